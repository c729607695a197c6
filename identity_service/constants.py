"""Defaults, limits and the Redis key layout, kept in one place.

Every Redis key the service writes is built here. Keys carry a hash tag (the part in
braces) so that a handoff's key and anything written with it atomically land in the
same Redis Cluster slot. The tag names a shard derived from the token's lookup id, which
spreads handoffs over ``shards`` slots (``IDENTITY_REDIS_SHARDS``), chosen so that a Cluster's
masters get equal numbers of them (``shard_tags``).
"""

from binascii import crc_hqx
from functools import cache
from hashlib import blake2b
from typing import Final

ENV_PREFIX: Final = "IDENTITY_"

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080

DEFAULT_TTL_SECONDS: Final = 300
DEFAULT_MAX_TTL_SECONDS: Final = 600
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024
DEFAULT_TOKEN_PARAM: Final = "handoff_token"  # noqa: S105 - a parameter name
DEFAULT_RETRY_AFTER_SECONDS: Final = 1
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: Final = 10.0
# The HTTP front: how long a request's head and its body may take to arrive, and how
# many connections one process holds open (new ones beyond it are refused at once).
DEFAULT_HEAD_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 1024
MIN_PORT: Final = 1
# `identity-service forward`'s own HTTP port (/metrics, /healthz): Prometheus's usual
# exporter port; on every interface, as a pod's port must be.
DEFAULT_FORWARDER_METRICS_PORT: Final = 9464
DEFAULT_FORWARDER_METRICS_HOST: Final = "0.0.0.0"  # noqa: S104
MAX_PORT: Final = 65535
MAX_WORKERS: Final = 64

DEFAULT_REDIS_KEY_PREFIX: Final = "idsvc:"
DEFAULT_REDIS_TIMEOUT_SECONDS: Final = 1.0
DEFAULT_REDIS_MAX_CONNECTIONS: Final = 64

TOKEN_BYTES: Final = 32
MIN_SECRET_LENGTH: Final = 32
MAX_ID_LENGTH: Final = 255
MAX_URL_LENGTH: Final = 2048
MAX_TOKEN_LENGTH: Final = 128
# aiohttp's own limits for a request line or field; the front's for the whole head.
MAX_HEAD_BYTES: Final = 8190
MAX_HEADERS: Final = 128

DEV_SOURCE_NAME: Final = "dev"

DEFAULT_STARTED_EVENT: Final = "Cross-Domain Handoff Started"
DEFAULT_COMPLETED_EVENT: Final = "Cross-Domain Handoff Completed"
DEFAULT_BATCH_MAX_EVENTS: Final = 100
DEFAULT_BATCH_MAX_WAIT_SECONDS: Final = 0.5
DEFAULT_DELIVERY_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_DELIVERY_MAX_ATTEMPTS: Final = 20
DEFAULT_BACKOFF_BASE_SECONDS: Final = 0.5
DEFAULT_BACKOFF_MAX_SECONDS: Final = 60.0
DEFAULT_RECLAIM_IDLE_SECONDS: Final = 60.0
# How often a forwarder keeps the entries it holds claimed (and reclaims and trims): at
# most this long, on top of a batch's filling and sending, an entry it holds goes unclaimed.
MAINTAIN_EVERY_SECONDS: Final = 1.0
# Segment's batch API limits: 500 KB a batch, 32 KB an event; 2500 events is our own cap.
MAX_BATCH_BYTES: Final = 500_000
MAX_BATCH_EVENTS: Final = 2500
MAX_EVENT_BYTES: Final = 32 * 1024
# What delivery adds to the stored documents (sinks.batch_body): `,"sentAt":"…"` to each
# event (an ISO 8601 time is 24 characters), a comma between events, `{"batch":[`…`]}`.
SENT_AT_BYTES: Final = 36
BATCH_FRAMING_BYTES: Final = 12

# An origin hop's lease outlives its landing's bounded wait for the webhook by this much and
# the Redis timeout: the time to settle the call in the store afterwards (one write).
AMP_LEASE_MARGIN_SECONDS: Final = 2.0
# A landing that finds another landing of its hop in flight asks again after this long at
# first, doubling up to the longest.
AMP_LEASE_POLL_SECONDS: Final = 0.05
AMP_LEASE_POLL_MAX_SECONDS: Final = 0.5

