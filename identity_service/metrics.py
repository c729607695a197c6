"""The service's Prometheus metrics, with prometheus_client, right with any number of workers.

One process (``serve`` with one worker, ``forward``, the tests) counts in a registry of its
own. With ``--workers N``, ``serve`` makes a private directory before forking
(:func:`multiprocess_directory`) and every worker counts in prometheus_client's
memory-mapped files there (its multiprocess mode): a scrape, whichever worker the kernel
hands it to, sums every worker's files (``MultiProcessCollector``), so every scrape reads
the same totals. The parent marks a worker that exited as dead.

What is state rather than a count (the store's ping, the outbox's backlog, its oldest
entry's age, the dead letters, the build) is not counted by the workers: the scraped
process reads it when scraped (scrape.py) and hands it over as :class:`Scraped`, so no
gauge needs a multiprocess mode and none goes stale with a worker.

Hot path: counts are tallied in plain Python numbers (:class:`Tally`, :class:`DurationTally`)
and handed to prometheus_client in bulk (:meth:`Metrics.flush`): before every exposition, and
in a worker of ``--workers N`` every :data:`FLUSH_SECONDS` (:func:`flushing`), so a scrape
answered by one worker reads the others' counts as of their last flush, at most a second
old, and never less than an earlier scrape read. A count costs an attribute addition, a
request's count and duration one dict lookup, a ``bisect`` and three additions: about a
fifth of what prometheus_client's own ``inc`` and ``observe`` cost, a tenth of its
memory-mapped files' (bench/README.md). Label values are bounded: route templates, never
paths; no token, id or URL.
"""

import asyncio
import contextlib
import os
import platform
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from identity_service import __version__

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format every Prometheus reads (the names are all plain ASCII).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# From 100 µs (a prepare answered by the front) to 1 s.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# How often a worker of ``--workers N`` hands its tallies to the shared files.
FLUSH_SECONDS = 1.0
OTHER = "other"  # the route of a request no route matched, and any unusual method
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# Counters: name, help, label names. The names and labels before 0.4.0 are kept as they were.
_COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("identity_handoffs_prepared_total", "Handoffs prepared, by source.", ("source",)),
    (
        "identity_handoffs_exchanged_total",
        "Handoffs exchanged for an identity, by source.",
        ("source",),
    ),
    (
        "identity_handoff_misses_total",
        "Exchanges that restored no identity, by source and reason "
        "(not_found: unknown, expired or used token; audience: origin not allowed).",
        ("source", "reason"),
    ),
    (
        "identity_handoff_fallbacks_total",
        "Misses answered with a generated anonymousId, by source.",
        ("source",),
    ),
    (
        "identity_identities_total",
        "Identities resolved for an event, by where the anonymousId came from (handoff, "
        "generated; AMP collect: amp_cookie, amp_link, amp_client_id, amp_generated).",
        ("id_source",),
    ),
    ("identity_store_errors_total", "Store operations that failed (answered 503).", ()),
    (
        "identity_redis_wait_short_total",
        "Prepares and exchanges whose WAIT (IDENTITY_REDIS_WAIT) saw fewer replicas than "
        "asked in time; the request succeeded all the same.",
        ("operation",),
    ),
    (
        "identity_events_skipped_total",
        "Events not emitted, by reason (consent: analytics denied).",
        ("reason",),
    ),
    (
        "identity_events_delivered_total",
        "Events a destination accepted (2xx), by destination.",
        ("destination",),
    ),
    (
        "identity_events_dead_lettered_total",
        "Events moved to the dead letters, by destination.",
        ("destination",),
    ),
    (
        "identity_delivery_attempts_total",
        "Batch deliveries attempted, by destination.",
        ("destination",),
    ),
    (
        "identity_delivery_failures_total",
        "Batch deliveries that failed (retried, split or dead-lettered), by destination.",
        ("destination",),
    ),
    (
        "identity_delivery_retries_total",
        "Batch deliveries that failed and were retried, by destination.",
        ("destination",),
    ),
    (
        "identity_connections_refused_total",
        "Connections refused over IDENTITY_MAX_CONNECTIONS (a /healthz answered is none).",
        (),
    ),
    (
        "identity_http_requests_total",
        "HTTP requests answered, by route template, method and status.",
        ("route", "method", "status"),
    ),
    (
        "identity_amp_hits_total",
        "AMP collect hits, by context (origin, cache_with_cookie, cache_without_cookie).",
        ("context",),
    ),
    (
        "identity_amp_hops_total",
        "AMP origin hops for actions, by action and stage.",
        ("action", "stage"),
    ),
    ("identity_amp_links_recorded_total", "AMP cache clientIds linked to a visitor.", ()),
    (
        "identity_amp_link_failures_total",
        "AMP links not recorded because the store failed (the request stood).",
        (),
    ),
    (
        "identity_amp_link_attributions_total",
        "AMP hits attributed to a visitor through a link.",
        (),
    ),
    ("identity_amp_refusals_total", "AMP requests refused, by reason.", ("reason",)),
)

