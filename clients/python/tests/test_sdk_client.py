"""IdentityClient and AsyncIdentityClient against the real service."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import DEV_WRITE_KEY, OTHER_WRITE_KEY, SHOP_WRITE_KEY, Service
from identity_client import (
    AsyncIdentityClient,
    AudienceMismatch,
    ConfigurationError,
    DestinationNotAllowed,
    IdentityClient,
    IdentityConnectionError,
    IdentityError,
    InvalidRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    TokenNotFound,
    Unauthorized,
)

from tests.redis_server import free_port

DESTINATION = "http://checkout.localhost:3000/cart?step=1"
PROBLEM = "urn:identity-service:problem:"


def test_round_trip_sync(service: Service) -> None:
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        handoff = client.prepare(
            anonymous_id="visitor-sync",
            user_id="user-42",
            destination=DESTINATION,
            traits={"plan": "pro"},
            context={"page": {"url": "http://shop.localhost/"}},
            consent={"analytics": True},
            ttl=60,
        )
        assert handoff.expires_in == 60
        assert handoff.expires_at.tzinfo is not None
        assert 0 < (handoff.expires_at - datetime.now(UTC)).total_seconds() <= 61
        query = parse_qs(urlsplit(handoff.redirect_url).query)
        assert query == {"step": ["1"], "handoff_token": [handoff.token]}
        assert handoff.token not in repr(handoff)

        identity = client.exchange(
            handoff.token,
            event="Checkout Started",
            properties={"cart": 3},
            context={"page": {"url": DESTINATION}},
        )
        assert identity.anonymous_id == "visitor-sync"
        assert identity.user_id == "user-42"
        assert identity.traits == {"plan": "pro"}
        assert identity.consent == {"analytics": True}
        assert identity.source == "handoff"
        assert identity.prepared_by == "dev"
        assert identity.prepared_at is not None
        assert identity.destination == DESTINATION

        with pytest.raises(TokenNotFound) as caught:
            client.exchange(handoff.token)
        assert caught.value.status == 404
        assert caught.value.type == PROBLEM + "token-not-found"
        assert caught.value.title
        assert caught.value.detail

        generated = client.exchange(handoff.token, fallback=True)
        assert generated.source == "generated"
        assert generated.anonymous_id != "visitor-sync"
        assert generated.user_id is None
        assert generated.prepared_by is None


async def test_round_trip_async(service: Service) -> None:
    async with AsyncIdentityClient(service.url, DEV_WRITE_KEY) as client:
        handoff = await client.prepare(user_id="user-async", destination=DESTINATION)
        identity = await client.exchange(handoff.token)
        assert identity.user_id == "user-async"
        assert identity.source == "handoff"
        with pytest.raises(TokenNotFound):
            await client.exchange(handoff.token)
        assert (await client.exchange(handoff.token, fallback=True)).source == "generated"
        with pytest.raises(Unauthorized):
            await AsyncIdentityClient(service.url, "wrong-key").exchange("x" * 43)


def test_environment_fallbacks(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDENTITY_URL", raising=False)
    monkeypatch.delenv("IDENTITY_WRITE_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="IDENTITY_URL"):
        IdentityClient()
    monkeypatch.setenv("IDENTITY_URL", service.url)
    with pytest.raises(ConfigurationError, match="IDENTITY_WRITE_KEY"):
        IdentityClient()
    monkeypatch.setenv("IDENTITY_WRITE_KEY", DEV_WRITE_KEY)
    with IdentityClient() as client:
        assert client.prepare("visitor-env", destination=DESTINATION).token
        assert DEV_WRITE_KEY not in repr(client)


def test_unauthorized_never_shows_the_key(service: Service) -> None:
    key = "a-wrong-write-key-that-must-not-leak"
    with IdentityClient(service.url, key) as client, pytest.raises(Unauthorized) as caught:
        client.prepare("visitor", destination=DESTINATION)
    error = caught.value
    assert error.status == 401
    assert error.type == PROBLEM + "unauthorized"
    assert key not in str(error)
    assert key not in repr(error)


def test_invalid_request_lists_field_errors(service: Service) -> None:
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.prepare("visitor", destination="ftp://checkout.localhost/", ttl=100_000)
        assert caught.value.status == 400
        assert caught.value.type == PROBLEM + "validation-failed"
        assert {error.field for error in caught.value.errors} == {"destination", "ttl"}
        with pytest.raises(InvalidRequest):
            client.prepare(destination=DESTINATION)  # no anonymous_id nor user_id
        with pytest.raises(PayloadTooLarge) as too_large:
            client.prepare("visitor", destination=DESTINATION, traits={"x": "y" * 20_000})
        assert too_large.value.status == 413


def test_destination_not_allowed_and_audience_mismatch(configured_service: Service) -> None:
    shop = IdentityClient(configured_service.url, SHOP_WRITE_KEY)
    other = IdentityClient(configured_service.url, OTHER_WRITE_KEY)
    with shop, other:
        with pytest.raises(DestinationNotAllowed) as refused:
            shop.prepare("visitor", destination="https://other.example.com/cart")
        assert refused.value.status == 403
        assert refused.value.type == PROBLEM + "destination-not-allowed"

        handoff = shop.prepare("visitor", destination="https://checkout.example.com/cart")
        with pytest.raises(AudienceMismatch) as mismatch:
            other.exchange(handoff.token, fallback=True)  # never a fallback for a mismatch
        assert mismatch.value.status == 403
        with pytest.raises(TokenNotFound):  # the mismatch used the token up
            shop.exchange(handoff.token)


def test_service_unavailable(down_service: Service) -> None:
    with IdentityClient(down_service.url, DEV_WRITE_KEY, max_retries=0) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            client.prepare("visitor", destination=DESTINATION)
        assert caught.value.status == 503
        assert caught.value.type == PROBLEM + "service-unavailable"
        assert caught.value.retry_after == 1.0
        with pytest.raises(ServiceUnavailable):
            client.exchange("t" * 43, fallback=True)


# Retries: a real HTTP server on loopback that fails the first requests, then proxies to the
# service.


class Stub:
    """Answers the first ``failures`` POSTs with 503 (``mode="503"``) or by closing the
    connection without an answer (``mode="drop"``), then proxies to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "503"
        self.failures = 0
        self.requests: list[str] = []
        self.bodies: list[bytes] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stub.requests.append(self.path)
                stub.bodies.append(body)
                if len(stub.requests) <= stub.failures:
                    if stub.mode == "drop":
                        self.close_connection = True
                        return
                    problem = (
                        b'{"type": "urn:identity-service:problem:service-unavailable", '
                        b'"title": "Unavailable", "status": 503, "detail": "stub"}'
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/problem+json")
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(problem)))
                    self.end_headers()
                    self.wfile.write(problem)
                    return
                answer = httpx.post(
                    stub.upstream + self.path,
                    content=body,
                    headers={
                        "Authorization": self.headers["Authorization"],
                        "Content-Type": "application/json",
                    },
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers["Content-Type"])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub(service: Service) -> Iterator[Stub]:
    server = Stub(service.url)
    yield server
    server.close()


