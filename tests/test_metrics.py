"""/metrics as Prometheus reads it: counters, histograms and gauges move with the flows.

Every scrape is parsed with prometheus_client's own parser. The services are real: the
app through the HTTP front on both stores, ``identity-service serve --workers 2`` and
``identity-service forward`` as processes, a collector that answers or refuses.
"""

import asyncio
import dataclasses
import re
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from identity_service import __version__, metrics
from tests.collector import WRITE_KEY, Answer, Collector, running_collector
from tests.conftest import (
    CHECKOUT_URL,
    WRITE_KEYS,
    AppClient,
    ClientFactory,
    exchange,
    prepare,
)
from tests.redis_server import RedisServer, free_port
from tests.test_cli import COMMAND, Service, post, redis_env

# (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def check_scrape_headers(headers: Mapping[str, str]) -> None:
    """A scrape's answer is text never sniffed as something else (a browser's tab opened on
    /metrics), nor kept by a cache, as the API's answers are."""
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"


async def scrape(client: AppClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    check_scrape_headers(response.headers)
    return parse(await response.text())


async def scrape_url(url: str) -> Samples:
    """A scrape of ``serve`` or ``forward`` running as a process."""
    # A connection of its own each time: with several workers, the kernel picks one.
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as answer:
        assert answer.status == 200
        check_scrape_headers(answer.headers)
        return parse(await answer.text())


async def eventually(
    read: Callable[[], Awaitable[Samples]], check: Callable[[Samples], bool]
) -> Samples:
    deadline = time.monotonic() + 15
    while True:
        samples = await read()
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "the metrics did not get there"
        await asyncio.sleep(0.05)


async def test_counters_and_histograms_follow_the_flows(client: AppClient) -> None:
    before = await scrape(client)
    token = (await prepare(client))["token"]
    assert (await exchange(client, token))[0] == 200
    assert (await exchange(client, token))[0] == 404  # used: not_found
    assert (await exchange(client, token, fallback=True))[0] == 200  # generated
    partner_token = (await prepare(client))["token"]
    assert (await exchange(client, partner_token, source="partner"))[0] == 403  # audience
    assert (await client.get("/v1/handoffs/no-such-thing-7d1e")).status == 404
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("identity_handoffs_prepared_total", source="shop") == 2
    assert moved("identity_handoffs_exchanged_total", source="checkout") == 1
    assert moved("identity_handoff_misses_total", source="checkout", reason="not_found") == 2
    assert moved("identity_handoff_misses_total", source="partner", reason="audience") == 1
    assert moved("identity_handoff_fallbacks_total", source="checkout") == 1
    assert moved("identity_identities_total", id_source="handoff") == 1
    assert moved("identity_identities_total", id_source="generated") == 1
    prepares = {"route": "/v1/handoffs", "method": "POST", "status": "201"}
    assert moved("identity_http_requests_total", **prepares) == 2
    exchanges = {"route": "/v1/handoffs/exchange", "method": "POST"}
    assert moved("identity_http_requests_total", **exchanges, status="200") == 2
    assert moved("identity_http_requests_total", **exchanges, status="404") == 1
    assert moved("identity_http_requests_total", **exchanges, status="403") == 1
    # No route matched: "other", never the path.
    assert moved("identity_http_requests_total", route="other", method="GET", status="404") == 1
    assert not any("no-such-thing" in str(labels) for _, labels in after)
    # The scrape before this one was counted under its own route.
    assert moved("identity_http_requests_total", route="/metrics", method="GET", status="200") == 1
    durations = "identity_http_request_duration_seconds"
    assert moved(f"{durations}_count", route="/v1/handoffs") == 2
    assert moved(f"{durations}_bucket", route="/v1/handoffs", le="+Inf") == 2
    assert moved(f"{durations}_bucket", route="/v1/handoffs", le="0.0001") <= 2
    assert moved(f"{durations}_sum", route="/v1/handoffs") > 0
    assert value(after, "identity_store_up") == 1
    builds = [labels for name, labels in after if name == "identity_build_info"]
    assert len(builds) == 1 and ("version", __version__) in builds[0]


# A documented metric: its type and its label names.
Documented = dict[str, tuple[str, frozenset[str]]]


def documented_metrics() -> Documented:
    """docs/metrics.md's table of metrics (a row may name several; a label's values may
    follow it in parentheses: `operation` (`prepare`, `exchange`))."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    table = docs.partition("\n## The metrics\n")[2].partition("\n## ")[0]
    documented: Documented = {}
    for row in re.findall(r"^\| (`identity_.*)$", table, re.MULTILINE):
        names, kind, labels = (cell.strip() for cell in row.split("|")[:3])
        label_names = frozenset(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels)))
        documented.update(dict.fromkeys(re.findall(r"`(\w+)`", names), (kind, label_names)))
    return documented


async def test_docs_metrics_lists_every_exposed_metric_with_its_type_and_labels(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """Each metric /metrics exposes is in docs/metrics.md's table with its type and labels,
    and each one the table lists is exposed (a destination's too: on Redis none is
    configured without one)."""
    client = await make_client(events_file=str(tmp_path / "events.jsonl"))
    documented = documented_metrics()
    token = (await prepare(client))["token"]
    assert (await exchange(client, token))[0] == 200
    response = await client.get("/metrics")
    exposed: Documented = {}
    for family in text_string_to_metric_families(await response.text()):
        # The parser names a counter's family without its samples' _total.
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = frozenset(label for s in family.samples for label in s.labels) - {"le"}
        exposed[name] = (family.type, labels)
    assert sorted(exposed) == sorted(documented)
    for name, (kind, labels) in exposed.items():
        assert kind == documented[name][0], name
        if labels:  # a labelled counter with no child yet shows no label
            assert labels == documented[name][1], name
    # Every counter, bound with its documented labels (prometheus_client refuses others).
    counts = metrics.Metrics()
    for name, (kind, label_names) in documented.items():
        if kind == "counter":
            values = dict.fromkeys(label_names, "x")
            try:
                counts.counter(name, **values)()
                assert counts.value(name, **values) == 1
            except ValueError as exc:  # "Incorrect label names", or some missing
                pytest.fail(f"{name} has other labels than docs/metrics.md lists: {exc}")


async def test_the_outbox_backlog_and_failures_show_while_the_destination_refuses(
    make_client: ClientFactory,
) -> None:
    async with running_collector() as collector:
        collector.plan = [Answer(status=503) for _ in range(1000)]
        client = await make_client(
            destination_url=collector.url,
            destination_write_key=WRITE_KEY,
            batch_max_wait="0.01",
            backoff_base="0.05",
            backoff_max="0.1",
            delivery_max_attempts="1000",
        )
        before = await scrape(client)
        assert value(before, "identity_outbox_pending", destination="default") == 0
        assert (
            value(before, "identity_outbox_oldest_pending_age_seconds", destination="default") == 0
        )
        await prepare(client)  # one started event, never accepted

        def refused(samples: Samples) -> bool:
            return (
                value(samples, "identity_delivery_failures_total", destination="default") >= 2
                and value(
                    samples, "identity_outbox_oldest_pending_age_seconds", destination="default"
                )
                > 0
            )

        during = await eventually(lambda: scrape(client), refused)
        assert value(during, "identity_outbox_pending", destination="default") == 1
        attempts = value(during, "identity_delivery_attempts_total", destination="default")
        assert attempts >= value(during, "identity_delivery_failures_total", destination="default")
        assert value(during, "identity_events_delivered_total", destination="default") == 0

        collector.plan.clear()  # the destination is back

        def delivered(samples: Samples) -> bool:
            return value(samples, "identity_outbox_pending", destination="default") == 0

        after = await eventually(lambda: scrape(client), delivered)
        assert value(after, "identity_events_delivered_total", destination="default") == 1
        assert (
            value(after, "identity_outbox_oldest_pending_age_seconds", destination="default") == 0
        )
        assert value(after, "identity_outbox_dead_letters", destination="default") == 0


async def test_on_redis_without_a_destination_the_waiting_events_are_a_backlog(
    aiohttp_client: Callable[..., Awaitable[AppClient]], redis_server: RedisServer, tmp_path: Path
) -> None:
    """On Redis without an events destination the events wait in the outbox for one: they
    show as the backlog of destination "(none)", growing, as old as the oldest, which
    IdentityOutboxLagging alerts on; on serve's port and on forward's. With a destination
    there is no such series."""
    from identity_service.app import create_app
    from identity_service.metrics_app import serving_metrics
    from identity_service.scrape import NO_DESTINATION
    from tests.conftest import FrontTestServer, make_settings

    waiting = {"destination": NO_DESTINATION}
    settings = make_settings(redis_server.url)
    assert not settings.outbox.destinations
    client = await aiohttp_client(FrontTestServer(create_app(settings)))
    before = await scrape(client)
    assert ("identity_outbox_pending", (("destination", NO_DESTINATION),)) in before
    assert value(before, "identity_outbox_pending", **waiting) == 0
    token = (await prepare(client))["token"]
    assert (await exchange(client, token))[0] == 200

    def aging(samples: Samples) -> bool:
        return value(samples, "identity_outbox_oldest_pending_age_seconds", **waiting) > 0

    during = await eventually(lambda: scrape(client), aging)
    assert value(during, "identity_outbox_pending", **waiting) == 2  # started, completed
    assert value(during, "identity_outbox_dead_letters", **waiting) == 0
    # identity-service forward's port shows the same.
    forwarding = dataclasses.replace(
        settings, forwarder_metrics_host="127.0.0.1", forwarder_metrics_port=free_port()
    )
    async with serving_metrics(forwarding, metrics.Metrics()) as port:
        forwarded = await scrape_url(f"http://127.0.0.1:{port}")
    assert value(forwarded, "identity_outbox_pending", **waiting) == 2

    routed = make_settings(redis_server.url, events_file=str(tmp_path / "events.jsonl"))
    other = await aiohttp_client(FrontTestServer(create_app(routed)))
    samples = await scrape(other)
    assert not [labels for _, labels in samples if ("destination", NO_DESTINATION) in labels]


async def test_dead_letters_are_counted_and_shown(make_client: ClientFactory) -> None:
    async with running_collector() as collector:
        collector.plan = [Answer(status=400)]  # a permanent rejection: dead at once
        client = await make_client(
            destination_url=collector.url, destination_write_key=WRITE_KEY, batch_max_wait="0.01"
        )
        await prepare(client)

        def dead(samples: Samples) -> bool:
            return value(samples, "identity_outbox_dead_letters", destination="default") == 1

        after = await eventually(lambda: scrape(client), dead)
        assert value(after, "identity_events_dead_lettered_total", destination="default") == 1
        assert value(after, "identity_outbox_pending", destination="default") == 0


async def test_a_store_that_does_not_answer_is_down_and_the_scrape_still_answers(
    aiohttp_client: Callable[..., Awaitable[AppClient]], private_redis: RedisServer
) -> None:
    from identity_service.app import create_app
    from tests.conftest import FrontTestServer, make_settings

    client = await aiohttp_client(
        FrontTestServer(create_app(make_settings(private_redis.url, redis_timeout="0.5")))
    )
    assert value(await scrape(client), "identity_store_up") == 1
    private_redis.stop()
    samples = await scrape(client)
    assert value(samples, "identity_store_up") == 0
    assert not any(name.startswith("identity_outbox_") for name, _ in samples)
    assert (await prepare_status(client)) == 503
    assert value(await scrape(client), "identity_store_errors_total") == 1


async def prepare_status(client: AppClient, consent: dict[str, bool] | None = None) -> int:
    from tests.conftest import auth

    body: dict[str, Any] = {"anonymousId": "anon-down", "destination": CHECKOUT_URL}
    if consent is not None:
        body["consent"] = consent
    response = await client.post("/v1/handoffs", json=body, headers=auth("shop"))
    return response.status


async def test_a_prepare_the_store_refused_counts_no_skipped_event(
    aiohttp_client: Callable[..., Awaitable[AppClient]], private_redis: RedisServer
) -> None:
    """identity_events_skipped_total{reason="consent"} counts the events a handoff did not
    send for its consent; a prepare answered 503 made no handoff, so it skipped nothing."""
    from identity_service.app import create_app
    from tests.conftest import FrontTestServer, make_settings

    client = await aiohttp_client(
        FrontTestServer(create_app(make_settings(private_redis.url, redis_timeout="0.5")))
    )
    assert (await prepare_status(client, consent={"analytics": False})) == 201
    skipped = value(await scrape(client), "identity_events_skipped_total", reason="consent")
    assert skipped == 1
    private_redis.stop()
    assert (await prepare_status(client, consent={"analytics": False})) == 503
    after = value(await scrape(client), "identity_events_skipped_total", reason="consent")
    assert after == 1


# -- processes ---------------------------------------------------------------------------


async def prepare_from_shop(service: Service, count: int) -> int:
    """Prepare ``count`` handoffs from the shop, each on a fresh connection (spread over
    the workers); return ``count``."""
    for number in range(count):
        status, _ = await post(
            f"{service.url}/v1/handoffs",
            {"anonymousId": f"visitor-{number}", "destination": CHECKOUT_URL},
            WRITE_KEYS["shop"],
        )
        assert status == 201
    return count


async def test_every_scrape_of_two_workers_reads_the_same_totals(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    service = Service(tmp_path, redis_env(private_redis), "--workers", "2")
    try:
        count = await prepare_from_shop(service, 24)
        # A worker hands its tallies to the shared files every FLUSH_SECONDS: until the
        # other worker's flush, a scrape may read less, never more, and never less than a
        # scrape before it.
        early = []
        for _ in range(100):
            early.append(await scrape_url(service.url))
            if value(early[-1], "identity_handoffs_prepared_total", source="shop") == count:
                break
            await asyncio.sleep(metrics.FLUSH_SECONDS / 10)
        scrapes_seen = {"route": "/metrics", "method": "GET", "status": "200"}
        for _ in range(100):  # until both workers flushed the early scrapes' counts too
            await asyncio.sleep(metrics.FLUSH_SECONDS / 5)
            settled = await scrape_url(service.url)
            if value(settled, "identity_http_requests_total", **scrapes_seen) >= len(early):
                break
        scrapes = [await scrape_url(service.url) for _ in range(8)]
    finally:
        assert await asyncio.to_thread(service.stop) == 0, service.stderr
    seen_early = [value(s, "identity_handoffs_prepared_total", source="shop") for s in early]
    assert seen_early == sorted(seen_early) and seen_early[-1] == count
    prepared = [value(s, "identity_handoffs_prepared_total", source="shop") for s in scrapes]
    assert prepared == [count] * len(scrapes)
    requests = {"route": "/v1/handoffs", "method": "POST", "status": "201"}
    assert [value(s, "identity_http_requests_total", **requests) for s in scrapes] == [count] * 8
    histogram = "identity_http_request_duration_seconds_count"
    assert {value(s, histogram, route="/v1/handoffs") for s in scrapes} == {count}
    # Scrapes count the scrapes before them, whichever worker answered them: at least every
    # early one, and never fewer than the scrape before.
    seen = [value(s, "identity_http_requests_total", **scrapes_seen) for s in scrapes]
    assert seen == sorted(seen) and seen[0] >= len(early)


class Forward:
    """A running ``identity-service forward`` with its metrics port."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp_path / "forward-stderr"
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [COMMAND, "forward"],
                env={
                    **env,
                    "IDENTITY_FORWARDER_METRICS_PORT": str(self.port),
                    "IDENTITY_FORWARDER_METRICS_HOST": "127.0.0.1",
                },
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    async def ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{self.url}/healthz") as answer,
                ):
                    if answer.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"forward did not start: {self.stderr_path.read_text()}")
            await asyncio.sleep(0.05)

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=20)


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as running:
        yield running


