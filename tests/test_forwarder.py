"""The forwarder's batching rules, on the in-memory feed with a sink that records batches."""

import asyncio
import contextlib
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import structlog.testing

from identity_service.answers import MAX_ANSWER_BYTES
from identity_service.constants import (
    BATCH_FRAMING_BYTES,
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    SENT_AT_BYTES,
)
from identity_service.events import Event, join_documents, split_documents
from identity_service.feeds import FeedEntry, MemoryFeed
from identity_service.forwarder import Forwarder
from identity_service.metrics import Metrics
from identity_service.scrape import memory_backlog
from identity_service.settings import Destination, OutboxSettings
from identity_service.sinks import (
    DELIVERED,
    Delivery,
    HttpSink,
    StdoutSink,
    batch_body,
    classify,
    parse_retry_after,
    stamped,
)
from identity_service.stores.memory import MemoryOutbox


class RecordingSink:
    def __init__(self, answers: list[Delivery] | None = None) -> None:
        self.batches: list[list[Event]] = []
        self.body_sizes: list[int] = []  # as a batch API receives them
        self.answers = answers or []

    async def send(self, events: list[bytes]) -> Delivery:
        self.batches.append([orjson.loads(event) for event in events])
        self.body_sizes.append(len(batch_body(events)))
        return self.answers.pop(0) if self.answers else DELIVERED

    async def close(self) -> None:
        return None


def event(number: int, size: int = 10) -> Event:
    return {"type": "track", "messageId": f"m-{number}", "properties": {"pad": "x" * size}}


def event_of(number: int, encoded_bytes: int) -> Event:
    """An event whose JSON document is exactly ``encoded_bytes`` long."""
    return event(number, encoded_bytes - len(orjson.dumps(event(number, 0))))


@pytest.fixture
def outbox() -> MemoryOutbox:
    return MemoryOutbox()


async def forward(
    outbox: MemoryOutbox, sink: RecordingSink, **settings: float
) -> AsyncIterator[Forwarder]:
    feed = MemoryFeed(outbox.subscribe())
    options = {"batch_max_wait": 0.05, "backoff_base": 0.01, "backoff_max": 0.02, **settings}
    forwarder = Forwarder("test", feed, sink, OutboxSettings(**options), Metrics())  # type: ignore[arg-type]
    task = asyncio.create_task(forwarder.run())
    try:
        yield forwarder
    finally:
        forwarder.stopping.set()
        await task


async def wait_until(condition: object, seconds: float = 5.0) -> None:
    assert callable(condition)
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_batches_close_at_the_event_limit(outbox: MemoryOutbox) -> None:
    sink = RecordingSink()
    async for _ in forward(outbox, sink, batch_max_events=10):
        outbox.extend([event(n) for n in range(25)])
        await wait_until(lambda: sum(len(b) for b in sink.batches) == 25)
    assert [len(b) for b in sink.batches] == [10, 10, 5]


async def test_batches_stay_under_500_kb_as_sent(outbox: MemoryOutbox) -> None:
    sink = RecordingSink()
    # 40 of these make 499,480 bytes stored, but more than 500,000 once stamped and framed.
    async for _ in forward(outbox, sink, batch_max_events=2500):
        outbox.extend([event_of(n, 12_487) for n in range(40)])
        await wait_until(lambda: sum(len(b) for b in sink.batches) == 40)
    assert len(sink.batches) == 2
    assert max(sink.body_sizes) <= MAX_BATCH_BYTES


async def test_an_event_over_32_kb_as_sent_is_dead_lettered_alone(outbox: MemoryOutbox) -> None:
    sink = RecordingSink()
    largest = MAX_EVENT_BYTES - SENT_AT_BYTES
    async for _ in forward(outbox, sink):
        outbox.extend([event_of(1, largest), event_of(2, largest + 1), event(3)])
        await wait_until(lambda: sum(len(b) for b in sink.batches) == 2)
    assert outbox.queues[0].dead_letters == 1
    assert [e["messageId"] for b in sink.batches for e in b] == ["m-1", "m-3"]
    # The largest event went out at exactly the limit once stamped.
    third = len(orjson.dumps(event(3))) + SENT_AT_BYTES
    assert sink.body_sizes == [BATCH_FRAMING_BYTES + MAX_EVENT_BYTES + 1 + third]


