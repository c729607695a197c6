"""The Redis store: one script call per request, keys with Cluster hash tags.

A handoff is a hash: ``r``, the record sealed under its token, and ``o``, the completion
template sealed under the server secret (absent when no events are due). Its shard's
outbox stream shares its hash tag, so each script touches one slot:

- prepare: replace the hash, set its TTL, and XADD the started events, atomically;
- exchange: read and delete the hash and XADD the completion entry, atomically;
- an AMP action's record read and leased to one landing of its hop (``CLAIM``: its lease
  key shares the record's hash tag), then deleted with its webhook call XADDed,
  atomically (``take_and_emit``).

Kept records (AMP clientId links) are plain strings written with their TTL by one ``SET``.
Rate-limit counters are one script call each (``HIT``): counters of one request have ids
in different shards, so no one script may touch them all in a Cluster, but their calls go
out together and the pipelined client sends them in one write. An AMP hit
(``hit_and_write``) is one ``AMP_HIT`` call on one node (or behind Sentinel): its
counters, and only under every limit its event and link; on a Cluster, the counters' calls
(and the link's read) in one write, then the event and the link in the next.

Scripts go through the pipelined :class:`RespClient` (see resp.py for why it never
retries), or on a Cluster or behind Sentinel the lean clients of topology.py. With
``IDENTITY_REDIS_WAIT``, prepare and exchange send ``WAIT`` in the same write, on the
connection that runs the script (replication.py). A failure
surfaces as StoreUnavailable (503 with Retry-After) and the next
request uses a fresh connection, so the service recovers by itself when Redis returns.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection as AsyncConnection
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.exceptions import AskError, RedisClusterException, RedisError

from identity_service import events as ev
from identity_service.constants import (
    handoff_key,
    lease_key,
    link_key,
    outbox_key,
    rate_key,
    shard_of,
    spread_shard,
)
from identity_service.crypto import OutboxSealer
from identity_service.metrics import Metrics
from identity_service.problems import StoreUnavailable
from identity_service.settings import RedisSettings
from identity_service.stores import (
    Claim,
    Counted,
    Emitted,
    HitOutcome,
    Kept,
    PrepareEvents,
    keep_apart,
    under_limits,
)
from identity_service.stores.replication import Waits
from identity_service.stores.resp import Arg, Reply, ReplyError, Script
from identity_service.stores.topology import (
    UNNAMED_HOSTS,
    Commands,
    SentinelClient,
    announced_host,
    lean_client,
    sentinel_clients,
)
from identity_service.urls import host_port

# What a failing, stalled or unreachable Redis raises, through the lean clients (ReplyError,
# OSError: timeouts included) and redis-py (RedisError; on a Cluster RedisClusterException
# too, when no node answers, which is no RedisError). The forwarder, the scrape and the
# outbox commands catch this one tuple.
STORE_ERRORS = (RedisError, RedisClusterException, ReplyError, OSError)

logger = structlog.get_logger(__name__)

# KEYS: handoff, outbox. ARGV: record, ttl, sealed template or "", sealed started events or "",
# the preparing source's name or "" (written only when destinations route by source).
# Its first write is an HSET: over maxmemory, Redis refuses a script's first write if it is
# one that grows the data, and lets the rest through once one write is done (a DEL first
# would let a prepare grow the data past the limit).
PREPARE = Script("""
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'r', ARGV[1], 'o', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'r', ARGV[1])
  redis.call('HDEL', KEYS[1], 'o')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[2], '*', 'j', ARGV[4], 's', ARGV[5])
  else
    redis.call('XADD', KEYS[2], '*', 'j', ARGV[4])
  end
end
return 1
""")

# KEYS: handoff, outbox. ARGV: sealed exchange facts or "", the exchanging source's name or ""
# (written only when destinations route by source).
EXCHANGE = Script("""
local found = redis.call('HMGET', KEYS[1], 'r', 'o')
if not found[1] then
  return false
end
redis.call('DEL', KEYS[1])
if found[2] and ARGV[1] ~= '' then
  if ARGV[2] ~= '' then
    redis.call('XADD', KEYS[2], '*', 't', found[2], 'p', ARGV[1], 's', ARGV[2])
  else
    redis.call('XADD', KEYS[2], '*', 't', found[2], 'p', ARGV[1])
  end