@pytest.fixture
def forward_env(private_redis: RedisServer, collector: Collector) -> dict[str, str]:
    return redis_env(
        private_redis,
        IDENTITY_DESTINATION_URL=collector.url,
        IDENTITY_DESTINATION_WRITE_KEY=WRITE_KEY,
        IDENTITY_BATCH_MAX_WAIT="0.01",
        IDENTITY_BACKOFF_BASE="0.05",
        IDENTITY_BACKOFF_MAX="0.1",
    )


async def test_forward_serves_its_own_metrics(
    tmp_path: Path, forward_env: dict[str, str], collector: Collector
) -> None:
    # The web side, with the forwarder off, writes the outbox the forward process reads.
    web = Service(tmp_path, {**forward_env, "IDENTITY_FORWARDER": "off"})
    forward = Forward(tmp_path, forward_env)
    try:
        await forward.ready()
        collector.plan = [Answer(status=503)]
        status, _ = await post(
            f"{web.url}/v1/handoffs",
            {"anonymousId": "visitor-f", "destination": CHECKOUT_URL},
            WRITE_KEYS["shop"],
        )
        assert status == 201
        await collector.wait_for(1)

        def delivered(samples: Samples) -> bool:
            return value(samples, "identity_events_delivered_total", destination="default") == 1

        samples = await eventually(lambda: scrape_url(forward.url), delivered)
        assert value(samples, "identity_delivery_attempts_total", destination="default") == 2
        assert value(samples, "identity_delivery_failures_total", destination="default") == 1
        assert value(samples, "identity_delivery_retries_total", destination="default") == 1
        assert value(samples, "identity_outbox_pending", destination="default") == 0
        assert value(samples, "identity_store_up") == 1
        # The web side shows the same outbox, read from Redis.
        web_samples = await scrape_url(web.url)
        assert value(web_samples, "identity_outbox_pending", destination="default") == 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{forward.url}/v1/handoffs") as answer,
        ):
            assert answer.status == 404
            assert answer.content_type == "application/problem+json"
    finally:
        assert await asyncio.to_thread(forward.stop) == 0
        assert await asyncio.to_thread(web.stop) == 0


