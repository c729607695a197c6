"""What the demo's sites share: one page layout with the analytics.js snippet, the reading
of their JSON endpoints' bodies, and their errors as RFC 9457 problems (the service's
types and rendering: ``identity_service.problems``).

The snippet is Segment's in miniature: ``window.analytics`` queues calls until
``analytics.load(key)`` loads the page script (static/analytics.js, served by the
collector, as Segment's CDN serves analytics.js). A page that lands with identity.js runs
``analytics.load`` inside ``IdentityHandoff.ready``: nothing is sent before the restored
anonymousId is set.
"""

import html
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from identity_client import (
    APIError,
    IdentityConnectionError,
    IdentityError,
    ServiceUnavailable,
    Unauthorized,
)

from identity_service import problems
from identity_service.middleware import problem_response

SNIPPET = """
!function(){var a=window.analytics=window.analytics||[];if(a.initialized||a.invoked)return;
a.invoked=!0;["page","track","identify","setAnonymousId","ready"].forEach(function(m){
a[m]=function(){var c=[].slice.call(arguments);c.unshift(m);a.push(c);return a;};});
a.load=function(key){a._writeKey=key;var s=document.createElement("script");s.async=!0;
s.src=%(script)s;document.head.appendChild(s);};}();
"""
SHOW_ID = """
analytics.ready(function () {
  document.getElementById("anonymous-id").textContent = analytics.user().anonymousId();
  document.body.setAttribute("data-analytics-ready", "");
});
"""
STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }
.site { color: #fff; padding: .2rem .6rem; border-radius: .3rem; background: %(colour)s; }
code { background: #eee; padding: .1rem .3rem; } a.button, button { display: inline-block;
  margin: .3rem 0; padding: .5rem 1rem; border: 0; border-radius: .3rem; background: #333;
  color: #fff; text-decoration: none; font: inherit; cursor: pointer; }
"""


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a problem: ``application/json`` only (a form on another
    site cannot send that without a CORS preflight, so it cannot forge the call)."""
    if request.content_type != "application/json":
        raise problems.UnsupportedMediaType("send the body as application/json")
    try:
        body = await request.json()
    except ValueError:
        raise problems.MalformedJson("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    return body


def invalid(field: str, message: str) -> problems.Problem:
    return problems.ValidationFailed([{"field": field, "message": message}])


def text_field(body: dict[str, Any], field: str) -> str:
    """``body[field]`` when it is a non-empty string, else a validation problem."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise invalid(field, "must be a non-empty string")
    return value


class _PassedOn(problems.Problem):
    """The identity service's problem with the request itself, passed on as the service
    answered it (its status and type; its title as the detail, which echoes nothing)."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.title or "refused by the identity service")
        self.status = error.status or 400
        self.slug = (error.type or "").removeprefix(problems.PROBLEM_TYPE_PREFIX) or "http-error"
        self.title = error.title or "Refused by the identity service"


def upstream_problem(error: IdentityError) -> problems.Problem:
    """The problem a site answers when its SDK call failed: the service's own 4xx about the
    request (not 401: that is the site's write key), 503 when the service is down, else 502."""
    if isinstance(error, (ServiceUnavailable, IdentityConnectionError)):
        retry_after = getattr(error, "retry_after", None) or 1
        return problems.ServiceUnavailable(
            "the identity service is unavailable", retry_after=math.ceil(retry_after)
        )
    client_fault = error.status is not None and 400 <= error.status < 500
    if isinstance(error, APIError) and client_fault and not isinstance(error, Unauthorized):
        return _PassedOn(error)
    return problems.HttpError(502, "Bad Gateway")


@web.middleware
async def problem_answers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A site's problems as ``application/problem+json`` (the service's own rendering)."""
    try:
        return await handler(request)
    except problems.Problem as problem:
        return problem_response(problem, request)


def script_json(value: Any) -> str:
    """``value`` as a JavaScript literal that is safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/")


@dataclass(frozen=True)
class Analytics:
    """Where the page script comes from and the write key it sends with."""

    collector_url: str
    write_key: str


@dataclass(frozen=True)
class Helper:
    """identity.js on a page: its URL and ``IdentityHandoff.init``'s options."""

    script_url: str
    options: dict[str, Any]


HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "strict-origin-when-cross-origin"}


def html_response(page: str) -> web.Response:
    """``page`` as the demo's sites answer it: not cached, no full URL in the Referer."""
    return web.Response(text=page, content_type="text/html", headers=HEADERS)


def page_html(
    *,
    site: str,
    colour: str,
    title: str,
    body: str,
    analytics: Analytics,
    helper: Helper | None = None,
    calls: str = "analytics.page();",
) -> str:
    """A page of ``site``: the snippet, the page call, identity.js when ``helper`` is given."""
    snippet = SNIPPET % {"script": script_json(f"{analytics.collector_url}/analytics.js")}
    load = f"analytics.load({script_json(analytics.write_key)});"
    helper_tags = ""
    if helper is not None:
        helper_tags = (
            f'<script src="{html.escape(helper.script_url)}"></script>\n'
            f"<script>IdentityHandoff.init({script_json(helper.options)});</script>\n"
        )
        if helper.options.get("exchangeEndpoint"):
            load = f"IdentityHandoff.ready(function () {{ {load} }});"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{STYLE % {"colour": colour}}</style>
{helper_tags}<script>{snippet}{load}
{calls}
{SHOW_ID}</script>
</head><body>
<p><span class="site">{html.escape(site)}</span></p>
<h1>{html.escape(title)}</h1>
<p>anonymousId: <code id="anonymous-id">(analytics.js not loaded)</code></p>
{body}
</body></html>
"""
    return page
