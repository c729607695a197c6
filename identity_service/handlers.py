"""aiohttp handlers. The handoff endpoints translate requests for handoff_api.py."""

from typing import Any

import orjson
from aiohttp import web

from identity_service import app_keys
from identity_service.handoff_api import Call
from identity_service.metrics import CONTENT_TYPE
from identity_service.middleware import DOCUMENT_HEADERS, SECURITY_HEADERS
from identity_service.problems import PayloadTooLarge

# What /healthz answers (over max_connections too, by the front: front.py's _Turnaway).
HEALTH = {"status": "ok"}
# A scrape is of now: never cached (SECURITY_HEADERS' no-store), never sniffed.
_METRICS_HEADERS = {**SECURITY_HEADERS, "Content-Type": CONTENT_TYPE}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=SECURITY_HEADERS,
    )


async def prepare_handoff(request: web.Request) -> web.Response:
    status, answer = await request.app[app_keys.API].prepare(await _call(request))
    return json_response(answer, status=status)


async def exchange_handoff(request: web.Request) -> web.Response:
    status, answer = await request.app[app_keys.API].exchange(await _call(request))
    return json_response(answer, status=status)


async def _call(request: web.Request) -> Call:
    limit = request.app[app_keys.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body must be at most {limit} bytes")
    return Call(request.headers.get("Authorization"), request.content_type, await request.read())


async def healthz(request: web.Request) -> web.Response:
    return json_response(HEALTH)


async def readyz(request: web.Request) -> web.Response:
    await request.app[app_keys.STORE].ping()
    return json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[app_keys.OPENAPI],
        content_type="application/json",
        headers=DOCUMENT_HEADERS,
    )


async def metrics(request: web.Request) -> web.Response:
    """The exposition, with the gauges read from the store for this scrape (scrape.py)."""
    counted = request.app[app_keys.METRICS]
    counted.scraped = await request.app[app_keys.PROBE].read()
    return web.Response(body=counted.render(), headers=_METRICS_HEADERS)
