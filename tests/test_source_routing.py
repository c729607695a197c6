"""Per-site Segment sources: a destination with ``sources`` gets only those sources' events.

Domain A's started event goes to A's destination, domain B's completion and identify to
B's; without ``sources`` every destination gets every event. On both stores, through real
HTTP collectors.
"""

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from identity_service import app_keys
from identity_service.app import create_app
from identity_service.settings import Settings
from tests.collector import WRITE_KEY, Collector, running_collector
from tests.conftest import AppClient, exchange, prepare
from tests.test_outbox import FAST_DELIVERY

Clients = Callable[..., Awaitable[AppClient]]


@pytest.fixture
async def collectors() -> AsyncIterator[tuple[Collector, Collector]]:
    async with running_collector() as shop, running_collector() as checkout:
        yield shop, checkout


@pytest.fixture
def routed_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings_for: Callable[..., Settings],
    collectors: tuple[Collector, Collector],
) -> Clients:
    """The service with one destination per collector; ``sources`` maps a destination to
    the sources it names (None: no ``sources`` setting)."""

    async def build(sources: dict[str, list[str] | None], **env: str) -> AppClient:
        destinations: dict[str, dict[str, Any]] = {}
        for (name, names), collector in zip(sources.items(), collectors, strict=True):
            destinations[name] = {"url": collector.url, "write_key": WRITE_KEY}
            if names is not None:
                destinations[name]["sources"] = names
        settings = settings_for(destinations=json.dumps(destinations), **FAST_DELIVERY, **env)
        return await aiohttp_client(create_app(settings))

    return build


def summary(collector: Collector) -> list[tuple[str, str]]:
    """Each event as (its type or event name, its anonymousId), in the order received."""
    return sorted((e.get("event", e["type"]), e["anonymousId"]) for e in collector.events)


async def hand_off(client: AppClient, anonymous_id: str) -> None:
    """Shop prepares with a userId, checkout exchanges: 1 started, 1 completed, 1 identify."""
    token = (await prepare(client, anonymousId=anonymous_id, userId="user-42"))["token"]
    status, _ = await exchange(client, token, source="checkout")
    assert status == 200


STARTED, COMPLETED = "Cross-Domain Handoff Started", "Cross-Domain Handoff Completed"


async def test_each_sites_destination_gets_exactly_its_sources_events(
    routed_client: Clients, collectors: tuple[Collector, Collector]
) -> None:
    shop, checkout = collectors
    client = await routed_client({"shop-segment": ["shop"], "checkout-segment": ["checkout"]})
    await hand_off(client, "anon-first")
    status, generated = await exchange(client, "no-such-token", source="checkout", fallback=True)
    assert (status, generated["source"]) == (200, "generated")
    # A second handoff after the first: a destination's events arrive in order, so once
    # its events are in, any of the first's sent astray would be too.
    await hand_off(client, "anon-second")
    await shop.wait_for(2)
    await checkout.wait_for(5)

    assert summary(shop) == [(STARTED, "anon-first"), (STARTED, "anon-second")]
    assert summary(checkout) == sorted(
        [
            (COMPLETED, "anon-first"),
            ("identify", "anon-first"),
            (COMPLETED, generated["anonymousId"]),
            (COMPLETED, "anon-second"),
            ("identify", "anon-second"),
        ]
    )
    assert all(e["properties"]["source"] == "shop" for e in shop.events)


async def test_a_destination_without_sources_still_gets_every_event(
    routed_client: Clients, collectors: tuple[Collector, Collector]
) -> None:
    shop, everything = collectors
    client = await routed_client({"shop-segment": ["shop"], "everything": None})
    await hand_off(client, "anon-first")
    await hand_off(client, "anon-second")
    await shop.wait_for(2)
    await everything.wait_for(6)
    assert summary(shop) == [(STARTED, "anon-first"), (STARTED, "anon-second")]
    assert [name for name, _ in summary(everything)].count(STARTED) == 2
    assert len(everything.events) == 6


async def test_without_sources_every_destination_gets_every_event(
    routed_client: Clients, collectors: tuple[Collector, Collector]
) -> None:
    client = await routed_client({"one": None, "two": None})
    await hand_off(client, "anon-first")
    for collector in collectors:
        await collector.wait_for(3)
    assert summary(collectors[0]) == summary(collectors[1])
    assert {name for name, _ in summary(collectors[0])} == {STARTED, COMPLETED, "identify"}


@pytest.mark.parametrize("store_kind", ["redis"])
@pytest.mark.parametrize(
    ("sources", "tags"),
    [
        ({"one": None, "two": None}, set()),
        ({"one": ["shop"], "two": None}, {b"shop", b"checkout"}),
    ],
)
async def test_outbox_entries_carry_their_source_only_when_destinations_route(
    routed_client: Clients,
    redis_client: Redis,
    sources: dict[str, list[str] | None],
    tags: set[bytes | None],
) -> None:
    # No forwarder: the entries stay in the streams to be read here.
    client = await routed_client(sources, forwarder="off")
    await hand_off(client, "anon-first")
    redis_settings = client.app[app_keys.SETTINGS].redis
    assert redis_settings is not None
    found: list[Any] = []
    async for key in redis_client.scan_iter(match=f"{redis_settings.key_prefix}*:outbox"):
        found += [(fields or {}).get(b"s") for _, fields in await redis_client.xrange(key) or []]
    assert len(found) == 2  # the started entry and the completion entry
    assert set(found) == (tags or {None})
