"""The forwarder: reads a feed, batches events, delivers them to a sink, acks what arrived.

A batch closes at ``batch_max_events`` events, ``MAX_BATCH_BYTES`` as sent (with what
delivery adds to each event), or ``batch_max_wait`` after its first event; an event over
``MAX_EVENT_BYTES`` as sent is dead-lettered unsent. Both sizes are the batch API's: an
AMP action's webhook, which gets each body as a call of its own, has neither. A batch
that fails for a transient reason is retried with exponential backoff and full jitter, or
after the Retry-After the destination sent when that is longer; an entry is acknowledged
only after a 2xx, and moved to the dead letters after a permanent rejection or
``max_attempts`` attempts. Nothing is dropped on 5xx or timeouts. A batch refused with a
400 or 422 (an event the destination will not take, maybe one of a hundred) or a 413 (too
large for it) is split in halves, each sent on its own, and so on down to the entries
refused alone: only those are dead-lettered. Everything of the batch not yet settled stays
claimed for the whole split; a stop ends it at once, and the drain's single attempt does
not split.

What was read stays in hand through store errors: the batch being retried, and the
entries read ahead for the next batches (a read takes a whole batch's worth from every
shard). After Redis restarted empty they are still delivered (at least once, as ever;
their acknowledgement then finds nothing pending): the feed makes its groups again.
"""

import asyncio
import random
import time
from dataclasses import dataclass, field

import structlog

from identity_service.constants import (
    BATCH_FRAMING_BYTES,
    MAINTAIN_EVERY_SECONDS,
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    SENT_AT_BYTES,
)
from identity_service.feeds import Feed, FeedEntry
from identity_service.metrics import Metrics
from identity_service.settings import OutboxSettings
from identity_service.sinks import Delivery, Sink
from identity_service.stores.redis import STORE_ERRORS

logger = structlog.get_logger(__name__)

IDLE_READ_SECONDS = 1.0
ERROR_PAUSE_SECONDS = 1.0
GATHER_SECONDS = 0.05
# Far past any backoff_max / backoff_base the settings allow.
_MAX_DOUBLINGS = 64


@dataclass(slots=True)
class Batch:
    entries: list[FeedEntry] = field(default_factory=list)
    events: int = 0
    size: int = 0


