"""The clients held to what httpx and openai-python promise a caller: a call is one request
to the service and nowhere else (no redirect followed), its errors chain no raw exception,
and an async client survives a new event loop; the middlewares exchange one landing once."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import DEV_WRITE_KEY, Service
from identity_client import (
    APIError,
    AsyncIdentityClient,
    ConfigurationError,
    Identity,
    IdentityClient,
    IdentityError,
    PreparedHandoff,
)
from identity_client.middleware import (
    IdentityASGIMiddleware,
    IdentityWSGIMiddleware,
    identity_middleware,
)
from misbehaving import Answer, Misbehaving, Seen, misbehaving

WRITE_KEY = "review-write-key-0123456789"
TOKEN = "review-token-0123456789abcdef0123456789abcd"
VISITOR = "visitor-review-42"
MODES = ["sync", "async"]
OPERATIONS = ["prepare", "exchange"]


@pytest.fixture
def elsewhere() -> Iterator[Misbehaving]:
    with misbehaving() as started:
        yield started


def call(
    mode: str, operation: str, url: str, *, follow: bool = False, **settings: Any
) -> Identity | PreparedHandoff:
    """``operation`` with the sync or the async client; ``follow``: its own ``http_client``
    following redirects, as ``httpx.Client(follow_redirects=True)`` does."""
    settings = {"max_retries": 0, **settings}
    if mode == "sync":
        own = httpx.Client(follow_redirects=True) if follow else None
        with IdentityClient(url, WRITE_KEY, http_client=own, **settings) as client:
            if operation == "prepare":
                return client.prepare(VISITOR, destination="http://b.localhost/")
            return client.exchange(TOKEN)

    async def run() -> Identity | PreparedHandoff:
        own = httpx.AsyncClient(follow_redirects=True) if follow else None
        async with AsyncIdentityClient(url, WRITE_KEY, http_client=own, **settings) as client:
            if operation == "prepare":
                return await client.prepare(VISITOR, destination="http://b.localhost/")
            return await client.exchange(TOKEN)

    return asyncio.run(asyncio.wait_for(run(), 20))


# Redirects: never followed


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_redirect_is_never_followed_even_by_an_http_client_that_follows(
    server: Misbehaving, elsewhere: Misbehaving, mode: str, operation: str, status: int
) -> None:
    """A 307 or 308 (a gateway, a moved service) would have httpx send the body again, to
    wherever it points: the token a second time (an exchange is single-use, never
    retried), the token and the visitor's ids to another host. The Node SDK fetches with
    ``redirect: "manual"``; a redirect is an ``APIError`` of its status."""
    reached: list[Seen] = []
    server.respond = lambda seen: Answer(status, headers={"Location": elsewhere.url + "/took"})

    def record(seen: Seen) -> Answer:
        reached.append(seen)
        return Answer(404)

    elsewhere.respond = record
    with pytest.raises(APIError) as caught:
        call(mode, operation, server.url, follow=True)
    assert caught.value.status == status
    assert reached == []


# Errors: no raw exception chained


RAW_FAILURES = {
    "timed out": Answer(200, b" " * 60, {"Content-Type": "application/json"}, drip=0.1),
    "refused by the parser": Answer(200, b"", {"X-Broken line": "x"}),
    "undecodable": Answer(200, b"not gzip", {"Content-Encoding": "gzip"}),
    "malformed date": Answer(
        200,
        b'{"anonymousId": "a", "preparedAt": "not a date"}',
        {"Content-Type": "application/json"},
    ),
}


def chain(error: BaseException) -> list[BaseException]:
    """The exceptions ``error`` chains, as a debugger, Sentry or ``error.__context__``
    reaches them whether or not a traceback prints them (``from None`` only hides them)."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found[1:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("failure", RAW_FAILURES)
