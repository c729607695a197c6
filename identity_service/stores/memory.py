"""The embedded store: a dict in this process, with TTLs, and an in-memory event queue.

For one process and development: handoffs and undelivered events are lost on restart.
"""

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from identity_service import events as ev
from identity_service.stores import PrepareEvents

# Dead entries the expiry heap may hold beyond twice the live records before a rebuild.
HEAP_SLACK = 1024


class MemoryQueue:
    """One destination's events (JSON documents) waiting for its forwarder, with a wake-up
    for the reader."""

    def __init__(self) -> None:
        self.events: deque[bytes] = deque()
        self.arrived = asyncio.Event()


class MemoryOutbox:
    """Copies each event to every subscribed destination's queue.

    With no subscriber (the forwarder is off) events are dropped, not hoarded.
    """

    def __init__(self) -> None:
        self.queues: list[MemoryQueue] = []

    def subscribe(self) -> MemoryQueue:
        queue = MemoryQueue()
        self.queues.append(queue)
        return queue

    def extend(self, events: list[ev.Event]) -> None:
        if not events or not self.queues:
            return
        encoded = [ev.encode(event) for event in events]
        for queue in self.queues:
            queue.events.extend(encoded)
            queue.arrived.set()


class MemoryStore:
    """Keeps records in memory; expired ones are dropped on read and swept on write.

    ``clock`` gives the seconds its TTLs are counted in (a test may drive it).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[bytes, tuple[float, bytes, dict[str, Any] | None]] = {}
        self._expiries: list[tuple[float, bytes]] = []
        self.outbox = MemoryOutbox()

    def __len__(self) -> int:
        return len(self._records)

    async def put(
        self, lookup_id: bytes, record: bytes, ttl_seconds: int, events: PrepareEvents | None
    ) -> None:
        now = self._clock()
        self._sweep(now)
        expires_at = now + ttl_seconds
        self._records[lookup_id] = (expires_at, record, events.completion if events else None)
        heapq.heappush(self._expiries, (expires_at, lookup_id))
        if len(self._expiries) > 2 * len(self._records) + HEAP_SLACK:
            self._compact()
        if events is not None:
            self.outbox.extend(events.started)

    async def take(self, lookup_id: bytes, facts: dict[str, Any] | None) -> bytes | None:
        entry = self._records.pop(lookup_id, None)
        if entry is None or entry[0] <= self._clock():
            return None
        _, record, template = entry
        if template is not None and facts is not None:
            self.outbox.extend(ev.complete(template, facts))
        return record

    async def emit(self, shard_hint: bytes, events: list[ev.Event]) -> None:
        self.outbox.extend(events)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()
        self._expiries.clear()

    def _compact(self) -> None:
        """Rebuild the expiry heap from the live records.

        Taken records leave their heap entry behind until it expires; under steady load
        that would be every handoff of the last TTL (5 minutes), long after its record.
        """
        self._expiries = [(entry[0], key) for key, entry in self._records.items()]
        heapq.heapify(self._expiries)

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            entry = self._records.get(key)
            # A key may have been taken, or replaced with a later expiry, since it was pushed.
            if entry is not None and entry[0] == expires_at:
                del self._records[key]
