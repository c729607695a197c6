"""The series the service really exposes, which the chart's alerts and dashboard may read.

:func:`scrape_after_flows` starts a real ``identity-service serve --workers 2`` on a real
redis-server of its own, delivering to a local collector, runs the flows whose series the
alerts and dashboard filter on (a handoff kept, a token used twice, a fallback, an audience
refusal, an event delivered, a 503 while Redis is down), and returns every sample of its
``/metrics``, read with prometheus_client's parser.
"""

import asyncio
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.collector import WRITE_KEY, running_collector
from tests.conftest import CHECKOUT_URL, WRITE_KEYS
from tests.redis_server import RedisServer
from tests.test_cli import Service, post, redis_env

# Metrics the alerts read from other exporters: kube-state-metrics.
EXTERNAL_METRIC_NAMES = frozenset({"kube_pod_status_ready", "kube_pod_status_phase"})

# Labels Prometheus gives every target; the service never exposes them.
TARGET_LABELS = frozenset({"namespace", "job", "pod"})

# One sample: its name and labels.
Series = tuple[str, dict[str, str]]


async def scrape_after_flows(directory: Path) -> list[Series]:
    """Every series of a two-worker service's ``/metrics`` after the flows above."""
    redis = RedisServer(directory)
    redis.start()
    try:
        async with running_collector() as collector:
            env = redis_env(
                redis,
                IDENTITY_DESTINATION_URL=collector.url,
                IDENTITY_DESTINATION_WRITE_KEY=WRITE_KEY,
                IDENTITY_BATCH_MAX_WAIT="0.01",
            )
            service = Service(directory, env, "--workers", "2")
            try:
                await _flows(service.url)
                await collector.wait_for(1)
                series = await _scrape_until(service.url, "identity_events_delivered_total")
                redis.stop()  # the store's 503 and its error, and store_up 0
                status, _ = await _prepare(service.url)
                assert status == 503
                series += await _scrape_until(service.url, "identity_store_errors_total")
                redis.start()
            finally:
                assert await asyncio.to_thread(service.stop) == 0, service.stderr
    finally:
        redis.stop()
    return series


async def _prepare(url: str) -> tuple[int, dict[str, object]]:
    body = {"anonymousId": "anon-metrics-3e1a", "destination": CHECKOUT_URL}
    return await post(f"{url}/v1/handoffs", body, WRITE_KEYS["shop"])


async def _flows(url: str) -> None:
    exchange = f"{url}/v1/handoffs/exchange"
    tokens = []
    for _ in range(2):
        status, prepared = await _prepare(url)
        assert status == 201
        tokens.append(prepared["token"])
    kept, refused = tokens
    assert (await post(exchange, {"token": kept}, WRITE_KEYS["checkout"]))[0] == 200
    assert (await post(exchange, {"token": kept}, WRITE_KEYS["checkout"]))[0] == 404
    used_again = {"token": kept, "fallback": True}
    assert (await post(exchange, used_again, WRITE_KEYS["checkout"]))[0] == 200  # generated
    assert (await post(exchange, {"token": refused}, WRITE_KEYS["partner"]))[0] == 403


async def _scrape_until(url: str, name: str) -> list[Series]:
    """A scrape that shows ``name`` (the workers' and the forwarder's counts settle)."""
    deadline = time.monotonic() + 15
    while True:
        # A connection of its own each time: with several workers, the kernel picks one.
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as answer:
            assert answer.status == 200
            text = await answer.text()
        series = [
            (sample.name, dict(sample.labels))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        if any(found == name for found, _ in series):
            return series
        assert time.monotonic() < deadline, f"no {name} in /metrics"
        await asyncio.sleep(0.05)
