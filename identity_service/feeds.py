"""Where the forwarder reads events from: the Redis outbox streams, or the in-memory queue.

A feed hands out entries (one or more events each), and is told afterwards what became of
them: acknowledged (delivered) or dead-lettered. On Redis each destination is a consumer
group over every shard's stream (on a Cluster read shard by shard: ``_read_each``); an
entry stays pending until acknowledged, a dead forwarder's pending entries are reclaimed
with XAUTOCLAIM (and its consumer deleted once nothing is pending under it), and streams
are trimmed only below the oldest entry some group still needs.

The reads and acknowledgements, a few per batch, go through a pipelined lean client of the
feed's own (topology.py; a blocking read holds its connection); the rarer commands (group
creation, reclaiming, trimming, dead letters) through redis-py (``RedisCluster`` on a
Cluster, which sends each shard's commands to its node).
"""

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import structlog
from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from identity_service import events as ev
from identity_service.constants import KEY_SHARDS, dead_letter_key, outbox_key
from identity_service.crypto import OutboxSealer, SealError
from identity_service.stores.memory import MemoryQueue
from identity_service.stores.redis import AdminClient
from identity_service.stores.resp import ReplyError, Script
from identity_service.stores.topology import ClusterClient, Commands
from identity_service.streams import parse_id, text

logger = structlog.get_logger(__name__)

RECLAIM_BATCH = 100
# A consumer idle this many reclaim_idle times over, with nothing pending, is deleted from
# its group (RETIRE_IDLE_CONSUMERS): every forwarder start joins under a new name, and a
# group would otherwise keep every consumer that ever read it. A live forwarder touches
# every stream it reads about once a second; one waiting out a long retry delay may not,
# but deleting it costs nothing: its next read or claim makes it again.
RETIRE_AFTER_RECLAIM_IDLES = 10

# KEYS: an outbox stream. ARGV: a consumer group, the calling consumer, an idle time in ms.
# Deletes the group's consumers idle longer than that with no entry pending, the caller
# apart, and returns how many. In a script, so that no entry becomes a consumer's between
# the look and the delete: XGROUP DELCONSUMER drops what a consumer has pending, which
# would then be pending nowhere, and trimmed. A dead forwarder's entries are taken over
# (XAUTOCLAIM, after reclaim_idle) and delivered first; its consumer goes after.
RETIRE_IDLE_CONSUMERS = Script("""
local retired = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #fields, 2 do
    consumer[fields[i]] = fields[i + 1]
  end
  if consumer['name'] ~= ARGV[2] and consumer['pending'] == 0
      and consumer['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
    retired = retired + 1
  end
end
return retired
""")
# On a Cluster, how long an empty read waits before reading again (no BLOCK there: see
# RedisFeed._read_each).
POLL_SECONDS = 0.05


@dataclass(slots=True)
class FeedEntry:
    """One outbox entry: where it came from, and its events, each a JSON document."""

    entry_id: str
    stream: str
    events: list[bytes]
    fields: dict[bytes, bytes] = field(default_factory=dict)


class Feed(Protocol):
    # After a read: whether more entries may be waiting right now.
    backlog: bool
    # During a read: whether the store has handed it entries, which are then this
    # consumer's (a stop lets such a read end rather than strand them until a reclaim).
    taking: bool

    async def read(self, max_entries: int, wait: float) -> list[FeedEntry]: ...

    async def ack(self, entries: list[FeedEntry]) -> None: ...

    async def dead_letter(
        self, entries: list[FeedEntry], reason: str, attempts: int = 0
    ) -> None: ...

    async def keep_alive(self, entries: list[FeedEntry]) -> None: ...

    async def release(self, entries: list[FeedEntry]) -> None:
        """Give back entries read but not settled, when stopping."""

    async def maintain(self) -> None: ...