# The series of ``<name>_created`` (the time a counter was made) say nothing here.
disable_created_metrics()  # type: ignore[no-untyped-call]

Inc = Callable[..., None]


class Tally:
    """A counter child's increments, kept until :meth:`flush` hands them over at once."""

    __slots__ = ("_inc", "pending")

    def __init__(self, child: MetricWrapperBase) -> None:
        self.pending: float = 0
        self._inc: Inc = child.inc  # type: ignore[attr-defined]

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0
            self._inc(amount)


class DurationTally:
    """A histogram child's observations as bucket counts and a sum, until :meth:`flush`.

    The buckets are the child's own (``le``: an observation counts in the first bucket whose
    bound is at least it; past the last, in +Inf). prometheus_client has no call that adds
    counts to a bucket, so the flush adds them to the child's bucket and sum values, the
    ones its ``observe`` adds to (tests/test_metrics.py holds the two expositions equal).
    """

    __slots__ = ("_child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0
        self._child = child

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def flush(self) -> None:
        if not self.total and not any(self.counts):
            return
        buckets = self._child._buckets
        for index, count in enumerate(self.counts):
            if count:
                buckets[index].inc(count)
                self.counts[index] = 0
        self._child._sum.inc(self.total)
        self.total = 0.0


@dataclass(slots=True)
class Backlog:
    """One destination's outbox as read at scrape time."""

    pending: int = 0  # written, not yet acknowledged (unread or in flight)
    oldest_age_seconds: float = 0.0  # of the oldest of those; 0 when there is none
    dead_letters: int = 0


@dataclass(slots=True)
class Scraped:
    """What the scraped process read for this scrape (scrape.py)."""

    store_up: bool | None = None  # None: no store to ping
    outbox: dict[str, Backlog] = field(default_factory=dict)


class Metrics:
    """The service's metrics and their exposition: counters, the request histogram and
    the gauges of the last :class:`Scraped`."""

    def __init__(self) -> None:
        directory = _directory
        self._registry = CollectorRegistry(auto_describe=True)
        if directory is None:
            metric_registry: CollectorRegistry | None = self._registry
        else:
            # The counts live in the files; every process's are read from there.
            metric_registry = None
            self._registry.register(_WorkerFiles(directory))
        self._counters = {
            name: Counter(name, help_text, labels, registry=metric_registry)
            for name, help_text, labels in _COUNTERS
        }
        self._durations = Histogram(
            "identity_http_request_duration_seconds",
            "HTTP request durations in the service (parse to answer), by route template.",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=metric_registry,
        )
        self.shared = directory is not None  # counting in the workers' files
        self._bound: dict[tuple[str, tuple[tuple[str, str], ...]], Tally] = {}
        self._requests: dict[tuple[str, str, int], tuple[Tally, DurationTally]] = {}
        self._durations_by_route: dict[str, DurationTally] = {}
        self._tallies: list[Tally | DurationTally] = []
        self.routes: frozenset[str] = frozenset()
        self.scraped = Scraped()
        self._registry.register(_ScrapedCollector(self))

    def add_routes(self, routes: Iterable[str]) -> None:
        """Route templates requests are counted under, besides those added before (the API's
        and the metrics port's share one Metrics); any other path counts as other."""
        self.routes |= frozenset(routes)
        for route in (*self.routes, OTHER):
            self._route_durations(route)

    def route_of(self, path: str) -> str:
        """The label of a request to ``path`` that no route matched (404, 405, refused)."""
        return path if path in self.routes else OTHER

    def counter(self, name: str, **labels: str) -> Inc:
        """The ``inc`` of counter ``name``'s child with ``labels`` (a tally), bound once."""
        key = (name, tuple(sorted(labels.items())))
        tally = self._bound.get(key)
        if tally is None:
            counter = self._counters[name]
            tally = self._bound[key] = self._tally(counter.labels(**labels) if labels else counter)
        return tally.inc

    def _tally(self, child: MetricWrapperBase) -> Tally:
        tally = Tally(child)
        self._tallies.append(tally)
        return tally

    def _route_durations(self, route: str) -> DurationTally:
        durations = self._durations_by_route.get(route)
        if durations is None:
            durations = DurationTally(self._durations.labels(route))
            self._durations_by_route[route] = durations
            self._tallies.append(durations)
        return durations

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        """Count ``amount`` on counter ``name`` (off the hot path; there, bind with counter)."""
        self.counter(name, **labels)(amount)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration (``route`` from :meth:`route_of` or
        a matched route's template)."""
        bound = self._requests.get((route, method, status))
        if bound is None:
            bound = self._bind_request(route, method, status)
        count, durations = bound
        count.pending += 1
        durations.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        durations.total += seconds

    def _bind_request(self, route: str, method: str, status: int) -> tuple[Tally, DurationTally]:
        method_label = method if method in METHODS else OTHER
        counter = self._counters["identity_http_requests_total"]
        count = self._tally(counter.labels(route, method_label, str(status)))
        bound = self._requests[route, method, status] = (count, self._route_durations(route))
        return bound

    def flush(self) -> None:
        """Hand every tally's counts to prometheus_client (its memory, or the shared files)."""
        for tally in self._tallies:
            tally.flush()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when it has none): for tests and tools."""
        self.flush()
        return self._registry.get_sample_value(name, labels) or 0

    def render(self) -> bytes:
        """The exposition, in the Prometheus text format."""
        self.flush()
        return generate_latest(self._registry)


class _WorkerFiles(Collector):
    """Every worker's counts, read from their files as prometheus_client's
    MultiProcessCollector reads them, less the files still empty: prometheus_client makes a
    worker's file, then sizes it, and a file read in between fails the whole read
    (``struct.error``). An empty file holds no count yet."""

    def __init__(self, directory: str) -> None:
        self._directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        files = [str(f) for f in self._directory.glob("*.db") if f.stat().st_size]
        merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        return merged


class _ScrapedCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        build = GaugeMetricFamily(
            "identity_build_info",
            "The running build: 1, with its version and Python's.",
            labels=("version", "python"),
        )
        build.add_metric((__version__, platform.python_version()), 1)
        yield build
        scraped = self._metrics.scraped
        if scraped.store_up is not None:
            yield GaugeMetricFamily(
                "identity_store_up",
                "1 if the store answered its ping when scraped, else 0.",
                value=1 if scraped.store_up else 0,
            )
        gauges = (
            ("identity_outbox_pending", "Outbox entries written, not yet acknowledged."),
            (
                "identity_outbox_oldest_pending_age_seconds",
                "Age of the oldest entry not yet acknowledged (0 when none).",
            ),
            ("identity_outbox_dead_letters", "Entries in the dead letters."),
        )
        families = [GaugeMetricFamily(n, h, labels=("destination",)) for n, h in gauges]
        pending, age, dead = families
        for destination, backlog in sorted(scraped.outbox.items()):
            pending.add_metric((destination,), backlog.pending)
            age.add_metric((destination,), round(backlog.oldest_age_seconds, 3))
            dead.add_metric((destination,), backlog.dead_letters)
        if scraped.outbox:
            yield from families


# prometheus_client asks for the process id at every count, to notice a fork; os.getpid is
# a system call each time, so the id is kept here and renewed in a forked child.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


def _process_id() -> int:
    return _pid


os.register_at_fork(after_in_child=_renew_pid)

# The directory of the multiprocess mode, or None: counts in this process's memory.
_directory: str | None = None
# prometheus_client picks its value class from PROMETHEUS_MULTIPROC_DIR when imported; here
# the mode is only ever what serve chose (use_directory), whatever the environment says.
values.ValueClass = values.MutexValue


def use_directory(directory: str | None) -> None:
    """Count in ``directory``'s files from now on (multiprocess mode), or in memory (None).

    Metrics made after the call use it (the workers make theirs after the fork).
    """
    global _directory
    _directory = directory
    if directory is None:
        values.ValueClass = values.MutexValue
    else:
        os.environ[MULTIPROC_ENV] = directory  # where prometheus_client's files go
        values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)  # type: ignore[no-untyped-call]


class DirectoryError(Exception):
    """``PROMETHEUS_MULTIPROC_DIR`` cannot be used; the message says why in one line."""


def given_directory() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR``, made if missing and emptied of earlier runs' files;
    None when unset. DirectoryError when it cannot be (under a file, not writable...)."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        return None
    try:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    except OSError as exc:
        raise DirectoryError(f"{MULTIPROC_ENV} {given}: {exc.strerror}") from None
    return given


@contextlib.contextmanager
def multiprocess_directory(given: str | None) -> Iterator[str]:
    """The workers' directory for the multiprocess mode, counting in it until exit.

    ``given``: ``PROMETHEUS_MULTIPROC_DIR`` as :func:`given_directory` made it ready (made,
    emptied of earlier runs' files), used as it is and kept; None: a private temporary
    directory, removed at exit. Emptying it again here, after the start's check, would
    delete what was written there in between.
    """
    directory = given or tempfile.mkdtemp(prefix="identity-metrics-")
    use_directory(directory)
    try:
        yield directory
    finally:
        use_directory(None)
        if not given:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def flushing(metrics: Metrics) -> AsyncIterator[None]:
    """While inside, a worker counting in the shared files flushes every FLUSH_SECONDS, and
    once more on the way out; a process of its own flushes when scraped, so needs none."""
    if not metrics.shared:
        yield
        return

    async def flush_now_and_then() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            metrics.flush()

    task = asyncio.create_task(flush_now_and_then())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.flush()


def mark_dead(pid: int, directory: str) -> None:
    """Let the files of worker ``pid``, which exited, count as a dead process's."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