class Forwarder:
    def __init__(
        self,
        destination: str,
        feed: Feed,
        sink: Sink,
        settings: OutboxSettings,
        metrics: Metrics,
        store: str = "memory",
        batched: bool = True,
    ) -> None:
        """``store`` names where the feed reads, for the logs (a Redis URL without password);
        ``batched``: the sink sends batches, held to the batch API's sizes
        (``Destination.batched``)."""
        self.destination = destination
        self._batched = batched
        self._store = store
        self._feed = feed
        self._sink = sink
        self._settings = settings
        self._metrics = metrics
        self._attempted = metrics.counter(
            "identity_delivery_attempts_total", destination=destination
        )
        self._failed = metrics.counter("identity_delivery_failures_total", destination=destination)
        self._held: list[FeedEntry] = []
        self._maintained_at = 0.0
        self._claimed_at = 0.0  # the last keep-alive of a batch's entries (_keep_claimed)
        # Often enough that entries we hold never look idle to another forwarder.
        self._keep_alive_every = min(MAINTAIN_EVERY_SECONDS, settings.reclaim_idle / 4)
        self._draining = False
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Forward until ``stopping`` is set; a failing Redis pauses, never ends, the loop."""
        log = logger.bind(destination=self.destination)
        log.info("forwarder_started")
        while not self.stopping.is_set():
            try:
                await self._maintain()
                batch = await self._collect(first_wait=IDLE_READ_SECONDS)
                if batch.entries:
                    await self._deliver(batch)
            except STORE_ERRORS as exc:
                log.warning("forwarder_store_error", store=self._store, error=type(exc).__name__)
                await self._pause(ERROR_PAUSE_SECONDS)
            except Exception:
                # A bug must not end delivery for the life of the process.
                log.exception("forwarder_error")
                await self._pause(ERROR_PAUSE_SECONDS)
        log.info("forwarder_stopped")

    async def drain(self, seconds: float) -> None:
        """Deliver what is queued now, one attempt a batch, for at most ``seconds``."""
        self._draining = True
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = await self._collect(first_wait=0.01)
            if not batch.entries or not await self._deliver(batch):
                return

    async def close(self) -> None:
        await self._sink.close()

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._maintained_at >= self._keep_alive_every:
            self._maintained_at = now
            if self._held:
                await self._feed.keep_alive(self._held)
            await self._feed.maintain()

    async def _collect(self, first_wait: float) -> Batch:
        """Wait up to ``first_wait`` for a first entry, then up to batch_max_wait for more."""
        batch = Batch()
        try:
            await self._fill(batch, first_wait)
        except BaseException:
            # Back in hand, in order, for the next batch: a store error must not drop what
            # was read (after Redis restarted empty, this copy is the only one left).
            self._held[:0] = batch.entries
            raise
        return batch

    async def _fill(self, batch: Batch, first_wait: float) -> None:
        settings = self._settings
        deadline = time.monotonic() + first_wait
        while batch.events < settings.batch_max_events:
            if not self._held:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if batch.entries and not self._feed.backlog:
                    # New entries arrive a few at a time; a read for each would cost more
                    # than their delivery. Let them gather, then read them in one call.
                    if await self._pause(min(remaining, GATHER_SECONDS)):
                        break
                    remaining = max(0.001, deadline - time.monotonic())
                # A whole batch's worth, even when this one needs less: the rest is held for
                # the next. Asking for only what is missing makes a read per few entries.
                # Short blocking reads: the Redis socket timeout allows IDLE_READ_SECONDS.
                self._held = await self._read(
                    settings.batch_max_events, min(remaining, IDLE_READ_SECONDS)
                )
                if not self._held:
                    if self.stopping.is_set() and not self._draining:
                        break
                    continue
            entry = self._held[0]
            if not entry.events:  # e.g. the completion of an exchange refused with 403
                self._held.pop(0)
                await self._feed.ack([entry])
                continue
            size = 0
            if self._batched:
                # Sizes as sent: stamped with sentAt, and a comma after each in the batch.
                sizes = [len(event) + SENT_AT_BYTES for event in entry.events]
                size = sum(sizes) + len(sizes)
                if max(sizes) > MAX_EVENT_BYTES:
                    self._held.pop(0)
                    await self._feed.dead_letter([entry], "event too large")
                    self._count("identity_events_dead_lettered_total", len(entry.events))
                    continue
            too_many = batch.events + len(entry.events) > settings.batch_max_events
            too_big = batch.size + size > MAX_BATCH_BYTES - BATCH_FRAMING_BYTES
            if batch.entries and (too_many or too_big):
                break
            self._held.pop(0)
            batch.entries.append(entry)
            batch.events += len(entry.events)
            batch.size += size
            if len(batch.entries) == 1:
                deadline = time.monotonic() + settings.batch_max_wait

    async def _read(self, wanted: int, wait: float) -> list[FeedEntry]:
        """Read from the feed, giving up at once when stopping: a read still waiting for
        entries is cancelled, one the store has handed entries to ends first (cancelled, it
        would leave them pending under this consumer until another reclaims them)."""
        if self._draining:
            return await self._feed.read(wanted, wait)
        if self.stopping.is_set():
            return []
        read = asyncio.ensure_future(self._feed.read(wanted, wait))
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not read.done():
            if self._feed.taking:
                return await read
            read.cancel()
            return []
        return read.result()

    async def _deliver(self, batch: Batch) -> bool:
        """Settle the batch (ack or dead-letter) and return True, or release what is left
        of it (stopping) and return False."""
        unsettled = await self._settle(batch.entries, sent_before=0, waiting=[])
        if unsettled:
            await self._feed.release(unsettled)
            return False
        return True

    async def _settle(
        self, entries: list[FeedEntry], sent_before: int, waiting: list[FeedEntry]
    ) -> list[FeedEntry]:
        """Send ``entries`` until they are acknowledged or dead-lettered, retrying as the
        answers allow; return those left unsettled when stopping (none otherwise).
        ``sent_before``: how many times they were sent within a larger batch, counted in
        their dead letters' attempts (0: ``entries`` are a batch of their own).
        ``waiting``: the rest of that larger batch, to be settled after them, kept claimed
        with them (see ``_bisect``)."""
        events = [event for entry in entries for event in entry.events]
        claimed = entries + waiting
        log = logger.bind(destination=self.destination, events=len(events))
        failures = throttles = attempts = 0
        while True:
            if sent_before:
                # Within a split, sends follow one another with no retry delay to keep
                # the entries claimed in: a hundred entries take some fourteen sends.
                await self._keep_claimed(claimed, when_due=True)
            self._attempted()
            attempts += 1
            delivery = await self._send(events, claimed)
            if delivery.outcome == "delivered":
                await self._feed.ack(entries)
                self._count("identity_events_delivered_total", len(events))
                return []
            self._failed()
            if delivery.refused_for_content and len(entries) > 1:
                if self._draining or self.stopping.is_set():
                    # Stopping, or the drain's single attempt: no more sends, the whole
                    # batch goes back, in order.
                    return entries
                log.warning("batch_split", reason=delivery.reason, entries=len(entries))
                return await self._bisect(entries, sent_before + attempts, waiting)
            if delivery.outcome == "rejected":
                log.error("batch_rejected", reason=delivery.reason)
                reason = delivery.reason
                break
            if self._draining:
                return entries
            if delivery.throttled:
                throttles += 1
            else:
                failures += 1
                if failures >= self._settings.max_attempts:
                    reason = "too many attempts"
                    break
            # Counted once the batch will be sent again: not the attempt it is dead-lettered
            # after, nor the drain's single attempt.
            self._metrics.inc("identity_delivery_retries_total", destination=self.destination)
            # A 429 is not a failed attempt, but it backs off as one.
            delay = self._backoff(failures + throttles, delivery.retry_after)
            log.warning(
                "batch_retry",
                reason=delivery.reason,
                failures=failures,
                throttled=throttles,
                delay_s=delay,
            )
            if await self._wait(delay, claimed):
                return entries
        await self._feed.dead_letter(entries, reason, sent_before + attempts)
        self._count("identity_events_dead_lettered_total", len(events))
        return []

    async def _bisect(
        self, entries: list[FeedEntry], sent_before: int, waiting: list[FeedEntry]
    ) -> list[FeedEntry]:
        """Settle the two halves of a batch the destination refused (a 400, 413 or 422), each on its
        own, so that only the entries it refuses alone are dead-lettered, not the events
        sent with them. A half refused again is split again; one answered otherwise is
        retried or dead-lettered as any batch. A batch of n entries, k of them refused,
        costs at most 2 k log2(n) more sends. Sending a refused batch's events again is
        safe: a destination deduplicates on each event's messageId (Segment does; an AMP
        webhook on its body's id), were some of them taken before the refusal.

        The second half and ``waiting`` (the rest of the batch split before, to be settled
        after this one) are kept claimed while the first is settled, or another forwarder
        would take them over and send them too. A stop ends the split: what is not settled
        yet goes back unsent, in order."""
        half = len(entries) // 2
        first, second = entries[:half], entries[half:]
        unsettled = await self._settle(first, sent_before, second + waiting)
        if unsettled or self.stopping.is_set():
            return unsettled + second
        return await self._settle(second, sent_before, waiting)

    async def _send(self, events: list[bytes], claimed: list[FeedEntry]) -> Delivery:
        """One attempt's answer. A batch API's send takes at most delivery_timeout, which
        the settings keep below reclaim_idle; a webhook's batch is a call per body, each up
        to delivery_timeout, and may take longer: ``claimed`` (its entries, and the rest of
        a batch being split) is kept claimed meanwhile, or another forwarder would take the
        batch over mid-send and send it again."""
        if self._batched:
            return await self._sink.send(events)
        sending = asyncio.ensure_future(self._sink.send(events))
        try:
            while not (await asyncio.wait({sending}, timeout=self._keep_alive_every))[0]:
                await self._keep_claimed(claimed)
        finally:
            sending.cancel()  # nothing once it is done; a stop's cancellation ends it
        return sending.result()

    async def _keep_claimed(self, entries: list[FeedEntry], when_due: bool = False) -> None:
        """Keep ``entries`` and those read ahead claimed; ``when_due``: only if the last
        keep-alive is ``keep_alive_every`` old. A keep-alive the store fails is logged, not
        raised: the entries are still pending under this consumer, and what was going on (a
        send, a retry delay) goes on (dropping the batch would leave them to be reclaimed,
        out of order, ``reclaim_idle`` later)."""
        now = time.monotonic()
        if when_due and now - self._claimed_at < self._keep_alive_every:
            return
        self._claimed_at = now
        try:
            await self._feed.keep_alive(entries + self._held)
        except STORE_ERRORS as exc:
            logger.warning(
                "forwarder_keep_alive_failed",
                destination=self.destination,
                store=self._store,
                error=type(exc).__name__,
            )

    async def _wait(self, seconds: float, claimed: list[FeedEntry]) -> bool:
        """Wait out a retry delay, keeping ``claimed`` (the batch's entries, and the rest of
        a batch being split) claimed; True if stopping."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            await self._keep_claimed(claimed)
            if await self._pause(min(remaining, self._keep_alive_every)):
                return True
        # A stop during the last keep-alive, or one before a delay too short to pause in,
        # ends the retries too: 429s are retried for as long as they come.
        return self.stopping.is_set()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """The delay before sending again: the backoff, or the destination's Retry-After
        when longer. Never shorter: a Retry-After of 0 (or a date already past) would have
        a 503's attempts spent in a moment and the batch dead-lettered, a 429's repeated
        at once."""
        # Throttled retries are not bounded by max_attempts: the exponent is, or a float
        # would overflow after about a thousand of them.
        doublings = min(attempt - 1, _MAX_DOUBLINGS)
        ceiling = min(self._settings.backoff_max, self._settings.backoff_base * 2**doublings)
        delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret
        return delay if retry_after is None else max(delay, retry_after)

    async def _pause(self, seconds: float) -> bool:
        """Sleep, waking early when stopping; True if stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _count(self, name: str, events: int) -> None:
        self._metrics.inc(name, events, destination=self.destination)
