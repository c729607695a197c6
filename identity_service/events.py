"""Segment-spec events: what is emitted at prepare, at exchange, on a miss and per AMP hit.

A prepare emits a ``track`` for domain A at once, with domain A's context, and leaves a
*completion template* (the identity part of domain B's events) with the handoff. The
exchange adds its *facts* (event name, properties, domain B's context, time); ``complete``
joins the two into the completion ``track`` and, with a userId, an ``identify``.
``messageId`` is derived from the handoff and the step, so a re-delivery carries the same
id and a deduplicating destination counts it once.

AMP collect hits (amp/collect.py) emit a ``page`` or ``track`` call of their own
(``amp_hit_event``), with a random messageId: a hit carries no id to derive one from.

Every event is at most 32 KB as sent. Domain B's events are made of both halves, each
checked before the other is known: the completion track takes only the anonymousId and
userId from the handoff, so the exchange is checked with the longest ones; the identify
takes the handoff's traits and the exchange's context, which get half the limit each.
"""

import hashlib
import os
import uuid
from typing import Any

import orjson

from identity_service import __version__
from identity_service.constants import MAX_EVENT_BYTES, MAX_ID_LENGTH, SENT_AT_BYTES
from identity_service.sources import Source, origin_allowed

Event = dict[str, Any]
LIBRARY = {"name": "identity-service", "version": __version__}
# Of domain B's identify event, the exchange's context may take this much, the rest is
# the handoff's (its ids and traits).
EXCHANGE_CONTEXT_ROOM = MAX_EVENT_BYTES // 2


class EventTooLarge(ValueError):
    """An event would exceed what a Segment-compatible API accepts."""


def message_id(handoff_id: bytes, step: str) -> str:
    """A stable UUID-shaped messageId for one step of one handoff."""
    digest = hashlib.sha256(b"identity-service message " + handoff_id + step.encode()).digest()
    return _uuid_text(digest[:16])


def random_uuid() -> str:
    """``str(uuid.uuid4())``, without building the UUID object (a messageId on every hit)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 9562 variant
    return _uuid_text(raw)


def _uuid_text(raw: bytes | bytearray) -> str:
    """``str(uuid.UUID(bytes=raw))`` for 16 bytes."""
    h = raw.hex()
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
        # Domain B's events carry the exchange's context; an empty one is kept for the
        # forwarders of 0.2.0, which read it, during a rolling upgrade.
        "context": {},
        "preparedBy": source,
        "destinationOrigin": destination_origin,
    }


def exchange_facts(
    *,
    event: str,
    properties: dict[str, Any],
    context: dict[str, Any],
    receiver: Source,
    timestamp: str,
) -> dict[str, Any]:
    """What the exchange adds to the completion; ``receiver`` is the exchanging source.

    ``context`` is domain B's (its page, ip, userAgent...): domain B's events carry it.
    """
    return {
        "event": event,
        "properties": properties,
        "context": context,
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
    events = [_completed_track(template, facts)]
    if template["userId"] is not None:
        events.append(_identify(template, facts))
    return events


def completion_count(user_id: str | None) -> int:
    """How many events ``complete`` makes: the track, and an identify with a userId."""
    return 1 if user_id is None else 2


def _context_of(facts: dict[str, Any]) -> dict[str, Any]:
    # The facts of exchanges made by 0.2.0 have no context.
    return with_library(facts.get("context", {}))


def _completed_track(template: dict[str, Any], facts: dict[str, Any]) -> Event:
    return _identified(
        {
            "type": "track",
            "event": facts["event"],
            "properties": {**facts["properties"], "source": "cross_domain"},
            "context": _context_of(facts),
            "messageId": template["messageIds"]["completed"],
            "timestamp": facts["timestamp"],
            "integrations": {},
        },
        template["anonymousId"],
        template["userId"],
    )


def _identify(template: dict[str, Any], facts: dict[str, Any]) -> Event:
    return _identified(
        {
            "type": "identify",
            "traits": template["traits"],
            "context": _context_of(facts),
            "messageId": template["messageIds"]["identify"],
            "timestamp": facts["timestamp"],
            "integrations": {},
        },
        template["anonymousId"],
        template["userId"],
    )


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
        "context": _context_of(facts),
        "messageId": message_id(anonymous_id.bytes, "fallback"),
        "timestamp": facts["timestamp"],
        "integrations": {},
    }


def amp_hit_event(
    *,
    event: str | None,
    anonymous_id: str,
    anonymous_id_source: str,
    client_id: str | None,
    page: dict[str, str],
    properties: dict[str, Any],
    context: dict[str, Any],
    timestamp: str,
) -> Event:
    """An AMP collect hit: a ``page`` call, or a ``track`` call when the hit names an event.

    ``page`` holds the page fields the hit carried (url, title, referrer, path, search):
    they go in ``context.page`` and, as the Segment spec has them, in a page call's
    properties. AMP's clientId goes in ``context.amp``; ``anonymousId_source`` (cookie,
    amp_link, amp_client_id or generated) in the properties. A hit has no stable id of its
    own (amp-analytics sends none), so the messageId is random: a re-delivery of the
    outbox entry still carries the same one.
    """
    props: dict[str, Any] = {**properties, "anonymousId_source": anonymous_id_source}
    page_context = {**context, "page": page} if page else dict(context)
    if client_id is not None:
        page_context["amp"] = {"clientId": client_id}
    built: Event = {"type": "page" if event is None else "track"}
    if event is None:
        props = {**page, **props}
        if "title" in page:
            built["name"] = page["title"]
    else:
        built["event"] = event
    built.update(
        {
            "anonymousId": anonymous_id,
            "properties": props,
            "context": with_library(page_context),
            "messageId": random_uuid(),
            "timestamp": timestamp,
            "integrations": {},
        }
    )
    return built


def check_size(what: str, event: Event) -> None:
    """Raise EventTooLarge if ``event`` would exceed 32 KB as sent."""
    _check(what, size_as_sent(event))


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


def size_as_sent(event: Event) -> int:
    """An event's size in a batch: its JSON document and the sentAt that delivery adds."""
    return len(orjson.dumps(event)) + SENT_AT_BYTES


