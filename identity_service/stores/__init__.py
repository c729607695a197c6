"""Where handoff records live between prepare and exchange, and the outbox beside them.

A store keeps opaque sealed records under opaque keys for a while and hands each one out
at most once. It never sees a token in the clear (see crypto.py). Events are written in
the same atomic step as the record they belong to, so a handoff and its events exist
together or not at all.
"""

from dataclasses import dataclass
from typing import Any, Protocol

from identity_service.events import Event


@dataclass(frozen=True, slots=True)
class PrepareEvents:
    """The events of a prepare: ``started`` now, ``completion`` kept for the exchange."""

    started: list[Event]
    completion: dict[str, Any] | None


class HandoffStore(Protocol):
    """The store interface; ``stores.memory`` and ``stores.redis`` implement it."""

    async def put(
        self, lookup_id: bytes, record: bytes, ttl_seconds: int, events: PrepareEvents | None
    ) -> None:
        """Keep ``record`` under ``lookup_id`` for ``ttl_seconds`` and queue ``events``."""

    async def take(self, lookup_id: bytes, facts: dict[str, Any] | None) -> bytes | None:
        """Atomically remove and return the record, or None if absent or expired.

        Under any number of concurrent calls for one id, at most one gets the record. With
        ``facts``, the completion events of a handoff that kept a template are queued in
        the same atomic step.
        """

    async def emit(self, shard_hint: bytes, events: list[Event]) -> None:
        """Queue events that belong to no handoff (a fallback on a miss)."""

    async def ping(self) -> None:
        """Return if the store can serve requests; raise StoreUnavailable otherwise."""

    async def close(self) -> None:
        """Release connections."""
