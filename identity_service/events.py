"""Segment-spec events for handoffs: what is emitted at prepare, at exchange and on a miss.

A prepare emits a ``track`` for domain A at once, and leaves a *completion template* (the
identity part of domain B's events) with the handoff. The exchange adds its *facts* (event
name, properties, time); ``complete`` joins the two into the completion ``track`` and, with
a userId, an ``identify``. ``messageId`` is derived from the handoff and the step, so a
re-delivery carries the same id and a deduplicating destination counts it once.
"""

import hashlib
import uuid
from typing import Any

import orjson

from identity_service import __version__
from identity_service.constants import MAX_EVENT_BYTES, SENT_AT_BYTES
from identity_service.sources import Source, origin_allowed

Event = dict[str, Any]
# An event as stored, leaving room for the sentAt that delivery adds.
MAX_STORED_EVENT_BYTES = MAX_EVENT_BYTES - SENT_AT_BYTES
LIBRARY = {"name": "identity-service", "version": __version__}


class EventTooLarge(ValueError):
    """An event would exceed what a Segment-compatible API accepts."""


def message_id(handoff_id: bytes, step: str) -> str:
    """A stable UUID-shaped messageId for one step of one handoff."""
    digest = hashlib.sha256(b"identity-service message " + handoff_id + step.encode()).digest()
    h = digest[:16].hex()  # str(uuid.UUID(bytes=digest[:16])), without building the UUID
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def with_library(context: dict[str, Any]) -> dict[str, Any]:
    return {**context, "library": LIBRARY}


def analytics_allowed(consent: dict[str, bool]) -> bool:
    """False only when the visitor's consent explicitly denies analytics."""
    return consent.get("analytics", True) is not False


def started_event(
    *,
    handoff_id: bytes,
    name: str,
    anonymous_id: str | None,
    user_id: str | None,
    context: dict[str, Any],
    destination_origin: str,
    source: str,
    timestamp: str,
) -> Event:
    return _identified(
        {
            "type": "track",
            "event": name,
            "properties": {"destination_origin": destination_origin, "source": source},
            "context": with_library(context),
            "messageId": message_id(handoff_id, "started"),
            "timestamp": timestamp,
            "integrations": {},
        },
        anonymous_id,
        user_id,
    )


def completion_template(
    *,
    handoff_id: bytes,
    anonymous_id: str | None,
    user_id: str | None,
    traits: dict[str, Any],
    context: dict[str, Any],
    source: str,
    destination_origin: str,
) -> dict[str, Any]:
    """What domain B's events need from the handoff, kept with it until the exchange."""
    return {
        "messageIds": {
            "completed": message_id(handoff_id, "completed"),
            "identify": message_id(handoff_id, "identify"),
        },
        "anonymousId": anonymous_id,
        "userId": user_id,
        "traits": traits,
        "context": context,
        "preparedBy": source,
        "destinationOrigin": destination_origin,
    }


def exchange_facts(
    *, event: str, properties: dict[str, Any], receiver: Source, timestamp: str
) -> dict[str, Any]:
    """What the exchange adds to the completion; ``receiver`` is the exchanging source."""
    return {
        "event": event,
        "properties": properties,
        "source": receiver.name,
        "receiverOrigins": sorted(receiver.origins),
        "receiverAllowsLocalhost": receiver.allow_localhost,
        "timestamp": timestamp,
    }


def complete(template: dict[str, Any], facts: dict[str, Any]) -> list[Event]:
    """Domain B's events for an exchanged handoff: the completion track, and an identify.

    None when the exchanging source may not receive the handoff's origin: that exchange
    was refused (403), and the store wrote its facts before the check could run.
    """
    allowed = origin_allowed(
        template["destinationOrigin"], facts["receiverOrigins"], facts["receiverAllowsLocalhost"]
    )
    if not allowed:
        return []
    context = with_library(template["context"])
    properties = {**facts["properties"], "source": "cross_domain"}
    events = [
        _identified(
            {
                "type": "track",
                "event": facts["event"],
                "properties": properties,
                "context": context,
                "messageId": template["messageIds"]["completed"],
                "timestamp": facts["timestamp"],
                "integrations": {},
            },
            template["anonymousId"],
            template["userId"],
        )
    ]
    if template["userId"] is not None:
        events.append(
            _identified(
                {
                    "type": "identify",
                    "traits": template["traits"],
                    "context": context,
                    "messageId": template["messageIds"]["identify"],
                    "timestamp": facts["timestamp"],
                    "integrations": {},
                },
                template["anonymousId"],
                template["userId"],
            )
        )
    return events


def fallback_event(*, anonymous_id: uuid.UUID, facts: dict[str, Any]) -> Event:
    """The completion track for a miss answered with a generated anonymousId.

    Its messageId comes from that new id, not from the token: many visitors may arrive
    with one stale token (or "undefined"), and a deduplicating destination would keep
    only the first of their events.
    """
    return {
        "type": "track",
        "event": facts["event"],
        "anonymousId": str(anonymous_id),
        "properties": {
            **facts["properties"],
            "source": "cross_domain",
            "anonymousId_source": "generated",
        },
        "context": with_library({}),
        "messageId": message_id(anonymous_id.bytes, "fallback"),
        "timestamp": facts["timestamp"],
        "integrations": {},
    }


def encode(event: Event) -> bytes:
    """An event as a JSON document, in a buffer of its own size, to be kept a while.

    orjson (3.12 and later) returns every document in a buffer of at least 4 KiB. Events
    wait in queues and in-flight batches, where that was 4 KiB held for a 600-byte event.
    Joining it with nothing copies it into a new, exact buffer (faster than memoryview).
    """
    return b"".join((orjson.dumps(event), b""))


def join_documents(events: list[Event]) -> bytes:
    """Events as one JSON document a line, as the outbox keeps them.

    The forwarder splits them without parsing: orjson escapes every newline in a string.
    """
    return b"\n".join(orjson.dumps(event) for event in events)


def split_documents(documents: bytes) -> list[bytes]:
    return documents.split(b"\n") if documents else []


def check_size(*documents: Any, limit: int = MAX_STORED_EVENT_BYTES) -> None:
    for document in documents:
        size = len(orjson.dumps(document))
        if size > limit:
            raise EventTooLarge(f"an event would be {size} bytes; the limit is {limit}")


def _identified(event: Event, anonymous_id: str | None, user_id: str | None) -> Event:
    if anonymous_id is not None:
        event["anonymousId"] = anonymous_id
    if user_id is not None:
        event["userId"] = user_id
    return event