# Stand-ins for what a check does not know yet: the exchange's facts at prepare, and the
# handoff at exchange, with the longest ids a prepare accepts (each character written as
# \u00XX). A timestamp is as long as every iso_time.
_TIMESTAMP = "2000-01-01T00:00:00.000Z"
_NO_FACTS: dict[str, Any] = {"event": "", "properties": {}, "context": {}, "timestamp": _TIMESTAMP}
_LONGEST_ID = "\x00" * MAX_ID_LENGTH
_LARGEST_IDS = completion_template(
    handoff_id=b"",
    anonymous_id=_LONGEST_ID,
    user_id=_LONGEST_ID,
    traits={},
    source="",
    destination_origin="",
)


def check_prepare_sizes(started: list[Event], template: dict[str, Any]) -> None:
    """Raise EventTooLarge unless the prepare's events fit: the started track as it is,
    and domain B's identify (the handoff's traits) with room for the exchange's context."""
    for event in started:
        _check(f"{event['event']!r} track", size_as_sent(event))
    if template["userId"] is not None:
        size = size_as_sent(_identify(template, _NO_FACTS))
        room = EXCHANGE_CONTEXT_ROOM
        _check(
            "identify event",
            size + room,
            f"up to {size + room} bytes as sent ({size}, and {room} kept for the exchange's "
            "context)",
        )


def check_exchange_sizes(facts: dict[str, Any]) -> None:
    """Raise EventTooLarge if the exchange's facts could make one of domain B's events too
    large, whatever the handoff: the completion track with the longest ids, the identify
    with the largest traits the prepare lets through."""
    # Each event holds the facts' values at most once, beside a skeleton of its own (a
    # comma more for each merged object): facts this small cannot make an event too
    # large, and one dump of them saves building and dumping three events.
    size = len(orjson.dumps(facts)) + 2
    if size + _TRACK_SKELETON <= MAX_EVENT_BYTES and size <= EXCHANGE_CONTEXT_ROOM:
        return
    track = size_as_sent(_completed_track(_LARGEST_IDS, facts))
    _check(
        # Not by its name, which the exchange may have sent: a problem repeats no request text.
        "completion track",
        track,
        f"up to {track} bytes as sent (with the longest anonymousId and userId)",
    )
    bare = {**facts, "context": {}}
    added = size_as_sent(_identify(_LARGEST_IDS, facts)) - size_as_sent(
        _identify(_LARGEST_IDS, bare)
    )
    identify = MAX_EVENT_BYTES - EXCHANGE_CONTEXT_ROOM + added
    _check(
        "identify event",
        identify,
        f"up to {identify} bytes as sent (this context takes {added} of the "
        f"{EXCHANGE_CONTEXT_ROOM} it may)",
    )


def _check(what: str, size: int, how: str = "") -> None:
    if size > MAX_EVENT_BYTES:
        how = how or f"{size} bytes as sent"
        raise EventTooLarge(
            f"the {what} would be {how}; the limit is {MAX_EVENT_BYTES} bytes (32 KB)"
        )


def _identified(event: Event, anonymous_id: str | None, user_id: str | None) -> Event:
    if anonymous_id is not None:
        event["anonymousId"] = anonymous_id
    if user_id is not None:
        event["userId"] = user_id
    return event


# The completion track of the longest ids with nothing of the exchange in it.
_TRACK_SKELETON = size_as_sent(_completed_track(_LARGEST_IDS, _NO_FACTS))
