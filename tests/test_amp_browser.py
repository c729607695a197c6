"""The origin hop in a real browser: headless Chromium (Debian's), third-party cookies blocked.

Two sites on loopback: the publisher, where the service runs (``http://pub.localhost:<port>``,
Chromium resolves ``*.localhost`` to loopback and treats it as a secure context), and the AMP
cache's form of the publisher's origin (``https://pub-localhost.cdn.ampproject.org``, mapped
to a local TLS server with ``--host-resolver-rules``; its certificate is made here and
accepted with ``ignore_https_errors``). The cache page submits a form the way amp-form does
(``fetch`` with ``credentials: "include"`` and ``FormData``, then ``AMP-Redirect-To`` followed
through ``window.top.location``). The test asserts the landing on ``done_url``, the cookie on
the publisher host, the action applied once at the webhook, and no form field in any URL
the browser requested. A second submission from the cache proves the cookie really is
blocked there: it hops again, and lands as the same visitor.

Without Chromium or Playwright this test skips, except in CI (CI set), where it fails
(tests/browser.py).
"""

import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from identity_service.amp.context import AMP
from identity_service.app import create_app
from tests.browser import (
    BLOCK_THIRD_PARTY_COOKIES,
    blocking_profile,
    chromium_path,
    need_browser,
    tls_context,
)
from tests.browser import CHROMIUM_ARGS as BROWSER_ARGS
from tests.conftest import AppClient, FrontTestServer, make_settings
from tests.redis_server import free_port
from tests.webhook_receiver import WEBHOOK_SECRET, WebhookReceiver

CACHE_HOST = "pub-localhost.cdn.ampproject.org"
FIELD_VALUES = {"sku": "sku-browser-7e41c2", "note": "note-browser-9b05aa"}
TIMEOUT_MS = 15_000
CHROMIUM_ARGS = [*BROWSER_ARGS, BLOCK_THIRD_PARTY_COOKIES]

CACHE_PAGE = """<!doctype html>
<html><body>
<form id="form" method="post" target="_top">
  <input name="sku" value="{sku}"><input name="note" value="{note}">
  <input type="hidden" name="clientId" value="amp-browserCacheClientId01">
</form>
<script>
// What amp-form does with action-xhr: FormData, credentials, then AMP-Redirect-To.
// The answer is handed to the test (reportAnswer) before the page navigates away, since
// a navigation destroys the context a still-pending evaluate would have returned it from.
async function submitForm() {{
  const url = {action} + "?__amp_source_origin=" + encodeURIComponent({source});
  const response = await fetch(url, {{
    method: "POST", body: new FormData(document.getElementById("form")),
    credentials: "include",
  }});
  const redirect = response.headers.get("AMP-Redirect-To");
  const body = await response.json();
  await reportAnswer({{status: response.status, body: body, redirect: redirect !== null}});
  if (redirect) {{ window.top.location.href = redirect; }}
}}
</script>
</body></html>
"""


async def serve_cache_page(page: str, context: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/c/s/pub.localhost/page.html", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port


async def test_cache_page_hops_to_the_publisher_in_chromium(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    async_api = need_browser()
    port = free_port()
    publisher = f"http://pub.localhost:{port}"
    done_url = f"{publisher}/done"
    amp = {
        "public_url": publisher,
        # The https twin is what AMP caches serve; its cache origin is the cache page's.
        "publisher_origins": [publisher, "https://pub.localhost"],
        "source": "shop",
        "actions": {
            "add": {"webhook": receiver.url, "secret": WEBHOOK_SECRET, "done_url": done_url}
        },
        "webhook_timeout": 2.0,
    }
    settings = make_settings(None, amp=json.dumps(amp))  # the memory store: one is enough
    client = await aiohttp_client(FrontTestServer(create_app(settings), port=port))
    action = json.dumps(f"{publisher}/v1/amp/actions/add")
    page = CACHE_PAGE.format(
        action=action, source=json.dumps("https://pub.localhost"), **FIELD_VALUES
    )
    cache_runner, cache_port = await serve_cache_page(page, tls_context(tmp_path, CACHE_HOST))
    profile = blocking_profile(tmp_path)  # Chrome's own setting too
    visited: list[str] = []
    try:
        async with async_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch_persistent_context(
                str(profile),
                executable_path=chromium_path(),
                headless=True,
                args=[
                    *CHROMIUM_ARGS,
                    f"--host-resolver-rules=MAP {CACHE_HOST}:443 127.0.0.1:{cache_port}",
                ],
                ignore_https_errors=True,
                timeout=TIMEOUT_MS,
            )
            browser.set_default_timeout(TIMEOUT_MS)
            browser.on("request", lambda request: visited.append(request.url))
            answers: list[Any] = []
            await browser.expose_function("reportAnswer", lambda answer: answers.append(answer))
            try:
                tab = browser.pages[0] if browser.pages else await browser.new_page()
                visitors = []
                for round_number in (1, 2):
                    await tab.goto(f"https://{CACHE_HOST}/c/s/pub.localhost/page.html")
                    async with tab.expect_navigation(url=done_url):
                        await tab.evaluate("setTimeout(submitForm, 0)")
                    answer = answers.pop()
                    # Third-party cookies are blocked: the cache page never shows the cookie,
                    # so every submission from it hops.
                    assert answer == {
                        "status": 200,
                        "body": {"status": "redirecting"},
                        "redirect": True,
                    }
                    cookies = await browser.cookies(publisher)
                    [cookie] = [c for c in cookies if c["name"] == "ajs_anonymous_id"]
                    assert cookie["domain"] == "pub.localhost"
                    visitors.append(cookie["value"])
                    assert receiver.applications == round_number
                cache_cookies = await browser.cookies(f"https://{CACHE_HOST}")
                assert not [c for c in cache_cookies if c["name"] == "ajs_anonymous_id"]
            finally:
                await browser.close()
    finally:
        await cache_runner.cleanup()

    assert visitors[0] == visitors[1]  # the second hop landed as the same visitor
    applied = list(receiver.applied.values())
    assert [call["anonymousId"] for call in applied] == visitors
    assert all(call["fields"] == FIELD_VALUES for call in applied)
    assert all(call["context"] == "origin_hop" for call in applied)
    hops = client.app[AMP].metrics
    assert hops.value("identity_amp_hops_total", action="add", stage="completed") == 2
    assert any("/complete?token=" in url for url in visited)
    for url in visited:
        for value in (*FIELD_VALUES.values(), "amp-browserCacheClientId01"):
            assert value not in url