def test_an_error_chains_no_raw_exception_holding_the_request(
    server: Misbehaving, mode: str, failure: str
) -> None:
    """``raise ... from None`` hides httpx's error from a printed traceback but keeps it as
    ``__context__``, and httpx's error holds the request: its ``Authorization`` header
    (the write key) and its body (the token). An error of this package chains nothing."""
    server.respond = lambda seen: RAW_FAILURES[failure]
    with pytest.raises(IdentityError) as caught:
        call(mode, "exchange", server.url, timeout=0.5)
    error = caught.value
    assert chain(error) == [], [repr(raw) for raw in chain(error)]
    credentials = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    logged = "".join(traceback.format_exception(error))
    for secret in (WRITE_KEY, credentials, TOKEN):
        assert secret not in logged


# One async client, event loops one after another


async def round_trip(client: AsyncIdentityClient, visitor: str) -> Identity:
    handoff = await client.prepare(anonymous_id=visitor, destination="http://b.localhost/")
    return await client.exchange(handoff.token)


def test_an_async_client_outlives_the_event_loop_it_was_used_in(service: Service) -> None:
    """A client made once (a module's global) and used from one ``asyncio.run`` after
    another (a sync view, a script, a test per loop): its pooled connections died with the
    first loop, and httpx raised a raw ``RuntimeError: Event loop is closed`` on the next
    call (a 500 through the middleware), and on ``aclose()`` too. The client now starts a
    new pool in the new loop."""
    client = AsyncIdentityClient(service.url, DEV_WRITE_KEY)
    assert asyncio.run(round_trip(client, "loop-1")).anonymous_id == "loop-1"
    assert asyncio.run(round_trip(client, "loop-2")).anonymous_id == "loop-2"
    asyncio.run(client.aclose())  # from a third loop: no error either
    with pytest.raises(RuntimeError, match="closed"):  # closed stays closed, as httpx's
        asyncio.run(round_trip(client, "loop-3"))


def test_an_async_client_in_use_in_a_live_loop_is_refused_in_another(service: Service) -> None:
    """Two loops at once (a server's, in a thread, and another): a connection belongs to
    its loop, so the second is refused with a ``ConfigurationError`` saying to make one
    client per loop, at once, rather than a raw error, a hang or a connection shared
    between two loops."""
    client = AsyncIdentityClient(service.url, DEV_WRITE_KEY)
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    try:
        first = asyncio.run_coroutine_threadsafe(round_trip(client, "live-1"), running)
        assert first.result(10).anonymous_id == "live-1"
        with pytest.raises(ConfigurationError, match="event loop"):
            asyncio.run(asyncio.wait_for(round_trip(client, "live-2"), 10))
        with pytest.raises(ConfigurationError, match="event loop"):
            asyncio.run(asyncio.wait_for(client.aclose(), 10))
        asyncio.run_coroutine_threadsafe(client.aclose(), running).result(10)
    finally:
        running.call_soon_threadsafe(running.stop)
        thread.join(10)
        running.close()


def test_an_http_client_of_a_closed_loop_is_a_configuration_error(service: Service) -> None:
    """Your own ``httpx.AsyncClient`` cannot be made anew: used after its loop closed, the
    call is a ``ConfigurationError``, not httpx's raw ``RuntimeError``."""
    client = AsyncIdentityClient(service.url, DEV_WRITE_KEY, http_client=httpx.AsyncClient())
    asyncio.run(round_trip(client, "own-1"))
    with pytest.raises(ConfigurationError, match="event loop"):
        asyncio.run(round_trip(client, "own-2"))


# One landing, requested twice at once: one exchange


def landing_path(client: IdentityClient, visitor: str) -> str:
    url = client.prepare(anonymous_id=visitor, destination="http://b.localhost/cart").redirect_url
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def visitor_cookies(set_cookies: list[str]) -> list[str]:
    return [
        value.split(";")[0].partition("=")[2]
        for value in set_cookies
        if value.startswith("ajs_anonymous_id=")
    ]


