"""The checkout demo (examples/checkout) end to end in headless Chromium (Debian's).

The demo's five parts run on free loopback ports: the shop on ``shop.localhost`` (domain A,
identity.js decorating its checkout links through the shop's ``/handoff``), the checkout
on ``checkout.localhost`` (domain B with the Python SDK's middleware), on
``pay.localhost`` (domain B with identity.js only) or on ``express.localhost`` (domain B in
Node: Express 5 and the Node SDK's middleware), the service, and the collector that
gets the pages' analytics.js calls and the service's events. A visitor views the product
and clicks through to the checkout. The test asserts that

- the checkout page's anonymousId is the shop's (or, with an expired token, a generated
  one, and the service's completion event says ``anonymousId_source: generated``);
- the address bar holds no token, and no event, no other URL and no ``Referer`` carries it;
  the raw anonymousId is in no URL at all; the checkout page's referrer is the shop's
  origin (neither middleware's 303 sends a ``Referrer-Policy``: the redirect's own URL is
  never a referrer, so none is needed to keep the token out, and ``no-referrer`` would
  leave the page without one);
- back to the shop and forward again replays nothing: no second exchange, no token in a
  request; identity.js kept ``history.state``;
- the collector got the shop's and the checkout's page calls and the service's started
  and completion events, under the one anonymousId.

Variants: a token that expires before the visitor lands (the shop's handoffs live 1 s and
the checkout request is held until then), third-party cookies blocked (Chrome's flag and
its setting; the other variants' profile allows them, since Debian's Chromium blocks them by
default), and the shop's storage (cookies, localStorage) cleared before the click. The plain
and blocked variants prove the setting took: a cross-site frame (on ``127.0.0.1``) sets and
reads back its own cookies in the one, and cannot in the other.
The Node checkout runs the plain and expired variants. Each run saves a screenshot of the
checkout page under artifacts/ (CI keeps it). With the visitor cookie ``SameSite=Strict``
(``running_demo(same_site=...)``) the Python and Node checkouts' handlers get the shop's
identity on the page after the 303 as with ``Lax``: the carry cookie is ``Lax``.

Without Chromium or Playwright these tests skip, and the Node ones without Node 20+ and
examples/checkout/node's packages (``make demo`` or ``make test`` install them), except in CI
(tests/browser.py, tests/tools.py).
"""

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from examples.checkout.checkout import EVENT, SameSite
from examples.checkout.collector import Received
from examples.checkout.demo import Demo, Ports, node_checkout_missing, running_demo
from identity_service import app_keys
from tests.browser import (
    BLOCK_THIRD_PARTY_COOKIES,
    CHROMIUM_ARGS,
    chromium_path,
    cookie_profile,
    need_browser,
)
from tests.redis_server import free_port
from tests.secrets_audit import AUDIT
from tests.tools import missing_tool

TIMEOUT_MS = 15_000
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN_PARAM = "handoff_token"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# The checkout's page scripts run once analytics.js has loaded and shown the id.
READY = "body[data-analytics-ready]"
# Set before any script of every page: identity.js must keep it when it cleans the URL.
KEEP_STATE = 'history.replaceState({demo: "kept"}, "");'
SHOP_TTL_WHEN_EXPIRED = 1


# Each checkout build's service source and host (examples/checkout/demo.py).
SOURCES = {"middleware": "checkout", "helper": "pay", "node": "node"}
HOSTS = {"middleware": "checkout.localhost", "helper": "pay.localhost", "node": "express.localhost"}
VARIANTS = ["plain", "expired", "third_party_blocked", "storage_cleared"]


def source_of(mode: str) -> str:
    return SOURCES[mode]


def checkout_url_of(demo: Demo, mode: str) -> str:
    urls = {"middleware": demo.checkout_url, "helper": demo.pay_url, "node": demo.node_url}
    url = urls[mode]
    assert url is not None
    return url


async def need_node_checkout() -> None:
    missing = await node_checkout_missing()
    if missing:
        missing_tool(f"the Node checkout cannot run: {missing}", "make demo installs it")


def exchanges(demo: Demo, mode: str) -> int:
    """Exchanges the service answered for the checkout: handed off or missed."""
    metrics = demo.service[app_keys.METRICS]
    source = source_of(mode)
    exchanged = metrics.value("identity_handoffs_exchanged_total", source=source)
    missed = metrics.value("identity_handoff_misses_total", source=source, reason="not_found")
    return int(exchanged + missed)


def host_of(event: dict[str, Any]) -> str:
    return str(event["context"]["page"]["url"]).split("/")[2].split(":")[0]