def fast_client(url: str, max_retries: int = 2) -> IdentityClient:
    return IdentityClient(url, DEV_WRITE_KEY, max_retries=max_retries, backoff_base=0.01)


def test_prepare_retried_on_503(stub: Stub) -> None:
    stub.failures = 2
    with fast_client(stub.url) as client:
        handoff = client.prepare("visitor-retried", destination=DESTINATION)
        assert stub.requests == ["/v1/handoffs"] * 3
        assert client.exchange(handoff.token).anonymous_id == "visitor-retried"


def test_prepare_retries_are_bounded(stub: Stub) -> None:
    stub.failures = 5
    with fast_client(stub.url, max_retries=1) as client, pytest.raises(ServiceUnavailable):
        client.prepare("visitor", destination=DESTINATION)
    assert len(stub.requests) == 2


async def test_prepare_retried_on_connection_errors_async(stub: Stub) -> None:
    stub.mode = "drop"
    stub.failures = 2
    client = AsyncIdentityClient(stub.url, DEV_WRITE_KEY, backoff_base=0.01)
    async with client:
        handoff = await client.prepare("visitor-dropped", destination=DESTINATION)
    assert handoff.token
    assert len(stub.requests) == 3


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_exchange_never_retried(stub: Stub, mode: str) -> None:
    with fast_client(stub.url) as client:
        handoff = client.prepare("visitor", destination=DESTINATION)
        stub.requests.clear()
        stub.mode = mode
        stub.failures = 10
        expected = ServiceUnavailable if mode == "503" else IdentityConnectionError
        with pytest.raises(expected):
            client.exchange(handoff.token, fallback=True)
        assert stub.requests == ["/v1/handoffs/exchange"]