class SlowClient(IdentityClient):
    """A service slow to answer an exchange (the real one, 0.3 s later): the landings
    overlap however the threads are scheduled."""

    def exchange(self, token: str, **options: Any) -> Identity:
        time.sleep(0.3)
        return super().exchange(token, **options)


class SlowAsyncClient(AsyncIdentityClient):
    async def exchange(self, token: str, **options: Any) -> Identity:
        await asyncio.sleep(0.3)
        return await super().exchange(token, **options)


async def aiohttp_page(request: web.Request) -> web.Response:
    return web.Response(text="page")


async def test_the_aiohttp_middleware_exchanges_a_landing_requested_twice_at_once_once(
    service: Service, aiohttp_client: Any
) -> None:
    """The same handoff URL twice at once (a double click, a prefetch and the navigation):
    each request exchanged the token, the second found it used and set the visitor cookie
    to a generated id, and whichever answer the browser kept decided the visitor. Both now
    wait on the one exchange and set the handed-off id."""
    with IdentityClient(service.url, DEV_WRITE_KEY) as prepare:
        path = landing_path(prepare, "twice-aiohttp")
    async with SlowAsyncClient(service.url, DEV_WRITE_KEY) as client:
        app = web.Application(middlewares=[identity_middleware(client, cookie_secure=False)])
        app.router.add_get("/cart", aiohttp_page)
        browser: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        landed = await asyncio.gather(*(browser.get(path, allow_redirects=False) for _ in range(3)))
    for answer in landed:
        assert answer.status == 303
        assert visitor_cookies(answer.headers.getall("Set-Cookie")) == ["twice-aiohttp"]


async def test_the_asgi_middleware_exchanges_a_landing_requested_twice_at_once_once(
    service: Service,
) -> None:
    async def page(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"page"})

    with IdentityClient(service.url, DEV_WRITE_KEY) as prepare:
        path = landing_path(prepare, "twice-asgi")
    async with SlowAsyncClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityASGIMiddleware(page, client, cookie_secure=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as browser:
            landed = await asyncio.gather(*(browser.get(path) for _ in range(3)))
    for answer in landed:
        assert answer.status_code == 303
        assert visitor_cookies(answer.headers.get_list("set-cookie")) == ["twice-asgi"]


def test_the_wsgi_middleware_exchanges_a_landing_requested_twice_at_once_once(
    service: Service,
) -> None:
    def page(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"page"]

    with SlowClient(service.url, DEV_WRITE_KEY) as client:
        path = landing_path(client, "twice-wsgi")
        app = IdentityWSGIMiddleware(page, client, cookie_secure=False)
        barrier = threading.Barrier(3)

        def land() -> httpx.Response:
            transport = httpx.WSGITransport(app=app)
            with httpx.Client(transport=transport, base_url="http://b") as browser:
                barrier.wait(10)
                return browser.get(path)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            landed = list(pool.map(lambda _: land(), range(3)))
    for answer in landed:
        assert answer.status_code == 303
        assert visitor_cookies(answer.headers.get_list("set-cookie")) == ["twice-wsgi"]


async def test_bad_links_landing_at_once_still_get_ids_of_their_own(
    service: Service, aiohttp_client: Any
) -> None:
    """Landings are joined by their token only when it can be one: every bad link (an
    empty or over-long token) is exchanged as the same unknown token, and two visitors
    landing at once on bad links must not share a generated id."""
    async with AsyncIdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = web.Application(middlewares=[identity_middleware(client, cookie_secure=False)])
        app.router.add_get("/cart", aiohttp_page)
        browser: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        paths = ["/cart?handoff_token=", "/cart?handoff_token=" + "x" * 200]
        landed = await asyncio.gather(
            *(browser.get(path, allow_redirects=False) for path in paths * 2)
        )
    ids = [visitor_cookies(answer.headers.getall("Set-Cookie")) for answer in landed]
    assert all(len(found) == 1 for found in ids)
    assert len({found[0] for found in ids}) == len(ids)
