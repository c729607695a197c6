"""AMP CORS: who may call the ``/v1/amp/`` endpoints, and the headers of the answer.

Every AMP endpoint calls :func:`check` before it changes anything, and the ``OPTIONS``
routes are :func:`preflight` (an action's checks its name too: actions.handle_preflight).
A request is allowed when:

- its ``Origin`` is, exactly, one of ``AmpSettings.allowed_origins``: a publisher origin or
  the cache form of one for a configured cache, derived from configuration at start and
  never from the request; or
- it has no ``Origin`` and carries ``AMP-Same-Origin: true``, which the AMP runtime adds on
  the publisher's own pages. A foreign page cannot send that custom header without a CORS
  preflight, and :func:`preflight` never allows it, so it is a CSRF signal.

``__amp_source_origin``, which the runtime still appends, is request data: it grants
nothing, and when present it must be a publisher origin or the request is refused.
Everything else is ``403 amp-origin-not-allowed``, counted in
``identity_amp_refusals_total{reason="origin"}``. The answer echoes the exact origin in
``Access-Control-Allow-Origin`` (never ``*``) with credentials allowed, exposes
``AMP-Redirect-To``, and says ``Vary: Origin`` whatever the outcome.
"""

from aiohttp import web

from identity_service import app_keys
from identity_service.amp.config import AmpSettings
from identity_service.problems import AmpOriginNotAllowed

SAME_ORIGIN_HEADER = "AMP-Same-Origin"
SOURCE_ORIGIN_PARAM = "__amp_source_origin"
REFUSALS_METRIC = "identity_amp_refusals_total"
# What a preflight may allow: the methods of the AMP endpoints, and the request headers an
# amp-form or amp-analytics request from another allowed origin sends beyond the safelisted
# ones (a JSON body's Content-Type). Never AMP-Same-Origin: the runtime sends it only to its
# own origin, where no preflight happens, and allowing it would end its worth as a signal.
ALLOWED_METHODS = ("GET", "POST")
ALLOWED_REQUEST_HEADERS = frozenset({"accept", "content-type"})
PREFLIGHT_MAX_AGE = 600


def allowed_origin(
    amp: AmpSettings, origin: str | None, amp_same_origin: str | None, source_origin: str | None
) -> str | None:
    """The origin to echo, or None for a same-origin request; raise when not allowed.

    ``origin`` is the ``Origin`` header (None when absent), ``amp_same_origin`` the
    ``AMP-Same-Origin`` header and ``source_origin`` the ``__amp_source_origin`` query
    parameter. Origins are compared as exact strings with nothing normalised: browsers send
    the serialized origin, so any other spelling is not a browser's (or not an allowed) one.
    """
    if source_origin is not None:
        check_source_origin(amp, source_origin)
    if origin is not None:
        if origin in amp.allowed_origins:
            return origin
        raise AmpOriginNotAllowed(
            "the Origin is neither a publisher origin nor one of its AMP cache origins"
        )
    if amp_same_origin == "true":
        return None
    raise AmpOriginNotAllowed(f"a request without Origin must carry {SAME_ORIGIN_HEADER}: true")


def check_source_origin(amp: AmpSettings, source_origin: object) -> None:
    """Raise AmpOriginNotAllowed unless ``source_origin``, a ``__amp_source_origin`` that is
    present (a JSON null included), is a publisher origin."""
    if not isinstance(source_origin, str) or source_origin not in amp.publisher_origins:
        raise AmpOriginNotAllowed(f"{SOURCE_ORIGIN_PARAM} is not a publisher origin")


def cors_headers(origin: str | None) -> dict[str, str]:
    """The CORS headers of an answer to an allowed request (``origin`` from ``check``)."""
    if origin is None:
        return {"Vary": "Origin"}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "AMP-Redirect-To",
        "Vary": "Origin",
    }


def check(request: web.Request) -> str | None:
    """:func:`allowed_origin` for an aiohttp request; refusals are counted.

    A repeated ``Origin``, ``AMP-Same-Origin`` or ``__amp_source_origin`` is refused: one
    reader could take the first and another the last.
    """
    try:
        return allowed_origin(
            _amp(request),
            _single(request.headers.getall("Origin", [])),
            _single(request.headers.getall(SAME_ORIGIN_HEADER, [])),
            _single(request.query.getall(SOURCE_ORIGIN_PARAM, [])),
        )
    except AmpOriginNotAllowed:
        request.app[app_keys.METRICS].inc(REFUSALS_METRIC, reason="origin")
        raise


async def preflight(request: web.Request) -> web.Response:
    """``OPTIONS`` of collect: 204 with CORS headers for an allowed Origin, else 403 (an
    action's, actions.handle_preflight, checks its name in between)."""
    return allowed_preflight(request, preflight_origin(request))


def preflight_origin(request: web.Request) -> str:
    """The ``Origin`` of a preflight, when allowed; raise AmpOriginNotAllowed (counted) else."""
    origins = request.headers.getall("Origin", [])
    if len(origins) != 1:  # a preflight always has one Origin; same-origin requests have none
        request.app[app_keys.METRICS].inc(REFUSALS_METRIC, reason="origin")
        raise AmpOriginNotAllowed("a preflight must come from an allowed Origin")
    check(request)  # raises unless that one Origin is allowed
    return origins[0]


def allowed_preflight(request: web.Request, origin: str) -> web.Response:
    """The 204 of a preflight from ``origin`` (allowed by :func:`preflight_origin`).

    The allowed methods are GET and POST; of the requested headers only those in
    :data:`ALLOWED_REQUEST_HEADERS` are allowed back, so a browser makes no request that
    asks for any other (``AMP-Same-Origin`` included).
    """
    requested = request.headers.get("Access-Control-Request-Headers", "")
    headers = {
        **cors_headers(origin),
        "Access-Control-Allow-Methods": ", ".join(ALLOWED_METHODS),
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    allowed_headers = [
        name
        for name in (part.strip().lower() for part in requested.split(","))
        if name in ALLOWED_REQUEST_HEADERS
    ]
    if allowed_headers:
        headers["Access-Control-Allow-Headers"] = ", ".join(dict.fromkeys(allowed_headers))
    return web.Response(status=204, headers=headers)


def _amp(request: web.Request) -> AmpSettings:
    amp = request.app[app_keys.SETTINGS].amp
    if amp is None:  # the AMP routes exist only with [amp]
        raise AmpOriginNotAllowed("the AMP endpoints are not configured")
    return amp


def _single(values: list[str]) -> str | None:
    """The one value of a header or parameter; None when absent; refuse a repeated one."""
    if len(values) > 1:
        raise AmpOriginNotAllowed("Origin, AMP-Same-Origin and __amp_source_origin must not repeat")
    return values[0] if values else None
