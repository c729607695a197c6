"""What ``/metrics`` reads when it is scraped: the store's ping and each destination's outbox.

The scraped process reads the shared state itself, so every worker (and every pod) shows
the same values: aggregate these gauges with ``max``, not ``sum``. No worker keeps them.

On Redis it costs two pipelined round trips whatever the backlog, on a connection of the
scrape's own (never the request path's): ``XINFO GROUPS`` of every shard's outbox stream
(and of 0.3.0's, which the forwarders still deliver after an upgrade) and ``XLEN`` of every
dead-letter stream; then, only where a group has entries left,
``XPENDING``'s summary (the oldest entry read but not acknowledged) and ``XRANGE … COUNT 1``
(the oldest not yet read). Where Redis cannot say a group's lag (before Redis 7), the unread
entries are read to be counted, at most ``UNREAD_COUNT_CAP`` a shard. Unlike ``outbox
status`` it takes no transaction per shard: an entry being dead-lettered during the scrape
may count once in both.

On Redis without an events destination the events (emitted unless
``IDENTITY_OUTBOX=actions``) wait in the outbox for one: their backlog shows as that of
destination ``(none)`` (:data:`NO_DESTINATION`, a name no destination can have), every
entry of the streams, as for a destination whose group does not exist yet.
"""

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from identity_service.constants import KEY_SHARDS, dead_letter_key, outbox_key
from identity_service.feeds import legacy_dead_letters, legacy_outbox_streams
from identity_service.metrics import Backlog, Scraped
from identity_service.problems import StoreUnavailable
from identity_service.settings import OutboxSettings, RedisSettings
from identity_service.stores.memory import MemoryOutbox
from identity_service.stores.redis import STORE_ERRORS, AdminClient, connect
from identity_service.streams import parse_id, text

logger = structlog.get_logger(__name__)

# When Redis cannot say a group's lag (before Redis 7, or entries deleted past its last
# read), its unread entries are counted by reading them, up to this many per shard: every
# scrape of every pod pays for it, so ``identity_outbox_pending`` is then a floor (up to
# 16 x 100 unread) rather than a read of a backlog's every entry.
UNREAD_COUNT_CAP = 100
# The backlog of the events no destination takes yet (Redis without an events destination).
# Destination names are letters, digits, '_' and '-': none can be this.
NO_DESTINATION = "(none)"


Ping = Callable[[], Awaitable[object]]
_Followup = Callable[[Any], None]


def backlog_destinations(outbox: OutboxSettings) -> list[str]:
    """The destinations whose outbox backlog a scrape of Redis reads: the configured ones,
    and :data:`NO_DESTINATION` when events are emitted and none of them takes events (they
    wait in the outbox: serve and forward warn at start, and the backlog shows it); never
    with ``IDENTITY_OUTBOX=actions``, which emits none."""
    names = [destination.name for destination in outbox.destinations]
    if outbox.events_wait:
        names.append(NO_DESTINATION)
    return names


class Probe:
    """Reads a :class:`Scraped` from the store: ``redis`` (with its key ``prefix``), or the
    ``memory`` outbox, or neither (the outbox is off)."""

    def __init__(
        self,
        ping: Ping,
        timeout: float,
        destinations: Sequence[str] = (),
        redis: AdminClient | None = None,
        prefix: str = "",
        memory: MemoryOutbox | None = None,
        shards: int = KEY_SHARDS,
    ) -> None:
        self._ping = ping
        self._timeout = timeout
        self._destinations = list(destinations)
        self._redis = redis
        self._prefix = prefix
        self._memory = memory
        self._shards = shards
        # One scrape at a time: a Redis probe has one connection (per node), and redis-py's
        # Cluster and Sentinel pools answer a second command meanwhile with
        # MaxConnectionsError, which would read as the store being down.
        self._reading = asyncio.Lock()

    @classmethod
    def of_redis(
        cls, settings: RedisSettings, destinations: Sequence[str], ping: Ping | None = None
    ) -> "Probe":
        """A probe of ``settings``' Redis on a connection of its own, never the request
        path's; it pings with ``ping`` (the store's), or on that connection. Close it."""
        redis = connect(dataclasses.replace(settings, max_connections=1))
        return cls(
            ping or redis.ping,
            settings.timeout,
            destinations,
            redis=redis,
            prefix=settings.key_prefix,
            shards=settings.shards,
        )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def read(self) -> Scraped:
        async with self._reading:
            return await self._read()

    async def _read(self) -> Scraped:
        scraped = Scraped(store_up=await self._answers())
        if self._memory is not None:
            scraped.outbox = memory_backlog(self._memory, time.time())
        elif self._redis is not None and self._destinations and scraped.store_up:
            try:
                scraped.outbox = await asyncio.wait_for(
                    redis_backlog(
                        self._redis, self._prefix, self._destinations, time.time(), self._shards
                    ),
                    self._timeout,
                )
            except STORE_ERRORS as exc:
                logger.warning("metrics_outbox_unread", error=type(exc).__name__)
        return scraped

    async def _answers(self) -> bool:
        try:
            await asyncio.wait_for(self._ping(), self._timeout)
        except (StoreUnavailable, *STORE_ERRORS):
            return False
        return True


