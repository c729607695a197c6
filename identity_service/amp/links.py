"""AMP cache clientIds linked to the visitor's anonymousId, kept sealed in the store.

In an AMP cache, AMP's clientId is an id of the cache's own; the visitor's anonymousId is
the publisher's cookie, which the cache page often cannot send. When one request carries
both, the link is kept for ``link_ttl`` so later cookie-less hits with that clientId are
attributed to the visitor.

A link is sealed the way a handoff record is (crypto.TokenSealer), with a token derived
from the clientId: the key id is an HMAC of it under the link secret, and the record is
AES-GCM under a key derived from it. A dump of the store shows neither clientIds nor
visitor ids, and a record opens only for the clientId it was kept for.
"""

import functools
import hashlib
import re
import time

import orjson
import structlog

from identity_service.amp.context import AmpContext
from identity_service.clock import iso_time
from identity_service.constants import MAX_ID_LENGTH
from identity_service.crypto import SealError, Token, TokenSealer
from identity_service.stores import Kept

# AMP writes `amp-` + 22 base64url characters on the origin and a base64 SHA-384 on caches;
# a publisher cookie used as the clientId (e.g. `_ga`) is short too.
MAX_CLIENT_ID_LENGTH = 128
_CLIENT_ID = re.compile(f"[!-~]{{1,{MAX_CLIENT_ID_LENGTH}}}")
_TOKEN_CONTEXT = b"identity-service amp client id"
# An amp-form hidden field the runtime did not substitute (no data-amp-replace) still holds
# the variable's name: CLIENT_ID(ajs_anonymous_id). That is no clientId.
_UNREPLACED = "CLIENT_ID("
# amp-consent's CONSENT_STATE when the visitor refused: no link is recorded then.
CONSENT_DENIED = "insufficient"
FAILURES_METRIC = "identity_amp_link_failures_total"

logger = structlog.get_logger(__name__)


def check_client_id(client_id: str) -> str:
    """``client_id`` if it can be an AMP clientId: 1 to 128 visible ASCII characters.

    Raises ValueError otherwise (callers treat the request as one without a clientId).
    """
    if _CLIENT_ID.fullmatch(client_id) is None:
        raise ValueError(f"a clientId is 1 to {MAX_CLIENT_ID_LENGTH} visible ASCII characters")
    return client_id


def client_id_of(value: object) -> str | None:
    """The AMP clientId a request parameter or form field carries, or None.

    None when absent, not a text, an unsubstituted ``CLIENT_ID(...)``, or not a possible
    clientId (``check_client_id``): the request is then treated as one without a clientId.
    """
    if not isinstance(value, str) or value.startswith(_UNREPLACED):
        return None
    try:
        return check_client_id(value)
    except ValueError:
        return None


def link_token(client_id: str) -> Token:
    """The token a clientId's link is sealed under."""
    return Token(hashlib.sha256(_TOKEN_CONTEXT + client_id.encode()).digest())


def link_key(ctx: AmpContext, client_id: str) -> tuple[Token, bytes]:
    """The token ``client_id``'s link is sealed under and the key id it is kept under.

    Raises ValueError for an invalid clientId.
    """
    return _link_key(ctx.link_sealer, client_id)


@functools.lru_cache(maxsize=4096)
def _link_key(sealer: TokenSealer, client_id: str) -> tuple[Token, bytes]:
    """:func:`link_key`, kept for the clientIds seen last: a clientId's hits follow each
    other, and each would derive both again (a SHA-256 and an HMAC)."""
    token = link_token(check_client_id(client_id))
    return token, sealer.lookup_id(token)


def sealed_link(ctx: AmpContext, client_id: str, anonymous_id: str) -> Kept:
    """The link ``client_id`` -> ``anonymous_id``, sealed, as the store keeps it.

    Raises ValueError for an invalid clientId or an empty or overlong anonymousId.
    """
    token, key_id = link_key(ctx, client_id)
    if not 0 < len(anonymous_id) <= MAX_ID_LENGTH:
        raise ValueError(f"an anonymousId has 1 to {MAX_ID_LENGTH} characters")
    link = orjson.dumps({"anonymousId": anonymous_id, "linkedAt": iso_time(time.time())})
    return Kept(key_id, ctx.link_sealer.seal(token, key_id, link), ctx.amp.link_ttl)


async def record_link(ctx: AmpContext, client_id: str, anonymous_id: str) -> None:
    """Link ``client_id`` to the visitor ``anonymous_id`` for ``link_ttl``, replacing any link.

    Raises ValueError for an invalid clientId or an empty or overlong anonymousId, and
    StoreUnavailable when the store cannot keep it.
    """
    link = sealed_link(ctx, client_id, anonymous_id)
    await ctx.store.keep(link.key_id, link.record, link.ttl_seconds)
    link_recorded(ctx)


async def record_link_or_log(ctx: AmpContext, client_id: str, anonymous_id: str) -> None:
    """:func:`record_link`, but a failure is logged and counted, never raised.

    A link only helps attribute later hits, so the request that carries it (an action
    applied, a hit recorded) stands without it: collect and the actions agree on that.
    """
    try:
        await record_link(ctx, client_id, anonymous_id)
    except Exception as exc:
        link_not_recorded(ctx, exc)


def link_recorded(ctx: AmpContext) -> None:
    """Count a link the store kept (collect writes its links with its hit)."""
    ctx.metrics.inc("identity_amp_links_recorded_total")


def link_not_recorded(ctx: AmpContext, error: Exception) -> None:
    """Log and count a link the store could not keep; the request stands."""
    ctx.metrics.inc(FAILURES_METRIC)
    logger.warning("amp_link_not_recorded", error=type(error).__name__)


async def linked_visitor(ctx: AmpContext, client_id: str) -> str | None:
    """The anonymousId ``client_id`` is linked to, or None without a readable link.

    A record that does not open (kept under another server secret, or damaged) counts as
    no link. Raises ValueError for an invalid clientId and StoreUnavailable when the store
    cannot answer. Counting an attribution is the caller's: it knows whether it used one.
    """
    token, key_id = link_key(ctx, client_id)
    return opened_link(ctx, token, key_id, await ctx.store.peek(key_id))


def opened_link(ctx: AmpContext, token: Token, key_id: bytes, record: bytes | None) -> str | None:
    """The anonymousId of a link ``record`` read under ``link_key``'s ``key_id``, or None
    when there is none or it does not open."""
    if record is None:
        return None
    try:
        link = orjson.loads(ctx.link_sealer.open(token, key_id, record))
    except (SealError, orjson.JSONDecodeError):
        return None
    anonymous_id = link.get("anonymousId") if isinstance(link, dict) else None
    return anonymous_id if isinstance(anonymous_id, str) and anonymous_id else None
