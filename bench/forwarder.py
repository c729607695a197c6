"""The forwarder alone: CPU per delivered event, outside the request path.

Fills a private Redis's outbox with N flows (a prepare and an exchange each, called on
the handoff service directly), then starts the forwarder against the local collector
and measures the wall and CPU time it takes to deliver every event.

    .venv/bin/python bench/forwarder.py --flows 20000 [--profile out.txt]
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import ORIGIN, Collector, Redis, service_settings

from identity_service.crypto import OutboxSealer, TokenSealer
from identity_service.handoff import HandoffService
from identity_service.metrics import Metrics
from identity_service.outbox import running_forwarders
from identity_service.settings import load_settings
from identity_service.sources import SourceRegistry
from identity_service.stores.redis import RedisStore
from identity_service.validation import parse_exchange, parse_prepare

PREPARE = {
    "anonymousId": "bench-visitor-0001",
    "userId": "bench-user",
    "consent": {"analytics": True},
    "destination": f"{ORIGIN}/cart?step=1",
}


async def fill(handoffs: HandoffService, registry: SourceRegistry, flows: int) -> None:
    source = next(iter(registry))
    for _ in range(flows):
        prepared = await handoffs.prepare(source, parse_prepare(PREPARE, 3600))
        await handoffs.exchange(source, parse_exchange({"token": prepared.token}))


async def measure(redis: Redis, collector: Collector, args: argparse.Namespace) -> None:
    env = {
        **service_settings(collector),
        "IDENTITY_REDIS_URL": redis.url,
        **dict(item.split("=", 1) for item in args.env),
    }
    settings = load_settings(env)
    assert settings.redis is not None
    store = RedisStore(settings.redis, OutboxSealer(settings.secret))
    handoffs = HandoffService(store, TokenSealer(settings.secret), settings, Metrics())
    await fill(handoffs, SourceRegistry(settings.sources), args.flows)
    await store.close()
    expected = 3 * args.flows
    collector.reset()
    profiler = None
    if args.profile:
        py_spy = Path(sys.executable).parent / "py-spy"
        command = [str(py_spy), "record", "-p", str(os.getpid()), "-r", "250", "-f", "raw"]
        command += ["-o", str(args.profile), "--nonblocking"]
        profiler = subprocess.Popen(command)  # noqa: ASYNC220 (started once, before timing)
        await asyncio.sleep(1)
    started, cpu_started = time.monotonic(), time.process_time()
    async with running_forwarders(settings, Metrics()):
        # Polled: the count lives in the collector's process.
        while (await asyncio.to_thread(collector.stats))["unique"] < expected:  # noqa: ASYNC110
            await asyncio.sleep(0.25)
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu_started
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait()
    print(
        json.dumps(
            {
                "events": expected,
                "seconds": round(seconds, 2),
                "events_per_s": round(expected / seconds),
                "cpu_us_per_event": round(cpu * 1e6 / expected, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--flows", type=int, default=20000)
    parser.add_argument("--env", action="append", default=[], metavar="IDENTITY_X=VALUE")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the delivery")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis, collector = Redis(Path(tmp)), Collector()
        try:
            asyncio.run(measure(redis, collector, args))
        finally:
            collector.stop()
            redis.stop()


if __name__ == "__main__":
    main()