async def test_forward_without_a_metrics_port_serves_none(private_redis: RedisServer) -> None:
    from identity_service.metrics import Metrics
    from identity_service.metrics_app import serving_metrics
    from tests.conftest import make_settings

    for off in ("0", "off"):
        settings = make_settings(private_redis.url, forwarder_metrics_port=off)
        async with serving_metrics(settings, Metrics()) as port:
            assert port is None


def test_forward_says_when_its_metrics_port_is_taken(forward_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **forward_env,
            "IDENTITY_FORWARDER_METRICS_PORT": str(port),
            "IDENTITY_FORWARDER_METRICS_HOST": "127.0.0.1",
        }
        result = subprocess.run(
            [COMMAND, "forward"], env=env, capture_output=True, text=True, timeout=20, check=False
        )
    assert result.returncode == 1
    assert f"metrics port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_workers_directory_is_private_or_the_one_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from identity_service import metrics

    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    with metrics.multiprocess_directory(None) as private:
        counted = metrics.Metrics()
        counted.inc("identity_store_errors_total")
        assert list(Path(private).glob("counter_*.db"))
        assert counted.value("identity_store_errors_total") == 1
    assert not Path(private).exists()

    given = tmp_path / "multiproc"
    given.mkdir()
    (given / "counter_1.db").write_bytes(b"an earlier run's")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(given))
    with metrics.multiprocess_directory(metrics.given_directory()) as directory:
        assert directory == str(given)
        assert not (given / "counter_1.db").exists()
    assert given.is_dir()
    # Back to counting in memory: a new registry starts from nothing.
    assert metrics.Metrics().value("identity_store_errors_total") == 0

    # Under a file: one line, not a NotADirectoryError traceback.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(given / "counter_2.db" / "x"))
    (given / "counter_2.db").write_bytes(b"")
    with pytest.raises(metrics.DirectoryError, match=r"counter_2\.db/x: Not a directory$"):
        metrics.given_directory()