async def test_retries_then_delivers_the_same_batch(outbox: MemoryOutbox) -> None:
    sink = RecordingSink([Delivery("retry", "http 500"), Delivery("retry", "timeout")])
    async for _ in forward(outbox, sink):
        outbox.extend([event(1), event(2)])
        await wait_until(lambda: len(sink.batches) == 3)
    assert sink.batches[0] == sink.batches[1] == sink.batches[2]


async def test_throttling_does_not_count_as_a_failed_attempt(outbox: MemoryOutbox) -> None:
    throttled = Delivery("retry", "http 429", retry_after=0.01, throttled=True)
    sink = RecordingSink([throttled, throttled, throttled])
    async for _ in forward(outbox, sink, max_attempts=1):
        outbox.extend([event(1)])
        await wait_until(lambda: len(sink.batches) == 4)
    assert outbox.queues[0].dead_letters == 0


async def test_dead_letters_in_memory_are_counted_not_kept(outbox: MemoryOutbox) -> None:
    """Embedded mode has nowhere to keep dead letters for long: their count is all that
    stays, so memory does not grow with them over the life of the process."""
    sink = RecordingSink([Delivery("rejected", "http 401")] * 20)
    refused = [{**event(number), "messageId": f"refused-{number}"} for number in range(100)]
    async for _ in forward(outbox, sink, batch_max_events=5):
        outbox.extend(refused)
        await wait_until(lambda: outbox.queues[0].dead_letters == 100)
        gc.collect()
        kept = [
            entry
            for entry in gc.get_objects()
            # type(), not isinstance(): a lazy object of another library (Django's
            # settings) raises when asked for its class.
            if type(entry) is FeedEntry and any(b"refused-" in e for e in entry.events)
        ]
    # At most the last batch, which the forwarder lets go when it takes the next.
    assert len(kept) <= 5


async def test_a_batch_being_retried_at_shutdown_goes_back_to_the_queue(
    outbox: MemoryOutbox,
) -> None:
    failing = [Delivery("retry", "http 503", retry_after=60)] * 10
    sink = RecordingSink(failing)
    queue = outbox.queues
    async for _ in forward(outbox, sink):
        outbox.extend([event(1), event(2)])
        await wait_until(lambda: len(sink.batches) == 1)
    assert [orjson.loads(e)["messageId"] for _, e in queue[0].events] == ["m-1", "m-2"]


REFUSED = Delivery("rejected", "http 400", status=400)


def message_ids(batches: list[list[Event]]) -> list[list[str]]:
    return [[e["messageId"] for e in batch] for batch in batches]


async def test_a_half_of_a_refused_batch_answered_otherwise_is_not_split_again(
    outbox: MemoryOutbox,
) -> None:
    """A 400 splits the batch; a half refused with another status (here the write key's
    401, which every half would get) is dead-lettered whole, as any batch, and the other
    half delivered."""
    sink = RecordingSink([REFUSED, Delivery("rejected", "http 401", status=401)])
    async for forwarder in forward(outbox, sink):
        outbox.extend([event(n) for n in range(4)])
        await wait_until(lambda: len(sink.batches) == 3)
        await wait_until(lambda: outbox.queues[0].undelivered == 0)
        metrics = forwarder._metrics
    assert message_ids(sink.batches) == [
        ["m-0", "m-1", "m-2", "m-3"],
        ["m-0", "m-1"],
        ["m-2", "m-3"],
    ]
    assert outbox.queues[0].dead_letters == 2
    assert metrics.value("identity_events_dead_lettered_total", destination="test") == 2
    assert metrics.value("identity_events_delivered_total", destination="test") == 2


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_refused_batch_is_split_down_to_its_refused_events(
    outbox: MemoryOutbox, status: int
) -> None:
    """Eight events, the sixth refused (a 400 or 422: its content; a 413: too large, as a
    destination with a lower size limit than the batch's answers): 8, then 4 + 4, 2 + 2 and
    1 + 1 for the halves refused, six more sends (2 log2(8)), and only the sixth
    dead-lettered."""
    refused = Delivery("rejected", f"http {status}", status=status)
    answers = [refused, DELIVERED, refused, refused, DELIVERED, refused, DELIVERED]
    sink = RecordingSink(answers)
    async for _ in forward(outbox, sink):
        outbox.extend([event(n) for n in range(8)])
        await wait_until(lambda: outbox.queues[0].undelivered == 0)
    assert message_ids(sink.batches) == [
        [f"m-{n}" for n in range(8)],
        ["m-0", "m-1", "m-2", "m-3"],
        ["m-4", "m-5", "m-6", "m-7"],
        ["m-4", "m-5"],
        ["m-4"],
        ["m-5"],
        ["m-6", "m-7"],
    ]
    assert outbox.queues[0].dead_letters == 1


