"""``GET`` and ``POST /v1/amp/collect``: amp-analytics hits, the visitor cookie, clientId links.

A hit is what amp-analytics sends to ``.../v1/amp/collect?ampId=${clientId(<cookie>)}&...``
as an image, a beacon or an xhrpost. :func:`collect` takes it as plain values
(:class:`Hit`) and returns an :class:`Answer`, so the HTTP front (front.py) serves it
without aiohttp's request objects and :func:`handle_collect` is a thin aiohttp adapter.

Who may send a hit (the CORS rule of this endpoint):

- With an ``Origin`` header (beacons and xhrpost from a cache page; any cross-origin
  POST): the origin must be a publisher origin or one of its cache origins, checked by
  ``cors.allowed_origin`` (403 otherwise). The allowed origin is echoed with the CORS
  headers.
- With ``AMP-Same-Origin: true`` and no ``Origin``: a hit from the publisher's own page
  through the AMP runtime.
- With neither (an image pixel: browsers send no ``Origin`` on a no-cors image ``GET``):
  the hit is recorded, nothing is echoed, and it never records a link. A foreign page can
  make a visitor's browser send such a pixel with the visitor's cookie and any ``ampId``:
  a link recorded from it would let that page attribute its own clientId to the visitor.
  Links are recorded only from hits with an allowed cache ``Origin``. That stops foreign
  pages (a browser sets ``Origin`` itself), not other clients: the server cannot tell a
  forged ``Origin`` from a browser's, and curl can send one with any cookie value and any
  ``ampId``. Such a link names an id its sender already knew; it only attributes later
  hits, and a linked id is never given back (no ``Set-Cookie``).

Whichever of these, ``__amp_source_origin`` must be a publisher origin when present, and
is refused (403) when it occurs more than once in the query and the body together, as
``cors.check`` refuses it for the other endpoints.

What the hit is attributed to (``anonymousId_source``):

- ``cookie``: the visitor cookie was sent. From a cache origin with a clientId, the link
  clientId -> visitor is recorded too (unless consent is ``insufficient``).
- ``amp_link``: no cookie, but the cache clientId is linked to a visitor. No cookie is
  set: the link was recorded from an earlier request, which may have been forged (see
  above), so sending the linked id back would hand a visitor's id to whoever holds the
  clientId.
- ``amp_client_id``: no cookie and no link in a cache context: AMP's clientId itself. No
  cookie is set either: a new id in it would make the visitor a second person (the hit is
  the clientId's, the cookie another id's).
- ``generated``: no cookie on the publisher's origin (or no clientId at all): a new id,
  offered in ``Set-Cookie``.

Each hit that emits an event counts in ``identity_identities_total`` under its own AMP
``id_source`` (``amp_cookie``, ``amp_link``, ``amp_client_id``, ``amp_generated``), apart
from the exchanges' ``handoff`` and ``generated``.

The only cookie collect sets is that new id, which the service generated; it never sets a
value from the request or from a link.

Consent is the hit's ``consent`` parameter (amp-consent's ``CONSENT_STATE``): only
``insufficient`` denies, as an explicit ``analytics: false`` does for handoffs. A denied
hit emits no event (counted in ``identity_events_skipped_total{reason="consent"}``),
records no link and sets no cookie.

Store calls (``HandoffStore.hit_and_write``; on one Redis node, one script call each): a
hit counts its rate limits and writes its event and link in one call, and over a limit
writes nothing. A cookie-less cache hit reads its link with the count, and its event as the
clientId's is written in that call only when there is no link; with one, the event is
built once the link is read (it is sealed) and emitted in a second call. Where
the link is a write of its own (a Redis Cluster, whose keys lie in different slots), a link
that cannot be written is logged and counted (``identity_amp_link_failures_total``) and
the hit stands, as on the actions' path; on one node the event and the link are written
together or not at all. An event that cannot be emitted fails the hit (503).
"""

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import query_to_pairs

from identity_service import events as ev
from identity_service.amp import cookies, cors, limits, links
from identity_service.amp.context import AMP, AmpContext
from identity_service.clock import iso_time
from identity_service.constants import MAX_EVENT_BYTES
from identity_service.middleware import SECURITY_HEADERS, problem_for, problem_response
from identity_service.problems import (
    AmpOriginNotAllowed,
    OversizedEvent,
    PayloadTooLarge,
    Problem,
    UnsupportedHitType,
    ValidationFailed,
)
from identity_service.stores import Counted, Emitted
from identity_service.validation import json_object_members, parse_json_object

