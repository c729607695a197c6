"""The one middleware: request id, problem rendering and the request's single log line.

Every exception a handler lets out becomes an RFC 9457 answer here: the service's
:class:`Problem` subclasses as they are, aiohttp's HTTP errors mapped to ours, store outages
to 503 with Retry-After, and anything unexpected to a bare 500 whose details stay in the log.
"""

import re
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from identity_service import app_keys
from identity_service.problems import (
    PROBLEM_CONTENT_TYPE,
    HttpError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Problem,
    ServiceUnavailable,
    StoreUnavailable,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

logger = structlog.get_logger("identity_service.request")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@web.middleware
async def handle_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    incoming_id = request.headers.get("X-Request-ID", "")
    request_id = incoming_id if _REQUEST_ID.fullmatch(incoming_id) else uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    problem: Problem | None = None
    try:
        response = await handler(request)
    except Problem as exc:
        problem = exc
    except StoreUnavailable as exc:
        request.app[app_keys.METRICS].inc("identity_store_errors_total")
        logger.warning("store_unavailable", reason=str(exc))
        problem = ServiceUnavailable(
            "the handoff store is unavailable; retry later",
            retry_after=request.app[app_keys.SETTINGS].retry_after,
        )
    except web.HTTPException as exc:
        problem = _from_http_exception(exc, request)
    except Exception:
        logger.exception("unhandled_error")
        problem = Problem("the request could not be completed")
    if problem is not None:
        response = problem_response(problem, request)
    response.headers["X-Request-ID"] = request_id
    logger.info(
        "request",
        method=request.method,
        path=request.path,
        status=response.status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        **({"problem": problem.slug} if problem is not None else {}),
    )
    return response


def problem_response(problem: Problem, request: web.Request) -> web.Response:
    body = problem.body(instance=request.path)
    return web.Response(
        body=orjson.dumps(body),
        status=problem.status,
        content_type=PROBLEM_CONTENT_TYPE,
        headers={**SECURITY_HEADERS, **problem.headers()},
    )


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> Problem:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        return MethodNotAllowed(f"{request.method} is not allowed here", allowed=allowed)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[app_keys.SETTINGS].max_body_bytes
        return PayloadTooLarge(f"the body must be at most {limit} bytes")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"there is nothing at {request.path}")
    return HttpError(exc.status, exc.reason)