async def test_a_stop_while_a_half_is_retried_puts_the_whole_batch_back_in_order(
    outbox: MemoryOutbox,
) -> None:
    sink = RecordingSink([REFUSED, Delivery("retry", "http 503", retry_after=60)])
    async for _ in forward(outbox, sink):
        outbox.extend([event(n) for n in range(4)])
        await wait_until(lambda: len(sink.batches) == 2)
    queued = [orjson.loads(e)["messageId"] for _, e in outbox.queues[0].events]
    assert queued == ["m-0", "m-1", "m-2", "m-3"]
    assert outbox.queues[0].dead_letters == 0


class StoppingSink(RecordingSink):
    """Answers as RecordingSink, then 400 to every batch once ``answers`` are spent (a
    destination refusing every event); ``stop`` is set during send number ``stop_at``
    (from 0), as a SIGTERM arriving while a batch is in flight."""

    def __init__(self, answers: list[Delivery], stop: asyncio.Event, stop_at: int) -> None:
        super().__init__(answers)
        self.stop = stop
        self.stop_at = stop_at

    async def send(self, events: list[bytes]) -> Delivery:
        if len(self.batches) == self.stop_at:
            self.stop.set()
        await asyncio.sleep(0)
        self.answers = self.answers or [REFUSED]
        return await super().send(events)


def queued_ids(outbox: MemoryOutbox) -> list[str]:
    return [orjson.loads(e)["messageId"] for _, e in outbox.queues[0].events]


def refusing_forwarder(
    outbox: MemoryOutbox, answers: list[Delivery], stop_at: int
) -> tuple[Forwarder, StoppingSink]:
    """A forwarder of batches of 64 events, to a StoppingSink."""
    feed = MemoryFeed(outbox.subscribe())
    settings = OutboxSettings(batch_max_events=64, batch_max_wait=0.01)
    stop = asyncio.Event()
    sink = StoppingSink(answers, stop, stop_at)
    forwarder = Forwarder("test", feed, sink, settings, Metrics())
    forwarder.stopping = stop
    return forwarder, sink


@pytest.mark.parametrize(
    ("answers", "settled"),
    [([], 0), ([REFUSED, DELIVERED], 32)],
    ids=["during-the-first-send", "during-a-half-delivered"],
)
async def test_a_stop_ends_a_split_at_once_and_puts_what_is_left_back_in_order(
    outbox: MemoryOutbox, answers: list[Delivery], settled: int
) -> None:
    """A stop while a batch of 64 is sent, or split: the send in flight is answered, and
    nothing more is sent. A batch refused whole goes back whole (its split does not begin:
    not 126 more sends, and all 64 dead-lettered, during the shutdown); after a half
    delivered at the stop, the other half goes back unsent, in order."""
    sends = max(1, len(answers))
    forwarder, sink = refusing_forwarder(outbox, answers, stop_at=sends - 1)
    outbox.extend([event(n) for n in range(64)])
    task = asyncio.create_task(forwarder.run())
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:
        task.cancel()
    assert done, "the forwarder went on splitting after the stop"
    assert len(sink.batches) == sends
    assert queued_ids(outbox) == [f"m-{n}" for n in range(settled, 64)]
    assert outbox.queues[0].dead_letters == 0


