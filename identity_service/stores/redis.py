"""The Redis store: one script call per request, keys with Cluster hash tags.

A handoff is a hash: ``r``, the record sealed under its token, and ``o``, the completion
template sealed under the server secret (absent when no events are due). Its shard's
outbox stream shares its hash tag, so each script touches one slot:

- prepare: replace the hash, set its TTL, and XADD the started events, atomically;
- exchange: read and delete the hash and XADD the completion entry, atomically.

Kept records (AMP clientId links) are plain strings written with their TTL by one ``SET``.
Rate-limit counters are one script call each (``HIT``): counters of one request have ids
in different shards, so no one script may touch them all in a Cluster, but their calls go
out together and the pipelined client sends them in one write.

Scripts go through the pipelined :class:`RespClient` (see resp.py for why it never
retries). A failure surfaces as StoreUnavailable (503 with Retry-After) and the next
request uses a fresh connection, so the service recovers by itself when Redis returns.
"""

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from identity_service import events as ev
from identity_service.constants import handoff_key, link_key, outbox_key, rate_key, shard_of
from identity_service.crypto import OutboxSealer
from identity_service.problems import StoreUnavailable
from identity_service.settings import RedisSettings
from identity_service.stores import PrepareEvents
from identity_service.stores.resp import Arg, Reply, ReplyError, RespClient, Script

# KEYS: handoff, outbox. ARGV: record, ttl, sealed template or "", sealed started events or "",
# the preparing source's name or "" (written only when destinations route by source).
PREPARE = Script("""
redis.call('DEL', KEYS[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'r', ARGV[1], 'o', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'r', ARGV[1])
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


def connect(settings: RedisSettings) -> Redis:
    """A redis-py client with a blocking pool and no command retries, for the forwarder and
    the admin commands (the request path uses :class:`RespClient`)."""
    # A blocking pool makes a burst of requests wait (up to the timeout) for a
    # connection instead of failing once max_connections are in use.
    pool = BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.timeout,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
    return Redis.from_pool(pool)


async def check_reachable(settings: RedisSettings) -> None:
    """PING Redis once within the configured timeout; StoreUnavailable names its address."""
    client = RespClient(settings.url, settings.timeout)
    try:
        await client.execute("PING")
    except (ReplyError, OSError) as exc:
        raise StoreUnavailable(_describe(settings.address, exc)) from exc
    finally:
        await client.close()


class RedisStore:
    """Keeps records in Redis with their TTL and their events set in the same script.

    ``tag_sources`` (some destination takes only some sources' events): each outbox entry
    carries its source's name (field ``s``), which the destinations' feeds route on.
    Otherwise entries are written as before, for every destination.
    """

    def __init__(
        self, settings: RedisSettings, sealer: OutboxSealer, tag_sources: bool = False
    ) -> None:
        self._tag_sources = tag_sources
        self._prefix = settings.key_prefix
        self._address = settings.address
        self._sealer = sealer
        self._redis = RespClient(settings.url, settings.timeout)

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
        await self._guarded(self._redis.run_script(PREPARE, self._keys(lookup_id), args))

    async def take(self, lookup_id: bytes, facts: dict[str, Any] | None) -> bytes | None:
        sealed_facts = source = b""
        if facts is not None:
            sealed_facts = self._sealer.seal(orjson.dumps(facts))
            if self._tag_sources:
                source = facts["source"].encode()
        keys = self._keys(lookup_id)
        script = self._redis.run_script(EXCHANGE, keys, [sealed_facts, source])
        record = await self._guarded(script)
        assert record is None or isinstance(record, bytes)
        return record

    async def emit(
        self,
        shard_hint: bytes,
        events: list[ev.Event],
        only: str | None = None,
        source: str | None = None,
    ) -> None:
        stream = outbox_key(self._prefix, shard_of(shard_hint))
        sealed = self._sealer.seal(ev.join_documents(events))
        addressed: list[Arg] = ["only", only] if only is not None else []
        if source is not None and self._tag_sources:
            addressed += ["s", source]
        await self._guarded(self._redis.execute("XADD", stream, "*", "j", sealed, *addressed))

    async def keep(self, key_id: bytes, record: bytes, ttl_seconds: int) -> None:
        key = link_key(self._prefix, key_id)
        await self._guarded(self._redis.execute("SET", key, record, "EX", ttl_seconds))

    async def peek(self, key_id: bytes) -> bytes | None:
        record = await self._guarded(self._redis.execute("GET", link_key(self._prefix, key_id)))
        assert record is None or isinstance(record, bytes)
        return record

    async def hit(self, counters: list[tuple[bytes, int]]) -> list[tuple[int, float]]:
        calls = [
            self._redis.run_script(HIT, [rate_key(self._prefix, counter_id)], [window * 1000])
            for counter_id, window in counters
        ]
        if len(calls) == 1:  # nothing to pipeline: no task needed
            replies = [await self._guarded(calls[0])]
        else:
            # Issued in one loop iteration, the calls leave in one write: one round trip.
            replies = await self._guarded(asyncio.gather(*calls))
        return [(int(count), int(left) / 1000) for count, left in replies]

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
            handoff_key(self._prefix, lookup_id),
            outbox_key(self._prefix, shard_of(lookup_id)),
        ]


def _describe(address: str, exc: BaseException) -> str:
    """What failed, where (the address without its password), and Redis's error code."""
    code = f" {str(exc).split(maxsplit=1)[0]}" if isinstance(exc, ReplyError) and str(exc) else ""
    return f"redis at {address} ({type(exc).__name__}{code})"
