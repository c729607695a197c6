"""Events reach a real collector exactly as the Segment spec and the issue say, on both stores."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from identity_service import __version__, app_keys
from identity_service.app import create_app
from identity_service.settings import Settings
from tests.collector import WRITE_KEY, Collector, running_collector
from tests.conftest import AppClient, exchange, make_settings, prepare

SEGMENT_EVENT = {
    "type": "object",
    "required": ["type", "messageId", "timestamp", "sentAt", "context", "integrations"],
    "anyOf": [{"required": ["anonymousId"]}, {"required": ["userId"]}],
    "properties": {
        "type": {"enum": ["track", "identify"]},
        "messageId": {"type": "string", "minLength": 1},
        "timestamp": {"type": "string", "format": "date-time"},
        "sentAt": {"type": "string", "format": "date-time"},
        "anonymousId": {"type": "string", "minLength": 1},
        "userId": {"type": "string", "minLength": 1},
        "integrations": {"type": "object"},
        "context": {
            "type": "object",
            "required": ["library"],
            "properties": {
                "library": {
                    "type": "object",
                    "required": ["name", "version"],
                    "properties": {"name": {"const": "identity-service"}},
                }
            },
        },
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "track"}}},
            "then": {
                "required": ["event", "properties"],
                "properties": {"event": {"type": "string", "minLength": 1}},
            },
        },
        {
            "if": {"properties": {"type": {"const": "identify"}}},
            "then": {"required": ["traits"], "properties": {"traits": {"type": "object"}}},
        },
    ],
}
VALIDATOR = Draft202012Validator(SEGMENT_EVENT, format_checker=Draft202012Validator.FORMAT_CHECKER)
FAST_DELIVERY = {
    "batch_max_wait": "0.05",
    "backoff_base": "0.05",
    "backoff_max": "0.2",
    "delivery_timeout": "0.5",
}


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as running:
        yield running


EventClientFactory = Callable[..., Awaitable[AppClient]]


@pytest.fixture
def event_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings_for: Callable[..., Settings],
    collector: Collector,
) -> EventClientFactory:
    async def build(**env: str) -> AppClient:
        settings = settings_for(
            destination_url=collector.url,
            destination_write_key=WRITE_KEY,
            **{**FAST_DELIVERY, **env},
        )
        return await aiohttp_client(create_app(settings))

    return build


def by_type(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    for event in events:
        found[event.get("event", event["type"])] = event
    return found


async def test_a_handoff_delivers_started_completed_and_identify(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client()
    context = {"page": {"url": "https://www.example.com/cart"}, "userAgent": "UA/1"}
    token = (await prepare(client, userId="user-42", traits={"plan": "pro"}, context=context))[
        "token"
    ]
    status, _ = await exchange(
        client, token, event="Checkout Started", properties={"cart_value": 42}
    )
    assert status == 200

    await collector.wait_for(3)

    assert len(collector.events) == 3
    for event in collector.events:
        VALIDATOR.validate(event)
        assert event["anonymousId"] == "anon-7f3a"
        assert event["userId"] == "user-42"
        assert event["context"]["library"] == {"name": "identity-service", "version": __version__}
    events = by_type(collector.events)
    started = events["Cross-Domain Handoff Started"]
    assert started["type"] == "track"
    # Domain A's context; domain B's events carry the exchange's (test_exchange_events.py).
    assert started["context"]["userAgent"] == "UA/1"
    assert started["properties"] == {
        "destination_origin": "https://checkout.example-pay.com",
        "source": "shop",
    }
    completed = events["Checkout Started"]
    assert completed["properties"] == {"cart_value": 42, "source": "cross_domain"}
    identify = events["identify"]
    assert identify["traits"] == {"plan": "pro"}
    assert len({e["messageId"] for e in collector.events}) == 3
    assert all(request.gzipped for request in collector.requests)


async def test_completion_event_has_the_default_name_and_no_identify_without_user_id(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client()
    token = (await prepare(client))["token"]
    await exchange(client, token)
    await collector.wait_for(2)
    names = sorted(e["event"] for e in collector.events)
    assert names == ["Cross-Domain Handoff Completed", "Cross-Domain Handoff Started"]
    completed = by_type(collector.events)["Cross-Domain Handoff Completed"]
    assert completed["properties"] == {"source": "cross_domain"}
    assert "userId" not in completed


async def test_a_fallback_emits_the_completion_with_the_generated_id(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client()
    status, identity = await exchange(client, "expired-or-unknown", fallback=True)
    assert status == 200

    await collector.wait_for(1)

    (event,) = collector.events
    VALIDATOR.validate(event)
    assert event["anonymousId"] == identity["anonymousId"]
    assert uuid.UUID(event["anonymousId"]).version == 4
    assert event["properties"] == {"source": "cross_domain", "anonymousId_source": "generated"}


async def test_visitors_with_the_same_stale_token_get_events_of_their_own(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client()
    answers = [await exchange(client, "undefined", fallback=True) for _ in range(2)]
    await collector.wait_for(2)
    ids = {identity["anonymousId"] for _, identity in answers}
    assert {event["anonymousId"] for event in collector.events} == ids and len(ids) == 2
    # A deduplicating destination would drop the second if they shared a messageId.
    assert len({event["messageId"] for event in collector.events}) == 2


async def test_denied_analytics_consent_emits_nothing_and_counts_the_skip(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client()
    denied = (await prepare(client, consent={"analytics": False}))["token"]
    assert (await exchange(client, denied))[0] == 200
    allowed = (await prepare(client, anonymousId="allowed", consent={"analytics": True}))["token"]
    assert (await exchange(client, allowed))[0] == 200

    await collector.wait_for(2)
    await asyncio.sleep(0.2)

    assert {e["anonymousId"] for e in collector.events} == {"allowed"}
    metrics = client.app[app_keys.METRICS]
    assert metrics.value("identity_events_skipped_total", reason="consent") == 2


async def test_a_refused_exchange_emits_no_completion(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client()
    token = (await prepare(client, userId="u-1"))["token"]
    status, _ = await exchange(client, token, source="partner")
    assert status == 403
    allowed = (await prepare(client, anonymousId="second"))["token"]
    assert (await exchange(client, allowed))[0] == 200

    await collector.wait_for(3)
    await asyncio.sleep(0.2)

    names = sorted((e["anonymousId"], e.get("event", e["type"])) for e in collector.events)
    assert names == [
        ("anon-7f3a", "Cross-Domain Handoff Started"),
        ("second", "Cross-Domain Handoff Completed"),
        ("second", "Cross-Domain Handoff Started"),
    ]


async def test_exchange_properties_over_the_limit_are_refused_before_the_token_is_used(
    event_client: EventClientFactory,
) -> None:
    client = await event_client(max_body_bytes="65536")
    token = (await prepare(client))["token"]
    status, problem = await exchange(client, token, properties={"blob": "x" * 40_000})
    assert status == 413
    assert problem["type"] == "urn:identity-service:problem:event-too-large"
    assert (await exchange(client, token, properties={"small": 1}))[0] == 200


async def test_an_event_over_32_kb_is_refused_at_prepare(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client(max_body_bytes="65536")
    response = await client.post(
        "/v1/handoffs",
        json={
            "anonymousId": "a",
            "userId": "u-1",  # the identify carries the traits
            "destination": "https://checkout.example-pay.com/",
            "traits": {"blob": "x" * 40_000},
        },
        headers={"Authorization": f"Bearer {'shop-write-key-8b1f0c'}"},
    )
    problem = await response.json(content_type=None)
    assert response.status == 413
    assert problem["type"] == "urn:identity-service:problem:event-too-large"
    await asyncio.sleep(0.2)
    assert collector.requests == []


async def test_outbox_off_emits_nothing(
    event_client: EventClientFactory, collector: Collector
) -> None:
    client = await event_client(outbox="off")
    token = (await prepare(client))["token"]
    assert (await exchange(client, token))[0] == 200
    await asyncio.sleep(0.3)
    assert collector.requests == []


async def test_embedded_mode_writes_events_to_a_jsonl_file(
    aiohttp_client: Callable[..., Awaitable[AppClient]], tmp_path: Path
) -> None:
    events_file = tmp_path / "events.jsonl"
    settings = make_settings(events_file=str(events_file), batch_max_wait="0.01")
    client = await aiohttp_client(create_app(settings))
    token = (await prepare(client))["token"]
    await exchange(client, token)
    for _ in range(200):
        if events_file.exists() and len(events_file.read_text().splitlines()) == 2:
            break
        await asyncio.sleep(0.02)
    events = [orjson.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["event"] for e in events] == [
        "Cross-Domain Handoff Started",
        "Cross-Domain Handoff Completed",
    ]
    for event in events:
        VALIDATOR.validate(event)


async def test_pending_memory_events_are_delivered_at_shutdown(
    aiohttp_client: Callable[..., Awaitable[AppClient]], tmp_path: Path
) -> None:
    events_file = tmp_path / "events.jsonl"
    # A long batch window: the events are still queued when the app stops.
    settings = make_settings(events_file=str(events_file), batch_max_wait="30")
    client = await aiohttp_client(create_app(settings))
    await prepare(client)
    await asyncio.sleep(0.1)
    await client.close()
    assert len(events_file.read_text().splitlines()) == 1
