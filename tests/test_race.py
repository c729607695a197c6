"""Single use under contention: of 200 concurrent exchanges of one token, exactly one wins
(in memory, on one Redis, and with `make topology` on a Cluster and behind Sentinel)."""

import asyncio
from collections import Counter

import pytest

from tests.conftest import TOPOLOGY_KINDS, AppClient, exchange, prepare


@pytest.fixture(params=["memory", "redis", *TOPOLOGY_KINDS])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


CONCURRENT_EXCHANGES = 200


async def test_exactly_one_of_200_concurrent_exchanges_succeeds(client: AppClient) -> None:
    for _ in range(3):
        token = (await prepare(client))["token"]

        results = await asyncio.gather(
            *(exchange(client, token) for _ in range(CONCURRENT_EXCHANGES))
        )

        statuses = Counter(status for status, _ in results)
        assert statuses == {200: 1, 404: CONCURRENT_EXCHANGES - 1}
        winners = [body for status, body in results if status == 200]
        assert winners[0]["anonymousId"] == "anon-7f3a"
