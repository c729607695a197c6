"""The one middleware: request id, problem rendering and the request's single log line.

Every exception a handler lets out becomes an RFC 9457 answer here: the service's
:class:`Problem` subclasses as they are, aiohttp's HTTP errors mapped to ours, store outages
to 503 with Retry-After, and anything unexpected to a bare 500 whose details stay in the log.
"""

import itertools
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator

import orjson
import structlog
from aiohttp import web

from identity_service import app_keys
from identity_service.log_config import log_request_line, start_request_fields
from identity_service.metrics import Metrics
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
from identity_service.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

logger = structlog.get_logger("identity_service.request")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Of every answer of the service's own: its Content-Type is not second-guessed (a browser
# sniffing a JSON or text answer as HTML or script), and no Referer leaves from it.
DOCUMENT_HEADERS = {"Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
# The API's answers, which carry tokens and identities, are never kept by a cache either;
# a public document (/openapi.json) has DOCUMENT_HEADERS alone.
SECURITY_HEADERS = {"Cache-Control": "no-store", **DOCUMENT_HEADERS}
# The paths of AMP's endpoints (amp/routes.py), whose every answer says Vary: Origin.
AMP_PATH_PREFIX = "/v1/amp/"


@web.middleware
async def handle_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = start_request(request.headers.get("X-Request-ID"))
    metrics = request.app[app_keys.METRICS]
    problem: Problem | None = None
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        problem = _from_http_exception(exc, request)
    except Exception as exc:
        problem = problem_for(exc, metrics, request.app[app_keys.SETTINGS])
    if problem is not None:
        response = problem_response(problem, request)
    response.headers["X-Request-ID"] = request_id
    resource = request.match_info.route.resource
    # The template of the route that matched (404 and 405 match none).
    route = resource.canonical if resource is not None else metrics.route_of(request.path)
    log_request(metrics, route, request.method, request.path, response.status, started, problem)
    return response


async def without_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp names itself and its version in ``Server``; the service sends no versions."""
    response.headers.popall("Server", None)


def start_request(incoming_id: str | None) -> str:
    """The request's id (the caller's X-Request-ID when it is sane), bound for its logs."""
    if incoming_id and _REQUEST_ID.fullmatch(incoming_id):
        request_id = incoming_id
    else:
        request_id = next(_request_ids)
    start_request_fields(request_id)
    return request_id


def problem_for(exc: Exception, metrics: Metrics, settings: Settings) -> Problem:
    """The problem to answer for an exception a handler let out."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, StoreUnavailable):
        metrics.inc("identity_store_errors_total")
        logger.warning("store_unavailable", reason=str(exc))
        return ServiceUnavailable(
            "the handoff store is unavailable; retry later", retry_after=settings.retry_after
        )
    logger.error("unhandled_error", exc_info=exc)
    return Problem("the request could not be completed")


def log_request(
    metrics: Metrics,
    route: str,
    method: str,
    path: str,
    status: int,
    started: float,
    problem: Problem | None,
) -> None:
    """The request's one log line, and its count and duration under ``route``."""
    seconds = time.perf_counter() - started
    metrics.request(route, method, status, seconds)
    fields = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
    }
    if problem is not None:
        fields["problem"] = problem.slug
    log_request_line(fields)


def problem_response(problem: Problem, request: web.Request) -> web.Response:
    body = problem.body(instance=problem_instance(request))
    headers = {**SECURITY_HEADERS, **problem.headers()}
    if request.path.startswith(AMP_PATH_PREFIX):
        # As every answer under AMP's paths: a cache must not reuse it for another origin.
        headers["Vary"] = "Origin"
    return web.Response(
        body=orjson.dumps(body),
        status=problem.status,
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def problem_instance(request: web.Request) -> str | None:
    """The ``instance`` of a problem answered to ``request``: the path of the route it was
    sent to when that route is a fixed path (``/v1/handoffs``), which is the service's own
    text; None when the path holds a part the client chose (an AMP action's name) or no
    route serves it (404), so that no answer repeats a path as sent.

    The path as the router reads it (percent-decoded but for ``%2F``): a 405's matched a
    route, though not its method; a 404's is no route's.
    """
    path = request.rel_url.path_safe
    for resource in request.app.router.resources():
        if isinstance(resource, web.PlainResource) and resource.canonical == path:
            return path
    return None


def _request_id_sequence() -> Iterator[str]:
    """Unique ids without a random draw per request: a random process prefix and a counter."""
    prefix = secrets.token_hex(8)
    for number in itertools.count(1):
        yield f"{prefix}{number:08x}"


_request_ids = _request_id_sequence()


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> Problem:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        # The method sent is not repeated: the client chose it. Allow lists what is taken.
        allowed = sorted(exc.allowed_methods)
        return MethodNotAllowed(f"the method must be {' or '.join(allowed)}", allowed=allowed)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[app_keys.SETTINGS].max_body_bytes
        return PayloadTooLarge(f"the body must be at most {limit} bytes")
    if isinstance(exc, web.HTTPNotFound):
        # The path is not repeated: the client chose it (docs/api.md).
        return NotFound("no resource of the service has this path")
    return HttpError(exc.status, exc.reason)