async def test_a_scrape_reads_little_from_redis_when_redis_cannot_say_a_groups_lag(
    private_redis: RedisServer,
) -> None:
    """Redis before 7, or a stream with a deleted entry, gives no ``lag``: the scrape then
    counts unread entries by reading them, and must read few, whatever the backlog."""
    from redis.asyncio import Redis

    from identity_service.constants import outbox_key
    from identity_service.scrape import redis_backlog

    redis = Redis.from_url(private_redis.url)
    try:
        stream = outbox_key("test:", 0)
        await redis.xgroup_create(stream, "segment", id="0", mkstream=True)
        entry: dict[Any, Any] = {"j": b"x" * 1000}  # about an event's size
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(2000):
                pipe.xadd(stream, entry)
            ids = await pipe.execute()
        await redis.xdel(stream, ids[1])  # a tombstone past the group's last read: no lag
        (group,) = await redis.xinfo_groups(stream)
        assert group["lag"] is None

        async def sent_bytes() -> int:
            stats = await redis.info("stats")
            return int(stats["total_net_output_bytes"])

        before = await sent_bytes()
        report = await redis_backlog(redis, "test:", ["segment"], time.time())
        cost = await sent_bytes() - before
    finally:
        await redis.aclose()
    assert report["segment"].pending >= 100  # a floor, said as such in docs/metrics.md
    assert report["segment"].oldest_age_seconds >= 0
    # Two thousand entries of 1 kB wait; a scrape reads no more than about a hundred.
    assert cost < 200_000, f"the scrape read {cost} bytes"


