"""Where handoff records live between prepare and exchange.

A store keeps opaque sealed records under opaque keys for a while and hands each one out
at most once. It never sees a token or an identity in the clear (see crypto.py).
"""

from typing import Protocol


class HandoffStore(Protocol):
    """The store interface; ``stores.memory`` and ``stores.redis`` implement it."""

    async def put(self, lookup_id: bytes, record: bytes, ttl_seconds: int) -> None:
        """Keep ``record`` under ``lookup_id`` for ``ttl_seconds``, replacing any other."""

    async def take(self, lookup_id: bytes) -> bytes | None:
        """Atomically remove and return the record, or None if absent or expired.

        Under any number of concurrent calls for one id, at most one gets the record.
        """

    async def ping(self) -> None:
        """Return if the store can serve requests; raise StoreUnavailable otherwise."""

    async def close(self) -> None:
        """Release connections."""
