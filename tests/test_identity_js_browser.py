"""identity.js in headless Chromium (Debian's): where a decorated link or form goes on
domain A, and the cookie it writes on domain B, against the real service and a real site.

The service (in process, through its HTTP front) serves identity.js and prepares the
handoffs; the site answers both ``a.localhost`` (domain A: the pages, and ``/handoff``,
which prepares through the Python SDK) and ``b.localhost`` (domain B: every request is
recorded). The tests assert

- a form's clicked button decides the submission, as in the browser: its ``formaction``,
  ``formmethod`` and ``formtarget`` win over the form's, and a button whose action is not
  a handed-off destination is left alone (no handoff prepared);
- a link with ``target="_top"`` or ``"_parent"`` in a frame navigates the top or the parent
  page, not the frame; ``_blank`` is left alone;
- a ``data-timeout`` that is not a positive number of milliseconds (``5s``) is the default,
  not an abort at once;
- a ``tokenEndpoint`` of another origin (one granting CORS) is never called.

And on domain B (``https://pay.example.test``: hosts of a registrable domain, which Chromium
maps to loopback with ``--host-resolver-rules``, served with a certificate made here, since
``*.localhost`` is a public suffix to cookies and the service takes https origins only), the
``ajs_anonymous_id`` cookie identity.js writes on landing reaches a sibling subdomain
(``www.example.test``) with ``cookieDomain`` (or ``data-cookie-domain``), and stays
host-only without it, or with one that is no domain name; a ``cookieName`` that is no
token, a ``cookieMaxAge`` that is no whole number of seconds from 1 to 400 days, a
``__Secure-`` or ``__Host-`` ``cookieName`` the cookie does not fit (on an http page too)
or a ``param`` that is not the service's kind of parameter is ignored too (each with a
console warning: the default is written, or read); an ``exchangeEndpoint`` of another
origin is never sent the token.

Without Chromium or Playwright these tests skip, except in CI (tests/browser.py).
"""

import asyncio
import html
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web
from identity_client import AsyncIdentityClient

from identity_service.app import create_app
from identity_service.front import FrontRunner
from identity_service.sources import hash_write_key
from tests.browser import CHROMIUM_ARGS, chromium_path, need_browser, tls_context
from tests.conftest import make_settings
from tests.redis_server import free_port

TIMEOUT_MS = 15_000
WRITE_KEY = "identity-js-browser-write-key-7c1d"
TOKEN = re.compile(r"[?&]handoff_token=[A-Za-z0-9_-]{43}(&|$)")
# /handoff answers after this long: a timeout that aborts at once cannot wait for it.
HANDOFF_DELAY = 0.3
# A backend that lets any origin POST JSON to it: what an endpoint of another origin needs
# for identity.js's fetch to reach it.
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "content-type",
}


@dataclass
class Site:
    a: str
    b: str
    service: str
    seen_b: list[str] = field(default_factory=list)  # "METHOD /path?query" on b.localhost
    handoffs: list[str] = field(default_factory=list)  # the destinations /handoff was asked

    async def wait_for_b(self, found: Callable[[str], bool]) -> str:
        for _ in range(int(TIMEOUT_MS / 50)):
            for request in self.seen_b:
                if found(request):
                    return request
            await asyncio.sleep(0.05)
        raise AssertionError(f"b.localhost got no such request: {self.seen_b}")


async def on_b(tab: Any, site: Site) -> None:
    """Waits until the tab has gone to domain B (its request may be seen before)."""
    await tab.wait_for_url(lambda url: url.startswith(site.b))


def fields(request: str) -> dict[str, str]:
    """The query of a recorded request ("GET /cart?q=1"), as a dict."""
    return dict(parse_qsl(urlsplit(request.split(" ", 1)[1]).query))


def page(
    site: Site,
    body: str,
    *,
    tag: str | None = None,
    token_endpoint: str = "/handoff",  # noqa: S107 - a path
) -> web.Response:
    """A domain-A page with identity.js, set up by ``init`` or by the script tag's ``tag``."""
    if tag is None:
        init = json.dumps({"domains": ["b.localhost"], "tokenEndpoint": token_endpoint})
        head = (
            f'<script src="{site.service}/v1/identity.js"></script>'
            f"<script>IdentityHandoff.init({init});</script>"
        )
    else:
        head = f'<script src="{site.service}/v1/identity.js" {tag}></script>'
    html = f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"
    return web.Response(text=html, content_type="text/html")