def test_tallied_durations_expose_what_prometheus_clients_observe_would() -> None:
    """The request histogram is tallied and flushed into the child's buckets and sum: its
    exposition must equal the one observe gives for the same durations (on the bounds, in
    between, past the last)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    durations = [0.0, 0.00005, *metrics.DURATION_BUCKETS, 0.0003, 0.003, 0.7, 2.5, 40.0]
    tallied = metrics.Metrics()
    tallied.add_routes(["/v1/handoffs"])
    registry = CollectorRegistry()
    observed = Histogram(
        "identity_http_request_duration_seconds",
        "HTTP request durations in the service (parse to answer), by route template.",
        ("route",),
        buckets=metrics.DURATION_BUCKETS,
        registry=registry,
    ).labels("/v1/handoffs")
    for round_ in range(2):  # a second flush adds to the first
        for seconds in durations:
            tallied.request("/v1/handoffs", "POST", 201, seconds)
            observed.observe(seconds)
        expected = {
            (sample.name, sample.labels.get("le"), sample.value)
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples
        }
        exposed = {
            (sample.name, sample.labels.get("le"), sample.value)
            for family in text_string_to_metric_families(tallied.render().decode())
            if family.name == "identity_http_request_duration_seconds"
            for sample in family.samples
            if sample.labels.get("route") == "/v1/handoffs"
        }
        assert exposed == expected, round_
    assert tallied.value(
        "identity_http_requests_total", route="/v1/handoffs", method="POST", status="201"
    ) == 2 * len(durations)


async def test_a_worker_hands_its_counts_to_the_shared_files_without_being_scraped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the multiprocess mode a worker flushes every FLUSH_SECONDS: another process reading
    the files sees its counts although nobody scraped that worker."""
    from prometheus_client import CollectorRegistry, multiprocess

    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    with metrics.multiprocess_directory(None) as directory:
        counted = metrics.Metrics()
        inc = counted.counter("identity_handoffs_prepared_total", source="shop")

        def in_files() -> float:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            found = registry.get_sample_value(
                "identity_handoffs_prepared_total", {"source": "shop"}
            )
            return found or 0

        async with metrics.flushing(counted):
            inc()
            inc(2)
            assert in_files() == 0  # tallied, not flushed yet
            for _ in range(50):
                await asyncio.sleep(metrics.FLUSH_SECONDS / 5)
                if in_files() == 3:
                    break
            assert in_files() == 3
            inc()
        assert in_files() == 4  # flushed once more on the way out