async def test_the_drain_does_not_split_a_refused_batch(outbox: MemoryOutbox) -> None:
    """The memory queues' last attempt at shutdown is one send a batch: a batch refused
    with a 400 goes back to the queue whole (reported undelivered), not split down to 64
    events dead-lettered one by one past the drain's time."""
    forwarder, sink = refusing_forwarder(outbox, [], stop_at=0)
    forwarder.stopping.set()
    outbox.extend([event(n) for n in range(64)])
    await asyncio.wait_for(forwarder.drain(seconds=2), timeout=3)
    assert len(sink.batches) == 1
    assert queued_ids(outbox) == [f"m-{n}" for n in range(64)]
    assert outbox.queues[0].dead_letters == 0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "delivered"), (204, "delivered"), (429, "retry"), (408, "retry"), (500, "retry"),
     (503, "retry"), (400, "rejected"), (401, "rejected"), (404, "rejected"), (413, "rejected"),
     (301, "rejected"), (307, "rejected")],
)  # fmt: skip
def test_answers_are_classified(status: int, outcome: str) -> None:
    assert classify(status, None).outcome == outcome


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("inf") is None
    assert parse_retry_after("99999") == 3600.0


def test_retry_after_is_whole_seconds_or_a_date_in_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 9110 10.2.3: delay-seconds is digits only (``1.5`` and ``-3`` were read as
    numbers), and an HTTP-date is UTC in all its forms: asctime's, which has no zone, was
    read in the process's local time (hours off wherever TZ is not UTC)."""
    for value in ("1.5", "-3", "1e3", "+5", " "):
        assert parse_retry_after(value) is None, value
    assert parse_retry_after(" 7 ") == 7.0
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        ahead = time.gmtime(time.time() + 30)
        asctime = time.strftime("%a %b %e %H:%M:%S %Y", ahead)
        assert 28.0 <= (parse_retry_after(asctime) or 0.0) <= 31.0, asctime
    finally:
        monkeypatch.undo()
        time.tzset()


def test_sent_at_is_added_to_each_encoded_event_without_parsing_it() -> None:
    events = [
        {"type": "track", "properties": {"note": "a } and a \\n", "text": "line\nbreak"}},
        {},
        {"type": "identify", "traits": {"name": "Zoë"}},
    ]
    encoded = split_documents(join_documents(events))
    assert [orjson.loads(document) for document in encoded] == events
    sent = [orjson.loads(document) for document in stamped(encoded)]
    sent_at = sent[0]["sentAt"]
    assert sent_at.endswith("Z") and len(sent_at) == 24
    assert sent == [{**event, "sentAt": sent_at} for event in events]
    assert split_documents(b"") == []


class CountingFeed(MemoryFeed):
    reads = 0

    async def read(self, max_entries: int, wait: float) -> list[FeedEntry]:
        self.reads += 1
        return await super().read(max_entries, wait)


async def test_a_trickle_of_events_is_gathered_not_read_one_by_one(outbox: MemoryOutbox) -> None:
    sink = RecordingSink()
    feed = CountingFeed(outbox.subscribe())
    # The batch closes at its 40th event, long before its wait would end.
    settings = OutboxSettings(batch_max_wait=30, batch_max_events=40)
    forwarder = Forwarder("test", feed, sink, settings, Metrics())
    task = asyncio.create_task(forwarder.run())
    try:
        for number in range(40):
            outbox.extend([event(number)])
            await asyncio.sleep(0.005)
        await wait_until(lambda: sum(len(batch) for batch in sink.batches) == 40)
    finally:
        forwarder.stopping.set()
        await task
    assert len(sink.batches) == 1
    # About one read per 50 ms gathering over a trickle of about 0.2 s, not one per event.
    assert feed.reads <= 12


