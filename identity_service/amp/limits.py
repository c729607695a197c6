"""Rate limits of the public AMP endpoints: per client address and per AMP clientId.

Each request counts against a fixed-window counter for its address and, when it carries
one, for its clientId, in one store call (Redis: one script call per counter, sent in one
write; collect counts in the store call that also writes its hit, ``hit_and_write``). A
counter's id is an HMAC under a key derived from the server secret, so the store holds
neither addresses nor clientIds; the process keeps the last few thousand ids it computed,
and what each address is counted as, in bounded caches.
"""

import functools
import hashlib
import hmac
import ipaddress
import math

from identity_service.amp.context import AmpContext
from identity_service.amp.cors import REFUSALS_METRIC
from identity_service.problems import RateLimited
from identity_service.proxies import parse_address
from identity_service.stores import Counted

# IPv6 clients are counted by their /64: one host commonly holds a whole /64 and could
# otherwise take a fresh address (and a fresh counter) for every request.
_IPV6_COUNTED_PREFIX = 64
# The refusal reason of each of a request's counters, in the order ``counters`` lists them.
_REASONS = ("rate_ip", "rate_client")


async def check_limits(ctx: AmpContext, ip: str, client_id: str | None) -> None:
    """Count this request; raise RateLimited (429) if its address or clientId is over.

    ``ip`` is the client address (``TrustedProxies.client_ip``); ``client_id`` a validated AMP
    clientId or None. Retry-After is when the exceeded windows end, in whole seconds.
    Raises StoreUnavailable when the store cannot count.
    """
    counted = counters(ctx, ip, client_id)
    refuse_over(
        ctx, counted, await ctx.store.hit([(c.counter_id, c.window_seconds) for c in counted])
    )


def counters(ctx: AmpContext, ip: str, client_id: str | None) -> list[Counted]:
    """The counters a request counts against: its address's, then its clientId's if any
    (the order ``refuse_over`` reads them in)."""
    key = _counter_key(ctx.settings.secret)
    per_ip, per_client = ctx.amp.limit_per_ip, ctx.amp.limit_per_client
    counted = [_counted(key, b"ip:", _address_counted(ip), per_ip.window_seconds, per_ip.requests)]
    if client_id is not None:
        counted.append(
            _counted(key, b"client:", client_id, per_client.window_seconds, per_client.requests)
        )
    return counted


def refuse_over(ctx: AmpContext, counted: list[Counted], counts: list[tuple[int, float]]) -> None:
    """Raise RateLimited, counted, when a count of ``counters``' is over its limit."""
    over = [
        (reason, left)
        for reason, counter, (count, left) in zip(_REASONS, counted, counts, strict=False)
        if count > counter.limit
    ]
    if over:
        reason = over[0][0]
        ctx.metrics.inc(REFUSALS_METRIC, reason=reason)
        retry_after = max(1, math.ceil(max(left for _, left in over)))
        what = "this address" if reason == "rate_ip" else "this clientId"
        raise RateLimited(f"too many requests from {what}", retry_after)


@functools.lru_cache(maxsize=4096)
def _address_counted(ip: str) -> str:
    """What an address is counted as: itself, or its /64 for IPv6."""
    address = parse_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        network = ipaddress.IPv6Network((address, _IPV6_COUNTED_PREFIX), strict=False)
        return str(network)
    return ip if address is None else str(address)


@functools.lru_cache(maxsize=4)
def _counter_key(server_secret: bytes) -> bytes:
    """The key counter ids are HMACs under, derived once per server secret."""
    return hmac.digest(server_secret, b"identity-service amp rate", hashlib.sha256)


@functools.lru_cache(maxsize=8192)
def _counted(key: bytes, kind: bytes, value: str, window_seconds: int, limit: int) -> Counted:
    """A counter, its id an HMAC of ``kind`` and ``value``: kept for the next requests of the
    same address or clientId (a visitor's pageviews follow each other)."""
    return Counted(hmac.digest(key, kind + value.encode(), hashlib.sha256), window_seconds, limit)