async def test_a_fallback_the_store_could_not_emit_is_not_counted_as_answered() -> None:
    """identity_handoff_fallbacks_total counts misses answered with a generated anonymousId
    (docs/metrics.md). When the fallback's event cannot be written (the store fails after
    the token's lookup: a Cluster node down, a connection lost), the exchange is answered
    503 with no identity: neither a fallback nor a generated id is counted, only the miss."""
    from identity_service.crypto import TokenSealer
    from identity_service.handoff import HandoffService
    from identity_service.problems import StoreUnavailable
    from identity_service.stores.memory import MemoryStore
    from identity_service.validation import ExchangeRequest
    from tests.conftest import make_settings

    class EmitFails(MemoryStore):
        async def emit(self, *args: Any, **kwargs: Any) -> None:
            raise StoreUnavailable("the outbox's shard does not answer")

    settings = make_settings()
    counted = metrics.Metrics()
    service = HandoffService(EmitFails(), TokenSealer(settings.secret), settings, counted)
    (checkout,) = [s for s in settings.sources if s.name == "checkout"]
    with pytest.raises(StoreUnavailable):
        await service.exchange(checkout, ExchangeRequest(token="no-such-token", fallback=True))
    assert (
        counted.value("identity_handoff_misses_total", source="checkout", reason="not_found") == 1
    )
    assert counted.value("identity_handoff_fallbacks_total", source="checkout") == 0
    assert counted.value("identity_identities_total", id_source="generated") == 0