class FailingReadFeed(MemoryFeed):
    """Its second read fails, as a read from a Redis that went away does."""

    reads = 0

    async def read(self, max_entries: int, wait: float) -> list[FeedEntry]:
        self.reads += 1
        if self.reads == 2:
            raise ConnectionError("the store went away")
        return await super().read(max_entries, wait)


async def test_a_failed_read_keeps_the_batch_it_was_filling(outbox: MemoryOutbox) -> None:
    """The batch in hand when a read fails is delivered later, not dropped (its entries may
    be nowhere else: memory, or a Redis restarted empty)."""
    sink = RecordingSink()
    feed = FailingReadFeed(outbox.subscribe())
    forwarder = Forwarder("test", feed, sink, OutboxSettings(batch_max_wait=0.05), Metrics())
    outbox.extend([event(1)])
    task = asyncio.create_task(forwarder.run())
    try:
        await wait_until(lambda: sink.batches)
    finally:
        forwarder.stopping.set()
        await task
    assert feed.reads >= 2
    assert sink.batches == [[event(1)]]


def test_the_backoff_stays_finite_however_many_retries_a_batch_had() -> None:
    # Found in review: 429s are not counted toward max_attempts, and after about a
    # thousand of them 2 ** attempt no longer fit a float (OverflowError, the batch lost).
    settings = OutboxSettings(backoff_base=0.5, backoff_max=60.0)
    forwarder = Forwarder(
        "test", MemoryFeed(MemoryOutbox().subscribe()), RecordingSink([]), settings, Metrics()
    )
    for attempt in (1, 2, 1025, 100_000):
        delay = forwarder._backoff(attempt, None)
        assert 0 < delay <= 60.0
    assert forwarder._backoff(100_000, None) >= 30.0  # still the capped range


def test_a_retry_after_lengthens_the_backoff_and_never_shortens_it() -> None:
    """Whatever the status (503 or 429): a Retry-After longer than the backoff is waited
    out, a shorter one (0, a date already past, or 1 s after several failures) is not
    allowed to crowd the attempts together."""
    settings = OutboxSettings(backoff_base=0.5, backoff_max=60.0)
    forwarder = Forwarder(
        "test", MemoryFeed(MemoryOutbox().subscribe()), RecordingSink([]), settings, Metrics()
    )
    assert forwarder._backoff(1, 30.0) == 30.0
    assert forwarder._backoff(1, 3600.0) == 3600.0
    for retry_after in (0.0, 1.0):
        assert 4.0 <= forwarder._backoff(5, retry_after) <= 8.0  # the 5th: 0.5 s x 2**4


async def test_only_failed_attempts_that_are_sent_again_count_as_retries(
    outbox: MemoryOutbox,
) -> None:
    """identity_delivery_retries_total counts the failed attempts that were retried: the
    last one, after which the batch is dead-lettered, was not."""
    sink = RecordingSink([Delivery("retry", "http 500")] * 3)
    async for forwarder in forward(outbox, sink, max_attempts=3):
        outbox.extend([event(1)])
        await wait_until(lambda: outbox.queues[0].dead_letters == 1)
        metrics = forwarder._metrics
    assert len(sink.batches) == 3
    assert metrics.value("identity_delivery_failures_total", destination="test") == 3
    assert metrics.value("identity_delivery_retries_total", destination="test") == 2


class YieldingSink(RecordingSink):
    """Lets the event loop run during each send, as a request over the network does."""

    async def send(self, events: list[bytes]) -> Delivery:
        await asyncio.sleep(0)
        return await super().send(events)