# Where the publisher's proxy may connect from unless ``IDENTITY_TRUSTED_PROXIES`` says
# otherwise: loopback, private-use (RFC 1918), shared address space (RFC 6598: some
# Kubernetes networks give pods 100.64.0.0/10), link-local, and IPv6 unique local. Listed
# rather than ``is_private``, which leaves RFC 6598 out (every visitor behind such a proxy
# shared one counter), takes routed ranges (Teredo's 2001::/32, whose clients could name
# their own address) and changes between Python patch releases.
DEFAULT_TRUSTED_PROXIES: Final = (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
    "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10",
)  # fmt: skip
# The most entries ``IDENTITY_TRUSTED_PROXIES`` may list (each address read is checked
# against each of them, once per new address).
MAX_TRUSTED_PROXIES: Final = 256
# The most ``X-Forwarded-For`` entries read, from the right: a header of thousands costs no
# more than one of this many (each a few microseconds to parse, when the answer is not
# cached). Real chains (a CDN, a load balancer, an ingress) are a handful of proxies.
MAX_FORWARDED_HOPS: Final = 16

# Handoffs spread over this many shards by default (``IDENTITY_REDIS_SHARDS``).
KEY_SHARDS: Final = 16
MAX_KEY_SHARDS: Final = 1024
CLUSTER_SLOTS: Final = 16384


def tag_slot(tag: str) -> int:
    """The Cluster slot of the keys with hash tag ``tag``: CRC16 (XMODEM) modulo 16384."""
    return crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


@cache
def shard_tags(shards: int) -> tuple[str, ...]:
    """The hash tag of each of ``shards`` shards: shard ``i``'s is the first of ``i``,
    ``i.1``, ``i.2``… whose Cluster slot lies in the ``i``-th of ``shards`` equal slot
    ranges. A Cluster's masters hold contiguous equal ranges (``redis-cli --cluster create``
    deals them so), so the shards spread evenly over the masters."""
    tags = []
    for shard in range(shards):
        low, high = shard * CLUSTER_SLOTS // shards, (shard + 1) * CLUSTER_SLOTS // shards
        tag, attempt = str(shard), 0
        while not low <= tag_slot(tag) < high:
            attempt += 1
            tag = f"{shard}.{attempt}"
        tags.append(tag)
    return tuple(tags)


def shard_of(lookup_id: bytes, shards: int = KEY_SHARDS) -> int:
    """The shard of a uniformly random id (an HMAC): its first four bytes, little-endian,
    modulo ``shards``, so every one of up to ``MAX_KEY_SHARDS`` shards gets an equal share
    (the first byte alone reaches 256 of them, unevenly unless ``shards`` divides 256; for
    those that do, this is that byte's shard, as in 0.3.0)."""
    return int.from_bytes(lookup_id[:4], "little") % shards


def spread_shard(hint: bytes, shards: int = KEY_SHARDS) -> int:
    """The shard of an id that need not be random (an event's messageId, a UUID's text):
    hashed first, so the outbox entries spread over every shard all the same."""
    return shard_of(blake2b(hint, digest_size=4).digest(), shards)


def _tag_of(random_id: bytes, shards: int) -> str:
    return shard_tags(shards)[shard_of(random_id, shards)]


def handoff_key(prefix: str, lookup_id: bytes, shards: int = KEY_SHARDS) -> str:
    """The Redis key of one handoff: prefix, a Cluster hash tag, then the lookup id."""
    return f"{prefix}{{{_tag_of(lookup_id, shards)}}}:handoff:{lookup_id.hex()}"


def lease_key(prefix: str, lookup_id: bytes, shards: int = KEY_SHARDS) -> str:
    """The lease of an AMP action's record (an origin hop's landing in flight): the hash tag
    of the record's ``handoff_key``, so one script reads the record and sets its lease."""
    return f"{prefix}{{{_tag_of(lookup_id, shards)}}}:lease:{lookup_id.hex()}"


def outbox_key(prefix: str, shard: int, shards: int = KEY_SHARDS) -> str:
    """The outbox stream of a shard; it shares the hash tag of the shard's handoffs."""
    return f"{prefix}{{{shard_tags(shards)[shard]}}}:outbox"


def dead_letter_key(prefix: str, shard: int, destination: str, shards: int = KEY_SHARDS) -> str:
    """A destination's dead letters from one shard's outbox (same slot, so moves are atomic)."""
    return f"{prefix}{{{shard_tags(shards)[shard]}}}:dead:{destination}"


def link_key(prefix: str, key_id: bytes, shards: int = KEY_SHARDS) -> str:
    """A kept record (an AMP clientId link) under its key id, hash-tagged like a handoff."""
    return f"{prefix}{{{_tag_of(key_id, shards)}}}:link:{key_id.hex()}"


def rate_key(prefix: str, counter_id: bytes, shards: int = KEY_SHARDS) -> str:
    """A rate-limit counter, hash-tagged by its id (each counter is its own script call)."""
    return f"{prefix}{{{_tag_of(counter_id, shards)}}}:rate:{counter_id.hex()}"