async def test_forwards_scrape_of_a_cluster_that_does_not_answer_says_it_is_down(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    """`forward`'s probe pings through redis-py's RedisCluster, which raises
    RedisClusterException (no RedisError) when no node answers: the scrape still answers
    200, with identity_store_up 0 and no outbox gauges, not a 500."""
    from identity_service.metrics import Metrics
    from identity_service.metrics_app import create_metrics_app
    from identity_service.scrape import Probe
    from tests.conftest import FrontTestServer, make_settings

    settings = make_settings(f"redis+cluster://127.0.0.1:{free_port()}", redis_timeout="0.5")
    assert settings.redis is not None
    probe = Probe.of_redis(settings.redis, ["default"])
    try:
        client = await aiohttp_client(
            FrontTestServer(create_metrics_app(settings, Metrics(), probe))
        )
        samples = await scrape(client)
    finally:
        await probe.close()
    assert value(samples, "identity_store_up") == 0
    assert not any(name.startswith("identity_outbox_") for name, _ in samples)


@pytest.mark.topology
async def test_scrapes_at_the_same_time_on_a_cluster_both_find_the_store_up(
    redis_cluster: Any,
) -> None:
    """Two Prometheus servers scraping `forward` at once: its probe's redis-py client (one
    connection a node) must not answer the second with MaxConnectionsError, read as the
    store being down and the outbox gauges left out."""
    from identity_service.scrape import Probe
    from tests.conftest import make_settings

    settings = make_settings(redis_cluster.url)
    assert settings.redis is not None
    probe = Probe.of_redis(settings.redis, ["default"])
    try:
        await probe.read()  # the client learns the Cluster's slots
        scrapes = await asyncio.gather(*(probe.read() for _ in range(3)))
    finally:
        await probe.close()
    assert [scraped.store_up for scraped in scrapes] == [True, True, True]
    assert all("default" in scraped.outbox for scraped in scrapes)


async def test_the_dead_letters_gauge_counts_those_of_an_earlier_version(
    private_redis: RedisServer,
) -> None:
    """0.3.0 kept dead letters under tags ``{0}``…``{15}``: `outbox status` counts them and
    `replay-dead` moves them back, so identity_outbox_dead_letters counts them too."""
    from redis.asyncio import Redis

    from identity_service.outbox_admin import outbox_status
    from identity_service.scrape import redis_backlog

    redis = Redis.from_url(private_redis.url)
    try:
        await redis.xadd("test:{5}:dead:segment", {"j": b"sealed", "reason": b"http 400"})
        (status,) = await outbox_status(redis, "test:", ["segment"])
        report = await redis_backlog(redis, "test:", ["segment"], time.time())
    finally:
        await redis.aclose()
    assert status.dead == 1
    assert report["segment"].dead_letters == 1


def test_a_worker_file_still_empty_does_not_fail_a_worker_start_or_a_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """prometheus_client makes a worker's file empty, then sizes it: a worker starting
    (its metrics read every file once) or a scrape in between read a file of 0 bytes, and
    failed with ``struct.error`` (``serve --workers 2`` stopped at start about one time in
    seven). A file still empty holds no count yet: it is passed over."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    with metrics.multiprocess_directory(None) as directory:
        (Path(directory) / "counter_424242.db").write_bytes(b"")  # a worker's, being made
        counted = metrics.Metrics()
        counted.inc("identity_store_errors_total")
        assert counted.value("identity_store_errors_total") == 1
        assert b"identity_store_errors_total 1.0" in counted.render()


async def test_outbox_status_and_the_backlog_gauges_count_the_streams_of_an_earlier_version(
    private_redis: RedisServer,
) -> None:
    """After an upgrade the forwarders still deliver what 0.3.0 left in its streams (tags
    ``{0}``…``{15}``): `outbox status` and identity_outbox_pending and
    identity_outbox_oldest_pending_age_seconds count those entries too, unread (with
    0.3.0's group or none yet) or in flight."""
    from redis.asyncio import Redis

    from identity_service.outbox_admin import outbox_status
    from identity_service.scrape import redis_backlog

    redis = Redis.from_url(private_redis.url)
    read, unread = "test:{5}:outbox", "test:{12}:outbox"
    try:
        oldest = await redis.xadd(read, {"j": b"sealed"}, id="1000-0")
        await redis.xadd(read, {"j": b"sealed"}, id="2000-0")
        await redis.xgroup_create(read, "segment", id="0")
        await redis.xreadgroup("segment", "a-0.3.0-forwarder", {read: ">"}, count=1)
        await redis.xadd(unread, {"j": b"sealed"}, id="3000-0")  # 0.3.0 made no group here
        now = time.time()
        (status,) = await outbox_status(redis, "test:", ["segment"])
        report = await redis_backlog(redis, "test:", ["segment"], now)
    finally:
        await redis.aclose()
    assert oldest == b"1000-0"
    assert (status.pending, status.in_flight) == (2, 1)
    assert status.oldest_age_seconds is not None and status.oldest_age_seconds >= now - 2
    assert report["segment"].pending == 3
    assert report["segment"].oldest_age_seconds == pytest.approx(now - 1, abs=1)


# -- serve's metrics port (IDENTITY_METRICS_PORT) -------------------------------------------


async def get_url(url: str) -> tuple[int, str, str]:
    """``GET url`` on a connection of its own: status, content type and body."""
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return answer.status, answer.content_type, await answer.text()


async def test_with_a_metrics_port_metrics_answer_there_and_no_longer_on_the_api_port(
    make_client: ClientFactory,
) -> None:
    """The API's port may face the internet: with IDENTITY_METRICS_PORT, /metrics answers
    there (with the API's counts and the store's gauges) and /healthz beside it, and the
    API's port answers /metrics as any unknown path. The port closes with the app."""
    port = free_port()
    client = await make_client(metrics_port=str(port), metrics_host="127.0.0.1")
    metrics_url = f"http://127.0.0.1:{port}"
    await prepare(client)
    samples = await scrape_url(metrics_url)
    assert value(samples, "identity_handoffs_prepared_total", source="shop") == 1
    prepares = {"route": "/v1/handoffs", "method": "POST", "status": "201"}
    assert value(samples, "identity_http_requests_total", **prepares) == 1
    assert value(samples, "identity_store_up") == 1
    assert await get_url(f"{metrics_url}/healthz") == (200, "application/json", '{"status":"ok"}')
    for path in ("/v1/handoffs", "/readyz", "/openapi.json"):  # the API stays on its port
        status, content_type, _ = await get_url(f"{metrics_url}{path}")
        assert (status, content_type) == (404, "application/problem+json")
    answer = await client.get("/metrics")
    assert answer.status == 404
    assert answer.content_type == "application/problem+json"
    assert (await client.get("/healthz")).status == 200
    # A route of the API's, asked with a method it does not take, is still counted as its
    # own (the metrics port's routes are added to the API's, not put in their place).
    assert (await client.get("/v1/handoffs")).status == 405
    # Both ports' requests are counted in one set of metrics: the scrape, and the API
    # port's refusal of /metrics.
    samples = await scrape_url(metrics_url)
    scrapes = {"route": "/metrics", "method": "GET"}
    assert value(samples, "identity_http_requests_total", **scrapes, status="200") == 1
    assert value(samples, "identity_http_requests_total", **scrapes, status="404") == 1
    refused = {"route": "/v1/handoffs", "method": "GET", "status": "405"}
    assert value(samples, "identity_http_requests_total", **refused) == 1
    await client.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_url(f"{metrics_url}/healthz")


def listening_processes(port: int, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold a socket listening on TCP ``port`` (Linux's /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    holders = []
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        if any(fd.readlink().as_posix() in inodes for fd in fds.iterdir() if fd.is_symlink()):
            holders.append(pid)
    return holders


async def test_two_workers_have_one_metrics_listener_whose_scrapes_count_both(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """With --workers 2 the workers share the API's port (SO_REUSEPORT), not the metrics
    port: worker 0 alone listens there, and its scrapes read both workers' counts."""
    from tests.test_cli import _children_of

    port = free_port()
    env = redis_env(private_redis, IDENTITY_METRICS_PORT=str(port))
    service = Service(tmp_path, env, "--workers", "2")
    metrics_url = f"http://127.0.0.1:{port}"
    try:
        workers = await asyncio.to_thread(_children_of, service.process.pid)
        assert len(workers) == 2

        def one_listener() -> bool:
            return len(listening_processes(port, [service.process.pid, *workers])) == 1

        deadline = time.monotonic() + 15
        while not one_listener():
            assert time.monotonic() < deadline, service.stderr
            await asyncio.sleep(0.05)
        (listener,) = listening_processes(port, [service.process.pid, *workers])
        assert listener in workers
        assert len(listening_processes(service.port, workers)) == 2  # the API's port: both
        count = await prepare_from_shop(service, 24)

        def all_counted(samples: Samples) -> bool:
            return value(samples, "identity_handoffs_prepared_total", source="shop") == count

        samples = await eventually(lambda: scrape_url(metrics_url), all_counted)
        requests = {"route": "/v1/handoffs", "method": "POST", "status": "201"}
        assert value(samples, "identity_http_requests_total", **requests) == count
        status, content_type, _ = await get_url(f"{service.url}/metrics")
        assert (status, content_type) == (404, "application/problem+json")
    finally:
        assert await asyncio.to_thread(service.stop) == 0, service.stderr
    assert f"/metrics and /healthz on http://127.0.0.1:{port}" in service.stderr
