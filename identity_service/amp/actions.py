"""The origin hop for state changes: ``POST /v1/amp/actions/{name}`` and its ``complete`` GET.

AMP Camp's add-to-cart hop, made safe (docs/amp.md walks through it):

- ``handle_submit`` takes an amp-form ``action-xhr`` submission. CORS is checked first (a
  refused origin learns nothing, not even which actions exist), then the action's name,
  the form (forms.py) and the rate limits. From a publisher origin, or with the visitor
  cookie, the action is applied at once through its signed webhook (webhooks.py) and the
  answer is ``200 {"status": "applied"}``. From a cache without the cookie, the fields are
  sealed under a one-time action token kept ``action_ttl`` seconds and the answer is ``200
  {"status": "redirecting"}`` with ``AMP-Redirect-To`` set to the ``complete`` URL under the
  configured ``public_url``: built from configuration and the token only, never from the
  request, and carrying no field.
- ``handle_complete`` is that top-level navigation on the publisher's origin: it reads the
  visitor cookie, reads the token's record, applies the action, uses the token up, records
  the link of the form's AMP clientId to the visitor, and answers 303 to the action's
  ``done_url``. A replayed, expired, unknown or foreign token lands there with nothing
  applied. Without a cookie, the id set is the hop's own, generated at submit and sealed
  in its record: every landing of one hop (a reload after a failed one, two at once) gives
  the webhook, and sets, the same id, as it sends the same call ``id``; landings at once
  take turns (below), so only one calls the webhook. Only that 303 sets
  the cookie: an error answer (429, 502, 503) sets none.
- ``handle_preflight`` is an action's ``OPTIONS``: as its POST, the origin first (403),
  then the name (``404 unknown-action``), so no preflight says an unknown action exists.
- The token is a bearer token minted by an unauthenticated POST (its ``Origin`` is only
  enforced by browsers: curl sends any). So ``handle_complete`` acts only on a top-level
  navigation: when the browser says what the request is for (``Sec-Fetch-Dest``), it
  must be ``document`` with ``Sec-Fetch-Mode: navigate``. An ``<img>``, ``<script>``,
  ``<iframe>`` or fetch of the URL (which would carry the victim's ``SameSite=None``
  cookie) lands on ``done_url`` with nothing applied, nothing linked and the token left
  alone, counted as a ``not_navigation`` refusal. Browsers without Fetch Metadata send
  neither header and are served. A navigation an attacker causes (a link, a top-level
  form) still applies the attacker's fields to whoever follows it: docs/security.md.

The visitor cookie and the client's address are read as collect reads them (every
``Cookie`` and ``X-Forwarded-For`` field, joined: collect.headers_of). The only cookie an
action sets is a new id the service generated, when the request carried none; a cookie
the request carries is never set again: its value was read percent-decoded (cookies.py),
so writing that back would not read as the same id, and the service never sets a value
taken from a request.

Every answer says ``Vary: Origin``. The form's ``clientId`` and ``consent`` fields (amp-
consent's ``CONSENT_STATE``) are not fields of the action; ``consent=insufficient``
records no link, while the action, the visitor's explicit request, is still applied.

Failure: a webhook that does not answer 2xx within the bounded wait (webhooks.wait_bound)
for a transient reason (5xx, 408, 429, a timeout, no connection) does not keep the visitor
waiting longer: the same body, with the same ``id`` (the receiver's idempotency key), is
queued in the outbox, addressed to the action's own destination (``amp-action-<name>``),
whose forwarder retries it like event delivery (backoff and jitter, Retry-After, dead
letters, reclaim). A submission then answers ``202 {"status": "queued"}``; a hop lands on
``done_url`` as when applied, its token used up. A refusal (another 4xx, a 3xx) is final
and queues nothing: ``502 action-not-applied``, as when the outbox is off.

A hop's token is used up only once its call is settled: applied, refused, or queued (the
token deleted and the call queued in one atomic write, ``HandoffStore.take_and_emit``).
Used up first, a store outage between the webhook's failure and the queueing lost the
action, with a 503 and nothing for the visitor to retry. Now that 503 (or a 502 with the
outbox off) leaves the token, and a reload calls again with the same ``id`` (and, without a
cookie, the same visitor id).

One landing of a hop at a time calls its webhook: the read of the token's record leases it
to the landing, in the same store call (``HandoffStore.claim``), for the bounded wait and a
margin to settle the call. A landing that finds another's lease live (a double click, a
reload while the first waits) waits for that landing's outcome, asking the store again
every 50 to 500 ms, no longer than the lease has left: the hop settled, it lands on
``done_url`` (and, without a cookie, sets the hop's one id); the hop left usable, it calls
the webhook itself. A landing that leaves the token usable ends its lease (a plain claim
would lose the action: the reload would find it claimed by a landing that is over); should
the store be down, the lease ends with its time, and a reload waits that long at most.
Past its wait, a landing that finds yet another lease answers ``503 action-in-progress``
with Retry-After.
"""