class CountingClient(IdentityClient):
    """Counts the request bodies it encodes."""

    encodings = 0

    def _encoded(self, body: dict[str, Any]) -> bytes:  # type: ignore[override]
        type(self).encodings += 1
        return super()._encoded(body)


class AsyncCountingClient(AsyncIdentityClient):
    encodings = 0

    def _encoded(self, body: dict[str, Any]) -> bytes:  # type: ignore[override]
        type(self).encodings += 1
        return super()._encoded(body)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_retried_prepare_encodes_its_body_once(stub: Stub, mode: str) -> None:
    """Each attempt sends the same bytes, encoded once for the call (they were encoded
    again for every retry)."""
    stub.failures = 2
    traits = {"plan": "pro", "items": list(range(50))}
    if mode == "sync":
        CountingClient.encodings = 0
        with CountingClient(stub.url, DEV_WRITE_KEY, backoff_base=0.01) as client:
            client.prepare("visitor-once", destination=DESTINATION, traits=traits)
        encodings = CountingClient.encodings
    else:

        async def run() -> None:
            AsyncCountingClient.encodings = 0
            async with AsyncCountingClient(stub.url, DEV_WRITE_KEY, backoff_base=0.01) as client:
                await client.prepare("visitor-once", destination=DESTINATION, traits=traits)

        asyncio.run(run())
        encodings = AsyncCountingClient.encodings
    assert stub.requests == ["/v1/handoffs"] * 3
    assert len(set(stub.bodies)) == 1
    assert encodings == 1


INVALID_RETRY_SETTINGS: list[dict[str, Any]] = [
    {"backoff_base": -0.5},
    {"backoff_base": float("nan")},
    {"backoff_base": float("inf")},
    {"backoff_base": "0.5"},
    {"backoff_max": -1.0},
    {"backoff_max": float("nan")},
    {"backoff_max": float("inf")},
    {"backoff_base": 1e300},  # time.sleep raised a raw OverflowError at the first retry
    {"backoff_max": 1e10},
    {"max_retries": -1},
    {"max_retries": 1.5},
    {"max_retries": "2"},
    # A bool is an int to Python: True was 1 s (or 1 retry), False 0 (Node refuses both).
    {"max_retries": True},
    {"max_retries": False},
    {"backoff_base": True},
    {"backoff_max": False},
]


@pytest.mark.parametrize("client_class", [IdentityClient, AsyncIdentityClient])
@pytest.mark.parametrize("settings", INVALID_RETRY_SETTINGS)
def test_invalid_retry_settings_are_refused_when_the_client_is_made(
    stub: Stub, client_class: type[IdentityClient | AsyncIdentityClient], settings: dict[str, Any]
) -> None:
    """The sync client raised a raw ValueError (time.sleep of a negative or nan delay) only
    at a prepare's first retry, the async one waited no time or for ever; now both refuse
    the setting at once, before any request."""
    name = next(iter(settings))
    with pytest.raises(ConfigurationError, match=name):
        client_class(stub.url, DEV_WRITE_KEY, **settings)
    assert stub.requests == []