class MemoryFeed:
    """Reads the embedded store's queue. Nothing survives the process, and dead letters
    are only counted (the queue's ``dead_letters``): nothing could replay them."""

    def __init__(self, queue: MemoryQueue) -> None:
        self._outbox = queue
        self._sequence = 0
        self.backlog = False
        self.taking = False  # entries are taken from the queue without awaiting

    async def read(self, max_entries: int, wait: float) -> list[FeedEntry]:
        queue = self._outbox.events
        if not queue:
            self._outbox.arrived.clear()
            try:
                await asyncio.wait_for(self._outbox.arrived.wait(), wait)
            except TimeoutError:
                return []
        entries: list[FeedEntry] = []
        taken = self._outbox.taken
        while queue and len(entries) < max_entries:
            self._sequence += 1
            entry_id = str(self._sequence)
            taken[entry_id], event = queue.popleft()
            entries.append(FeedEntry(entry_id, "memory", [event]))
        self.backlog = bool(queue)
        return entries

    async def ack(self, entries: list[FeedEntry]) -> None:
        self._settle(entries)

    async def dead_letter(self, entries: list[FeedEntry], reason: str, attempts: int = 0) -> None:
        self._settle(entries)
        self._outbox.dead_letters += len(entries)

    async def keep_alive(self, entries: list[FeedEntry]) -> None:
        return None

    async def release(self, entries: list[FeedEntry]) -> None:
        """Put the events back at the front of the queue, in order, for the drain."""
        taken = self._outbox.taken
        for entry in reversed(entries):
            queued_at = taken.pop(entry.entry_id, 0.0)
            self._outbox.events.extendleft((queued_at, event) for event in reversed(entry.events))

    def _settle(self, entries: list[FeedEntry]) -> None:
        taken = self._outbox.taken
        for entry in entries:
            taken.pop(entry.entry_id, None)

    async def maintain(self) -> None:
        return None


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class RedisFeed:
    """One destination's consumer group over the shards' outbox streams."""

    def __init__(
        self,
        redis: AdminClient,
        commands: Commands,
        prefix: str,
        destination: str,
        sealer: OutboxSealer,
        reclaim_idle: float,
        all_destinations: list[str],
        addressed_only: bool = False,
        sources: frozenset[str] | None = None,
        shards: int = KEY_SHARDS,
        trim: bool = True,
    ) -> None:
        """``addressed_only``: deliver only the entries whose ``only`` names ``destination``
        (an AMP action's webhook); other destinations deliver those without ``only`` too,
        but with ``sources``, only those whose source (field ``s``) is one of them.
        ``trim``: False when events are emitted and no destination configured takes them
        (only AMP actions' do exist): the actions' groups skip the events and need none of
        them, which wait in the streams for a destination, so the streams are not trimmed.
        With ``IDENTITY_OUTBOX=actions`` no event is written, and the streams are trimmed."""
        self._redis = redis
        self._addressed_only = addressed_only
        self._sources = None if sources is None else {name.encode() for name in sources}
        self._commands = commands
        self._prefix = prefix
        self._group = destination
        # ``only`` is compared as Redis holds it: decoding it per entry would cost more, and
        # one that is not UTF-8 (a damaged or hand-made entry) would raise out of the read.
        self._only = destination.encode()
        # Every configured destination's group exists before anything is trimmed, so a
        # destination whose forwarder has not started yet loses nothing.
        self._groups = sorted({destination, *all_destinations})
        self._consumer = consumer_name()
        self._sealer = sealer
        self._reclaim_idle_ms = max(1, int(reclaim_idle * 1000))
        self._retire_idle_ms = RETIRE_AFTER_RECLAIM_IDLES * self._reclaim_idle_ms
        # Idle consumers are looked for at the first maintenance, then every reclaim_idle.
        self._retire_every = reclaim_idle
        self._retired_at: float | None = None
        self._shards = shards
        self._streams = [outbox_key(prefix, shard, shards) for shard in range(shards)]
        self._shard_of_stream = {stream: shard for shard, stream in enumerate(self._streams)}
        # The streams of 0.3.0 and earlier, whose tags were the shard numbers: read while
        # they exist, so an upgrade strands no entry. Their dead letters go to the new keys.
        legacy = legacy_outbox_streams(redis, prefix, shards)
        self._legacy = [stream for stream, _ in legacy]
        self._shard_of_stream.update(legacy)
        self._read_streams = list(self._streams)
        self._new_entries = [">"] * len(self._read_streams)
        self._reclaimed: list[FeedEntry] = []
        # On a Cluster, a shard's failed read, raised by the next read (see _read_each).
        self._read_failure: BaseException | None = None
        self._groups_ready = False
        self._trim = trim
        self.backlog = False
        self.taking = False

    async def read(self, max_entries: int, wait: float) -> list[FeedEntry]:
        async with self._groups_checked():
            return await self._read(max_entries, wait)

    async def _read(self, max_entries: int, wait: float) -> list[FeedEntry]:
        await self._ensure_groups()
        if self._reclaimed:
            entries, self._reclaimed = (
                self._reclaimed[:max_entries],
                self._reclaimed[max_entries:],
            )
            self.backlog = True
            return entries
        # COUNT applies per stream: ask each shard for its share of what is wanted.
        count = -(-max_entries // self._shards)
        if isinstance(self._commands, ClusterClient):
            answer = await self._read_each(count, wait)
        else:
            answer = await self._read_all(count, wait)
        # A shard that filled its COUNT may hold more: the forwarder should read again.
        self.backlog = any(len(messages) >= count for _, messages in answer or [])
        read: list[FeedEntry] = []
        self.taking = True
        try:
            for stream, messages in answer or []:
                decoded = [(entry_id, _field_dict(fields)) for entry_id, fields in messages]
                read.extend(await self._decode_all(text(stream), decoded))
                # Opening a whole read's entries takes a third of a millisecond or more,
                # and the worker's requests wait meanwhile: they go between shards.
                await asyncio.sleep(0)
        finally:
            self.taking = False
        return read

    async def _read_all(self, count: int, wait: float) -> Any:
        """One blocking read over every shard's stream (one node holds them all)."""
        try:
            return await self._commands.execute(
                "XREADGROUP",
                "GROUP",
                self._group,
                self._consumer,
                "COUNT",
                count,
                "BLOCK",
                max(1, int(wait * 1000)),
                "STREAMS",
                *self._read_streams,
                *self._new_entries,
            )
        except asyncio.CancelledError:
            # Redis would go on blocking, and hand entries that arrive meanwhile to a
            # reply nobody reads (pending until reclaimed). Dropping the connection ends it.
            self._commands.disconnect()
            raise

    async def _read_each(self, count: int, wait: float) -> list[Any]:
        """On a Cluster: one XREADGROUP per shard, since no command may name keys of
        different slots, all sent at once, so each node gets one write for its shards.
        Without BLOCK (a blocked command would hold its node's connection, and the reads of
        that node's other shards behind it): an empty read is tried again every
        ``POLL_SECONDS`` until ``wait`` is over.

        A shard whose read fails (its node is down) does not discard what the others read:
        those entries are now pending for this consumer, and would wait for a reclaim. They
        are returned, and the failure is raised by the next read instead."""
        if self._read_failure is not None:
            failure, self._read_failure = self._read_failure, None
            raise failure
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            # No BLOCK: a shard's answer may hold entries at once (see RedisFeed.taking).
            self.taking = True
            try:
                answers = await asyncio.gather(
                    *(
                        self._commands.call(
                            stream, "XREADGROUP", "GROUP", self._group, self._consumer,
                            "COUNT", count, "STREAMS", stream, ">",
                        )
                        for stream in self._streams
                    ),
                    return_exceptions=True,
                )  # fmt: skip
            finally:
                self.taking = False
            found = []
            for answer in answers:
                if isinstance(answer, BaseException):
                    self._read_failure = self._read_failure or answer
                elif answer:
                    found.append(answer[0])
            if self._read_failure is not None and not found:
                failure, self._read_failure = self._read_failure, None
                raise failure
            if found or loop.time() + POLL_SECONDS > deadline:
                return found
            await asyncio.sleep(POLL_SECONDS)

    async def ack(self, entries: list[FeedEntry]) -> None:
        # One write for all shards: the client pipelines what is sent in one loop iteration.
        await asyncio.gather(
            *(
                self._commands.call(stream, "XACK", stream, self._group, *ids)
                for stream, ids in _by_stream(entries).items()
            )
        )

    async def dead_letter(self, entries: list[FeedEntry], reason: str, attempts: int = 0) -> None:
        """Move ``entries`` to their dead letters with why, when, and after how many sends
        (0: never sent), which `outbox dead` shows."""
        failed_at = str(int(time.time() * 1000)).encode()
        for entry in entries:
            shard = self._shard_of_stream[entry.stream]
            dead = dead_letter_key(self._prefix, shard, self._group, self._shards)
            fields = {
                **entry.fields,
                b"reason": reason.encode(),
                b"failed_at": failed_at,
                b"attempts": str(attempts).encode(),
            }
            # Same hash tag: the move is one transaction, even on a Cluster.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(dead, fields)  # type: ignore[arg-type]
                pipe.xack(entry.stream, self._group, entry.entry_id)
                await pipe.execute()

    async def keep_alive(self, entries: list[FeedEntry]) -> None:
        """Reset the entries' idle time so no other forwarder reclaims them while we retry.

        Groups lost with the data are made again first, as a read does: entries read
        before then are no longer pending anywhere, and XCLAIM passes over them.

        The entries this feed reclaimed and has not handed out yet are ours too: kept
        alive with them, or another forwarder would take them over during a retry delay
        and send them a second time.
        """
        async with self._groups_checked():
            await self._ensure_groups()
            await self._keep_alive(entries + self._reclaimed)

    async def _keep_alive(self, entries: list[FeedEntry]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, ids in _by_stream(entries).items():
                pipe.xclaim(stream, self._group, self._consumer, 0, list[Any](ids), justid=True)
            await pipe.execute()

    async def release(self, entries: list[FeedEntry]) -> None:
        """Nothing to do: the entries stay pending, and are reclaimed after reclaim_idle."""

    async def maintain(self) -> None:
        """Reclaim entries a dead forwarder left pending, trim what every group acked, and
        now and then delete the group's consumers long idle with nothing pending."""
        async with self._groups_checked():
            await self._maintain()

    async def _maintain(self) -> None:
        await self._ensure_groups()
        if self._reclaimed:
            # Ours now; keep them from looking idle until they are delivered.
            await self._keep_alive(self._reclaimed)
        for stream in self._read_streams:
            if not self._reclaimed:
                answer = await self._redis.xautoclaim(
                    stream,
                    self._group,
                    self._consumer,
                    self._reclaim_idle_ms,
                    start_id="0-0",
                    count=RECLAIM_BATCH,
                )
                if answer[1]:
                    logger.info("outbox_reclaimed", stream=stream, entries=len(answer[1]))
                    self._reclaimed.extend(await self._decode_all(stream, answer[1]))
            if self._trim:
                await trim_acknowledged(self._redis, stream)
        now = time.monotonic()
        if self._retired_at is None or now - self._retired_at >= self._retire_every:
            self._retired_at = now
            await self._retire_idle_consumers()

    async def _retire_idle_consumers(self) -> None:
        """Delete the group's consumers idle past ``RETIRE_AFTER_RECLAIM_IDLES`` times
        reclaim_idle with nothing pending (the forwarders that stopped or died), stream by
        stream, each stream's in its own slot."""
        for stream in self._read_streams:
            retired = await self._commands.run_script(
                RETIRE_IDLE_CONSUMERS,
                [stream],
                [self._group, self._consumer, self._retire_idle_ms],
            )
            if retired:
                logger.info("outbox_consumers_retired", stream=stream, consumers=retired)

    @asynccontextmanager
    async def _groups_checked(self) -> AsyncIterator[None]:
        """Notice groups lost with the data (a Redis restarted without persistence), so the
        next read, keep-alive or maintenance makes them again.

        Around every command that names a group and answers NOGROUP without it: XREADGROUP,
        XCLAIM, XAUTOCLAIM, XPENDING. XACK (``ack``, ``dead_letter``) answers 0 instead.
        """
        try:
            yield
        except (ResponseError, ReplyError) as exc:
            if "NOGROUP" in str(exc):
                self._groups_ready = False
            raise

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        legacy = [stream for stream in self._legacy if await self._redis.exists(stream)]
        for stream in [*self._streams, *legacy]:
            for group in self._groups:
                try:
                    await self._redis.xgroup_create(
                        stream, group, id="0", mkstream=stream not in legacy
                    )
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        self._read_streams = self._streams + legacy
        self._new_entries = [">"] * len(self._read_streams)
        self._groups_ready = True

    async def _decode_all(self, stream: str, messages: list[Any]) -> list[FeedEntry]:
        entries, poisoned, not_ours = [], [], []
        for entry_id, fields in messages:
            if fields is None:
                # Deleted while pending (an XDEL): Redis 6.2's XAUTOCLAIM hands it back
                # without fields and keeps it pending (7.0 drops it from the PEL itself).
                # Acknowledged, or it would stay the group's oldest pending entry, and no
                # trim would pass it again.
                not_ours.append(text(entry_id))
                continue
            entry = FeedEntry(text(entry_id), stream, [], fields)
            if not self._wanted(fields.get(b"only"), fields.get(b"s")):
                not_ours.append(entry.entry_id)
                continue
            try:
                entry.events = self._decode(fields)
            except (SealError, ValueError, KeyError, TypeError) as exc:
                logger.error("outbox_entry_unreadable", stream=stream, error=type(exc).__name__)
                poisoned.append(entry)
                continue
            entries.append(entry)
        if not_ours:
            # One acknowledgement for the read: an action's feed skips every event entry.
            await self._redis.xack(stream, self._group, *not_ours)
        if poisoned:
            await self.dead_letter(poisoned, "unreadable entry")
        return entries

    def _wanted(self, only: bytes | None, source: bytes | None) -> bool:
        """Whether an entry addressed to ``only`` (None: to every destination) from
        ``source`` (None: written without one) is ours."""
        if only is not None:
            return only == self._only
        if self._addressed_only:
            return False
        return self._sources is None or source is None or source in self._sources

    def _decode(self, fields: dict[bytes, bytes]) -> list[bytes]:
        if b"j" in fields:  # one JSON document a line, sent on as they are
            return ev.split_documents(self._sealer.open(fields[b"j"]))
        if b"e" in fields:
            # One JSON list, the format written before j: entries an older version queued
            # still drain. (The version before this one already read j, so a rolling
            # upgrade from it, or a rollback to it, loses nothing.)
            return [ev.encode(e) for e in orjson.loads(self._sealer.open(fields[b"e"]))]
        template = orjson.loads(self._sealer.open(fields[b"t"]))
        facts = orjson.loads(self._sealer.open(fields[b"p"]))
        return [ev.encode(event) for event in ev.complete(template, facts)]


def legacy_outbox_keys(prefix: str) -> list[str]:
    """The outbox streams of 0.3.0 and earlier: tags ``{0}`` to ``{15}``."""
    return [f"{prefix}{{{shard}}}:outbox" for shard in range(KEY_SHARDS)]


def legacy_outbox_streams(redis: AdminClient, prefix: str, shards: int) -> list[tuple[str, int]]:
    """The outbox streams 0.3.0 and earlier wrote (tags ``{0}``…``{15}``) that are not
    today's keys, each with the shard whose dead letters its entries go to; none on a
    Cluster (those versions never ran there). The feeds read them while they exist;
    ``outbox status``, ``retire`` and the scrape read the same list."""
    if isinstance(redis, RedisCluster):
        return []
    current = {outbox_key(prefix, shard, shards) for shard in range(shards)}
    return [
        (stream, shard % shards)
        for shard, stream in enumerate(legacy_outbox_keys(prefix))
        if stream not in current
    ]


def legacy_dead_letter_keys(prefix: str, destination: str) -> list[str]:
    """A destination's dead letters as 0.3.0 and earlier kept them: tags ``{0}`` to ``{15}``."""
    return [f"{prefix}{{{shard}}}:dead:{destination}" for shard in range(KEY_SHARDS)]


def legacy_dead_letters(
    redis: AdminClient, prefix: str, destination: str, shards: int
) -> list[tuple[str, str]]:
    """The dead letters 0.3.0 and earlier kept (tags ``{0}``…``{15}``) that are not today's
    keys, each with the outbox stream of the shard its letters go back to; none on a
    Cluster (those versions never ran there). ``outbox status``, ``replay-dead`` and the
    scrape read the same list."""
    if isinstance(redis, RedisCluster):
        return []
    current = {dead_letter_key(prefix, shard, destination, shards) for shard in range(shards)}
    return [
        (outbox_key(prefix, shard % shards, shards), dead)
        for shard, dead in enumerate(legacy_dead_letter_keys(prefix, destination))
        if dead not in current
    ]


async def trim_acknowledged(redis: AdminClient, stream: str) -> None:
    """Drop the entries below the oldest one that any consumer group still needs.

    Every group counts, configured here or not: another process may deliver to a
    destination this one does not know. ``outbox retire`` removes a group for good.
    """
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return
    needed: list[tuple[int, int]] = []
    for group in groups:
        oldest = await oldest_pending(redis, stream, group) if group["pending"] else None
        if oldest is not None:
            needed.append(parse_id(oldest))
        else:
            ms, seq = parse_id(group["last-delivered-id"])
            needed.append((ms, seq + 1))
    ms, seq = min(needed)
    await redis.xtrim(stream, minid=f"{ms}-{seq}", approximate=False)


async def oldest_pending(redis: AdminClient, stream: str, group: dict[str, Any]) -> bytes | None:
    """The group's oldest unacknowledged entry id; None if it acked all since XINFO."""
    summary = await redis.xpending(stream, text(group["name"]))
    oldest: bytes | None = summary["min"]
    return oldest


def _field_dict(fields: list[bytes] | None) -> dict[bytes, bytes] | None:
    """An entry's fields from Redis's flat name, value, name, value list."""
    if fields is None:
        return None
    pairs = iter(fields)
    return dict(zip(pairs, pairs, strict=True))


def _by_stream(entries: list[FeedEntry]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for entry in entries:
        grouped.setdefault(entry.stream, []).append(entry.entry_id)
    return grouped
