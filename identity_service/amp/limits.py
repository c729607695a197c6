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
from identity_service.stores import Counted

# IPv6 clients are counted by their /64: one host commonly holds a whole /64 and could
# otherwise take a fresh address (and a fresh counter) for every request.
_IPV6_COUNTED_PREFIX = 64
# The refusal reason of each of a request's counters, in the order ``counters`` lists them.
_REASONS = ("rate_ip", "rate_client")


async def check_limits(ctx: AmpContext, ip: str, client_id: str | None) -> None:
    """Count this request; raise RateLimited (429) if its address or clientId is over.

    ``ip`` is the client address (see ``client_ip``); ``client_id`` a validated AMP
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
def client_ip(peer: str | None, x_forwarded_for: str | None) -> str:
    """The client's address: the peer's, or the proxy's word for it when the peer is local.

    The issue has the publisher's reverse proxy mount the service on the publisher's
    origin, so the peer is that proxy, on a loopback or private address
    (``_PROXY_NETWORKS``), and the client's address is the last one in
    ``X-Forwarded-For``: the one the proxy appended. Earlier
    entries came from the client and could be anything, so they are never read. A public
    peer is the client itself and its ``X-Forwarded-For`` is ignored: anyone can send one.
    A missing peer (a Unix socket) is local. ``x_forwarded_for`` holds every such header
    of the request, joined with commas. A last entry that is not an address gives the
    peer: all such requests then share the proxy's counter rather than name their own.
    An entry may carry the client's port (``ip:port``, ``[ipv6]:port``).
    """
    trusted = peer is None or _is_local(peer)
    if trusted and x_forwarded_for:
        forwarded = _forwarded_address(x_forwarded_for.rsplit(",", 1)[-1].strip())
        if forwarded is not None:
            return str(forwarded)
    return peer if peer is not None else "unix"


def _forwarded_address(entry: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an ``X-Forwarded-For`` entry names, with or without the client's port
    (``203.0.113.7:50712``, ``[2001:db8::7]:50712``), as some proxies write it (Azure's
    Application Gateway): read as no address, every visitor shared the proxy's counter."""
    address = _parse(entry)
    if address is None and entry.endswith(tuple("0123456789")):
        host, colon, port = entry.rpartition(":")
        if colon and port.isdigit() and len(port) <= 5:
            if host.startswith("[") and host.endswith("]"):
                address = _parse(host[1:-1])
            elif "." in host:  # IPv4: an IPv6 address's last group is no port
                address = _parse(host)
                address = address if isinstance(address, ipaddress.IPv4Address) else None
    return address


# Where the publisher's proxy may connect from: loopback, private-use (RFC 1918), shared
# address space (RFC 6598: some Kubernetes networks give pods 100.64.0.0/10), link-local,
# and IPv6 unique local. Listed rather than ``is_private``, which leaves RFC 6598 out (every
# visitor behind such a proxy shared one counter), takes routed ranges (Teredo's 2001::/32,
# whose clients could name their own address) and changes between Python patch releases.
_PROXY_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
        "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10",
    )
)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _is_local(peer: str) -> bool:
    address = _parse(peer)
    return address is not None and any(address in network for network in _PROXY_NETWORKS)


def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` names, IPv4-mapped IPv6 addresses as IPv4, or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _address_counted(ip: str) -> str:
    """What an address is counted as: itself, or its /64 for IPv6."""
    address = _parse(ip)
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