INVALID_TIMEOUTS: list[object] = [
    -1.0,
    0,
    float("nan"),
    float("inf"),
    "5",
    None,
    httpx.Timeout(-1.0),
    httpx.Timeout(5.0, connect=float("nan")),
    httpx.Timeout(5.0, read=float("inf")),
    httpx.Timeout(5.0, pool=0),
    1e10,  # over what a socket or a sleep can wait: a raw OverflowError at every call
    httpx.Timeout(5.0, read=1e300),
    True,  # a bool is an int to Python: a timeout of 1 s (Node refuses it)
    False,
    httpx.Timeout(5.0, connect=True),
]


@pytest.mark.parametrize("client_class", [IdentityClient, AsyncIdentityClient])
@pytest.mark.parametrize("timeout", INVALID_TIMEOUTS, ids=repr)
def test_invalid_timeouts_are_refused_when_the_client_is_made(
    stub: Stub, client_class: type[IdentityClient | AsyncIdentityClient], timeout: object
) -> None:
    """Each of these made every call fail as an IdentityConnectionError (an outage, to
    whoever reads it) or a raw TypeError; now the client is refused at once, as a bad retry
    setting is, before any request."""
    with pytest.raises(ConfigurationError, match="timeout"):
        client_class(stub.url, DEV_WRITE_KEY, timeout=timeout)  # type: ignore[arg-type]
    assert stub.requests == []


@pytest.mark.parametrize(
    "timeout", [0.5, 3, httpx.Timeout(None), httpx.Timeout(5.0, connect=None)], ids=repr
)
def test_valid_timeouts_are_kept(stub: Stub, timeout: float | httpx.Timeout) -> None:
    with IdentityClient(stub.url, DEV_WRITE_KEY, timeout=timeout) as client:
        assert client.timeout == timeout
        handoff = client.prepare("visitor-timeout", destination=DESTINATION)
    assert handoff.token


@pytest.mark.parametrize("client_class", [IdentityClient, AsyncIdentityClient])
def test_no_backoff_at_all_is_a_valid_setting(
    client_class: type[IdentityClient | AsyncIdentityClient],
) -> None:
    client = client_class("http://127.0.0.1:1", DEV_WRITE_KEY, backoff_base=0, backoff_max=0)
    assert (client.backoff_base, client.backoff_max) == (0, 0)
    assert client._retry_delay(3, None) == 0
    assert client._retry_delay(0, 5.0) == 0