def memory_backlog(outbox: MemoryOutbox, now: float) -> dict[str, Backlog]:
    """Each subscribed destination's queue: queued and taken events, the oldest's age."""
    report = {}
    for queue in outbox.queues:
        times = list(queue.taken.values())
        if queue.events:
            times.append(queue.events[0][0])
        report[queue.name] = Backlog(
            pending=len(queue.events) + len(queue.taken),
            oldest_age_seconds=max(0.0, now - min(times)) if times else 0.0,
            dead_letters=queue.dead_letters,
        )
    return report


async def redis_backlog(
    redis: AdminClient,
    prefix: str,
    destinations: Sequence[str],
    now: float,
    shards: int = KEY_SHARDS,
) -> dict[str, Backlog]:
    """Each destination's backlog over the shards' outbox streams (two round trips; on a
    Cluster, two per node, which redis-py's cluster pipeline sends node by node)."""
    report = {name: Backlog() for name in destinations}
    oldest: dict[str, list[int]] = {name: [] for name in destinations}
    # 0.3.0's streams and dead letters (tags {0}..{15}), which the forwarders still deliver,
    # `outbox status` counts and `replay-dead` moves back; none on a Cluster, where that
    # version never ran.
    streams = [outbox_key(prefix, shard, shards) for shard in range(shards)]
    streams += [stream for stream, _ in legacy_outbox_streams(redis, prefix, shards)]
    dead_letters = [
        (name, dead_letter_key(prefix, shard, name, shards))
        for shard in range(shards)
        for name in destinations
    ]
    dead_letters += [
        (name, dead)
        for name in destinations
        for _, dead in legacy_dead_letters(redis, prefix, name, shards)
    ]
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        for _, key in dead_letters:
            pipe.xlen(key)
        replies = await pipe.execute(raise_on_error=False)
    for (name, _), dead in zip(dead_letters, replies[len(streams) :], strict=True):
        if isinstance(dead, int):
            report[name].dead_letters += dead
    followups: list[_Followup] = []
    async with redis.pipeline(transaction=False) as pipe:
        for stream, group_reply in zip(streams, replies[: len(streams)], strict=True):
            if isinstance(group_reply, Exception):  # no stream (yet, or any more)
                continue
            groups = {text(group["name"]): group for group in group_reply}
            for name in destinations:
                backlog, times = report[name], oldest[name]
                followups += _queue_shard(pipe, stream, name, groups.get(name), backlog, times)
        answers = await pipe.execute(raise_on_error=False)
    for followup, answer in zip(followups, answers, strict=True):
        if not isinstance(answer, Exception):
            followup(answer)
    for name, times in oldest.items():
        if times:
            report[name].oldest_age_seconds = max(0.0, now - min(times) / 1000)
    return report


def _queue_shard(
    pipe: Any, stream: str, group_name: str, group: Any, backlog: Backlog, times: list[int]
) -> list[_Followup]:
    """Count what the XINFO reply says; queue on ``pipe`` the reads it leaves to do, and
    return what to do with each of their answers."""

    def first_entry(reply: Any) -> None:
        if reply:
            times.append(parse_id(reply[0][0])[0])

    def counted(reply: Any) -> None:
        backlog.pending += len(reply)
        first_entry(reply)

    def add_length(reply: Any) -> None:
        backlog.pending += reply

    def oldest_pending(summary: Any) -> None:
        if summary and summary.get("min"):
            times.append(parse_id(summary["min"])[0])

    if group is None:  # its forwarder has not run yet: every entry waits for it
        pipe.xlen(stream)
        pipe.xrange(stream, count=1)
        return [add_length, first_entry]
    followups: list[_Followup] = []
    backlog.pending += group["pending"]
    unread_after = f"({text(group['last-delivered-id'])}"
    lag = group.get("lag")
    if lag is None:
        pipe.xrange(stream, min=unread_after, count=UNREAD_COUNT_CAP)
        followups.append(counted)
    elif lag:
        backlog.pending += lag
        pipe.xrange(stream, min=unread_after, count=1)
        followups.append(first_entry)
    if group["pending"]:
        pipe.xpending(stream, group_name)
        followups.append(oldest_pending)
    return followups