def plain_cookie(value: str) -> str:
    """An ajs_anonymous_id cookie's id: as is, or JSON-quoted and percent-encoded."""
    return value.replace("%22", "").strip('"')


async def visitor_id(tab: Any) -> str:
    await tab.wait_for_selector(READY, state="attached")
    found: str = await tab.evaluate("analytics.user().anonymousId()")
    assert found == await tab.text_content("#anonymous-id")
    return found


def free_ports() -> Ports:
    return Ports(*(free_port() for _ in range(6)))


@asynccontextmanager
async def chromium(
    tmp_path: Path, *, block_third_party_cookies: bool = False
) -> AsyncIterator[Any]:
    """A headless Chromium's browser context, every page starting with ``KEEP_STATE``."""
    async_api = need_browser()
    async with async_api.async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(cookie_profile(tmp_path, block_third_party=block_third_party_cookies)),
            executable_path=chromium_path(),
            headless=True,
            args=[
                *CHROMIUM_ARGS,
                *([BLOCK_THIRD_PARTY_COOKIES] if block_third_party_cookies else []),
            ],
            timeout=TIMEOUT_MS,
        )
        context.set_default_timeout(TIMEOUT_MS)
        await context.add_init_script(KEEP_STATE)
        try:
            yield context
        finally:
            await context.close()


async def first_tab(context: Any) -> Any:
    return context.pages[0] if context.pages else await context.new_page()


