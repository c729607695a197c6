"""Where handoff records live between prepare and exchange, and the outbox beside them.

A store keeps opaque sealed records under opaque keys for a while and hands each one out
at most once. It never sees a token in the clear (see crypto.py). Events are written in
the same atomic step as the record they belong to, so a handoff and its events exist
together or not at all.

Beside handoffs it keeps two smaller things for the AMP endpoints: *kept* records (sealed
clientId links, read any number of times until their TTL ends) and fixed-window request
counters for rate limits. Their ids are opaque too (HMACs), so the store sees neither a
clientId nor a client address. An AMP hit counts, reads a link and writes its event and
link with one call, ``hit_and_write``: in one atomic step where the store can take it.
"""

from dataclasses import dataclass
from typing import Any, Protocol

from identity_service.events import Event


@dataclass(slots=True)  # not frozen: one a request, and frozen costs 3x the __init__
class PrepareEvents:
    """The events of a prepare: ``started`` now, ``completion`` kept for the exchange.
    ``source``: the preparing source, whose events the started ones are (the completion's
    are the exchanging source's, named in the exchange's facts)."""

    started: list[Event]
    completion: dict[str, Any] | None
    source: str | None = None


@dataclass(slots=True)  # not frozen: two a hit, and frozen costs 3x the __init__
class Counted:
    """A rate-limit counter a request counts against: its id, window, and the most requests
    a window may hold."""

    counter_id: bytes
    window_seconds: int
    limit: int


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class Emitted:
    """Events to queue that belong to no handoff, as ``HandoffStore.emit`` takes them."""

    shard_hint: bytes
    events: list[Event]
    source: str | None = None


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class Kept:
    """A record to keep, as ``HandoffStore.keep`` takes it."""

    key_id: bytes
    record: bytes
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``HandoffStore.claim`` found: the record, and how many seconds another owner's
    lease on it has left (0.0: the lease is the caller's now)."""

    record: bytes
    leased_for: float = 0.0

    @property
    def claimed(self) -> bool:
        """Whether the caller holds the lease."""
        return self.leased_for <= 0


@dataclass(slots=True)  # not frozen: one a hit, and frozen costs 3x the __init__
class HitOutcome:
    """What ``HandoffStore.hit_and_write`` did: each counter's count and seconds left (as
    ``hit`` returns them), the record peeked (None: none), whether the record to keep was
    kept (False also when nothing was to be kept, or a limit was over), and, when its own
    write failed, why."""

    counts: list[tuple[int, float]]
    record: bytes | None
    kept: bool = False
    keep_error: Exception | None = None


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
        the same atomic step, as events of the exchanging source (``facts["source"]``).
        """

    async def read(self, lookup_id: bytes) -> bytes | None:
        """The record ``put`` under ``lookup_id``, or None if absent or expired; it stays,
        for ``take`` or ``take_and_emit`` to hand out (an AMP action's, until its webhook
        call is settled)."""

    async def claim(self, lookup_id: bytes, owner: bytes, lease_seconds: float) -> Claim | None:
        """The record ``put`` under ``lookup_id`` (None if absent or expired) and, unless a
        lease on it is live (then ``leased_for`` says how long it has left), a lease on it
        for ``owner`` that ends after ``lease_seconds``, in one atomic step: under any number
        of concurrent calls, one owner at a time holds it. The record stays, as with
        ``read``; the lease ends with its time or ``release``, whatever becomes of the record.
        """

    async def release(self, lookup_id: bytes, owner: bytes) -> None:
        """End ``owner``'s lease on the record under ``lookup_id``, if it still holds it (a
        lease that ran out and was taken by another owner is left to that owner)."""

    async def take_and_emit(self, lookup_id: bytes, events: list[Event], only: str) -> None:
        """Queue ``events`` addressed to destination ``only`` (as ``emit`` with ``only``) and
        remove the record under ``lookup_id``, if it is still there, in one atomic step: a
        failure writes neither, and the record stays."""

    async def emit(
        self,
        shard_hint: bytes,
        events: list[Event],
        only: str | None = None,
        source: str | None = None,
    ) -> None:
        """Queue events that belong to no handoff (a fallback on a miss, an AMP hit).

        With ``only``, they are addressed to that destination alone: no other destination
        delivers them (an AMP action's webhook body, for its ``amp-action-<name>``
        destination). Without it, every destination but the addressed-only ones does,
        except those whose ``sources`` leave out ``source``, the source they are from.
        """

    async def keep(self, key_id: bytes, record: bytes, ttl_seconds: int) -> None:
        """Keep ``record`` under ``key_id`` for ``ttl_seconds``, replacing any record there.

        The record and its TTL are written in one atomic step. Kept records live apart from
        handoffs: ``take`` never sees them and ``peek`` never sees a handoff.
        """

    async def peek(self, key_id: bytes) -> bytes | None:
        """The record kept under ``key_id``, or None if absent or expired; it stays kept."""

    async def hit(self, counters: list[tuple[bytes, int]]) -> list[tuple[int, float]]:
        """Count one request against each ``(counter id, window seconds)``, in fixed windows.

        A counter's window starts with its first hit and lasts ``window seconds``; then the
        count starts again from zero. Returns, for each counter in order, the count in its
        current window (this hit included) and the seconds left in that window.
        """

    async def hit_and_write(
        self,
        counters: list[Counted],
        peek: bytes | None = None,
        emit: Emitted | None = None,
        keep: Kept | None = None,
        unless_peeked: bool = False,
    ) -> HitOutcome:
        """Count one request against each counter (as ``hit``), read the record kept under
        ``peek`` (as ``peek``), and only when no count is over its counter's limit, queue
        ``emit``'s events and keep ``keep`` (as ``emit`` and ``keep``).

        With ``unless_peeked``, ``emit``'s events are queued only when ``peek`` finds no
        record (``record`` is None): events that the record, once the caller opens it,
        would change (a cookie-less AMP hit's, which a clientId link attributes).

        Over a limit nothing is written but the counts. Where the store can, all of it is
        one atomic step (memory, one Redis node); on a Redis Cluster the keys lie in
        different slots and the writes follow the count. A ``keep`` that fails on its own
        (only where it is a write of its own) gives ``kept=False`` and its
        ``keep_error``, and the rest stands;
        raises StoreUnavailable when the count, the read or the events fail.
        """

    async def ping(self) -> None:
        """Return if the store can serve requests; raise StoreUnavailable otherwise."""

    async def close(self) -> None:
        """Release connections."""


async def keep_apart(store: HandoffStore, keep: Kept) -> Exception | None:
    """``store.keep`` as a write of its own (``hit_and_write`` where it does not write all at
    once); what made it fail, if it did. Its failure fails nothing else: a kept record (a
    clientId link) only helps later requests."""
    try:
        await store.keep(keep.key_id, keep.record, keep.ttl_seconds)
    except Exception as exc:
        return exc
    return None


def under_limits(counters: list[Counted], counts: list[tuple[int, float]]) -> bool:
    """Whether no count is over its counter's limit."""
    return all(count <= c.limit for c, (count, _) in zip(counters, counts, strict=True))