import asyncio
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from identity_service.amp import cookies, cors, limits, links, webhooks
from identity_service.amp.collect import headers_of
from identity_service.amp.config import ActionSettings
from identity_service.amp.context import AMP, AmpContext
from identity_service.amp.forms import read_form
from identity_service.constants import (
    AMP_LEASE_MARGIN_SECONDS,
    AMP_LEASE_POLL_MAX_SECONDS,
    AMP_LEASE_POLL_SECONDS,
)
from identity_service.crypto import SealError, Token
from identity_service.middleware import SECURITY_HEADERS, problem_for, problem_response
from identity_service.problems import (
    ActionInProgress,
    ActionNotApplied,
    MalformedForm,
    PayloadTooLarge,
    Problem,
    StoreUnavailable,
    UnknownAction,
    UnsupportedFormType,
)
from identity_service.settings import action_destination_name
from identity_service.stores import Claim

logger = structlog.get_logger(__name__)

# The hidden field that carries AMP's clientId: <input type="hidden" name="clientId"
# value="CLIENT_ID(ajs_anonymous_id)" data-amp-replace="CLIENT_ID">. Not passed as a field.
CLIENT_ID_FIELD = "clientId"
# amp-consent's CONSENT_STATE, as collect's ``consent`` parameter: not passed as a field.
CONSENT_FIELD = "consent"
_RECORD_VERSION = 1
# Fetch Metadata of a top-level navigation, the only request the complete URL acts on.
_NAVIGATION = {"Sec-Fetch-Dest": "document", "Sec-Fetch-Mode": "navigate"}
# Refusals this module counts (CORS and the rate limits count their own).
_REFUSAL_REASONS: dict[type[Problem], str] = {
    UnknownAction: "unknown_action",
    PayloadTooLarge: "form_too_large",
    MalformedForm: "malformed_form",
    UnsupportedFormType: "unsupported_form_type",
    ActionNotApplied: "webhook_failed",
}


async def handle_submit(request: web.Request) -> web.StreamResponse:
    """An amp-form submission: applied at once, or sealed for the origin hop."""
    ctx = request.app[AMP]
    allow = cors.cors_headers(None)  # Vary: Origin, whatever the answer
    try:
        origin = cors.check(request)  # before anything else: a 403 changes and tells nothing
        allow = cors.cors_headers(origin)
        action = _action(ctx, request)
        fields = read_form(
            request.headers.get("Content-Type"),
            await request.read(),
            max_bytes=ctx.amp.max_form_bytes,
            max_fields=ctx.amp.max_form_fields,
        )
        client_id = links.client_id_of(fields.pop(CLIENT_ID_FIELD, None))
        may_link = fields.pop(CONSENT_FIELD, None) != links.CONSENT_DENIED
        visitor, address = _visitor_and_address(ctx, request)
        await limits.check_limits(ctx, address, client_id)
        first_party = origin is None or origin in ctx.amp.publisher_origins
        if visitor is None and not first_party:
            return await _start_hop(ctx, action, fields, client_id, may_link, allow)
        return await _apply_now(
            ctx, action, fields, client_id, may_link, visitor, first_party, allow
        )
    except Exception as exc:
        response = _problem(ctx, exc, request)
        response.headers.update(allow)
        return response


async def handle_complete(request: web.Request) -> web.StreamResponse:
    """The origin hop's landing: apply the sealed action once, then 303 to ``done_url``."""
    ctx = request.app[AMP]
    headers = {**SECURITY_HEADERS, **cors.cors_headers(None)}
    try:
        action = _action(ctx, request)
        if _is_navigation(request):
            visitor, address = _visitor_and_address(ctx, request)
            await limits.check_limits(ctx, address, None)
            token = Token.parse(request.query.get("token", ""))
            hop = None if token is None else await _claim(ctx, action, token)
            if visitor is None:
                visitor = _hop_visitor(hop)
                # In the landing's headers alone: a failed answer sets nothing in the browser.
                headers["Set-Cookie"] = cookies.set_cookie(visitor, ctx.amp.cookie)
            if hop is None:
                _count_hop(ctx, action, "missed")
            elif hop.lease is not None:
                await _complete(ctx, action, visitor, hop)
            # else: settled by the landing this one waited for, which applied it or not.
        else:
            # An <img>, <iframe> or fetch of the URL, which some page may make with the
            # visitor's cookie: nothing applied or linked, the token left as it is.
            ctx.metrics.inc(cors.REFUSALS_METRIC, reason="not_navigation")
        headers["Location"] = action.done_url
        return web.Response(status=303, headers=headers)
    except Exception as exc:
        response = _problem(ctx, exc, request)
        response.headers.update(cors.cors_headers(None))
        return response


