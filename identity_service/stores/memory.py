"""The embedded store: a dict in this process, with TTLs, and an in-memory event queue.

For one process and development: handoffs and undelivered events are lost on restart.
"""

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog

from identity_service import events as ev
from identity_service.problems import StoreUnavailable
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

# Dead entries the expiry heap may hold beyond twice the live records before a rebuild.
HEAP_SLACK = 1024
# Kept records (AMP clientId links, 30 days each by default) held at most: every cache hit
# with a cookie and a clientId keeps one, so without a cap memory grows with the visitors
# of the last link_ttl. When full, the record that would expire soonest makes room.
MAX_KEPT = 100_000
# Rate counters held at most: one per client address and per AMP clientId in its window,
# so without a cap requests with made-up clientIds grow memory without bound. When full
# (expired windows swept first), a hit that needs a new counter is refused whole, as Redis
# over maxmemory refuses it (503), rather than drop live counters: dropping one would
# restart its count, and a flood of new ids would then lift every limit.
MAX_COUNTERS = 100_000

logger = structlog.get_logger(__name__)

V = TypeVar("V")


class MemoryQueue:
    """One destination's events (JSON documents) waiting for its forwarder, with a wake-up
    for the reader. ``addressed_only``: it takes only events addressed to ``name``;
    ``sources``: only those sources' events (None: every source's)."""

    def __init__(
        self, name: str = "", addressed_only: bool = False, sources: frozenset[str] | None = None
    ) -> None:
        self.name = name
        self.addressed_only = addressed_only
        self.sources = sources
        # Each event with the time it was queued, for the oldest pending age (metrics).
        self.events: deque[tuple[float, bytes]] = deque()
        # Read by the forwarder and not yet settled: the entry's id, the time it was queued.
        self.taken: dict[str, float] = {}
        self.dead_letters = 0
        self.arrived = asyncio.Event()

    @property
    def undelivered(self) -> int:
        """The events not delivered (nor dead-lettered) yet: queued, or read and unsettled
        (one event an entry)."""
        return len(self.events) + len(self.taken)

    def wants(self, only: str | None, source: str | None = None) -> bool:
        """Whether events addressed to ``only`` (None: to every destination) from ``source``
        (None: of no known source) come here."""
        if only is not None or self.addressed_only:
            return self.name == only
        return self.sources is None or source is None or source in self.sources


class MemoryOutbox:
    """Copies each event to every subscribed destination's queue that wants it, as the
    Redis consumer groups do: events addressed to one destination (``only``) go to that
    destination alone, and an addressed-only destination (an AMP action's webhook) takes
    nothing else.

    A destination with ``sources`` takes only those sources' events. Which queues an
    (``only``, source) pair goes to is worked out once and kept, not per event.

    With no subscriber (the forwarder is off) events are dropped, not hoarded.
    """

    def __init__(self) -> None:
        self.queues: list[MemoryQueue] = []
        self._routes: dict[tuple[str | None, str | None], list[MemoryQueue]] = {}

    def subscribe(
        self, name: str = "", addressed_only: bool = False, sources: frozenset[str] | None = None
    ) -> MemoryQueue:
        """A queue for destination ``name``, filled from now on."""
        queue = MemoryQueue(name, addressed_only, sources)
        self.queues.append(queue)
        self._routes.clear()
        return queue

    def extend(
        self, events: list[ev.Event], only: str | None = None, source: str | None = None
    ) -> None:
        """Queue ``events`` of ``source`` for every destination that takes that source's
        events, or for destination ``only`` alone."""
        queues = self._routes.get((only, source))
        if queues is None:
            queues = [queue for queue in self.queues if queue.wants(only, source)]
            self._routes[only, source] = queues
        if not events or not queues:
            return
        now = time.time()
        queued = [(now, ev.encode(event)) for event in events]
        for queue in queues:
            queue.events.extend(queued)
            queue.arrived.set()