end
return found[1]
""")

# KEYS: handoff, outbox. ARGV: sealed events, the destination they are addressed to. An AMP
# action's webhook call queued and its record used up. The XADD goes first: over maxmemory
# it is refused, and the record stays for a retry.
TAKE_AND_EMIT = Script("""
redis.call('XADD', KEYS[2], '*', 'j', ARGV[1], 'only', ARGV[2])
return redis.call('DEL', KEYS[1])
""")

# KEYS: an AMP action's record (a handoff hash), its lease. ARGV: the owner, the lease in
# milliseconds. The record (false: none) and 0 when the lease is the caller's now, or the
# milliseconds another owner's lease has left. A lease without a TTL (which this script never
# leaves behind) gets one rather than holding the record for ever.
CLAIM = Script("""
local record = redis.call('HGET', KEYS[1], 'r')
if not record then
  return false
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {record, 0}
end
local left = redis.call('PTTL', KEYS[2])
if left < 0 then
  left = tonumber(ARGV[2])
  redis.call('PEXPIRE', KEYS[2], left)
end
return {record, left}
""")

# KEYS: a lease. ARGV: its owner. Deletes the lease if that owner still holds it.
RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")

# KEYS: counter. ARGV: window in milliseconds. Counts one hit in a fixed window that starts
# with the first hit; returns {count, milliseconds left}. A counter found without a TTL
# (which this script never leaves behind) gets one rather than counting forever.
HIT = Script("""
local count = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  left = tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], left)
end
return {count, left}
""")


# An AMP hit in one call (one Redis node; a Cluster's keys lie in different slots).
# KEYS: the n counters, then the outbox (when there are events), then the link read (when
# one is), then the link kept (when one is: its own key, the same as the one read or not).
# ARGV: n; each counter's window in milliseconds and limit; "1" to read the link, "2" to
# read it and XADD the events only when there is none, or ""; the sealed events or ""; their
# source's name or ""; the link record to keep or ""; its TTL in seconds.
# Counts as HIT does; only when no count is over its limit, XADDs the events and then SETs
# the link (the XADD, the one write that can fail, goes first: a failure leaves no link
# behind). Returns each counter's count and milliseconds left, then the link as it was
# before (false: none, or not read).
AMP_HIT = Script("""
local n = tonumber(ARGV[1])
local reply = {}
local under = true
for i = 1, n do
  local count = redis.call('INCR', KEYS[i])
  local left = redis.call('PTTL', KEYS[i])
  if left < 0 then
    left = tonumber(ARGV[2 * i])
    redis.call('PEXPIRE', KEYS[i], left)
  end
  if count > tonumber(ARGV[2 * i + 1]) then
    under = false
  end
  reply[2 * i - 1] = count
  reply[2 * i] = left
end
local at = 2 * n + 2
local events = ARGV[at + 1] ~= ''
local link = events and n + 2 or n + 1
local found = false
if ARGV[at] ~= '' then
  found = redis.call('GET', KEYS[link])
  link = link + 1
end
reply[2 * n + 1] = found
if under and events and not (found and ARGV[at] == '2') then
  if ARGV[at + 2] ~= '' then
    redis.call('XADD', KEYS[n + 1], '*', 'j', ARGV[at + 1], 's', ARGV[at + 2])
  else
    redis.call('XADD', KEYS[n + 1], '*', 'j', ARGV[at + 1])
  end
end
if under and ARGV[at + 3] ~= '' then
  redis.call('SET', KEYS[link], ARGV[at + 3], 'EX', ARGV[at + 4])