async def test_a_stop_ends_retries_that_a_destination_asks_to_make_at_once(
    outbox: MemoryOutbox,
) -> None:
    """A destination answering 429 with Retry-After: 0 (or a date already past) asks for
    the batch again at once (backed off: the shortest backoff here), for as long as it likes
    (429s are not failed attempts): a stop still ends the retries, and the batch goes back
    to the queue for the drain."""
    at_once = Delivery("retry", "http 429", retry_after=0.0, throttled=True)
    sink = YieldingSink([at_once] * 1_000_000)
    feed = MemoryFeed(outbox.subscribe())
    settings = OutboxSettings(batch_max_wait=0.01, backoff_base=0.001, backoff_max=0.001)
    forwarder = Forwarder("test", feed, sink, settings, Metrics())
    task = asyncio.create_task(forwarder.run())
    outbox.extend([event(1), event(2)])
    await wait_until(lambda: len(sink.batches) >= 3)
    forwarder.stopping.set()
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:
        task.cancel()
    assert done, "the forwarder went on retrying after the stop"
    assert [orjson.loads(e)["messageId"] for _, e in outbox.queues[0].events] == ["m-1", "m-2"]


async def test_standard_output_that_cannot_be_written_is_a_failed_attempt(
    outbox: MemoryOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standard output whose reader is gone (EPIPE) or whose disk is full fails the attempt,
    as the file sink's errors do: the batch is retried, then dead-lettered and counted; not
    dropped from the forwarder's hands while the queue still counts it pending for ever."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write fails with EPIPE
    broken = os.fdopen(write_end, "w")  # closed below
    monkeypatch.setattr(sys, "stdout", broken)
    feed = MemoryFeed(outbox.subscribe("test"))
    settings = OutboxSettings(max_attempts=2, backoff_base=0.01, backoff_max=0.02)
    forwarder = Forwarder("test", feed, StdoutSink(), settings, Metrics())
    # The log lines are kept apart: the service's own go out buffered, flushed off the
    # forwarder's path (log_config.py), so a broken stdout does not fail its log calls.
    with structlog.testing.capture_logs() as logged:
        task = asyncio.create_task(forwarder.run())
        try:
            outbox.extend([event(1)])
            await wait_until(lambda: outbox.queues[0].dead_letters == 1, seconds=3)
        finally:
            forwarder.stopping.set()
            await task
            monkeypatch.undo()
            with contextlib.suppress(OSError):
                broken.close()
    assert memory_backlog(outbox, time.time())["test"].pending == 0
    retries = [line for line in logged if line["event"] == "batch_retry"]
    assert [line["reason"] for line in retries] == ["stdout: Broken pipe"]


@contextlib.asynccontextmanager
async def raw_destination(head: bytes, body: bytes, hang: bool) -> AsyncIterator[str]:
    """An HTTP server that reads a request, answers ``head`` then ``body`` (in 64 KiB
    writes) and, with ``hang``, never ends the answer; its URL."""
    answering: list[asyncio.Task[Any]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        answering.append(task)
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        writer.write(head)
        for start in range(0, len(body), 65536):
            writer.write(body[start : start + 65536])
            await writer.drain()
        if hang:
            await asyncio.sleep(3600)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in answering:
            task.cancel()
        await asyncio.gather(*answering, return_exceptions=True)


async def test_a_2xx_whose_body_never_ends_is_delivered_not_retried() -> None:
    """The status is the answer: a destination that accepted the batch and then sends its
    body slowly, or never finishes it, has the batch delivered, not timed out (sent again,
    and again, then dead-lettered although the destination had taken every copy)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    async with raw_destination(head, b'{"success":', hang=True) as url:
        sink = HttpSink(Destination("d", "http", url=url, write_key="key"), timeout=0.5)
        try:
            assert await sink.send([orjson.dumps(event(1))]) == DELIVERED
        finally:
            await sink.close()


async def test_a_huge_answer_is_not_held_in_memory() -> None:
    """However long a destination's answer (an error page, a misdirected URL's download),
    the sink reads a bounded part of it: the body was read whole into memory."""
    body = b"x" * (32 * 1024 * 1024)
    head = b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with raw_destination(head, body, hang=False) as url:
        sink = HttpSink(Destination("d", "http", url=url, write_key="key"), timeout=10.0)
        tracemalloc.start()
        try:
            delivery = await sink.send([orjson.dumps(event(1))])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await sink.close()
    assert (delivery.outcome, delivery.reason) == ("retry", "http 503")
    assert peak < 8 * MAX_ANSWER_BYTES + 4 * 1024 * 1024
