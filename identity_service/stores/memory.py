"""The embedded store: a dict in this process, with TTLs. For one process and development."""

import heapq
import time

from identity_service.constants import handoff_key


class MemoryStore:
    """Keeps records in memory; expired ones are dropped on read and swept on write."""

    def __init__(self, key_prefix: str = "") -> None:
        self._prefix = key_prefix
        self._records: dict[str, tuple[float, bytes]] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._records)

    async def put(self, lookup_id: bytes, record: bytes, ttl_seconds: int) -> None:
        now = time.monotonic()
        self._sweep(now)
        key = handoff_key(self._prefix, lookup_id)
        expires_at = now + ttl_seconds
        self._records[key] = (expires_at, record)
        heapq.heappush(self._expiries, (expires_at, key))

    async def take(self, lookup_id: bytes) -> bytes | None:
        entry = self._records.pop(handoff_key(self._prefix, lookup_id), None)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()
        self._expiries.clear()

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            entry = self._records.get(key)
            # A key may have been taken, or replaced with a later expiry, since it was pushed.
            if entry is not None and entry[0] == expires_at:
                del self._records[key]