end
return reply
""")


AdminClient = Redis | RedisCluster


def connect(settings: RedisSettings) -> AdminClient:
    """A redis-py client with no command retries, for the forwarder and the admin commands
    (the request path uses the lean clients): a ``RedisCluster`` on a Cluster (it follows
    MOVED and ASK), a client of the master the sentinels name with Sentinel."""
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    if settings.topology == "cluster":
        node = _node_options(settings.node_url)
        node.pop("db", None)
        seeds = [ClusterNode(host, port) for host, port in settings.nodes]
        cluster = RedisCluster(
            startup_nodes=seeds,
            max_connections=settings.max_connections,
            address_remap=_unnamed_on_the_seeds_host(settings.nodes),
            **node,
            **options,
        )
        # The connections of the nodes made from now on (its kwargs), and the seeds'.
        ssl = issubclass(cluster.connection_kwargs["connection_class"], AsyncSSLConnection)
        connection_class = _ClusterSSLConnection if ssl else _ClusterConnection
        cluster.connection_kwargs["connection_class"] = connection_class
        for seed in cluster.nodes_manager.startup_nodes.values():
            seed.connection_class = connection_class
        return cluster
    if settings.topology == "sentinel":
        node = _node_options(settings.node_url)
        username, password = settings.sentinel_auth
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(settings.nodes),
            # The sentinels take the URL's TLS options too (its CA, above all), as the
            # request path's client does, and the same bounded timeouts.
            sentinel_kwargs={
                **{name: value for name, value in node.items() if name.startswith("ssl")},
                "username": username,
                "password": password,
                "socket_timeout": settings.timeout,
                "socket_connect_timeout": settings.timeout,
            },
            max_connections=settings.max_connections,
            **node,
            **options,
        )
        client: Redis = sentinel.master_for(settings.service)
        return client
    # A blocking pool makes a burst of requests wait (up to the timeout) for a
    # connection instead of failing once max_connections are in use.
    pool = BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.max_connections, timeout=settings.timeout, **options
    )
    return Redis.from_pool(pool)


def _unnamed_on_the_seeds_host(
    seeds: tuple[tuple[str, int], ...],
) -> Callable[[tuple[str, int]], tuple[str, int]]:
    """redis-py's ``address_remap`` for the nodes a Cluster names by no host (nil, "" or
    "?": UNNAMED_HOSTS), which are on the host the client asked. redis-py took nil for
    localhost and "?" for a name, and does not say which node it asked: the seed's host
    of that port, else the first seed's (such a Cluster is reached on one host, each node
    on a port of its own)."""
    hosts = {port: host for host, port in reversed(seeds)}

    def remap(address: tuple[str | None, int]) -> tuple[str, int]:
        host, port = address
        return announced_host(host, hosts.get(port, seeds[0][0])), port

    return remap


class _ClusterConnection(AsyncConnection):
    """A connection to a Cluster node, reached on ``host``: a redirection to a node it names
    by no host (``MOVED <slot> :<port>``, ``?:<port>``: UNNAMED_HOSTS) is to ``host``, where
    redis-py found no node (its first keyed command is often redirected)."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except AskError as exc:  # MOVED too
            if exc.host in UNNAMED_HOSTS:
                exc.host = self.host
                exc.node_addr = (self.host, exc.port)
            raise


class _ClusterSSLConnection(_ClusterConnection, AsyncSSLConnection):
    """A TLS connection to a Cluster node, redirected as :class:`_ClusterConnection`."""


def follow_master(commands: Commands, admin: AdminClient) -> None:
    """Behind Sentinel, drop ``admin``'s connections, in use or idle, when ``commands`` sees
    the sentinels name another master. redis-py asks the sentinels only when it opens a
    connection: its open ones would go on writing (reclaims, trims, dead letters) to a
    replaced master that is still up, and what they wrote would be lost with it."""
    if isinstance(commands, SentinelClient) and isinstance(admin, Redis):
        pool = admin.connection_pool

        async def drop(first: bool) -> None:
            # In use too at the switch; later, the idle ones that went back to the old
            # master through a sentinel that had not switched yet.
            await pool.disconnect(inuse_connections=first)

        commands.switched.append(drop)