class Expiring(Generic[V]):
    """Values with an expiry time: expired ones are dropped on read and swept on write.

    Expiries wait in a heap, oldest first, so each write sweeps what has expired in time
    proportional to that. Entries removed before they expire leave their heap entry behind;
    the heap is rebuilt when those outnumber the live entries, so memory stays bounded by
    what is live.
    """

    __slots__ = ("_entries", "_expiries")

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, V]] = {}
        self._expiries: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, key: bytes, expires_at: float, value: V, now: float) -> None:
        """Hold ``value`` under ``key`` until ``expires_at``, after sweeping up to ``now``."""
        self._sweep(now)
        previous = self._entries.get(key)
        self._entries[key] = (expires_at, value)
        # The same expiry already has its heap entry (a counter counting within its window).
        if previous is None or previous[0] != expires_at:
            heapq.heappush(self._expiries, (expires_at, key))
            if len(self._expiries) > 2 * len(self._entries) + HEAP_SLACK:
                self._compact()

    def get(self, key: bytes, now: float) -> tuple[float, V] | None:
        """The expiry and value under ``key``, or None if absent or expired at ``now``."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry

    def pop(self, key: bytes, now: float) -> V | None:
        """Remove the value under ``key`` and return it, or None if absent or expired."""
        entry = self._entries.pop(key, None)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._expiries.clear()

    def sweep(self, now: float) -> None:
        """Drop what has expired at ``now``."""
        self._sweep(now)

    def make_room(self, now: float, limit: int) -> bool:
        """Leave fewer than ``limit`` entries: sweep what has expired at ``now``, then drop
        live entries, those that expire soonest first. Whether a live entry was dropped."""
        self._sweep(now)
        dropped = False
        while len(self._entries) >= limit and self._expiries:
            expires_at, key = heapq.heappop(self._expiries)
            entry = self._entries.get(key)
            if entry is not None and entry[0] == expires_at:
                del self._entries[key]
                dropped = True
        return dropped

    def _compact(self) -> None:
        """Rebuild the expiry heap from the live entries.

        Taken records leave their heap entry behind until it expires; under steady load
        that would be every handoff of the last TTL (5 minutes), long after its record.
        """
        self._expiries = [(entry[0], key) for key, entry in self._entries.items()]
        heapq.heapify(self._expiries)

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            entry = self._entries.get(key)
            # A key may have been taken, or replaced with a later expiry, since it was pushed.
            if entry is not None and entry[0] == expires_at:
                del self._entries[key]


class MemoryStore:
    """Keeps records, kept records and counters in memory, each with its expiry.

    ``clock`` gives the seconds its TTLs are counted in (a test may drive it). At most
    ``max_kept`` kept records are held: a new one beyond that drops the one that would
    expire soonest (logged once per store). At most ``max_counters`` rate counters are
    held: a hit that needs a new one beyond that raises StoreUnavailable, counting nothing
    (each answered 503 and logged by the middleware; the first also logged here).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_kept: int = MAX_KEPT,
        max_counters: int | None = None,
    ) -> None:
        self._clock = clock
        self._max_kept = max_kept
        self._max_counters = MAX_COUNTERS if max_counters is None else max_counters
        self._kept_full_logged = False
        self._counters_full_logged = False
        self._records: Expiring[tuple[bytes, dict[str, Any] | None]] = Expiring()
        self._kept: Expiring[bytes] = Expiring()
        self._leases: Expiring[bytes] = Expiring()  # an AMP action record's owner, by its id
        self._counters: Expiring[int] = Expiring()
        self.outbox = MemoryOutbox()

    def __len__(self) -> int:
        """How many handoff records are held (expired ones not yet swept included)."""
        return len(self._records)

    async def put(
        self, lookup_id: bytes, record: bytes, ttl_seconds: int, events: PrepareEvents | None
    ) -> None:
        now = self._clock()
        template = events.completion if events else None
        self._records.set(lookup_id, now + ttl_seconds, (record, template), now)
        if events is not None:
            self.outbox.extend(events.started, source=events.source)

    async def take(self, lookup_id: bytes, facts: dict[str, Any] | None) -> bytes | None:
        entry = self._records.pop(lookup_id, self._clock())
        if entry is None:
            return None
        record, template = entry
        if template is not None and facts is not None:
            self.outbox.extend(ev.complete(template, facts), source=facts["source"])
        return record

    async def read(self, lookup_id: bytes) -> bytes | None:
        entry = self._records.get(lookup_id, self._clock())
        return None if entry is None else entry[1][0]

    async def claim(self, lookup_id: bytes, owner: bytes, lease_seconds: float) -> Claim | None:
        now = self._clock()
        entry = self._records.get(lookup_id, now)
        if entry is None:
            return None
        lease = self._leases.get(lookup_id, now)
        if lease is not None:
            return Claim(entry[1][0], leased_for=lease[0] - now)
        self._leases.set(lookup_id, now + lease_seconds, owner, now)
        return Claim(entry[1][0])

    async def release(self, lookup_id: bytes, owner: bytes) -> None:
        lease = self._leases.get(lookup_id, self._clock())
        if lease is not None and lease[1] == owner:
            self._leases.pop(lookup_id, self._clock())

    async def take_and_emit(self, lookup_id: bytes, events: list[ev.Event], only: str) -> None:
        self.outbox.extend(events, only)
        self._records.pop(lookup_id, self._clock())

    async def emit(
        self,
        shard_hint: bytes,
        events: list[ev.Event],
        only: str | None = None,
        source: str | None = None,
    ) -> None:
        self.outbox.extend(events, only, source)

    async def keep(self, key_id: bytes, record: bytes, ttl_seconds: int) -> None:
        now = self._clock()
        full = key_id not in self._kept and len(self._kept) >= self._max_kept
        if full and self._kept.make_room(now, self._max_kept) and not self._kept_full_logged:
            self._kept_full_logged = True
            logger.warning("memory_store_kept_records_full", max_kept=self._max_kept)
        self._kept.set(key_id, now + ttl_seconds, record, now)

    async def peek(self, key_id: bytes) -> bytes | None:
        entry = self._kept.get(key_id, self._clock())
        return None if entry is None else entry[1]

    async def hit(self, counters: list[tuple[bytes, int]]) -> list[tuple[int, float]]:
        now = self._clock()
        self._room_for_counters(counters, now)
        results: list[tuple[int, float]] = []
        for counter_id, window_seconds in counters:
            entry = self._counters.get(counter_id, now)
            if entry is None:  # a new window starts with this hit
                expires_at, count = now + window_seconds, 1
            else:
                expires_at, count = entry[0], entry[1] + 1
            self._counters.set(counter_id, expires_at, count, now)
            results.append((count, expires_at - now))
        return results

    def _room_for_counters(self, counters: list[tuple[bytes, int]], now: float) -> None:
        """Raise StoreUnavailable, before anything is counted, when ``counters`` need more
        new counters than there is room for once expired windows are swept."""
        held = self._counters
        new = {counter_id for counter_id, _ in counters if held.get(counter_id, now) is None}
        if not new or len(held) + len(new) <= self._max_counters:
            return
        held.sweep(now)  # what is left is live: none of ``new`` among it
        if len(held) + len(new) <= self._max_counters:
            return
        if not self._counters_full_logged:
            self._counters_full_logged = True
            logger.warning("memory_store_counters_full", max_counters=self._max_counters)
        raise StoreUnavailable(f"memory store: rate counters full ({self._max_counters})")

    async def hit_and_write(
        self,
        counters: list[Counted],
        peek: bytes | None = None,
        emit: Emitted | None = None,
        keep: Kept | None = None,
        unless_peeked: bool = False,
    ) -> HitOutcome:
        counts = await self.hit([(c.counter_id, c.window_seconds) for c in counters])
        record = None if peek is None else await self.peek(peek)
        if not under_limits(counters, counts):
            return HitOutcome(counts, record)
        if emit is not None and not (unless_peeked and record is not None):
            self.outbox.extend(emit.events, source=emit.source)
        if keep is None:
            return HitOutcome(counts, record)
        error = await keep_apart(self, keep)
        return HitOutcome(counts, record, kept=error is None, keep_error=error)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()
        self._kept.clear()
        self._leases.clear()
        self._counters.clear()