async def handle_preflight(request: web.Request) -> web.Response:
    """``OPTIONS`` of an action: the origin checked first (403), as by its POST; then an
    unknown name is the POST's ``404 unknown-action``, not a 204 for an action that is not."""
    ctx = request.app[AMP]
    origin = cors.preflight_origin(request)
    try:
        _action(ctx, request)
    except UnknownAction as exc:
        response = _problem(ctx, exc, request)
        response.headers.update(cors.cors_headers(origin))
        return response
    return cors.allowed_preflight(request, origin)


def _is_navigation(request: web.Request) -> bool:
    """Whether the request is a top-level navigation, or from a browser that does not say.

    Browsers with Fetch Metadata send both headers on every request to an https origin;
    neither means an older browser (or no browser: it has no victim's cookie to send).
    """
    sent = {name: request.headers.getall(name, []) for name in _NAVIGATION}
    if not any(sent.values()):
        return True
    return all(sent[name] == [value] for name, value in _NAVIGATION.items())


async def _apply_now(
    ctx: AmpContext,
    action: ActionSettings,
    fields: dict[str, str],
    client_id: str | None,
    may_link: bool,
    visitor: str | None,
    first_party: bool,
    allow: dict[str, str],
) -> web.Response:
    """Apply at once: the visitor is known (cookie) or can be given a first-party cookie."""
    headers = {**SECURITY_HEADERS, **allow}
    if visitor is None:
        visitor = cookies.new_visitor_id()
        headers["Set-Cookie"] = cookies.set_cookie(visitor, ctx.amp.cookie)
    context = "origin" if first_party else "cache_with_cookie"
    applied = await _apply(ctx, action, _hop_id(), visitor, fields, client_id, context)
    if applied:
        _count_hop(ctx, action, "applied")
    if may_link:
        await _link(ctx, client_id, visitor)
    if not applied:  # queued: the outbox's forwarder applies it
        return _json({"status": "queued"}, headers, status=202)
    return _json({"status": "applied"}, headers)


async def _start_hop(
    ctx: AmpContext,
    action: ActionSettings,
    fields: dict[str, str],
    client_id: str | None,
    may_link: bool,
    allow: dict[str, str],
) -> web.Response:
    """Seal the submission under a one-time token; send the visitor to the publisher's origin."""
    record = {
        "v": _RECORD_VERSION,
        "id": _hop_id(),
        "action": action.name,
        "fields": fields,
        "clientId": client_id,
        "link": may_link,  # False: consent insufficient
        # The id every landing without a cookie offers (_hop_visitor): one per hop, as its
        # webhook call's id is, so a reload after a failed landing names the visitor the
        # webhook may already have applied the action to.
        "visitor": cookies.new_visitor_id(),
        "preparedAt": time.time(),
    }
    token = Token.generate()
    lookup_id = ctx.action_sealer.lookup_id(token)
    sealed = ctx.action_sealer.seal(token, lookup_id, orjson.dumps(record))
    await ctx.store.put(lookup_id, sealed, ctx.amp.action_ttl, None)
    _count_hop(ctx, action, "started")
    redirect = f"{ctx.amp.public_url}/v1/amp/actions/{action.name}/complete?token={token.text}"
    # allow (cors_headers) exposes AMP-Redirect-To to the cache page.
    headers = {**SECURITY_HEADERS, **allow, "AMP-Redirect-To": redirect}
    return _json({"status": "redirecting"}, headers)


@dataclass(frozen=True, slots=True)
class _Hop:
    """A hop's record as a landing found it: its lookup id, the record opened, and the lease
    the landing holds on it (None: another landing held it, and settled the hop while this
    one waited)."""

    lookup_id: bytes
    record: dict[str, Any]
    lease: bytes | None