def _node_options(node_url: str) -> dict[str, Any]:
    """redis-py's connection options of a node URL, its host and port left out."""
    options: dict[str, Any] = parse_url(node_url)  # type: ignore[no-untyped-call]
    for name in ("host", "port"):
        options.pop(name, None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


class UnusableRedis(Exception):
    """What the URL reaches can never serve as it is written (one clear line): its form
    does not match what the Redis is, or Redis refuses its credentials."""


# Redis's answers to a wrong or missing password (Redis 6+; "invalid password" before), and
# to a password it has none for (Redis 6+; "Client sent AUTH" before): each an error's start,
# and what a message says of it (never the error's text, which may one day quote the URL's).
_REFUSED_CREDENTIALS = {
    "WRONGPASS": "WRONGPASS",
    "NOAUTH": "NOAUTH",
    "ERR invalid password": "invalid password",
    "ERR AUTH <password> called without any password configured": "no password configured",
    "ERR Client sent AUTH, but no password is set": "no password configured",
}


async def check_reachable(settings: RedisSettings) -> None:
    """Reach Redis once within the configured timeout; StoreUnavailable names its address.

    A one-node URL that reaches a Cluster node or a sentinel raises UnusableRedis: the
    requests would fail on most keys (MOVED) or on every command; so does a Cluster URL
    whose nodes are not in Cluster mode, and a Sentinel URL naming a node that answers and
    is not a sentinel (sentinels that do not answer are StoreUnavailable: they may be
    starting); so do credentials Redis refuses (WRONGPASS, NOAUTH, a password it has none
    for).
    """
    if settings.topology == "sentinel":
        await _check_sentinels(settings)
    client = lean_client(settings, settings.timeout)
    try:
        info = await client.execute("INFO") if settings.topology == "single" else None
        await client.execute("PING")
    except (ReplyError, OSError) as exc:
        if "cluster support disabled" in str(exc.__cause__):
            raise UnusableRedis(
                f"{settings.address} reaches Redis nodes without Cluster mode: use "
                "redis://<host:port>/<db> (one node) or redis+sentinel://"
            ) from exc
        refused = next((str(e) for e in (exc, exc.__cause__) if isinstance(e, ReplyError)), "")
        said = next((s for e, s in _REFUSED_CREDENTIALS.items() if refused.startswith(e)), None)
        if said is not None:
            # The credentials never change in a running process: it would answer 503 for ever.
            raise UnusableRedis(
                f"{settings.address} refused the credentials ({said}): set the user and "
                "password Redis expects in the URL"
            ) from exc
        raise StoreUnavailable(_describe(settings.address, exc)) from exc
    finally:
        await client.close()
    if info is not None:
        fields = _info_fields(info)
        if fields.get("redis_mode") == "sentinel":
            raise UnusableRedis(
                f"{settings.address} is a sentinel: name the master as "
                "redis+sentinel://<sentinel host:port,...>/<service name>"
            )
        if fields.get("cluster_enabled") == "1":
            raise UnusableRedis(
                f"{settings.address} is a Redis Cluster node: use "
                "redis+cluster://<host:port,...> (seed nodes)"
            )


async def _check_sentinels(settings: RedisSettings) -> None:
    """Raise UnusableRedis if a node the URL names as a sentinel answers and is not one."""
    sentinels = sentinel_clients(settings, settings.timeout)
    try:
        replies = await asyncio.gather(
            *(sentinel.execute("INFO", "server") for sentinel in sentinels),
            return_exceptions=True,
        )
    finally:
        for sentinel in sentinels:
            await sentinel.close()
    for (host, port), reply in zip(settings.nodes, replies, strict=True):
        if not isinstance(reply, bytes):  # no answer, or no entry: not known to be wrong
            continue
        mode = _info_fields(reply).get("redis_mode")
        if mode is not None and mode != "sentinel":  # a server that does not say: not known
            raise UnusableRedis(
                f"{host_port(host, port)} is not a sentinel but a Redis {mode} node: name "
                "the sentinels as redis+sentinel://<sentinel host:port,...>/<service name>, "
                "or one node as redis://<host:port>/<db>"
            )


def _info_fields(info: bytes) -> dict[str, str]:
    """The ``name:value`` fields of an ``INFO`` reply."""
    return dict(line.partition(":")[::2] for line in info.decode(errors="replace").splitlines())


class RedisStore:
    """Keeps records in Redis with their TTL and their events set in the same script.

    ``tag_sources`` (some destination takes only some sources' events): each outbox entry
    carries its source's name (field ``s``), which the destinations' feeds route on.
    Otherwise entries are written as before, for every destination. ``metrics`` counts the
    ``WAIT``s short of their replicas (``IDENTITY_REDIS_WAIT``).
    """

    def __init__(
        self,
        settings: RedisSettings,
        sealer: OutboxSealer,
        tag_sources: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._tag_sources = tag_sources
        self._prefix = settings.key_prefix
        self._shards = settings.shards
        self._address = settings.address
        self._sealer = sealer
        self._metrics = metrics
        self._waits = Waits(*settings.wait) if settings.wait is not None else None
        self._redis = lean_client(settings, settings.timeout)
        # An AMP hit in one script call (AMP_HIT), or, on a Cluster, where its keys lie in
        # different slots, a call per counter, then its writes.
        self.one_script_hits = settings.topology != "cluster"

    @property
    def commands(self) -> Commands:
        """The lean client requests go through (a ClusterClient on a Cluster)."""
        return self._redis

    async def put(
        self, lookup_id: bytes, record: bytes, ttl_seconds: int, events: PrepareEvents | None
    ) -> None:
        template = started = b""
        if events is not None:
            if events.completion is not None:
                template = self._sealer.seal(orjson.dumps(events.completion))
            if events.started:
                started = self._sealer.seal(ev.join_documents(events.started))
        source = events.source if events is not None and self._tag_sources else None
        args: list[Arg] = [record, ttl_seconds, template, started, source or ""]
        keys = self._keys(lookup_id)
        await self._guarded(self._write(PREPARE, keys, args, "prepare"))

    async def take(self, lookup_id: bytes, facts: dict[str, Any] | None) -> bytes | None:
        sealed_facts = source = b""
        if facts is not None:
            sealed_facts = self._sealer.seal(orjson.dumps(facts))
            if self._tag_sources:
                source = facts["source"].encode()
        keys = self._keys(lookup_id)
        args: list[Arg] = [sealed_facts, source]
        record = await self._guarded(self._write(EXCHANGE, keys, args, "exchange"))
        assert record is None or isinstance(record, bytes)
        return record

    async def read(self, lookup_id: bytes) -> bytes | None:
        key = handoff_key(self._prefix, lookup_id, self._shards)
        record = await self._guarded(self._redis.call(key, "HGET", key, "r"))
        assert record is None or isinstance(record, bytes)
        return record

    async def claim(self, lookup_id: bytes, owner: bytes, lease_seconds: float) -> Claim | None:
        keys = [
            handoff_key(self._prefix, lookup_id, self._shards),
            lease_key(self._prefix, lookup_id, self._shards),
        ]
        args: list[Arg] = [owner, max(1, round(lease_seconds * 1000))]
        reply = await self._guarded(self._redis.run_script(CLAIM, keys, args))
        if reply is None:
            return None
        record, left = reply
        assert isinstance(record, bytes)
        return Claim(record, leased_for=int(left) / 1000)

    async def release(self, lookup_id: bytes, owner: bytes) -> None:
        key = lease_key(self._prefix, lookup_id, self._shards)
        await self._guarded(self._redis.run_script(RELEASE, [key], [owner]))

    async def take_and_emit(self, lookup_id: bytes, events: list[ev.Event], only: str) -> None:
        args: list[Arg] = [self._sealer.seal(ev.join_documents(events)), only]
        # A single-use take, replicated as an exchange's is (IDENTITY_REDIS_WAIT).
        await self._guarded(self._write(TAKE_AND_EMIT, self._keys(lookup_id), args, "exchange"))

    def _write(
        self, script: Script, keys: list[str], args: list[Arg], operation: str
    ) -> Awaitable[Reply]:
        """The handoff write ``script``: alone, or followed by a WAIT (``_replicated``)."""
        if self._waits is None:
            return self._redis.run_script(script, keys, args)
        return self._replicated(script, keys, args, operation)

    async def _replicated(
        self, script: Script, keys: list[str], args: list[Arg], operation: str
    ) -> Reply:
        """``script``, then a ``WAIT`` that covers it, on the connection that ran it
        (replication.py: in the same write when none is in flight on that connection, else
        one shared by every request meanwhile).

        Fewer replicas than asked within the timeout does not fail the request: the write
        is done on the master, and a 503 would make the client retry, which for an exchange
        is the very double redemption WAIT is there to prevent (docs/redis-topologies.md).
        """
        assert self._waits is not None
        reply, acknowledged = await self._waits.after(self._redis, script, keys, args)
        if acknowledged < self._waits.replicas:
            if self._metrics is not None:
                self._metrics.inc("identity_redis_wait_short_total", operation=operation)
            logger.warning(
                "redis_wait_short",
                operation=operation,
                replicas=acknowledged,
                wanted=self._waits.replicas,
            )
        return reply

    def _outbox_for(self, shard_hint: bytes) -> str:
        return outbox_key(self._prefix, spread_shard(shard_hint, self._shards), self._shards)

    async def emit(
        self,
        shard_hint: bytes,
        events: list[ev.Event],
        only: str | None = None,
        source: str | None = None,
    ) -> None:
        stream = self._outbox_for(shard_hint)
        sealed = self._sealer.seal(ev.join_documents(events))
        addressed: list[Arg] = ["only", only] if only is not None else []
        if source is not None and self._tag_sources:
            addressed += ["s", source]
        await self._guarded(self._redis.call(stream, "XADD", stream, "*", "j", sealed, *addressed))

    async def keep(self, key_id: bytes, record: bytes, ttl_seconds: int) -> None:
        key = link_key(self._prefix, key_id, self._shards)
        await self._guarded(self._redis.call(key, "SET", key, record, "EX", ttl_seconds))

    async def peek(self, key_id: bytes) -> bytes | None:
        key = link_key(self._prefix, key_id, self._shards)
        record = await self._guarded(self._redis.call(key, "GET", key))
        assert record is None or isinstance(record, bytes)
        return record

    async def hit(self, counters: list[tuple[bytes, int]]) -> list[tuple[int, float]]:
        calls = [
            self._redis.run_script(
                HIT, [rate_key(self._prefix, counter_id, self._shards)], [window * 1000]
            )
            for counter_id, window in counters
        ]
        if len(calls) == 1:  # nothing to pipeline: no task needed
            replies = [await self._guarded(calls[0])]
        else:
            # Issued in one loop iteration, the calls leave in one write: one round trip.
            replies = await self._guarded(asyncio.gather(*calls))
        return [(int(count), int(left) / 1000) for count, left in replies]

    async def hit_and_write(
        self,
        counters: list[Counted],
        peek: bytes | None = None,
        emit: Emitted | None = None,
        keep: Kept | None = None,
        unless_peeked: bool = False,
    ) -> HitOutcome:
        if not self.one_script_hits:
            return await self._hit_then_write(counters, peek, emit, keep, unless_peeked)
        keys = [rate_key(self._prefix, c.counter_id, self._shards) for c in counters]
        args: list[Arg] = [len(counters)]
        for counter in counters:
            args += (counter.window_seconds * 1000, counter.limit)
        args.append(b"" if peek is None else b"2" if unless_peeked else b"1")
        if emit is not None:
            keys.append(self._outbox_for(emit.shard_hint))
            source = emit.source if emit.source is not None and self._tag_sources else ""
            args += (self._sealer.seal(ev.join_documents(emit.events)), source)
        else:
            args += (b"", b"")
        if peek is not None:
            keys.append(link_key(self._prefix, peek, self._shards))
        if keep is not None:
            keys.append(link_key(self._prefix, keep.key_id, self._shards))
            args += (keep.record, keep.ttl_seconds)
        else:
            args += (b"", 0)
        reply = await self._guarded(self._redis.run_script(AMP_HIT, keys, args))
        counts = [(int(reply[i]), int(reply[i + 1]) / 1000) for i in range(0, len(reply) - 1, 2)]
        record = reply[-1]
        kept = keep is not None and under_limits(counters, counts)
        return HitOutcome(counts, record if isinstance(record, bytes) else None, kept)

    async def _hit_then_write(
        self,
        counters: list[Counted],
        peek: bytes | None,
        emit: Emitted | None,
        keep: Kept | None,
        unless_peeked: bool,
    ) -> HitOutcome:
        """``hit_and_write`` in several calls: the counters (and the read) in one write,
        then the event and the link in another."""
        counting = self.hit([(c.counter_id, c.window_seconds) for c in counters])
        if peek is None:
            counts, record = await counting, None
        else:
            counts, record = await asyncio.gather(counting, self.peek(peek))
        if not under_limits(counters, counts):
            return HitOutcome(counts, record)
        writes: list[Awaitable[Exception | None]] = []
        if emit is not None and not (unless_peeked and record is not None):
            writes.append(self.emit(emit.shard_hint, emit.events, source=emit.source))
        if keep is not None:
            writes.append(keep_apart(self, keep))
        done = await asyncio.gather(*writes)
        error = done[-1] if keep is not None else None
        return HitOutcome(counts, record, kept=keep is not None and error is None, keep_error=error)

    async def ping(self) -> None:
        await self._guarded(self._redis.execute("PING"))

    async def close(self) -> None:
        await self._redis.close()

    async def _guarded(self, call: Awaitable[Reply]) -> Reply:
        """Await ``call``; a Redis error or a lost connection becomes StoreUnavailable."""
        try:
            return await call
        except (ReplyError, OSError) as exc:
            raise StoreUnavailable(_describe(self._address, exc)) from exc

    def _keys(self, lookup_id: bytes) -> list[str]:
        return [
            handoff_key(self._prefix, lookup_id, self._shards),
            outbox_key(self._prefix, shard_of(lookup_id, self._shards), self._shards),
        ]


def _describe(address: str, exc: BaseException) -> str:
    """What failed, where (the address without its password), and Redis's error code."""
    code = f" {str(exc).split(maxsplit=1)[0]}" if isinstance(exc, ReplyError) and str(exc) else ""
    return f"redis at {address} ({type(exc).__name__}{code})"
