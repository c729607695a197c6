"""HTTP handlers: authenticate, read and validate the body, call the handoff service, answer."""

from typing import Any

import orjson
import structlog
from aiohttp import web

from identity_service import app_keys
from identity_service.middleware import SECURITY_HEADERS
from identity_service.openapi import openapi_document
from identity_service.problems import PayloadTooLarge, Unauthorized, UnsupportedMediaType
from identity_service.sources import Source
from identity_service.validation import parse_exchange, parse_json_object, parse_prepare


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=SECURITY_HEADERS,
    )


def authenticate(request: web.Request) -> Source:
    source = request.app[app_keys.SOURCES].authenticate(request.headers.get("Authorization"))
    if source is None:
        raise Unauthorized(
            "send the source's write key with HTTP Basic (as the user name) or as a Bearer token"
        )
    structlog.contextvars.bind_contextvars(source=source.name)
    return source


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"send the body as application/json, not {request.content_type or 'nothing'}"
        )
    limit = request.app[app_keys.SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body must be at most {limit} bytes")
    return parse_json_object(await request.read())


async def prepare_handoff(request: web.Request) -> web.Response:
    source = authenticate(request)
    body = await read_json_object(request)
    prepare = parse_prepare(body, request.app[app_keys.SETTINGS].max_ttl)
    prepared = await request.app[app_keys.HANDOFFS].prepare(source, prepare)
    return json_response(prepared.as_json(), status=201)


async def exchange_handoff(request: web.Request) -> web.Response:
    source = authenticate(request)
    body = await read_json_object(request)
    identity = await request.app[app_keys.HANDOFFS].exchange(source, parse_exchange(body))
    return json_response(identity)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    await request.app[app_keys.STORE].ping()
    return json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    text = request.app[app_keys.METRICS].render()
    return web.Response(
        text=text,
        headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
            "Cache-Control": "no-store",
        },
    )