async def _claim(ctx: AmpContext, action: ActionSettings, token: Token) -> _Hop | None:
    """The token's record, opened and leased to this landing (left in the store until its
    webhook call is settled: :func:`_apply`); None if unknown or used. A foreign or
    unreadable record is used up at once, with nothing applied.

    The lease, taken in the same store call as the read, lasts the landing's bounded wait
    for the webhook and a margin to settle the call. A landing that finds another's lease
    waits for it (:func:`_wait_for_lease`), so no two landings of one hop call the webhook
    at once.
    """
    lookup_id = ctx.action_sealer.lookup_id(token)
    lease = secrets.token_bytes(16)
    seconds = _lease_seconds(ctx)
    claim = await ctx.store.claim(lookup_id, lease, seconds)
    if claim is None:
        return None
    try:
        record = orjson.loads(ctx.action_sealer.open(token, lookup_id, claim.record))
    except (SealError, orjson.JSONDecodeError):
        logger.warning("action_record_unreadable", action=action.name)
        record = None
    if not isinstance(record, dict) or record.get("action") != action.name:
        # Unreadable, or a token taken to another action's URL: used up, nothing applied.
        await ctx.store.take(lookup_id, None)
        return None
    if claim.claimed:
        return _Hop(lookup_id, record, lease)
    _count_hop(ctx, action, "waited")
    claimed = await _wait_for_lease(ctx, lookup_id, lease, seconds, claim.leased_for)
    if claimed is None:
        return _Hop(lookup_id, record, None)
    return _Hop(lookup_id, record, lease)


def _lease_seconds(ctx: AmpContext) -> float:
    """How long a landing's lease lasts: its bounded wait for the webhook, then the time to
    settle the call in the store (one write, which Redis may take its whole timeout over)."""
    redis = ctx.settings.redis
    settle = AMP_LEASE_MARGIN_SECONDS + (0.0 if redis is None else redis.timeout)
    return webhooks.wait_bound(ctx.amp) + settle


async def _wait_for_lease(
    ctx: AmpContext, lookup_id: bytes, lease: bytes, seconds: float, left: float
) -> Claim | None:
    """Wait, asking the store again and again, until the lease another landing holds on a
    hop ends: the hop settled (None), or left usable and now leased to this landing. That
    lease had ``left`` seconds to live when first seen: this waits no longer (one pause
    more, for clocks), then answers ActionInProgress (503 with Retry-After) if yet another
    landing leased the hop meanwhile."""
    deadline = time.monotonic() + left + AMP_LEASE_POLL_SECONDS
    pause = AMP_LEASE_POLL_SECONDS
    while True:
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        claim = await ctx.store.claim(lookup_id, lease, seconds)
        if claim is None or claim.claimed:
            return claim
        if time.monotonic() >= deadline:
            raise ActionInProgress(
                "another landing of this origin hop is applying its action; try again "
                "when it is settled",
                retry_after=max(1, math.ceil(claim.leased_for)),
            )
        pause = min(2 * pause, AMP_LEASE_POLL_MAX_SECONDS)


def _hop_visitor(hop: _Hop | None) -> str:
    """The visitor id a landing without a cookie sets: the hop's own, or a new one when there
    is no hop (or its record, sealed before hops had one, has none)."""
    visitor = None if hop is None else hop.record.get("visitor")
    return visitor if isinstance(visitor, str) else cookies.new_visitor_id()


async def _complete(ctx: AmpContext, action: ActionSettings, visitor: str, hop: _Hop) -> None:
    """Apply a hop's record, or queue it (its token used up either way); raise if refused.

    A landing that fails with the token left usable (the store down, the outbox off) ends
    its lease, so the visitor's reload calls again at once; should the store be down, the
    lease ends with its time.
    """
    record = hop.record
    client_id = record.get("clientId")
    try:
        await _apply(
            ctx,
            action,
            record["id"],
            visitor,
            record["fields"],
            client_id,
            "origin_hop",
            hop.lookup_id,
        )
    except Exception:
        assert hop.lease is not None
        await _release(ctx, action, hop.lookup_id, hop.lease)
        raise
    _count_hop(ctx, action, "completed")
    if record.get("link", True) is not False:
        await _link(ctx, client_id, visitor)