@asynccontextmanager
async def elsewhere() -> AsyncIterator[str]:
    """A real server on another site (``127.0.0.1``, not ``*.localhost``): ``/probe`` sets a
    third-party cookie (``SameSite=None; Secure``, by header and by script) and
    ``/identity/exchange`` answers 500, as a broken backend does."""

    async def probe(request: web.Request) -> web.Response:
        return web.Response(
            text="<script>document.cookie = 'scripted=1; SameSite=None; Secure; Path=/';</script>",
            content_type="text/html",
            headers={"Set-Cookie": "probe=1; SameSite=None; Secure; Path=/"},
        )

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="Internal Server Error")

    app = web.Application()
    app.router.add_get("/probe", probe)
    app.router.add_post("/identity/exchange", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def third_party_cookies(tab: Any, site: str) -> str:
    """What a cross-site iframe on ``tab`` can set and read back of its own cookies."""
    await tab.evaluate(
        """(src) => new Promise((resolve) => { const frame = document.createElement("iframe");
        frame.onload = resolve; frame.src = src; document.body.appendChild(frame); })""",
        f"{site}/probe",
    )
    [frame] = [frame for frame in tab.frames if frame.url.startswith(site)]
    cookies: str = await frame.evaluate("document.cookie")
    return cookies


async def hold_until_expired(route: Any) -> None:
    """The landing request waits until the shop's 1 s handoff is over, then goes."""
    if TOKEN_PARAM in route.request.url:
        await asyncio.sleep(SHOP_TTL_WHEN_EXPIRED + 0.5)
    await route.continue_()


@pytest.mark.parametrize(
    ("mode", "variant"),
    [
        *((mode, variant) for mode in ("middleware", "helper") for variant in VARIANTS),
        ("node", "plain"),
        ("node", "expired"),
    ],
)
async def test_the_visitor_keeps_one_anonymous_id_from_shop_to_checkout(
    mode: str, variant: str, tmp_path: Path
) -> None:
    if mode == "node":
        await need_node_checkout()
    ttl = SHOP_TTL_WHEN_EXPIRED if variant == "expired" else None
    async with (
        running_demo(free_ports(), handoff_ttl=ttl, node=mode == "node") as demo,
        chromium(tmp_path, block_third_party_cookies=variant == "third_party_blocked") as context,
    ):
        checkout_url = checkout_url_of(demo, mode)
        requested: list[str] = []
        sent: list[Any] = []  # the requests themselves, for their Referer

        def record(request: Any) -> None:
            requested.append(request.url)
            sent.append(request)

        context.on("request", record)
        tab = await first_tab(context)
        await tab.goto(f"{demo.shop_url}/")
        shop_id = await visitor_id(tab)
        if variant in ("plain", "third_party_blocked") and mode != "node":
            # The blocking is in effect (and the probe can tell): a cross-site frame's own
            # cookies are refused with it, kept without it.
            async with elsewhere() as site:
                found = await third_party_cookies(tab, site)
            assert found == ("" if variant == "third_party_blocked" else "probe=1; scripted=1")
        if variant == "storage_cleared":
            # The shop's backend no longer sees a cookie: identity.js sends the id
            # analytics.js holds, in the POST body.
            await context.clear_cookies()
            await tab.evaluate("localStorage.clear(); sessionStorage.clear()")
        if variant == "expired":
            await context.route(f"{checkout_url}/**", hold_until_expired)
        async with tab.expect_navigation(url=lambda url: url.startswith(checkout_url)):
            await tab.click(f"#{mode}")
        checkout_id = await visitor_id(tab)
        ARTIFACTS.mkdir(exist_ok=True)
        await tab.screenshot(path=ARTIFACTS / f"checkout-{mode}-{variant}.png")

        tokens = {
            match.group(1)
            for url in requested
            for match in [re.search(rf"[?&]{TOKEN_PARAM}=([^&#]+)", url)]
            if match
        }
        assert len(tokens) == 1, requested  # one handoff, one token
        [token] = tokens
        AUDIT.token(token)
        referers = [await request.header_value("referer") or "" for request in sent]
        assert not [referer for referer in referers if token in referer]
        assert await tab.evaluate("document.referrer") == f"{demo.shop_url}/"
        assert TOKEN_PARAM not in tab.url
        assert await tab.evaluate("location.href") == tab.url
        assert tab.url.startswith(f"{checkout_url}/cart")
        if mode == "helper":
            assert await tab.evaluate("history.state") == {"demo": "kept"}
        if variant == "expired":
            assert checkout_id != shop_id
            assert UUID.fullmatch(checkout_id)
        else:
            assert checkout_id == shop_id
        assert exchanges(demo, mode) == 1

        # Back to the shop and forward again: the clean URL, nothing exchanged.
        await tab.go_back()
        assert tab.url == f"{demo.shop_url}/"
        assert await visitor_id(tab) == shop_id or variant == "storage_cleared"
        await tab.go_forward()
        assert tab.url.startswith(f"{checkout_url}/cart")
        assert TOKEN_PARAM not in tab.url
        assert await visitor_id(tab) == checkout_id
        assert exchanges(demo, mode) == 1
        assert sum(TOKEN_PARAM in url for url in requested) == 1
        await tab.click("#pay")
        await demo.collector.wait_for(
            lambda got: any(item.event.get("event") == "Order Completed" for item in got)
        )

        assert not [url for url in requested if shop_id in url]  # the raw id, never in a URL
        await check_events(demo, mode, variant, shop_id, checkout_id, token)


def set_cookies(headers: list[dict[str, str]]) -> dict[str, set[str]]:
    """The ``Set-Cookie`` headers of a response (Playwright's ``headers_array``): each
    cookie's name and attributes."""
    found: dict[str, set[str]] = {}
    for header in headers:
        if header["name"].lower() == "set-cookie":
            pair, *attributes = header["value"].split("; ")
            found[pair.split("=")[0]] = set(attributes)
    return found


@pytest.mark.parametrize("same_site", ["Lax", "Strict"])
@pytest.mark.parametrize("mode", ["middleware", "node"])
async def test_the_page_after_the_303_has_the_handed_off_identity(
    mode: str, same_site: SameSite, tmp_path: Path
) -> None:
    """The cart's handler, on the request after the middleware's 303, gets the identity the
    shop handed off (``source`` ``handoff``), whatever the visitor cookie's SameSite. The
    shop (``shop.localhost``) and the checkout are two sites to Chromium, so the landing and
    the request after its 303 are cross-site navigations: a ``Strict`` cookie rides on
    neither (the test checks that it did not), and only the carry cookie, ``Lax`` then,
    brings the identity to that request. The carry cookie is cleared once read."""
    if mode == "node":
        await need_node_checkout()
    async with (
        running_demo(free_ports(), node=mode == "node", same_site=same_site) as demo,
        chromium(tmp_path) as context,
    ):
        checkout_url = checkout_url_of(demo, mode)
        tab = await first_tab(context)
        await tab.goto(f"{demo.shop_url}/")
        shop_id = await visitor_id(tab)
        async with tab.expect_navigation(url=lambda url: url.startswith(checkout_url)) as nav:
            await tab.click(f"#{mode}")
        page = await nav.value
        assert await visitor_id(tab) == shop_id
        assert TOKEN_PARAM not in tab.url
        assert await tab.text_content("#server-source") == "handoff"

        after_303 = page.request
        landing = after_303.redirected_from
        assert landing is not None and TOKEN_PARAM in landing.url
        landed = await landing.response()
        assert landed is not None and landed.status == 303
        cookies = set_cookies(await landed.headers_array())
        assert f"SameSite={same_site}" in cookies["ajs_anonymous_id"]
        assert "SameSite=Lax" in cookies["identity_restored"]
        sent = await after_303.header_value("cookie") or ""
        assert "identity_restored=" in sent
        # Strict: the visitor cookie did not ride on the request after the 303 (two sites).
        assert ("ajs_anonymous_id=" in sent) == (same_site == "Lax"), sent
        jar = {cookie["name"] for cookie in await context.cookies(checkout_url)}
        assert "identity_restored" not in jar  # read, and cleared
        assert exchanges(demo, mode) == 1


async def test_a_form_to_the_checkout_is_decorated_at_submit(tmp_path: Path) -> None:
    """A GET form: the token rides as a field, the middleware takes it off, the form's own
    fields stay."""
    async with running_demo(free_ports(), node=False) as demo, chromium(tmp_path) as context:
        tab = await first_tab(context)
        await tab.goto(f"{demo.shop_url}/")
        shop_id = await visitor_id(tab)
        async with tab.expect_navigation(url=lambda url: url.startswith(demo.checkout_url)):
            await tab.click("#checkout-form button")
        assert await visitor_id(tab) == shop_id
        assert tab.url == f"{demo.checkout_url}/cart?coupon=WELCOME"
        assert exchanges(demo, "middleware") == 1


async def test_a_failed_handoff_lets_the_visitor_through_undecorated(tmp_path: Path) -> None:
    """The shop's backend cannot prepare (an origin the service does not allow it): the
    visitor still reaches the link's destination, as it was."""
    ports = free_ports()
    async with running_demo(ports, node=False) as demo, chromium(tmp_path) as context:
        requested: list[str] = []
        context.on("request", lambda request: requested.append(request.url))
        tab = await first_tab(context)
        await tab.goto(f"{demo.shop_url}/")
        await visitor_id(tab)
        # checkout.localhost on the pay app's port: a checkout domain, not an allowed origin.
        destination = f"http://checkout.localhost:{ports.pay}/cart?item=mug-red"
        await tab.evaluate(
            """(href) => { const link = document.createElement("a");
            link.id = "elsewhere"; link.href = href; link.textContent = "elsewhere";
            document.body.appendChild(link); }""",
            destination,
        )
        async with tab.expect_navigation(url=destination):
            await tab.click("#elsewhere")
        await visitor_id(tab)
        handoffs = [url for url in requested if url.endswith("/handoff")]
        assert handoffs == [f"{demo.shop_url}/handoff"]  # asked, and refused
        assert not [url for url in requested if TOKEN_PARAM in url]
        metrics = demo.service[app_keys.METRICS]
        assert metrics.value("identity_handoffs_prepared_total", source="shop") == 0


async def test_identity_js_lands_the_visitor_when_analytics_js_is_blocked(
    tmp_path: Path,
) -> None:
    """analytics.js blocked on domain B (as a content blocker does): identity.js still takes
    the token out of the URL, and leaves the id in the ajs_anonymous_id cookie."""
    async with running_demo(free_ports(), node=False) as demo, chromium(tmp_path) as context:
        tab = await first_tab(context)
        await tab.goto(f"{demo.shop_url}/")
        shop_id = await visitor_id(tab)
        await context.route(f"{demo.collector_url}/analytics.js", lambda route: route.abort())
        async with tab.expect_navigation(url=lambda url: url.startswith(demo.pay_url)):
            await tab.click("#helper")
        landed = await tab.evaluate("new Promise((resolve) => IdentityHandoff.ready(resolve))")
        assert landed == {"anonymousId": shop_id, "source": "handoff"}
        assert TOKEN_PARAM not in tab.url
        assert await tab.evaluate("Array.isArray(window.analytics)")  # the snippet's queue only
        cookies = {c["name"]: c["value"] for c in await context.cookies(demo.pay_url)}
        assert cookies["ajs_anonymous_id"] == shop_id


@pytest.mark.parametrize("cookie", ["analytics_js", "classic"])
async def test_identity_js_keeps_a_returning_visitors_id_when_the_token_is_stale(
    cookie: str, tmp_path: Path
) -> None:
    """A visitor who has been on the checkout before (its analytics.js gave them an id and
    the ajs_anonymous_id cookie; or analytics.js classic's JSON-quoted, percent-encoded
    cookie) lands with an expired token: the backend's fallback answers a generated id,
    and identity.js keeps the visitor's own, as the middlewares keep their cookie; ``ready``
    says ``cookie``."""
    async with (
        running_demo(free_ports(), handoff_ttl=SHOP_TTL_WHEN_EXPIRED, node=False) as demo,
        chromium(tmp_path) as context,
    ):
        tab = await first_tab(context)
        if cookie == "classic":
            returning_id = "returning-visitor-1"
            classic = {"name": "ajs_anonymous_id", "value": f"%22{returning_id}%22"}
            await context.add_cookies([{**classic, "url": demo.pay_url}])
        else:
            await tab.goto(f"{demo.pay_url}/cart")
            returning_id = await visitor_id(tab)
        await tab.goto(f"{demo.shop_url}/")
        shop_id = await visitor_id(tab)
        assert shop_id != returning_id
        await context.route(f"{demo.pay_url}/**", hold_until_expired)
        async with tab.expect_navigation(url=lambda url: url.startswith(demo.pay_url)):
            await tab.click("#helper")
        landed = await tab.evaluate("new Promise((resolve) => IdentityHandoff.ready(resolve))")
        assert landed == {"anonymousId": returning_id, "source": "cookie"}
        assert await visitor_id(tab) == returning_id
        assert TOKEN_PARAM not in tab.url
        cookies = {c["name"]: c["value"] for c in await context.cookies(demo.pay_url)}
        assert plain_cookie(cookies["ajs_anonymous_id"]) == returning_id
        metrics = demo.service[app_keys.METRICS]
        assert metrics.value("identity_handoff_misses_total", source="pay", reason="not_found") == 1


@pytest.mark.parametrize("failure", ["server_error", "network_error"])
async def test_identity_js_lands_without_the_handoff_when_the_exchange_endpoint_fails(
    failure: str, tmp_path: Path
) -> None:
    """The checkout's own /identity/exchange answers 500 (a real server's) or cannot be
    reached (connection refused): the page still loads, the token still leaves the address
    bar, ``ready`` gets null and analytics.js starts with an id of its own (identity.js's
    documented fallback)."""
    async with (
        running_demo(free_ports(), node=False) as demo,
        elsewhere() as site,
        chromium(tmp_path) as context,
    ):
        broken = f"{site}/identity/exchange" if failure == "server_error" else None
        refused = f"http://127.0.0.1:{free_port()}/identity/exchange"  # nothing listens

        async def fail(route: Any) -> None:
            await route.continue_(url=broken or refused)

        tab = await first_tab(context)
        await tab.goto(f"{demo.shop_url}/")
        shop_id = await visitor_id(tab)
        await context.route(f"{demo.pay_url}/identity/exchange", fail)
        async with tab.expect_navigation(url=lambda url: url.startswith(demo.pay_url)):
            await tab.click("#helper")
        checkout_id = await visitor_id(tab)
        assert (
            await tab.evaluate("new Promise((resolve) => IdentityHandoff.ready(resolve))") is None
        )
        assert TOKEN_PARAM not in tab.url
        assert tab.url == f"{demo.pay_url}/cart"
        assert await tab.evaluate("history.state") == {"demo": "kept"}
        assert UUID.fullmatch(checkout_id)
        assert checkout_id != shop_id
        cookies = {c["name"]: c["value"] for c in await context.cookies(demo.pay_url)}
        assert cookies["ajs_anonymous_id"] == checkout_id
        assert exchanges(demo, "helper") == 0  # the service never saw the token


async def check_events(
    demo: Demo, mode: str, variant: str, shop_id: str, checkout_id: str, token: str
) -> None:
    """The collector got both sites' page calls and the service's events, one visitor."""
    checkout_host = HOSTS[mode]

    def completed(got: list[Received]) -> bool:
        return any(item.event.get("event") == EVENT for item in got)

    received = await demo.collector.wait_for(completed)
    events = [(item.via, item.event) for item in received]
    assert token not in orjson.dumps(events).decode()
    pages = [(host_of(event), event["anonymousId"]) for via, event in events if via == "page"]
    assert ("shop.localhost", shop_id) in pages
    assert (checkout_host, checkout_id) in pages
    assert {host for host, _ in pages} == {"shop.localhost", checkout_host}
    assert all(
        anonymous_id == checkout_id for host, anonymous_id in pages if host != "shop.localhost"
    )
    service = [event for via, event in events if via == "service"]
    [started] = [event for event in service if event["event"] == "Cross-Domain Handoff Started"]
    assert started["anonymousId"] == shop_id
    [completion] = [event for event in service if event["event"] == EVENT]
    assert completion["anonymousId"] == checkout_id
    assert host_of(completion) == checkout_host  # domain B's context, URL without the token
    if variant == "expired":
        assert completion["properties"]["anonymousId_source"] == "generated"
    else:
        assert "anonymousId_source" not in completion["properties"]
        assert completion["anonymousId"] == shop_id