# Parameters that are not event properties.
CLIENT_ID = "ampId"
EVENT = "event"
CONSENT = "consent"
_NOT_PROPERTIES = frozenset({CLIENT_ID, EVENT, CONSENT, "__amp_source_origin"})
# Page fields, as Segment's page call and context.page name them.
PAGE_FIELDS = ("url", "title", "referrer", "path", "search")
CONSENT_DENIED = links.CONSENT_DENIED  # amp-consent's CONSENT_STATE when analytics is refused
MAX_VALUE_LENGTH = 2048  # of an event name or a page field
# What an event name or a page field must not hold: control characters (C0, DEL, C1).
# Not str.isprintable(), which also refuses format characters that real titles hold (a
# soft hyphen, an emoji's zero-width joiner, a right-to-left mark) and every character
# newer than Python's Unicode database (recent emoji): such a hit's event was lost.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORM = "application/x-www-form-urlencoded"
# An event is at most this much larger than what the hit sent: each byte sent becomes at
# most 6 as JSON (\u00XX), and page fields appear twice (properties, context.page).
_GROWTH = 12
_EVENT_OVERHEAD = 1024  # the event's own fields, ids, timestamp, library, sentAt
# Fields read whole when repeated; of any other, the last one counts.
# A repeated Origin or AMP-Same-Origin, joined, is no allowed value: it is refused.
_JOINED = {"cookie": "; ", "x-forwarded-for": ", ", "origin": " ", "amp-same-origin": " "}
# The header fields collect reads, by their lower-case names.
_READ = {
    name.encode(): name
    for name in (
        "origin",
        "amp-same-origin",
        "cookie",
        "referer",
        "x-forwarded-for",
        "user-agent",
        "content-type",
    )
}
# sendBeacon with a string body sends text/plain; amp-analytics' useBody sends JSON so.
_JSON_TYPES = frozenset({"application/json", "text/plain"})


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class Hit:
    """What collect reads of a request. ``headers`` maps lower-case names to values (those
    collect reads are enough)."""

    method: str
    query: str  # the raw query string, percent-encoded
    headers: Mapping[str, str]
    body: bytes
    peer: str | None  # the connection's peer address


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class Answer:
    """A bodiless answer: 204, or 302 to the configured next hop."""

    status: int
    headers: dict[str, str]


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class _Attribution:
    anonymous_id: str
    source: str
    set_cookie: str | None  # the id to keep in a new cookie, if any


async def handle_collect(request: web.Request) -> web.Response:
    """The aiohttp route: the request as a :class:`Hit`, the answer as a response."""
    ctx = request.app[AMP]
    peer = request.transport.get_extra_info("peername") if request.transport else None
    hit = Hit(
        method=request.method,
        query=request.raw_path.partition("?")[2],
        headers=headers_of(request.raw_headers),
        body=await request.read(),
        peer=peer_address(peer),
    )
    try:
        answer = await collect(ctx, hit)
    except Exception as exc:
        response = problem_response(problem_for(exc, ctx.metrics, ctx.settings), request)
        response.headers.update(cors.cors_headers(None))  # Vary: Origin on refusals too
        return response
    return web.Response(status=answer.status, headers={**SECURITY_HEADERS, **answer.headers})


async def collect_raw(
    ctx: AmpContext,
    method: str,
    target: bytes,
    raw_headers: list[tuple[bytes, bytes]],
    body: bytes,
    peername: Any,
) -> tuple[int, dict[str, str]]:
    """The HTTP front's entry (front.py): the request as parsed and the transport's
    ``peername``; the answer's status and header fields (the front adds its own security
    headers)."""
    query = target.partition(b"?")[2].decode("utf-8", "replace")
    hit = Hit(method, query, headers_of(raw_headers), body, peer_address(peername))
    answer = await collect(ctx, hit)
    return answer.status, answer.headers


def peer_address(peername: Any) -> str | None:
    """The address of a transport's ``peername`` (None for a Unix socket)."""
    return peername[0] if isinstance(peername, tuple) and peername else None