async def _apply(
    ctx: AmpContext,
    action: ActionSettings,
    hop_id: str,
    visitor: str,
    fields: dict[str, str],
    client_id: str | None,
    context: str,
    hop: bytes | None = None,
) -> bool:
    """Call the action's webhook within the bounded wait: True if it answered 2xx.

    False if it failed for a transient reason: the same body (same ``id``) is then queued
    for the action's outbox destination, which retries it. ActionNotApplied if the
    webhook refused it, or the outbox is off (nothing would deliver it).

    ``hop``: the lookup id of an origin hop's record, left in the store until the call is
    settled, so that no failure loses the action: used up once applied or refused, or in
    the same atomic write that queues the call. A store that fails before that write
    leaves it usable (503): the visitor's reload calls again, with the same ``id``. So
    does a transient failure with the outbox off (502).
    """
    document = webhooks.payload(
        hop_id=hop_id,
        action=action,
        anonymous_id=visitor,
        fields=fields,
        client_id=client_id,
        context=context,
    )
    outcome = await webhooks.call(ctx.http, ctx.amp, action, orjson.dumps(document))
    if outcome.applied:
        if hop is not None:
            await _use_up(ctx, action, hop)
        return True
    if outcome.refused or not ctx.settings.outbox.enabled:
        _count_hop(ctx, action, "failed")
        if outcome.refused and hop is not None:
            await _use_up(ctx, action, hop)  # final: a reload would be refused again
        raise ActionNotApplied(
            f"the publisher's backend did not confirm the action after {outcome.attempts} "
            "attempt(s); nothing was applied by this service"
        )
    destination = action_destination_name(action.name)
    if hop is None:
        await ctx.store.emit(hop_id.encode(), [document], only=destination)
    else:
        # Queued even if the token is gone meanwhile (its action_ttl may end within the
        # wait, or another landing of the URL settled it): the webhook deduplicates on id.
        await ctx.store.take_and_emit(hop, [document], destination)
    _count_hop(ctx, action, "queued")
    logger.info("webhook_queued", action=action.name, reason=outcome.reason)
    return False


async def _use_up(ctx: AmpContext, action: ActionSettings, lookup_id: bytes) -> None:
    """Use up a hop whose call is settled. Should the store fail, the answer stands and the
    token lasts until its ``action_ttl``: a reload would call again with the same ``id``,
    which the webhook deduplicates."""
    try:
        await ctx.store.take(lookup_id, None)
    except StoreUnavailable:
        logger.warning("action_token_not_used_up", action=action.name)


async def _release(ctx: AmpContext, action: ActionSettings, lookup_id: bytes, lease: bytes) -> None:
    """End a failed landing's lease; should the store fail, it ends with its time."""
    try:
        await ctx.store.release(lookup_id, lease)
    except StoreUnavailable:
        logger.warning("action_lease_not_released", action=action.name)


async def _link(ctx: AmpContext, client_id: str | None, visitor: str) -> None:
    """Record that a cache clientId is this visitor; the action stands if the store fails."""
    if client_id is None or client_id == visitor:
        return  # on the origin, AMP's clientId is the visitor cookie itself
    await links.record_link_or_log(ctx, client_id, visitor)


def _action(ctx: AmpContext, request: web.Request) -> ActionSettings:
    action = ctx.amp.actions.get(request.match_info["name"])
    if action is None:
        raise UnknownAction("no action of that name is configured")
    return action


def _visitor_and_address(ctx: AmpContext, request: web.Request) -> tuple[str | None, str]:
    """The visitor cookie's id (None without one) and the client's address, read as collect
    reads them: every ``Cookie`` and ``X-Forwarded-For`` field of the request, joined."""
    headers = headers_of(request.raw_headers)
    visitor = cookies.visitor_id(headers.get("cookie"), ctx.amp.cookie)
    address = ctx.settings.trusted_proxies.client_ip(request.remote, headers.get("x-forwarded-for"))
    return visitor, address


def _hop_id() -> str:
    """The id a webhook sees on every attempt for one submission: its idempotency key."""
    return secrets.token_urlsafe(16)


def _count_hop(ctx: AmpContext, action: ActionSettings, stage: str) -> None:
    ctx.metrics.inc("identity_amp_hops_total", action=action.name, stage=stage)


def _problem(ctx: AmpContext, exc: Exception, request: web.Request) -> web.Response:
    problem = problem_for(exc, ctx.metrics, ctx.settings)
    reason = _REFUSAL_REASONS.get(type(problem))
    if reason is not None:
        ctx.metrics.inc(cors.REFUSALS_METRIC, reason=reason)
    return problem_response(problem, request)


def _json(document: dict[str, str], headers: dict[str, str], status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(document),
        content_type="application/json",
        headers=headers,
    )
