"""What a dump of Redis would reveal after a prepare: neither the token nor the identity
(on one node, and with `make topology` on every node of a 3-master Cluster)."""

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from identity_service.app import create_app
from tests.conftest import AppClient, exchange, make_settings, prepare
from tests.redis_server import RedisServer
from tests.redis_topologies import Cluster

SECRET_VALUES: dict[str, Any] = {
    "anonymousId": "anon-5c1e9d2b-4f7a",
    "userId": "user-d81f2a",
    "traits": {"email": "visitor@example.com"},
}


async def dump(redis: Redis) -> bytes:
    """Every key and value (strings, hashes, streams) in the server, concatenated."""
    parts: list[Any] = []
    async for key in redis.scan_iter(count=1000):
        parts.append(key)
        kind = await redis.type(key)
        if kind == b"string":
            parts.append(await redis.get(key))
        elif kind == b"hash":
            parts += [*(await redis.hgetall(key)).items()]
        elif kind == b"stream":
            parts += [fields for _, fields in await redis.xrange(key) or []]
    return b"\n".join(flatten(parts))


def flatten(value: Any) -> list[bytes]:
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, dict):
        return flatten(list(value.items()))
    if isinstance(value, list | tuple):
        return [part for item in value for part in flatten(item)]
    raise TypeError(f"unexpected {type(value).__name__} in a Redis reply")


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.topology)])
async def dumped(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, list[Redis]]]:
    """A Redis URL, and a client of each of its nodes (the three masters of a Cluster)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url, nodes = server.url, [server.url]
    else:
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        url, nodes = cluster.url, [node.url for node in cluster.nodes]
    clients = [Redis.from_url(node) for node in nodes]
    yield url, clients
    for client in clients:
        await client.aclose()


async def test_a_dump_of_redis_holds_neither_token_nor_identity(
    aiohttp_client: Callable[..., Awaitable[AppClient]], dumped: tuple[str, list[Redis]]
) -> None:
    url, nodes = dumped
    client = await aiohttp_client(create_app(make_settings(url)))
    token = (await prepare(client, **SECRET_VALUES))["token"]
    raw_token = base64.urlsafe_b64decode(token + "=")

    contents = b"\n".join([await dump(node) for node in nodes])

    assert b":handoff:" in contents, "the handoff should be in Redis"
    assert b":outbox" in contents, "its started event should be in the outbox stream"
    forbidden = [
        token.encode(),
        raw_token,
        raw_token.hex().encode(),
        base64.b64encode(raw_token),
        SECRET_VALUES["anonymousId"].encode(),
        SECRET_VALUES["userId"].encode(),
        b"visitor@example.com",
        b"checkout.example-pay.com",
    ]
    for value in forbidden:
        assert value not in contents
    # And the handoff still works: the sealed record opens with the token.
    status, identity = await exchange(client, token)
    assert (status, identity["anonymousId"]) == (200, SECRET_VALUES["anonymousId"])
