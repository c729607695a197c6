"""What the demo's sites share: one page layout with the analytics.js snippet, and the
reading of their JSON endpoints' bodies.

The snippet is Segment's in miniature: ``window.analytics`` queues calls until
``analytics.load(key)`` loads the page script (static/analytics.js, served by the
collector, as Segment's CDN serves analytics.js). A page that lands with identity.js runs
``analytics.load`` inside ``IdentityHandoff.ready``: nothing is sent before the restored
anonymousId is set.
"""

import html
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

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


async def json_body(request: web.Request) -> dict[str, Any] | None:
    """The request's JSON object, or None. ``application/json`` only: a form on another
    site cannot send that without a CORS preflight, so it cannot forge the call."""
    if request.content_type != "application/json":
        return None
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


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