def site_app(site: Site, client: AsyncIdentityClient, pages: dict[str, str]) -> web.Application:
    async def handoff(request: web.Request) -> web.Response:
        destination = (await request.json())["destination"]
        site.handoffs.append(destination)
        await asyncio.sleep(HANDOFF_DELAY)
        prepared = await client.prepare(anonymous_id="visitor-1", destination=destination)
        return web.json_response({"redirectUrl": prepared.redirect_url}, headers=CORS)

    async def preflight(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def any_page(request: web.Request) -> web.Response:
        if request.host.split(":")[0] == "b.localhost":
            site.seen_b.append(f"{request.method} {request.path_qs}")
            return web.Response(text=f"<h1>B {request.path}</h1>", content_type="text/html")
        if request.path == "/tag":
            timeout = request.query["timeout"]
            tag = f'data-domains="b.localhost" data-token-endpoint="/handoff" data-timeout="{timeout}"'
            return page(site, f'<a id="link" href="{site.b}/cart">checkout</a>', tag=tag)
        if request.path == "/elsewhere":  # the token endpoint of domain B, another origin
            link = f'<a id="link" href="{site.b}/cart">checkout</a>'
            return page(site, link, token_endpoint=f"{site.b}/handoff")
        if request.path in pages:
            return page(site, pages[request.path].format(a=site.a, b=site.b))
        return web.Response(text=f"<h1>A {request.path}</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/handoff", handoff)
    app.router.add_route("OPTIONS", "/handoff", preflight)
    app.router.add_route("*", "/{tail:.*}", any_page)
    return app


PAGES = {
    # The form's action is domain B's; one button submits elsewhere (formaction).
    "/form": """<form method="get" action="{b}/cart"><input name="q" value="1">
        <button id="save" name="act" value="save" formaction="/save">Save for later</button>
        <button id="go" name="act" value="go">Checkout</button>
        <button id="pay" name="act" value="pay" formaction="{b}/pay" formmethod="post">Pay</button>
        <button id="popup" name="act" value="popup" formtarget="_blank">In a new tab</button>
        </form>""",
    # The form's action is this site's; one button submits to domain B.
    "/local-form": """<form method="post" action="/local"><input name="q" value="1">
        <button id="local" name="act" value="local">Here</button>
        <button id="checkout" name="act" value="checkout" formaction="{b}/cart"
          formmethod="get">Checkout</button></form>""",
    "/top": '<h1>top</h1><iframe id="frame" src="/frame" width="600" height="200"></iframe>',
    "/frame": """<a id="to-top" href="{b}/cart?from=frame" target="_top">checkout</a>
        <a id="blank" href="{b}/cart?from=blank" target="_blank">new tab</a>""",
    "/parent": """<h1>parent</h1>
        <iframe id="middle" name="middle" src="/middle" width="600" height="300"></iframe>""",
    "/middle": '<h1>middle</h1><iframe id="inner" src="/inner" width="500" height="100"></iframe>',
    "/inner": '<a id="to-parent" href="{b}/cart?from=inner" target="_parent">checkout</a>',
}


@asynccontextmanager
async def running_site() -> AsyncIterator[Site]:
    service_port, site_port = free_port(), free_port()
    sources = {
        "shop": {
            "write_key_hash": hash_write_key(WRITE_KEY),
            "origins": [f"http://b.localhost:{site_port}"],
        }
    }
    service = FrontRunner(create_app(make_settings(sources=json.dumps(sources))), access_log=None)
    await service.setup()
    await web.TCPSite(service, "127.0.0.1", service_port).start()
    site = Site(
        f"http://a.localhost:{site_port}",
        f"http://b.localhost:{site_port}",
        f"http://127.0.0.1:{service_port}",
    )
    try:
        async with AsyncIdentityClient(site.service, WRITE_KEY) as client:
            runner = web.AppRunner(site_app(site, client, PAGES), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", site_port).start()
            try:
                yield site
            finally:
                await runner.cleanup()
    finally:
        await service.cleanup()


@asynccontextmanager
async def browser_tab() -> AsyncIterator[Any]:
    async_api = need_browser()
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        try:
            context = await browser.new_context()
            context.set_default_timeout(TIMEOUT_MS)
            yield await context.new_page()
        finally:
            await browser.close()


async def test_a_forms_clicked_button_decides_where_it_goes() -> None:
    async with running_site() as site, browser_tab() as tab:
        # formaction="/save" on a form to domain B: this site's /save, no handoff.
        await tab.goto(f"{site.a}/form")
        async with tab.expect_navigation(url=f"{site.a}/save?q=1&act=save"):
            await tab.click("#save")
        assert site.handoffs == []
        assert site.seen_b == []

        # The form's own action: handed off, the token a field (a GET form).
        await tab.goto(f"{site.a}/form")
        await tab.click("#go")
        got = await site.wait_for_b(lambda request: request.startswith("GET /cart?"))
        await on_b(tab, site)
        assert got.startswith("GET /cart?"), got
        assert fields(got).keys() == {"q", "act", "handoff_token"}, got
        assert fields(got)["act"] == "go"
        assert TOKEN.search(got), got
        assert site.handoffs == [f"{site.b}/cart"]

        # formaction and formmethod="post" to domain B: a POST to the redirect URL.
        await tab.goto(f"{site.a}/form")
        await tab.click("#pay")
        got = await site.wait_for_b(lambda request: "/pay" in request)
        await on_b(tab, site)
        assert got.startswith("POST /pay?handoff_token="), got
        assert site.handoffs[-1] == f"{site.b}/pay"

        # formtarget="_blank": another context, left alone (no handoff prepared).
        await tab.goto(f"{site.a}/form")
        async with tab.context.expect_page() as popup:
            await tab.click("#popup")
        opened = await popup.value
        await opened.wait_for_load_state()
        assert opened.url == f"{site.b}/cart?q=1&act=popup"
        assert len(site.handoffs) == 2

        # A form to this site whose button goes to domain B (formaction, formmethod="get").
        await tab.goto(f"{site.a}/local-form")
        await tab.click("#checkout")
        got = await site.wait_for_b(lambda request: "act=checkout" in request)
        await on_b(tab, site)
        assert got.startswith("GET /cart?"), got
        assert fields(got).keys() == {"q", "act", "handoff_token"}, got
        assert TOKEN.search(got), got
        assert len(site.handoffs) == 3
        # ...and its other button posts to this site, untouched.
        await tab.goto(f"{site.a}/local-form")
        async with tab.expect_navigation(url=f"{site.a}/local"):
            await tab.click("#local")
        assert len(site.handoffs) == 3


async def test_a_link_in_a_frame_navigates_the_context_its_target_names() -> None:
    async with running_site() as site, browser_tab() as tab:
        # target="_top" in a frame: the top page goes to domain B, with the token.
        await tab.goto(f"{site.a}/top")
        frame = tab.frame_locator("#frame")
        async with tab.expect_navigation(url=lambda url: url.startswith(f"{site.b}/cart")):
            await frame.locator("#to-top").click()
        got = await site.wait_for_b(lambda request: "from=frame" in request)
        assert got.startswith("GET /cart?from=frame&handoff_token="), got
        assert TOKEN.search(tab.url), tab.url
        assert len(tab.frames) == 1  # the frame went with its page

        # target="_parent": the middle frame goes, the top page stays.
        await tab.goto(f"{site.a}/parent")
        inner = tab.frame_locator("#middle").frame_locator("#inner")
        await inner.locator("#to-parent").click()
        got = await site.wait_for_b(lambda request: "from=inner" in request)
        assert got.startswith("GET /cart?from=inner&handoff_token="), got
        middle = tab.frame(name="middle")
        await middle.wait_for_url(lambda url: url.startswith(f"{site.b}/cart"))
        assert middle.parent_frame == tab.main_frame
        assert tab.url == f"{site.a}/parent"

        # target="_blank": a new tab, as the browser opens it, undecorated.
        handoffs = len(site.handoffs)
        await tab.goto(f"{site.a}/top")
        async with tab.context.expect_page() as popup:
            await tab.frame_locator("#frame").locator("#blank").click()
        opened = await popup.value
        await opened.wait_for_load_state()
        assert opened.url == f"{site.b}/cart?from=blank"
        assert len(site.handoffs) == handoffs


async def test_a_token_endpoint_of_another_origin_is_not_called() -> None:
    """A tokenEndpoint of another origin (domain B's, which grants CORS) was POSTed the
    destination (and the visitor's anonymousId, with analytics.js), and its redirectUrl
    followed. The docs make it the site's own backend: one of another origin is ignored
    with a console warning (its default, none: links are not decorated)."""
    async with running_site() as site, browser_tab() as tab:
        warned = console_warnings(tab)
        await tab.goto(f"{site.a}/elsewhere")
        await tab.click("#link")
        got = await site.wait_for_b(lambda request: request.startswith("GET /cart"))
        await on_b(tab, site)
        assert got == "GET /cart", got
        assert site.handoffs == []
        assert any("tokenEndpoint" in text for text in warned), warned


async def test_a_data_timeout_that_is_not_a_number_is_the_default() -> None:
    async with running_site() as site, browser_tab() as tab:
        for timeout in ["5s", "0", "-1", "Infinity", "3000"]:
            await tab.goto(f"{site.a}/tag?timeout={timeout}")
            async with tab.expect_navigation(url=lambda url: url.startswith(f"{site.b}/cart")):
                await tab.click("#link")
            assert TOKEN.search(tab.url), f"data-timeout={timeout}: {tab.url}"
        # A real timeout still bounds the call: 100 ms is less than the backend's delay.
        await tab.goto(f"{site.a}/tag?timeout=100")
        async with tab.expect_navigation(url=lambda url: url.startswith(f"{site.b}/cart")):
            await tab.click("#link")
        assert tab.url == f"{site.b}/cart"


# Domain B on a registrable domain of its own: a cookie for the parent domain needs one.
PARENT_DOMAIN = "example.test"
LANDING_ARGS = [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP *.{PARENT_DOMAIN} 127.0.0.1"]
ONE_YEAR = 365 * 24 * 3600
# The script tag's attributes of identity.js's options (cookieMaxAge has none).
ATTRIBUTES = {
    "exchangeEndpoint": "data-exchange-endpoint",
    "cookieDomain": "data-cookie-domain",
    "cookieName": "data-cookie-name",
    "param": "data-param",
}


@dataclass(frozen=True)
class Landing:
    """How the page gives identity.js its cookie options (``init`` or the script tag's
    attributes) and which, the option identity.js ignores with a console warning (None:
    all valid), and the cookie it then writes: its name, for the parent domain or
    host-only, and its Max-Age; on an https page, or an http one."""

    how: str
    options: dict[str, object]
    warned: str | None = None
    name: str = "ajs_anonymous_id"
    parent: bool = False
    max_age: int = ONE_YEAR
    https: bool = True


LANDINGS: dict[str, Landing] = {
    "init": Landing("init", {"cookieDomain": f".{PARENT_DOMAIN}"}, parent=True),
    "tag": Landing("tag", {"cookieDomain": PARENT_DOMAIN}, parent=True),
    "none": Landing("init", {}),
    # No domain name: ignored, the cookie host-only.
    "attribute-init": Landing(
        "init", {"cookieDomain": f"{PARENT_DOMAIN}; Max-Age=0"}, "cookieDomain"
    ),
    "attribute-tag": Landing(
        "tag", {"cookieDomain": f"{PARENT_DOMAIN}; Max-Age=0"}, "cookieDomain"
    ),
    "empty-label": Landing("init", {"cookieDomain": f"pay..{PARENT_DOMAIN}"}, "cookieDomain"),
    "space": Landing("tag", {"cookieDomain": f"{PARENT_DOMAIN} x"}, "cookieDomain"),
    # A single label or an IP address: browsers set no Domain cookie for either (the
    # visitor cookie was never set), so ignored, the cookie host-only.
    "single-label": Landing("init", {"cookieDomain": ".test"}, "cookieDomain"),
    "ip-address": Landing("tag", {"cookieDomain": "127.0.0.1"}, "cookieDomain"),
    # Cookie names: a token (RFC 6265), or the default.
    "name-init": Landing("init", {"cookieName": "ajs_id"}, name="ajs_id"),
    "name-tag": Landing("tag", {"cookieName": "ajs.id"}, name="ajs.id"),
    "name-attribute": Landing("init", {"cookieName": "ajs; Max-Age=0"}, "cookieName"),
    "name-equals": Landing("tag", {"cookieName": "ajs=id"}, "cookieName"),
    "name-space": Landing("tag", {"cookieName": "ajs id"}, "cookieName"),
    "name-empty": Landing("init", {"cookieName": ""}, "cookieName"),
    # Max-Age: whole seconds from 1 to 400 days, or the default.
    "age": Landing("init", {"cookieMaxAge": 3600}, max_age=3600),
    "age-negative": Landing("init", {"cookieMaxAge": -5}, "cookieMaxAge"),
    "age-fraction": Landing("init", {"cookieMaxAge": 1.5}, "cookieMaxAge"),
    "age-text": Landing("init", {"cookieMaxAge": "1 year"}, "cookieMaxAge"),
    "age-over-400-days": Landing("init", {"cookieMaxAge": 401 * 24 * 3600}, "cookieMaxAge"),
    # The token's parameter: the service's rule (ASCII letters, digits, '_' or '-'), or the
    # default; an empty one took any empty query part (?a&&b) for the token.
    "param-empty": Landing("init", {"param": ""}, "param"),
    "param-tag": Landing("tag", {"param": "t\u00f6ken"}, "param"),
    # Prefixed names (RFC 6265bis 4.1.3, in any case): written when the cookie fits the
    # prefix, else the default name (the browser dropped the cookie: no id kept at all).
    "host-prefix": Landing("init", {"cookieName": "__Host-ajs"}, name="__Host-ajs"),
    "secure-prefix": Landing(
        "tag",
        {"cookieName": "__Secure-ajs", "cookieDomain": PARENT_DOMAIN},
        name="__Secure-ajs",
        parent=True,
    ),
    "host-prefix-domain": Landing(
        "init",
        {"cookieName": "__Host-ajs", "cookieDomain": f".{PARENT_DOMAIN}"},
        "cookieName",
        parent=True,
    ),
    "host-prefix-domain-tag": Landing(
        "tag",
        {"cookieName": "__host-ajs", "cookieDomain": PARENT_DOMAIN},
        "cookieName",
        parent=True,
    ),
    "secure-prefix-http": Landing(
        "init", {"cookieName": "__Secure-ajs"}, "cookieName", https=False
    ),
    "host-prefix-http": Landing("tag", {"cookieName": "__HOST-ajs"}, "cookieName", https=False),
    "http": Landing("init", {"cookieName": "ajs_id"}, name="ajs_id", https=False),
}


# Modes of a landing whose exchangeEndpoint is the sibling subdomain's (another origin, which
# grants CORS), given by ``init`` or by the script tag's attribute, absolute or scheme-relative.
ELSEWHERE = {"elsewhere-init": ("init", "https:"), "elsewhere-tag": ("tag", "")}
READY = "new Promise((resolve) => IdentityHandoff.ready(resolve))"


async def written_cookies(context: Any, url: str) -> list[Any]:
    """The cookies of ``url`` once the page's ``document.cookie`` write has reached the
    browser's cookie store: Chromium sends it there asynchronously, so a read right after
    the page settled may find none yet (it did, once, on a loaded machine). Waits 5 s at
    most, then gives what is there."""
    deadline = time.monotonic() + 5.0
    while not (cookies := await context.cookies(url)) and time.monotonic() < deadline:  # noqa: ASYNC110 (polls the browser)
        await asyncio.sleep(0.05)
    return list(cookies)


def landing_page(service: str, landing: Landing) -> web.Response:
    """Domain B's page with identity.js, its options given by ``init`` or by the script
    tag's attributes."""
    src = f"{service}/v1/identity.js"
    options = {"exchangeEndpoint": "/identity/exchange", **landing.options}
    if landing.how == "tag":
        attributes = "".join(
            f' {ATTRIBUTES[name]}="{html.escape(str(value))}"' for name, value in options.items()
        )
        head = f'<script src="{src}"{attributes}></script>'
    else:
        head = f'<script src="{src}"></script><script>IdentityHandoff.init({json.dumps(options)});</script>'
    document = f"<!doctype html><html><head>{head}</head><body><h1>cart</h1></body></html>"
    return web.Response(text=document, content_type="text/html")


def landing_of(request: web.Request) -> Landing:
    """The landing a /cart request's ``mode`` names (LANDINGS, ELSEWHERE)."""
    mode = request.query["mode"]
    if mode in LANDINGS:
        return LANDINGS[mode]
    how, scheme = ELSEWHERE[mode]
    endpoint = f"{scheme}//www.{PARENT_DOMAIN}:{request.url.port}/identity/exchange"
    return Landing(how, {"exchangeEndpoint": endpoint}, "exchangeEndpoint")


@dataclass
class LandingSite:
    """Domain B (``pay``) and its sibling subdomain (``www``) on https and on http (the
    service takes https origins only: a token prepared for https is followed there), one
    site answering all four; the service's client; Chromium mapping them to loopback.
    ``exchanges``: the host of each call to /identity/exchange."""

    pay: str
    www: str
    http_pay: str
    http_www: str
    client: AsyncIdentityClient
    browser: Any
    exchanges: list[str] = field(default_factory=list)

    async def tab(self) -> tuple[Any, Any, list[str]]:
        """A fresh context, its tab and the console warnings the tab gets."""
        context = await self.browser.new_context(ignore_https_errors=True)
        context.set_default_timeout(TIMEOUT_MS)
        tab = await context.new_page()
        return context, tab, console_warnings(tab)


def console_warnings(tab: Any) -> list[str]:
    """The console warnings ``tab`` gets from now on."""
    warned: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "warning":
            warned.append(message.text)

    tab.on("console", on_console)
    return warned


def landing_app(service: str, site: LandingSite) -> web.Application:
    async def exchange(request: web.Request) -> web.Response:
        site.exchanges.append(request.host)
        token = (await request.json())["token"]
        identity = await site.client.exchange(token, fallback=True)
        answer = {"anonymousId": identity.anonymous_id, "source": identity.source}
        return web.json_response(answer, headers=CORS)

    async def preflight(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def any_page(request: web.Request) -> web.Response:
        if request.path == "/cart":
            return landing_page(service, landing_of(request))
        return web.Response(
            text=f"<h1>{request.host} {request.path}</h1>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_post("/identity/exchange", exchange)
    app.router.add_route("OPTIONS", "/identity/exchange", preflight)
    app.router.add_get("/{tail:.*}", any_page)
    return app


@asynccontextmanager
async def landing_site(directory: Path) -> AsyncIterator[LandingSite]:
    async_api = need_browser()
    service_port, site_port, http_port = free_port(), free_port(), free_port()
    pay = f"https://pay.{PARENT_DOMAIN}:{site_port}"
    tls = tls_context(directory, f"pay.{PARENT_DOMAIN}", f"www.{PARENT_DOMAIN}")
    sources = {"pay": {"write_key_hash": hash_write_key(WRITE_KEY), "origins": [pay]}}
    service = FrontRunner(create_app(make_settings(sources=json.dumps(sources))), access_log=None)
    await service.setup()
    await web.TCPSite(service, "127.0.0.1", service_port).start()
    service_url = f"http://127.0.0.1:{service_port}"
    try:
        async with (
            AsyncIdentityClient(service_url, WRITE_KEY) as client,
            async_api.async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(
                executable_path=chromium_path(), args=LANDING_ARGS, timeout=TIMEOUT_MS
            )
            site = LandingSite(
                pay,
                f"https://www.{PARENT_DOMAIN}:{site_port}",
                f"http://pay.{PARENT_DOMAIN}:{http_port}",
                f"http://www.{PARENT_DOMAIN}:{http_port}",
                client,
                browser,
            )
            runner = web.AppRunner(landing_app(service_url, site), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", site_port, ssl_context=tls).start()
                await web.TCPSite(runner, "127.0.0.1", http_port).start()
                yield site
            finally:
                await browser.close()
                await runner.cleanup()
    finally:
        await service.cleanup()


async def test_identity_js_writes_the_cookie_its_options_say(tmp_path: Path) -> None:
    """identity.js wrote a host-only cookie whatever the site's setup: a visitor restored on
    pay.example.test was unknown on www.example.test. With ``cookieDomain`` (the
    middlewares' option) the cookie is the parent domain's. A cookieDomain that is no
    domain name, a cookieName that is no token or a cookieMaxAge that is no whole number of
    seconds from 1 to 400 days went into document.cookie as written: a ';' added
    attributes (``Max-Age=0``: no cookie at all), an '=' moved the name into the value, an
    empty label or a space made a cookie Chromium refuses, ``Max-Age=-5`` deleted it; each
    is now ignored with a console warning, and its default written. So is a ``__Secure-``
    or ``__Host-`` cookieName on an http page, or a ``__Host-`` one with a cookieDomain:
    Chromium dropped the cookie. An empty ``param`` took no token at all (the visitor was
    never restored): the default is read instead."""
    async with landing_site(tmp_path) as site:
        for mode, landing in LANDINGS.items():
            visitor = f"visitor-{mode}"
            context, tab, warned = await site.tab()
            prepared = await site.client.prepare(
                anonymous_id=visitor, destination=f"{site.pay}/cart?mode={mode}"
            )
            page, sibling = (
                (site.pay, site.www) if landing.https else (site.http_pay, site.http_www)
            )
            await tab.goto(prepared.redirect_url.replace(site.pay, page))
            landed = await tab.evaluate(READY)
            written = time.time()
            assert landed == {"anonymousId": visitor, "source": "handoff"}, mode
            assert tab.url == f"{page}/cart?mode={mode}"
            cookies = await written_cookies(context, page)
            assert [(c["name"], c["value"]) for c in cookies] == [(landing.name, visitor)], mode
            [cookie] = cookies
            assert abs(cookie["expires"] - written - landing.max_age) < 60, mode
            # The sibling subdomain's own page sees it, or not.
            await tab.goto(f"{sibling}/account")
            seen = await tab.evaluate("document.cookie")
            if landing.parent:
                assert cookie["domain"] == f".{PARENT_DOMAIN}", mode
                assert seen == f"{landing.name}={visitor}", mode
            else:
                assert cookie["domain"] == f"pay.{PARENT_DOMAIN}", mode
                assert seen == "", mode
            # An option that cannot be written is said so, and ignored.
            if landing.warned is None:
                assert warned == [], mode
            else:
                assert any(landing.warned in text for text in warned), (mode, warned)
            await context.close()


async def test_identity_js_posts_the_token_to_its_own_origin_only(tmp_path: Path) -> None:
    """An exchangeEndpoint of another origin (the sibling subdomain's, which grants CORS) was
    POSTed the token: whoever answers there exchanged it, and the visitor was theirs. The
    docs make it the site's own backend: one of another origin is ignored with a console
    warning (its default, none: no exchange), and the token is left unused."""
    async with landing_site(tmp_path) as site:
        for mode in ELSEWHERE:
            context, tab, warned = await site.tab()
            prepared = await site.client.prepare(
                anonymous_id="visitor-elsewhere", destination=f"{site.pay}/cart?mode={mode}"
            )
            await tab.goto(prepared.redirect_url)
            assert await tab.evaluate(READY) is None, mode
            assert site.exchanges == [], mode
            assert await context.cookies(site.pay) == [], mode
            assert any("exchangeEndpoint" in text for text in warned), (mode, warned)
            await context.close()
        identity = await site.client.exchange(prepared.token)
        assert identity.anonymous_id == "visitor-elsewhere"
