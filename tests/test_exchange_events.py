"""Domain B's events: the exchange's context, the 32 KB event limit and the skipped events.

Events are read from the JSON-lines file sink, which the forwarder writes on both stores
(on Redis they pass through the outbox: the exchange's facts travel with its entry).
"""

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from identity_service import __version__, app_keys
from identity_service import events as ev
from identity_service.constants import MAX_EVENT_BYTES
from identity_service.sources import Source
from tests.conftest import AppClient, ClientFactory, exchange, prepare
from tests.test_outbox import VALIDATOR

LIBRARY = {"name": "identity-service", "version": __version__}
A_CONTEXT = {
    "page": {"url": "https://www.example.com/cart"},
    "ip": "203.0.113.7",
    "userAgent": "UA-of-domain-A",
}
B_CONTEXT = {
    "page": {"url": "https://checkout.example-pay.com/cart", "referrer": ""},
    "ip": "198.51.100.9",
    "userAgent": "UA-of-domain-B",
    "locale": "de-DE",
}
# The detail of every event-too-large problem: the event, its size as sent, the limit.
TOO_LARGE = re.compile(
    r"^the (.+) would be (?:up to )?(\d+) bytes as sent.*; "
    rf"the limit is {MAX_EVENT_BYTES} bytes \(32 KB\)"
)


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


@pytest.fixture
async def events_client(make_client: ClientFactory, events_file: Path) -> AppClient:
    """A client whose service writes its events to ``events_file`` and takes 64 KB bodies."""
    return await make_client(
        events_file=str(events_file), batch_max_wait="0.01", max_body_bytes="65536"
    )


def written(events_file: Path) -> list[bytes]:
    return events_file.read_bytes().splitlines() if events_file.exists() else []


async def delivered(events_file: Path, count: int) -> dict[str, dict[str, Any]]:
    """The first ``count`` events written, by event name (``identify`` for an identify)."""
    deadline = time.monotonic() + 30
    while len(lines := written(events_file)) < count:
        assert time.monotonic() < deadline, f"{len(lines)} of {count} events arrived"
        await asyncio.sleep(0.02)
    events = [orjson.loads(line) for line in lines]
    for event in events:
        VALIDATOR.validate(event)
    return {event.get("event", event["type"]): event for event in events}


def size_in_detail(problem: dict[str, Any]) -> int:
    """The event size that an event-too-large problem's detail names, checked to be over."""
    assert problem["type"] == "urn:identity-service:problem:event-too-large", problem
    found = TOO_LARGE.match(problem["detail"])
    assert found is not None, problem["detail"]
    size = int(found.group(2))
    assert size > MAX_EVENT_BYTES, problem["detail"]
    return size


# Issue 10: domain B's events carry domain B's context.


async def test_completion_and_identify_carry_the_exchange_context_and_started_keeps_a_s(
    events_client: AppClient, events_file: Path
) -> None:
    token = (await prepare(events_client, userId="user-42", context=A_CONTEXT))["token"]

    status, identity = await exchange(events_client, token, context=B_CONTEXT)

    assert status == 200
    assert identity["context"] == A_CONTEXT  # the answer is the identity domain A handed off
    events = await delivered(events_file, 3)
    assert events["Cross-Domain Handoff Started"]["context"] == {**A_CONTEXT, "library": LIBRARY}
    assert events["Cross-Domain Handoff Completed"]["context"] == {
        **B_CONTEXT,
        "library": LIBRARY,
    }
    assert events["identify"]["context"] == {**B_CONTEXT, "library": LIBRARY}


async def test_without_an_exchange_context_domain_b_events_carry_only_the_library(
    events_client: AppClient, events_file: Path
) -> None:
    token = (await prepare(events_client, userId="user-42", context=A_CONTEXT))["token"]
    assert (await exchange(events_client, token))[0] == 200

    events = await delivered(events_file, 3)

    assert events["Cross-Domain Handoff Completed"]["context"] == {"library": LIBRARY}
    assert events["identify"]["context"] == {"library": LIBRARY}


async def test_the_library_context_is_not_replaced_by_the_exchange_context(
    events_client: AppClient, events_file: Path
) -> None:
    token = (await prepare(events_client))["token"]
    context = {**B_CONTEXT, "library": {"name": "analytics.js", "version": "5"}}
    assert (await exchange(events_client, token, context=context))[0] == 200

    events = await delivered(events_file, 2)

    assert events["Cross-Domain Handoff Completed"]["context"]["library"] == LIBRARY


async def test_a_fallback_completion_carries_the_exchange_context(
    events_client: AppClient, events_file: Path
) -> None:
    status, identity = await exchange(
        events_client, "expired-or-unknown", fallback=True, context=B_CONTEXT
    )
    assert status == 200

    (event,) = (await delivered(events_file, 1)).values()

    assert event["anonymousId"] == identity["anonymousId"]
    assert event["context"] == {**B_CONTEXT, "library": LIBRARY}


async def test_an_exchange_context_that_is_not_an_object_is_refused(
    events_client: AppClient,
) -> None:
    token = (await prepare(events_client))["token"]
    status, problem = await exchange(events_client, token, context="en-US")
    assert status == 400
    assert problem["errors"] == [{"field": "context", "message": "must be an object"}]
    assert (await exchange(events_client, token))[0] == 200