def test_connection_refused(service: Service) -> None:
    with fast_client(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(IdentityConnectionError) as caught:
            client.prepare("visitor", destination=DESTINATION)
        assert isinstance(caught.value, IdentityError)
        assert isinstance(caught.value, ConnectionError)
        assert DEV_WRITE_KEY not in repr(caught.value)


# Timeouts and connection reuse: real sockets on loopback, counted where they are accepted.


class Listener:
    """Accepts connections on loopback and counts them; with ``upstream``, relays each to
    it byte for byte (a TCP proxy), else holds it open and never answers."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = urlsplit(upstream) if upstream else None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)
            if self.upstream is not None:
                up = socket.create_connection((self.upstream.hostname, self.upstream.port))
                self.accepted.append(up)  # closed with the rest
                for source, sink in ((conn, up), (up, conn)):
                    relay = threading.Thread(target=_pump, args=(source, sink), daemon=True)
                    relay.start()

    def connections(self, expected: int) -> int:
        """How many connections came in, once ``expected`` have (or after 5 s)."""
        deadline = time.monotonic() + 5
        while self.count() < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.count()

    def count(self) -> int:
        return len(self.accepted) // (1 if self.upstream is None else 2)

    def close(self) -> None:
        self.stopping.set()
        self.threads[0].join()
        self.server.close()
        for conn in self.accepted:
            conn.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def silent() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture
def proxy(service: Service) -> Iterator[Listener]:
    listener = Listener(service.url)
    yield listener
    listener.close()


def test_a_server_that_never_answers_times_prepare_out_after_its_retries(
    silent: Listener,
) -> None:
    timeout = httpx.Timeout(0.3, connect=2.0)
    with IdentityClient(
        silent.url, DEV_WRITE_KEY, timeout=timeout, max_retries=2, backoff_base=0.01
    ) as client:
        with pytest.raises(IdentityConnectionError) as caught:
            client.prepare("visitor", destination=DESTINATION)
        assert "timed out" in str(caught.value)
        assert silent.connections(3) == 3  # the first attempt and two retries

        with pytest.raises(IdentityConnectionError) as caught:
            client.exchange("t" * 43, fallback=True)
        assert "timed out" in str(caught.value)
        assert silent.connections(4) == 4  # one attempt: an exchange is never retried


def test_the_sync_client_reuses_one_connection(proxy: Listener) -> None:
    with IdentityClient(proxy.url, DEV_WRITE_KEY) as client:
        for n in range(3):
            handoff = client.prepare(f"reused-{n}", destination=DESTINATION)
            assert client.exchange(handoff.token).anonymous_id == f"reused-{n}"
    assert proxy.connections(1) == 1


async def test_the_async_client_reuses_one_connection(proxy: Listener) -> None:
    async with AsyncIdentityClient(proxy.url, DEV_WRITE_KEY) as client:
        for n in range(3):
            handoff = await client.prepare(f"reused-async-{n}", destination=DESTINATION)
            assert (await client.exchange(handoff.token)).anonymous_id == f"reused-async-{n}"
    assert proxy.connections(1) == 1


# A string that is not UTF-8 (a lone surrogate, as json.loads gives for "\ud800" in a
# browser's JSON body) or a number that is not JSON (NaN, as json.loads gives for NaN):
# a typed error from both clients, never a raw UnicodeEncodeError or ValueError.
NOT_UTF8 = "visitor-\ud800"
UNSENDABLE: list[tuple[str, dict[str, Any]]] = [
    ("prepare", {"anonymous_id": NOT_UTF8, "destination": DESTINATION}),
    ("prepare", {"anonymous_id": "v", "traits": {"t": NOT_UTF8}, "destination": DESTINATION}),
    ("exchange", {"token": NOT_UTF8 + "abcdefghijklmnop"}),
    ("exchange", {"token": "t" * 43, "fallback": True, "context": {"page": {"url": NOT_UTF8}}}),
    ("prepare", {"anonymous_id": "v", "traits": {"n": float("nan")}, "destination": DESTINATION}),
    ("exchange", {"token": "t" * 43, "fallback": True, "context": {"x": float("inf")}}),
    # Not JSON at all: a datetime, a set.
    (
        "prepare",
        {"anonymous_id": "v", "traits": {"since": datetime.now(UTC)}, "destination": DESTINATION},
    ),
    ("exchange", {"token": "t" * 43, "fallback": True, "properties": {"tags": {"a"}}}),
]


def call_with(service: Service, mode: str, operation: str, kwargs: dict[str, Any]) -> object:
    if mode == "sync":
        with IdentityClient(service.url, DEV_WRITE_KEY, max_retries=0) as client:
            return getattr(client, operation)(**kwargs)

    async def run() -> object:
        async with AsyncIdentityClient(service.url, DEV_WRITE_KEY, max_retries=0) as client:
            return await getattr(client, operation)(**kwargs)

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("operation", "kwargs"), UNSENDABLE)
def test_input_that_cannot_be_sent_as_json_is_a_typed_error(
    service: Service, mode: str, operation: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(InvalidRequest):
        call_with(service, mode, operation, kwargs)
