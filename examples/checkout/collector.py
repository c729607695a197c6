"""The demo's local Segment-compatible collector: it takes events and shows them.

- ``POST /v1/batch``: the service's outbox forwarder (HTTP Basic, the destination's write
  key, gzip), as Segment's HTTP API takes it.
- ``POST /v1/p``, ``/v1/t``: the pages' analytics.js stand-in (the write key in the body,
  ``text/plain``, as analytics.js sends them to api.segment.io).
- ``GET /analytics.js``: the stand-in itself (static/analytics.js), as Segment's CDN.
- ``GET /``: the events received, newest first; ``GET /events``: the same as JSON.

Every event is kept with where it came from (``service`` or ``page``) and, when ``echo``,
printed as one line.
"""

import asyncio
import base64
import html
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

STATIC = Path(__file__).parent / "static"
_CORS = {"Access-Control-Allow-Origin": "*"}


@dataclass
class Received:
    via: str  # "service" (the outbox) or "page" (analytics.js)
    event: dict[str, Any]


@dataclass
class Collector:
    service_key: str  # the service's destination write key
    page_key: str  # the pages' analytics.js write key
    echo: Callable[[str], None] | None = None
    received: list[Received] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def events(self, via: str | None = None) -> list[dict[str, Any]]:
        return [item.event for item in self.received if via is None or item.via == via]

    async def wait_for(
        self, match: Callable[[list[Received]], bool], seconds: float = 15.0
    ) -> list[Received]:
        """Wait until ``match`` holds for what arrived; an AssertionError after ``seconds``."""
        async with self._arrived:
            try:
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: match(self.received)), seconds
                )
            except TimeoutError:
                raise AssertionError(f"not arrived in {seconds} s: {self.received}") from None
        return self.received

    async def _keep(self, via: str, events: list[dict[str, Any]]) -> None:
        async with self._arrived:
            for event in events:
                self.received.append(Received(via, event))
                if self.echo is not None:
                    self.echo(describe(via, event))
            self._arrived.notify_all()

    async def batch(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{self.service_key}:".encode()).decode()
        if not secrets.compare_digest(request.headers.get("Authorization", ""), expected):
            return web.json_response({"error": "bad write key"}, status=401)
        document = orjson.loads(await request.read())
        await self._keep("service", document["batch"])
        return web.json_response({})

    async def page_call(self, request: web.Request) -> web.Response:
        try:
            event = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"error": "not JSON"}, status=400, headers=_CORS)
        key = event.pop("writeKey", None) if isinstance(event, dict) else None
        if not isinstance(key, str) or not secrets.compare_digest(key, self.page_key):
            return web.json_response({"error": "bad write key"}, status=401, headers=_CORS)
        await self._keep("page", [event])
        return web.json_response({}, headers=_CORS)

    async def listing(self, request: web.Request) -> web.Response:
        rows = "\n".join(
            f"<tr><td>{html.escape(item.via)}</td><td>{html.escape(summary(item.event))}</td>"
            f"<td><code>{html.escape(str(item.event.get('anonymousId')))}</code></td>"
            f"<td>{html.escape(page_host(item.event))}</td></tr>"
            for item in reversed(self.received)
        )
        page = (
            "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=2>"
            "<title>Collector</title><style>body{font:14px system-ui;margin:2rem}"
            "td,th{padding:.2rem .6rem;text-align:left}</style>"
            f"<h1>Events received: {len(self.received)}</h1><table>"
            "<tr><th>via</th><th>call</th><th>anonymousId</th><th>page</th></tr>"
            f"{rows}</table>"
        )
        return web.Response(text=page, content_type="text/html")

    async def as_json(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"via": item.via, "event": item.event} for item in self.received],
            dumps=lambda data: orjson.dumps(data).decode(),
        )


def summary(event: dict[str, Any]) -> str:
    name = event.get("event") or event.get("name") or ""
    return f"{event.get('type')} {name}".strip()


def page_host(event: dict[str, Any]) -> str:
    url = str((event.get("context") or {}).get("page", {}).get("url", ""))
    return url.split("/")[2] if url.count("/") >= 2 else url


def describe(via: str, event: dict[str, Any]) -> str:
    source = event.get("properties", {}).get("anonymousId_source", "")
    marked = f" ({source} id)" if source else ""
    return (
        f"{time.strftime('%H:%M:%S')} collector <- {via:7} {summary(event):40} "
        f"anonymousId={event.get('anonymousId')}{marked} page={page_host(event) or '-'}"
    )


async def analytics_js(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC / "analytics.js",
        headers={"Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache"},
    )


def collector_app(collector: Collector) -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/v1/batch", collector.batch)
    app.router.add_post("/v1/p", collector.page_call)
    app.router.add_post("/v1/t", collector.page_call)
    app.router.add_get("/analytics.js", analytics_js)
    app.router.add_get("/events", collector.as_json)
    app.router.add_get("/", collector.listing)
    return app