async def test_the_exchange_context_counts_toward_the_event_limit(
    events_client: AppClient,
) -> None:
    token = (await prepare(events_client, userId="user-42"))["token"]

    status, problem = await exchange(events_client, token, context={"blob": "x" * 40_000})

    assert status == 413
    assert size_in_detail(problem) > 40_000
    # Refused before the store was touched: the token is still good.
    assert (await exchange(events_client, token, context=B_CONTEXT))[0] == 200


# Issue 11: the event-too-large detail, and what identity_events_skipped_total counts.


async def test_exchange_refusal_names_the_track_size_and_the_32_kb_limit(
    events_client: AppClient,
) -> None:
    token = (await prepare(events_client))["token"]

    # Found in review: the event's name, the exchange's own text, came back in the detail.
    name = "<img src=x onerror=alert(1)>"
    status, problem = await exchange(
        events_client, token, event=name, properties={"blob": "x" * 40_000}
    )

    assert status == 413
    assert problem["detail"].startswith("the completion track would be up to ")
    assert "img" not in orjson.dumps(problem).decode()
    assert size_in_detail(problem) > 40_000
    assert (await exchange(events_client, token))[0] == 200


async def test_properties_whose_event_fits_in_32_kb_are_accepted(
    events_client: AppClient, events_file: Path
) -> None:
    # Over half the limit, which the exchange's properties were held to before.
    token = (await prepare(events_client))["token"]
    properties = {"blob": "x" * 24_000}

    status, _ = await exchange(events_client, token, properties=properties)

    assert status == 200
    completed = (await delivered(events_file, 2))["Cross-Domain Handoff Completed"]
    assert completed["properties"] == {**properties, "source": "cross_domain"}
    assert len(orjson.dumps(completed)) <= MAX_EVENT_BYTES


async def test_prepare_refusals_name_the_event_size_and_the_32_kb_limit(
    events_client: AppClient,
) -> None:
    body = {"anonymousId": "a", "destination": "https://checkout.example-pay.com/"}
    headers = {"Authorization": "Bearer shop-write-key-8b1f0c"}
    big = {"blob": "x" * 40_000}

    for fields, event in (
        ({"context": big}, "'Cross-Domain Handoff Started' track"),
        ({"userId": "u-1", "traits": big}, "identify event"),
    ):
        response = await events_client.post(
            "/v1/handoffs", json={**body, **fields}, headers=headers
        )
        problem = await response.json(content_type=None)
        assert response.status == 413
        assert problem["detail"].startswith(f"the {event} would be ")
        assert size_in_detail(problem) > 40_000


async def test_traits_without_a_user_id_are_in_no_event_and_not_limited_by_it(
    events_client: AppClient,
) -> None:
    # Only an identify carries traits, and only a handoff with a userId has one.
    answer = await events_client.post(
        "/v1/handoffs",
        json={
            "anonymousId": "a",
            "destination": "https://checkout.example-pay.com/",
            "traits": {"blob": "x" * 40_000},
        },
        headers={"Authorization": "Bearer shop-write-key-8b1f0c"},
    )
    assert answer.status == 201


@pytest.mark.parametrize(("fields", "held_back"), [({}, 2), ({"userId": "user-42"}, 3)])
async def test_denied_consent_counts_every_event_held_back(
    client: AppClient, fields: dict[str, str], held_back: int
) -> None:
    token = (await prepare(client, consent={"analytics": False}, **fields))["token"]
    assert (await exchange(client, token))[0] == 200

    metrics = client.app[app_keys.METRICS]
    assert metrics.value("identity_events_skipped_total", reason="consent") == held_back


@pytest.mark.parametrize("context_size", [0, 8_000, 16_000, 16_380, 16_400])
def test_the_size_check_passes_only_facts_whose_events_fit(context_size: int) -> None:
    """Around the limits, the check's shortcut never lets through an event over 32 KB."""
    for properties_size in range(0, 33_000, 97):
        facts = ev.exchange_facts(
            event="Checkout Started",
            properties={"p": "x" * properties_size},
            context={"c": "y" * context_size},
            receiver=Source(name="checkout", write_key_digest=b""),
            timestamp="2026-11-30T00:00:00.000Z",
        )
        try:
            ev.check_exchange_sizes(facts)
        except ev.EventTooLarge:
            continue
        track = ev._completed_track(ev._LARGEST_IDS, facts)
        assert ev.size_as_sent(track) <= MAX_EVENT_BYTES
        bare = ev._identify(ev._LARGEST_IDS, {**facts, "context": {}})
        added = ev.size_as_sent(ev._identify(ev._LARGEST_IDS, facts)) - ev.size_as_sent(bare)
        assert added <= ev.EXCHANGE_CONTEXT_ROOM


def test_random_uuids_are_version_4_uuids_as_the_uuid_module_writes_them() -> None:
    drawn = {ev.random_uuid() for _ in range(2000)}
    assert len(drawn) == 2000
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_message_ids_are_stable_uuid_shaped_texts_per_handoff_step() -> None:
    first = ev.message_id(b"handoff-1", "started")
    assert first == ev.message_id(b"handoff-1", "started")
    assert first != ev.message_id(b"handoff-1", "completed")
    assert str(uuid.UUID(first)) == first
