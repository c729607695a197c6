"""The clients held to what httpx and openai-python promise a caller: a call is one request
to the service and nowhere else (no redirect followed), its errors chain no raw exception,
and an async client survives a new event loop; the middlewares exchange one landing once."""

from __future__ import annotations

import asyncio
import base64
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
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
from misbehaving import Answer, Misbehaving, Seen, misbehaving

WRITE_KEY = "review-write-key-0123456789"
TOKEN = "review-token-0123456789abcdef0123456789abcd"
VISITOR = "visitor-review-42"
MODES = ["sync", "async"]
OPERATIONS = ["prepare", "exchange"]


@pytest.fixture
def server() -> Iterator[Misbehaving]:
    with misbehaving() as started:
        yield started


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
