"""A local Segment-compatible collector for tests: /v1/batch with Basic auth and gzip.

Tests script its answers (``plan``), or have it refuse with a 400 every batch holding an
event they mark (``refuses``), as Segment refuses a batch with one malformed event; and
read what it received. It records a batch before answering, so a held or failed answer
still shows what the forwarder sent.
"""

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.redis_server import free_port

WRITE_KEY = "collector-write-key-71d2"


@dataclass
class Answer:
    """How to answer one request: a status, headers, and how long to hold the answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hold: float = 0.0


@dataclass
class Received:
    at: float
    status: int
    events: list[dict[str, Any]]
    gzipped: bool
    answered: bool = False


class Collector:
    def __init__(self) -> None:
        self.plan: list[Answer] = []
        # Once the plan is spent: a batch holding an event this marks is answered 400.
        self.refuses: Callable[[dict[str, Any]], bool] = lambda event: False
        self.requests: list[Received] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event of every batch answered with a 2xx, duplicates included."""
        return [
            event
            for request in self.requests
            if request.answered and 200 <= request.status < 300
            for event in request.events
        ]

    @property
    def message_ids(self) -> set[str]:
        return {event["messageId"] for event in self.events}

    async def wait_for(self, count: int, seconds: float = 30.0) -> None:
        """Wait until ``count`` unique messageIds were accepted."""
        deadline = time.monotonic() + seconds
        while len(self.message_ids) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.message_ids)} of {count} events arrived")
            await asyncio.sleep(0.02)

    async def handle(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "bad write key"}, status=401)
        # aiohttp inflates a gzip Content-Encoding itself; the flag records that it was used.
        events = orjson.loads(await request.read())["batch"]
        if self.plan:
            answer = self.plan.pop(0)
        else:
            answer = Answer(400 if any(self.refuses(event) for event in events) else 200)
        gzipped = request.headers.get("Content-Encoding") == "gzip"
        received = Received(time.monotonic(), answer.status, events, gzipped)
        self.requests.append(received)
        if answer.hold:
            await asyncio.sleep(answer.hold)
        received.answered = True
        return web.json_response({}, status=answer.status, headers=answer.headers)


@asynccontextmanager
async def running_collector() -> AsyncIterator[Collector]:
    collector = Collector()
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/batch", collector.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", collector.port).start()
    try:
        yield collector
    finally:
        await runner.cleanup()


async def stats(collector: Collector, request: web.Request) -> web.Response:
    return web.json_response(
        {"events": len(collector.events), "unique": len(collector.message_ids)}
    )


def main() -> None:
    """Run the collector alone (the benchmark does): ``python -m tests.collector PORT``."""
    import sys

    collector = Collector()
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/batch", collector.handle)
    app.router.add_get("/stats", lambda request: stats(collector, request))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