def headers_of(raw_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The header fields collect reads, as :class:`Hit` wants them (repeated ``Cookie`` and
    ``X-Forwarded-For`` fields joined); the others are not decoded. The actions read their
    cookie and address with it too."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = _READ.get(raw_name.lower())
        if name is None:
            continue
        value = raw_value.decode("latin-1").strip()
        joiner = _JOINED.get(name)
        if joiner is not None and name in headers:
            value = f"{headers[name]}{joiner}{value}"
        headers[name] = value
    return headers


async def collect(ctx: AmpContext, hit: Hit) -> Answer:
    """Record one hit; raise the problem that refuses it (403, 413, 415, 400, 429)."""
    amp = ctx.amp
    headers = hit.headers
    origin = headers.get("origin")
    same_origin_header = headers.get("amp-same-origin")
    same_origin = same_origin_header == "true"
    try:  # the one place these refusals are counted (a try costs nothing when none is)
        # Before the hit is read, whatever it carries: raises AmpOriginNotAllowed.
        echoed = _allowed_origin(ctx, origin, same_origin_header)
        params = _parameters(hit, amp.max_form_bytes, amp.max_form_fields)
        content = _content(params, amp.source, len(hit.query) + len(hit.body))
        # Before anything changes: raises AmpOriginNotAllowed.
        _check_source_origin(ctx, params)
    except Problem as problem:
        ctx.metrics.inc(cors.REFUSALS_METRIC, reason=_refusal_reason(problem))
        raise
    client_id = links.client_id_of(params.get(CLIENT_ID))
    cookie_id = cookies.visitor_id(headers.get("cookie"), amp.cookie)
    on_origin = _on_origin(ctx, origin, same_origin, cookie_id, client_id, headers.get("referer"))
    consent = params.get(CONSENT) != CONSENT_DENIED
    address = ctx.settings.trusted_proxies.client_ip(hit.peer, headers.get("x-forwarded-for"))
    counted = limits.counters(ctx, address, client_id)
    context = (
        "origin" if on_origin else "cache_with_cookie" if cookie_id else "cache_without_cookie"
    )
    user_agent = headers.get("user-agent")
    if not on_origin and cookie_id is None and client_id is not None and consent:
        # A cookie-less cache hit: its link is read with the count, and only then can its
        # event be built (the link is sealed).
        return await _linked_hit(ctx, counted, context, content, client_id, user_agent, echoed)
    counters = ctx.hit_counters
    who = _attribution(on_origin, cookie_id, client_id, None)
    emit = link = None
    oversized: OversizedEvent | None = None
    if consent:
        if ctx.settings.outbox.emits_events:
            try:
                emit = _emitted(ctx, _event(content, who, client_id, user_agent))
            except OversizedEvent as refused:
                oversized = refused  # refused once counted, as a hit is
        if (
            cookie_id is not None
            and client_id not in (None, cookie_id)
            and _from_cache(ctx, origin)
        ):
            assert client_id is not None
            link = links.sealed_link(ctx, client_id, cookie_id)
    # The counters, the event and the link in one store call: nothing written if over a limit.
    outcome = await ctx.store.hit_and_write(
        counted, emit=emit, keep=None if oversized is not None else link
    )
    limits.refuse_over(ctx, counted, outcome.counts)
    counters.by_context[context]()
    answer = _answer(ctx, echoed)
    if not consent:
        counters.consent_skipped()
        return answer
    if who.set_cookie is not None:
        answer.headers["Set-Cookie"] = cookies.set_cookie(who.set_cookie, amp.cookie)
    if oversized is not None:
        raise oversized
    if outcome.kept:
        links.link_recorded(ctx)
    elif outcome.keep_error is not None:
        links.link_not_recorded(ctx, outcome.keep_error)
    counters.by_attribution[who.source]()
    return answer


async def _linked_hit(
    ctx: AmpContext,
    counted: list[Counted],
    context: str,
    content: "_Content",
    client_id: str,
    user_agent: str | None,
    echoed: str | None,
) -> Answer:
    """A cookie-less cache hit (consent given), counted with its link read.

    Its event as the clientId's own goes in the same store call, written only when no link
    is found, as it mostly is not: one round trip. A link is sealed, so the event it
    attributes can only be built once the link is read, and goes in a second call.
    """
    token, key_id = links.link_key(ctx, client_id)
    emit: Emitted | None = None
    if ctx.settings.outbox.emits_events:
        try:
            unlinked = _attribution(False, None, client_id, None)
            emit = _emitted(ctx, _event(content, unlinked, client_id, user_agent))
        except OversizedEvent:
            pass  # built again below, with its link if any; still too large, refused then
    outcome = await ctx.store.hit_and_write(counted, peek=key_id, emit=emit, unless_peeked=True)
    limits.refuse_over(ctx, counted, outcome.counts)
    linked = links.opened_link(ctx, token, key_id, outcome.record)
    counters = ctx.hit_counters
    counters.by_context[context]()
    answer = _answer(ctx, echoed)
    who = _attribution(False, None, client_id, linked)
    if who.source == "amp_link":
        counters.link_attributions()
    if ctx.settings.outbox.emits_events and (emit is None or outcome.record is not None):
        # A link was found (one that does not open too: the store wrote nothing), or the
        # event was too large, which building it again raises.
        emit = _emitted(ctx, _event(content, who, client_id, user_agent))
        await ctx.store.emit(emit.shard_hint, emit.events, source=emit.source)
    counters.by_attribution[who.source]()
    return answer


def _emitted(ctx: AmpContext, event: ev.Event) -> Emitted:
    return Emitted(event["messageId"].encode(), [event], ctx.amp.source)


def _parameters(hit: Hit, max_bytes: int, max_fields: int) -> dict[str, Any]:
    """The query's parameters, then the body's (which win): an urlencoded form or JSON.

    Raises AmpOriginNotAllowed when ``__amp_source_origin`` occurs more than once in the
    query and the body together, as ``cors.check`` refuses it for the other endpoints.
    """
    if len(hit.query) > max_bytes or len(hit.body) > max_bytes:
        raise PayloadTooLarge(f"a hit's query and body must be at most {max_bytes} bytes each")
    query = hit.query if hit.query.isascii() else hit.query.encode("utf-8", "replace").decode()
    query_pairs = _form(query, max_fields)
    params: dict[str, Any] = dict(query_pairs)
    body_pairs: Sequence[tuple[str, Any]] = ()
    if hit.body:
        media_type = hit.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == _FORM:
            body_pairs = _form(hit.body.decode("utf-8", "replace"), max_fields)
            params.update(body_pairs)
        elif media_type in _JSON_TYPES or not media_type:
            document = parse_json_object(hit.body)
            if cors.SOURCE_ORIGIN_PARAM in document:  # orjson kept one of its repeats
                body_pairs = json_object_members(hit.body)
            params.update(document)
        else:
            raise UnsupportedHitType(
                f"send a hit as {_FORM} or JSON (text/plain or application/json)"
            )
        if len(params) > max_fields:
            raise PayloadTooLarge(f"a hit may carry at most {max_fields} parameters")
    # One lookup when absent, as it mostly is: the pairs are counted only when it is there.
    if cors.SOURCE_ORIGIN_PARAM in params and _repeats_source_origin(query_pairs, body_pairs):
        raise AmpOriginNotAllowed(f"{cors.SOURCE_ORIGIN_PARAM} must not repeat")
    return params


def _repeats_source_origin(*pairs: Sequence[tuple[str, Any]]) -> bool:
    names = (name for listed in pairs for name, _ in listed)
    return sum(name == cors.SOURCE_ORIGIN_PARAM for name in names) > 1


def _form(text: str, max_fields: int) -> list[tuple[str, str]]:
    """An urlencoded query or form, as ``urllib.parse.parse_qsl(text,
    keep_blank_values=True, max_num_fields=max_fields)`` reads it (yarl's C unquoting)."""
    try:
        return query_to_pairs(text, max_fields=max_fields)
    except ValueError as exc:
        raise PayloadTooLarge(f"a hit may carry at most {max_fields} parameters") from exc


def _has_control(value: str) -> bool:
    # isprintable() first: it answers most values in C, and the regex only those it refuses.
    return not value.isprintable() and _CONTROL.search(value) is not None


def _text(params: Mapping[str, Any], name: str) -> str | None:
    """A parameter that must be a short text without control characters, or None when
    absent or empty."""
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_VALUE_LENGTH or _has_control(value):
        raise ValidationFailed(
            [{"field": name, "message": f"must be a text of at most {MAX_VALUE_LENGTH} characters"}]
        )
    return value


def _allowed_origin(ctx: AmpContext, origin: str | None, same_origin: str | None) -> str | None:
    """The origin to echo (None: nothing to echo); raise AmpOriginNotAllowed.

    Judged from the header fields alone, before the hit is read: a refused ``Origin`` (or
    ``AMP-Same-Origin``) is a 403 whatever the hit carries. An image pixel (neither field)
    is let through with nothing echoed. ``__amp_source_origin``, which may be in the body,
    is checked once the hit is read (:func:`_check_source_origin`).
    """
    if origin is None and same_origin is None:
        return None
    return cors.allowed_origin(ctx.amp, origin, same_origin, None)


def _check_source_origin(ctx: AmpContext, params: Mapping[str, Any]) -> None:
    """Raise AmpOriginNotAllowed unless ``__amp_source_origin`` is absent or a publisher
    origin (present as anything else, a JSON null included, it is refused)."""
    if cors.SOURCE_ORIGIN_PARAM in params:
        cors.check_source_origin(ctx.amp, params[cors.SOURCE_ORIGIN_PARAM])


def _refusal_reason(problem: Problem) -> str:
    """The ``reason`` a refusal of the hit as sent counts under: ``origin`` for every origin
    refusal (the Origin, AMP-Same-Origin, ``__amp_source_origin``), as ``cors.check``
    counts them, else the problem's slug."""
    if isinstance(problem, AmpOriginNotAllowed):
        return "origin"
    return problem.slug.replace("-", "_")


def _on_origin(
    ctx: AmpContext,
    origin: str | None,
    same_origin: bool,
    cookie_id: str | None,
    client_id: str | None,
    referer: str | None,
) -> bool:
    """Whether the hit comes from the publisher's own page rather than a cache's.

    ``Origin`` (already allowed) or ``AMP-Same-Origin`` say so. A pixel carries neither:
    on the origin, AMP's clientId is the cookie itself, and the ``Referer`` (when the
    page's referrer policy sends one) names the page. This only chooses the attribution
    and the metric's label; links are recorded from an allowed cache ``Origin`` alone.
    """
    if origin is not None:
        return origin in ctx.amp.publisher_origins
    if same_origin or (cookie_id is not None and client_id in (None, cookie_id)):
        return True
    if referer:
        return any(referer.startswith(f"{o}/") for o in ctx.amp.publisher_origins)
    return False


def _from_cache(ctx: AmpContext, origin: str | None) -> bool:
    """The hit's ``Origin`` (already allowed) is a cache origin: a link may be recorded."""
    return origin is not None and origin not in ctx.amp.publisher_origins


def _attribution(
    on_origin: bool, cookie_id: str | None, client_id: str | None, linked: str | None
) -> _Attribution:
    if cookie_id is not None:
        return _Attribution(cookie_id, "cookie", None)
    if linked is not None:
        return _Attribution(linked, "amp_link", None)  # never given back: see the docstring
    if on_origin or client_id is None:
        new_id = cookies.new_visitor_id()
        return _Attribution(new_id, "generated", new_id)
    return _Attribution(client_id, "amp_client_id", None)


def _answer(ctx: AmpContext, echoed: str | None) -> Answer:
    headers = cors.cors_headers(echoed)  # Vary: Origin, and the CORS headers when echoed
    redirect = ctx.amp.collect_redirect
    if redirect is None:
        return Answer(204, headers)
    headers["Location"] = redirect
    return Answer(302, headers)


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class _Content:
    """What a hit's event says, besides who: its name, page fields and properties."""

    event: str | None
    page: dict[str, str]
    properties: dict[str, Any]
    size: int  # the query's and the body's bytes, which bound the event's size


def _content(params: Mapping[str, Any], source: str, size: int) -> _Content:
    page = {name: text for name in PAGE_FIELDS if (text := _text(params, name)) is not None}
    properties = {
        name: value
        for name, value in params.items()
        if name not in _NOT_PROPERTIES and name not in page
    }
    properties["source"] = source  # the configured source's name, as handoff events have
    return _Content(_text(params, EVENT), page, properties, size)


def _event(
    content: _Content, who: _Attribution, client_id: str | None, user_agent: str | None
) -> ev.Event:
    event = ev.amp_hit_event(
        event=content.event,
        anonymous_id=who.anonymous_id,
        anonymous_id_source=who.source,
        client_id=client_id,
        page=content.page,
        properties=content.properties,
        context={"userAgent": user_agent} if user_agent else {},
        timestamp=iso_time(time.time()),
    )
    if content.size * _GROWTH + len(user_agent or "") * 6 > MAX_EVENT_BYTES - _EVENT_OVERHEAD:
        # Only a large hit can make an event too large: smaller ones are not measured.
        try:
            ev.check_size("collect event", event)
        except ev.EventTooLarge as exc:
            raise OversizedEvent(f"{exc}; send fewer or shorter parameters") from exc
    return event
