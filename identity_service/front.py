"""The HTTP front: the one HTTP/1.1 parser of every connection, and the two hot endpoints.

Every byte a client sends is read here, by llhttp (through httptools) in its strict mode,
so no other parser can frame the same bytes differently and no request can be smuggled
past this one. The front enforces what a server facing the internet must: a head of at
most 8,190 bytes and 128 fields, a body within ``max_body_bytes`` (chunked or not, and
after ``gzip``/``deflate`` decoding), a head within ``head_timeout`` and a body within
``body_timeout`` of their first byte, and at most ``max_connections`` connections. What
breaks a rule is answered with an RFC 9457 problem that echoes nothing of the request,
and logged as one request line without a header value or a traceback.

A connection over ``max_connections`` is answered 503 with ``Retry-After`` and closed,
unless its first request is a ``GET`` or ``HEAD`` of ``/healthz``: that one gets /healthz's
own 200, so that a kubelet's liveness probe never restarts a pod for being busy (which would
move its load to the next pod, and saturate it in turn). Its head is read within a few
bytes and a second, and only so many such connections are held at once (``_Turnaway``).

Prepare and exchange sit on every cross-domain click, and aiohttp's request and response
objects cost more CPU than the handoff itself: a ``POST`` to either is answered through
handoff_api.py with one ``write``. Every other request is handed, already parsed, to the
aiohttp application (its router, middleware and handlers, with aiohttp's response writer),
and the connection stays with the front. Answers go out in the order of the requests.
"""

import asyncio
import contextvars
import functools
import math
import os
import socket
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
import orjson
import structlog
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from identity_service import app_keys
from identity_service.constants import MAX_HEAD_BYTES, MAX_HEADERS
from identity_service.handlers import HEALTH
from identity_service.handoff_api import Call, HandoffApi
from identity_service.metrics import OTHER
from identity_service.middleware import (
    AMP_PATH_PREFIX,
    SECURITY_HEADERS,
    log_request,
    problem_for,
    problem_response,
    start_request,
)
from identity_service.problems import (
    PROBLEM_CONTENT_TYPE,
    ExpectationFailed,
    HeadTooLarge,
    MalformedRequest,
    PayloadTooLarge,
    Problem,
    RequestTimeout,
    ServiceUnavailable,
    TransferCodingNotImplemented,
    UnsupportedContentEncoding,
)
from identity_service.urls import host_port

logger = structlog.get_logger("identity_service.request")

IDLE_TIMEOUT_SECONDS = 75.0
# How long a refused connection is still read (and what is read dropped) before it closes.
LINGER_SECONDS = 2.0
# Connections turned away over max_connections that may be held at once (_Turnaway).
MAX_LINGERING_TURNAWAYS = 256
# How much of a turned-away connection's head, and for how long, is read for a liveness
# probe (``GET /healthz``) before it is answered 503.
TURNAWAY_HEAD_BYTES = 2048
TURNAWAY_HEAD_SECONDS = 1.0
_HEALTHZ = "/healthz"
_HEALTHY = orjson.dumps(HEALTH)
_PROBE_METHODS = (b"GET", b"HEAD")
# Parsed requests a connection may queue before it is read no further.
MAX_QUEUED_REQUESTS = 64
# What llhttp is given at a time of a read larger than this: a read of 256 KB of tiny
# pipelined requests made 8,000 queued requests (800 bytes each, 6 MB) before the queue's
# bound was looked at. Past the bound, the rest of the read waits, unparsed.
FEED_BYTES = 4096
_NEVER = math.inf

# Headers read from every request; any other is kept only for the application.
_HOST = b"host"
_SINGLE = {_HOST, b"authorization", b"content-type", b"content-encoding", b"x-request-id"}
_SECURITY_LINES = "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items())
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# RFC 9110's deflate is the zlib format; both are read with zlib's own decoder.
_DEFLATE = zlib.MAX_WBITS
# How much of a coded body the decoder is given at a time (decoded).
_FEED_BYTES = 1024
_CODINGS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": _DEFLATE}

Endpoint = Callable[[HandoffApi, Call], Awaitable[tuple[int, dict[str, Any]]]]
_ENDPOINTS: dict[bytes, Endpoint] = {
    b"/v1/handoffs": HandoffApi.prepare,
    b"/v1/handoffs/exchange": HandoffApi.exchange,
}
# AMP's collect (with [amp]): GET or POST, method, target, raw headers, body and peername in,
# a bodiless answer's status and header fields out (amp/collect.py).
_COLLECT_PATH = b"/v1/amp/collect"
_COLLECT_METHODS = frozenset({"GET", "POST"})
Collect = Callable[
    [str, bytes, list[tuple[bytes, bytes]], bytes, Any],
    Awaitable[tuple[int, dict[str, str]]],
]
# What an endpoint answers: status, content type (None: no body), body, header fields.
_Answer = tuple[int, str | None, bytes, dict[str, str]]


class Request:
    """A request as the front parsed it."""

    __slots__ = (
        "body",
        "chunks",
        "collect",
        "encoding",
        "endpoint",
        "expect_continue",
        "fields",
        "head_size",
        "http10",
        "keep_alive",
        "method",
        "path",
        "raw_headers",
        "target",
        "url",
    )

    def __init__(self) -> None:
        self.target = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.chunks: list[bytes] = []
        self.body = b""
        self.method = "GET"
        self.path = ""
        self.endpoint: Endpoint | None = None
        self.collect = False  # answered by AMP's collect
        self.fields: dict[bytes, bytes] = {}
        self.keep_alive = True
        self.http10 = False
        self.encoding = b""
        self.expect_continue = False  # a 100 Continue is owed before the body
        self.url: URL | None = None  # for the application: the target as aiohttp reads it

    def text(self, name: bytes) -> str | None:
        value = self.fields.get(name)
        return None if value is None else value.decode("latin-1")


class Refusal:
    """A request that broke a rule of HTTP or of the front: answered, then the connection
    closes, since what follows it on the connection cannot be framed or trusted."""

    __slots__ = ("path", "problem")

    def __init__(self, problem: Problem, path: str) -> None:
        self.problem = problem
        self.path = path  # "" when the head was not read as far as the target


class FrontServer(web.Server):
    """aiohttp's protocol factory, with the front as the protocol new connections get."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        # What Application._make_handler builds; the front hands parsed requests to it.
        handle = cast(Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], app._handle)
        super().__init__(handle, request_factory=app._make_request, **kwargs)
        # The app has started (its cleanup_ctx ran): what requests need is read once here.
        # None in an app without the handoff endpoints (the forwarder's metrics port).
        self.api = app.get(app_keys.API)
        self.metrics = app[app_keys.METRICS]
        self.settings = app[app_keys.SETTINGS]
        self.collect = _collect_endpoint(app)
        self.max_body_bytes = self.settings.max_body_bytes
        self.head_timeout = self.settings.head_timeout
        self.body_timeout = self.settings.body_timeout
        # Unanswered request bytes a connection may hold before it is no longer read.
        self.read_limit = MAX_HEAD_BYTES + self.max_body_bytes
        # Raw bytes a body may take on the wire: chunk framing and trailers on top of it.
        self.framed_body_limit = 2 * (self.max_body_bytes + MAX_HEAD_BYTES)
        self.front_connections: set[FrontProtocol] = set()
        self.lingering_turnaways = 0  # connections turned away, not closed yet (_Turnaway)
        self._sweep_every = min(1.0, self.head_timeout / 4, self.body_timeout / 4)
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        at_limit = len(self.front_connections) >= self.settings.max_connections
        if at_limit and not self._close_a_kept_alive_connection():
            return _Turnaway(self)
        return FrontProtocol(self)

    def _close_a_kept_alive_connection(self) -> bool:
        """At the limit: close a connection kept alive between requests, for the new one.

        Such a connection holds its place for the idle time (75 s) with nothing to answer:
        one request every 75 s a connection would otherwise keep every new client out. A
        connection with a request begun, queued or being answered is never closed here.
        """
        for connection in self.front_connections:
            if connection.waits_for_a_request:
                connection.close_kept_alive()
                return True
        return False

    def pre_shutdown(self) -> None:
        for connection in list(self.front_connections):
            connection.close_when_idle()
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Let the requests in flight finish, within ``timeout``, then close what is left."""
        deadline = self._loop.time() + (timeout if timeout is not None else 60.0)
        # Polled: it runs once, at shutdown, over connections that each finish on their own
        # (the sweep still times out slow bodies meanwhile).
        while any(c.busy for c in self.front_connections) and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.front_connections):
            connection.abort()
        await super().shutdown(max(0.0, deadline - self._loop.time()))

    def _sweep(self) -> None:
        """Time out slow heads and bodies, stalled readers and idle connections (one timer)."""
        now = self._loop.time()
        for connection in list(self.front_connections):
            if connection.deadline < now or connection.stalled_until < now:
                connection.timed_out(now)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)


class FrontRunner(web.AppRunner):
    """An AppRunner whose sites listen with the front (see the module docstring)."""

    async def _make_server(self) -> web.Server:
        await super()._make_server()
        return FrontServer(self.app, loop=asyncio.get_running_loop(), **self._kwargs)


class BindError(Exception):
    """The address cannot be listened on (taken, not this host's, not allowed). ``what``:
    which of the process's ports it is, when it has more than one ("metrics port")."""

    def __init__(self, host: str, port: int, exc: OSError, what: str = "") -> None:
        address = host_port(host, port)
        if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
            reason = exc.strerror or str(exc)
        else:  # not the event loop's text, which repeats the address as a tuple
            reason = os.strerror(exc.errno)
        super().__init__(f"{what + ': ' if what else ''}cannot listen on {address}: {reason}")


async def listen(
    runner: web.AppRunner, host: str, port: int, *, reuse_port: bool = False, what: str = ""
) -> None:
    """Have ``runner`` (set up) listen on ``host``:``port``; BindError (``what``) if it
    cannot."""
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    except OSError as exc:
        raise BindError(host, port, exc, what) from exc


class _Turnaway(asyncio.Protocol):
    """A connection over ``max_connections``: answered 503, or 200 to a liveness probe.

    Its first request is read as far as the end of its head, by llhttp (httptools), within
    ``TURNAWAY_HEAD_BYTES`` and ``TURNAWAY_HEAD_SECONDS`` (or the head timeout, if shorter):
    a ``GET`` or ``HEAD`` of ``/healthz`` gets the answer ``/healthz`` always gives (the
    process and its loop are alive, which this answer proves; a kubelet must not restart a
    pod for being busy), anything else, or nothing in time, a 503 with ``Retry-After``.
    ``/readyz`` too: the pod can take no more. Only the 503s are counted
    (``identity_connections_refused_total``); the 200 is logged and counted as any /healthz.

    Closing with the client's request unread would make the kernel reset the connection,
    and the client could lose the answer: the writing side ends, and what the client sends
    is dropped, as the front's own lingering close does, until ``LINGER_SECONDS`` after
    the connection was made. At most ``MAX_LINGERING_TURNAWAYS`` are held at once, read or
    lingering: in a flood of connections, the next ones are told 503 and closed at once, as
    a bound on the sockets (and parsers) held beyond ``max_connections``.
    """

    def __init__(self, server: "FrontServer") -> None:
        self._server = server
        self._loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = None  # None once answered
        self._room = TURNAWAY_HEAD_BYTES  # bytes still given to the parser
        self._target = b""
        self._request_id: bytes | None = None
        self._until = 0.0  # when the connection is dropped, answered or not
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        connection = self._transport = cast(asyncio.Transport, transport)
        if server.lingering_turnaways >= MAX_LINGERING_TURNAWAYS or not connection.can_write_eof():
            self._refuse()
            connection.close()
            return
        server.lingering_turnaways += 1
        self._parser = httptools.HttpRequestParser(self)
        now = self._loop.time()
        self._until = now + LINGER_SECONDS
        read_for = min(TURNAWAY_HEAD_SECONDS, server.head_timeout)
        self._timer = self._loop.call_at(now + read_for, self._answer, False)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # answered: dropped
        piece = data[: self._room]
        self._room -= len(piece)
        try:
            parser.feed_data(piece)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._answer(False)
        if self._room <= 0:
            self._answer(False)  # the head is over the bound (a no-op once answered)

    def eof_received(self) -> bool:
        self._answer(False)
        return False  # the transport closes: both sides are done

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._server.lingering_turnaways -= 1
        if self._parser is not None:
            self._server.metrics.inc("identity_connections_refused_total")  # left unanswered
        self._transport = None

    # llhttp's callbacks (httptools): the head of the first request

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self._request_id = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None:
            return  # a request after the first, which was answered
        target = self._target
        self._answer(
            parser.get_method() in _PROBE_METHODS
            and parser.get_http_version() in ("1.1", "1.0")
            and b"#" not in target
            and _absolute_path(target) == _HEALTHZ
        )

    def _answer(self, alive: bool) -> None:
        """Answer ``/healthz`` (``alive``) or the 503, once; then linger until ``_until``."""
        transport = self._transport
        if self._parser is None or transport is None:
            return
        method = self._parser.get_method() if alive else b""
        self._parser = None
        if alive:
            transport.write(contextvars.Context().run(self._healthy, method.decode("ascii")))
        else:
            self._refuse()
        transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._until, transport.abort)

    def _healthy(self, method: str) -> bytes:
        """/healthz's answer (handlers.healthz), logged and counted as the application's."""
        started = time.perf_counter()
        sent_id = self._request_id
        request_id = start_request(None if sent_id is None else sent_id.decode("latin-1"))
        log_request(self._server.metrics, _HEALTHZ, method, _HEALTHZ, 200, started, None)
        answer = _response(200, "application/json", _HEALTHY, request_id, {"Connection": "close"})
        return answer if method != "HEAD" else answer[: -len(_HEALTHY)]

    def _refuse(self) -> None:
        """Today's answer over ``max_connections``: 503 with Retry-After, counted."""
        server = self._server
        server.metrics.inc("identity_connections_refused_total")
        problem = ServiceUnavailable(
            "the server holds as many connections as it may; retry later",
            server.settings.retry_after,
        )
        cast(asyncio.Transport, self._transport).write(
            problem_answer(problem, None, keep_alive=False)
        )


class AppBridge(BaseProtocol):
    """What aiohttp's request and response writer need of a connection, for the front's."""

    __slots__ = ("max_field_size", "max_headers", "peername", "sockname", "ssl_context")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        super().__init__(loop)
        self.transport = transport
        self.ssl_context = transport.get_extra_info("sslcontext")
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self.max_field_size = MAX_HEAD_BYTES
        self.max_headers = MAX_HEADERS


class FrontProtocol(asyncio.Protocol):
    """One client connection: parses its requests and answers them in order."""

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self._loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._request = Request()
        self._queue: deque[Request | Refusal] = deque()
        self._bridge: AppBridge | None = None
        self._in_message = False
        self._in_head = False
        # Bytes of the head (or of the body) in progress: the read it began in is not
        # counted, the later ones are, a bound of what llhttp may be holding unparsed.
        self._part_began_in_this_read = False
        self._bytes_in_later_reads = 0
        self._body_size = 0
        self._trailer_bytes = 0
        self._queued_bytes = 0
        self._refused = False  # nothing more is read from this connection
        self._lingering = False  # the last answer is sent; waits for the client to close
        self._closed = False  # closed, perhaps with answers the client has not read yet
        self._closing = False
        self._read_paused = False
        self._write_blocked = False
        self._unfed = b""  # the rest of a read, parsed once the queue drains
        self._eof_after_unfed = False  # the client's end of the stream came after it
        self.idle = True  # no request of this connection is being answered
        self._answered = False  # an answer was sent, and the connection kept alive after it
        self.deadline = self._loop.time() + server.head_timeout
        # Set while the client does not read its answers: then it must, within the idle time.
        self.stalled_until = _NEVER

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        self._server.front_connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.front_connections.discard(self)
        self._transport = None
        if self._bridge is not None:
            self._bridge.connection_lost(exc)

    def eof_received(self) -> bool:
        if self._lingering:
            return False
        if self._unfed and not self._refused:
            self._eof_after_unfed = True  # once the bytes before it are parsed
            return True
        if self._in_message and not self._refused:
            self._refuse(MalformedRequest("the connection ended inside a request"))
        # A client that half-closes after its requests still gets their answers.
        self._refused = self._closing = True
        return self.busy

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._unfed:  # not expected: reading is paused while bytes wait
            data, self._unfed = self._unfed + data, b""
        if len(data) <= FEED_BYTES:
            self._feed(data)
        else:
            view = memoryview(data)
            for start in range(0, len(data), FEED_BYTES):
                if self._refused:
                    break
                if self._queue_full():  # the rest waits for the answers (_feed_unfed)
                    self._unfed = bytes(view[start:])
                    break
                self._feed(view[start : start + FEED_BYTES])
        self._next()

    def _feed_unfed(self) -> None:
        """Parse the bytes of a read that waited for the queue to drain, then an end of the
        stream that came after them."""
        data, self._unfed = self._unfed, b""
        self.data_received(data)
        if self._eof_after_unfed and not self._unfed:
            self._eof_after_unfed = False
            if not self.eof_received() and self._transport is not None:
                self._transport.close()

    def _feed(self, data: bytes | memoryview) -> None:
        self._part_began_in_this_read = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asked to switch protocols: it is answered as HTTP, then closed.
            self._refused = True
            self._pause_reading()
            last = self._queue[-1] if self._queue else None
            if isinstance(last, Request):
                last.keep_alive = False
                if _declares_a_body(last):
                    # httptools leaves an upgrade's body unread (the bytes after the head
                    # belong to the new protocol): it would be served without its body.
                    self._queue[-1] = Refusal(
                        MalformedRequest(
                            "a request that asks to switch protocols may carry no body: "
                            "none is switched to"
                        ),
                        last.path,
                    )
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, Problem):
                raise
            self._refuse(cause)
        except httptools.HttpParserError as exc:
            # llhttp's reasons are fixed texts ("Invalid header value char"): no request bytes.
            self._refuse(MalformedRequest(f"the request is not valid HTTP/1.1: {exc}"))
        else:
            if self._in_message and not self._part_began_in_this_read:
                self._bound_unparsed(len(data))
        if self._queue_full():
            # A client sending far ahead of the answers waits until they are written.
            self._pause_reading()

    def _bound_unparsed(self, size: int) -> None:
        """Refuse a head or body whose bytes outgrow its limit before llhttp has framed it."""
        self._bytes_in_later_reads += size
        if self._in_head and self._bytes_in_later_reads > MAX_HEAD_BYTES:
            self._refuse(HeadTooLarge(f"the head must be at most {MAX_HEAD_BYTES} bytes"))
        elif not self._in_head and self._bytes_in_later_reads > self._server.framed_body_limit:
            self._refuse(PayloadTooLarge("the body's chunks and trailers are far over the limit"))

    def _queue_full(self) -> bool:
        return (
            len(self._queue) >= MAX_QUEUED_REQUESTS or self._queued_bytes > self._server.read_limit
        )

    def pause_writing(self) -> None:
        # A client that does not read its answers gets no more of them, and is not read.
        self._write_blocked = True
        self.stalled_until = self._loop.time() + IDLE_TIMEOUT_SECONDS
        self._pause_reading()
        if self._bridge is not None:
            self._bridge.pause_writing()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self.stalled_until = _NEVER
        if self._bridge is not None:
            self._bridge.resume_writing()
        self._next()

    # llhttp's callbacks (httptools), in the order of the bytes

    def on_message_begin(self) -> None:
        self._request = Request()
        self._in_message = self._in_head = self._part_began_in_this_read = True
        self._bytes_in_later_reads = 0
        self._body_size = self._trailer_bytes = 0
        self.deadline = self._loop.time() + self._server.head_timeout

    def on_url(self, url: bytes) -> None:
        request = self._request
        request.target += url
        request.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A chunked body's trailer: never a header of the request, and bounded as one.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > MAX_HEAD_BYTES:
                raise HeadTooLarge(f"the trailer must be at most {MAX_HEAD_BYTES} bytes")
            return
        request = self._request
        request.raw_headers.append((name, value))
        # The field as sent, give or take optional white space around the value.
        request.head_size += len(name) + len(value) + 4
        if len(request.raw_headers) > MAX_HEADERS:
            raise HeadTooLarge(f"a request may carry at most {MAX_HEADERS} header fields")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._part_began_in_this_read = True  # the body's bytes are counted from here
        self._bytes_in_later_reads = 0
        request = self._request
        parser = self._parser
        # The request line: "METHOD SP target SP HTTP/1.1 CRLF"; the blank line that ends it.
        request.head_size += len(parser.get_method()) + 13
        if request.head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge(f"the head must be at most {MAX_HEAD_BYTES} bytes")
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise MalformedRequest("only HTTP/1.1 and HTTP/1.0 are served")
        request.http10 = version == "1.0"
        request.keep_alive = parser.should_keep_alive()
        request.method = parser.get_method().decode("ascii")
        # Known to a refusal too. An absolute-form target's path alone: its authority may
        # hold user information, a credential, which no log line may carry.
        path = request.target.partition(b"?")[0]
        if path.startswith(b"/"):
            request.path = path.decode("utf-8", "surrogateescape")
        else:
            request.path = _absolute_path(request.target)
        if b"#" in request.target:
            # A fragment is no part of a request target (RFC 9112, 3.2), and browsers never
            # send one (WHATWG). Read as sent, /healthz#x named no route, /healthz?x#y was
            # /healthz with "#y" in its query, and an absolute form's was dropped.
            raise MalformedRequest("the request target must not carry a fragment (#)")
        fields = request.fields
        expectations: list[bytes] = []
        codings: list[bytes] = []
        for raw_name, value in request.raw_headers:
            name = raw_name.lower()
            if name in _SINGLE:
                if name in fields:
                    raise MalformedRequest(f"the {name.decode()} header must appear once")
                fields[name] = value
            elif name == b"expect":
                expectations += _list_elements(value)
            elif name == b"content-length" and int(value) > self._server.max_body_bytes:
                raise PayloadTooLarge(
                    f"the body must be at most {self._server.max_body_bytes} bytes"
                )
            elif name == b"transfer-encoding":
                codings += _list_elements(value)
        if codings:
            if codings[-1] != b"chunked":  # RFC 9112, 6.3: no length to read
                raise MalformedRequest("a request's last transfer coding must be chunked")
            if len(codings) > 1:
                # llhttp frames the body by its chunks and never reads the codings before
                # them: the body would be taken for what it is not.
                raise TransferCodingNotImplemented("the only transfer coding served is chunked")
            if request.http10:
                # RFC 9112, 6.1: HTTP/1.0 has no chunks, so its framing is not to be trusted
                # (an HTTP/1.0 hop would not have framed it so): served, then closed.
                request.keep_alive = False
        if _HOST not in fields and not request.http10:
            raise MalformedRequest("an HTTP/1.1 request must carry a Host header")
        coding = fields.get(b"content-encoding")
        if coding is not None:
            # A list too; identity is no coding (RFC 9110, 8.4.1). Two codings are refused.
            request.encoding = b",".join(c for c in _list_elements(coding) if c != b"identity")
        if request.method == "POST" and self._server.api is not None:
            request.endpoint = _ENDPOINTS.get(path)
        if path == _COLLECT_PATH and self._server.collect is not None:
            request.collect = request.method in _COLLECT_METHODS
        if request.endpoint is None and not request.collect:
            request.url = _target_url(request.target)
        if expectations:
            if any(expectation != b"100-continue" for expectation in expectations):
                raise ExpectationFailed("the only expectation served is 100-continue")
            # HTTP/1.0 clients do not wait for it (RFC 9110, 10.1.1).
            request.expect_continue = not request.http10
            self._send_continue()
        self.deadline = self._loop.time() + self._server.body_timeout

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._server.max_body_bytes:
            raise PayloadTooLarge(f"the body must be at most {self._server.max_body_bytes} bytes")
        self._request.chunks.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        request = self._request
        chunks = request.chunks
        request.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        request.expect_continue = False
        self._queued_bytes += len(request.body)
        self._queue.append(request)
        self.deadline = _NEVER
        if self._closing:
            self._read_no_more()  # the request that was arriving when the server began to stop

    def _send_continue(self) -> None:
        """Send the 100 Continue the request in progress is owed, once nothing is before it."""
        request = self._request
        ready = self.idle and not self._queue and not request.chunks
        if request.expect_continue and ready and self._transport is not None:
            request.expect_continue = False
            self._transport.write(_CONTINUE)

    # Answering

    @property
    def busy(self) -> bool:
        """A request is being answered, waits to be, or its body has started to arrive.

        A head still arriving does not count: at shutdown it is not waited for.
        """
        return not self.idle or bool(self._queue) or (self._in_message and not self._in_head)

    @property
    def waits_for_a_request(self) -> bool:
        """Kept alive after an answer, and nothing of a next request read or queued."""
        return (
            self._answered
            and self.idle
            and not self._queue
            and not self._unfed
            and not self._in_message
            and not self._refused
            and self._transport is not None
        )

    def close_kept_alive(self) -> None:
        """Close a connection that waits for a request (HTTP lets a server close an idle
        connection at any time; RFC 9112, 9.5); its place is free at once."""
        self._server.front_connections.discard(self)
        self._refused = self._closed = True
        if self._transport is None:
            return
        if self._write_blocked:
            self._transport.abort()  # a client that does not read its answers: not waited for
        else:
            self._transport.close()  # after the rest of the last answer

    @property
    def _last_answer(self) -> bool:
        """The answer being made is the connection's last: it is closing (the client
        half-closed, or the server stops) and no request read before waits behind it."""
        return self._closing and not self._queue

    def close_when_idle(self) -> None:
        """Answer the requests read (and one still arriving), read no more, then close."""
        self._closing = True
        if not self._in_message:
            self._read_no_more()
        if not self.busy:
            self._end()

    def _read_no_more(self) -> None:
        self._refused = True
        self._pause_reading()

    def abort(self) -> None:
        """Drop the connection now, with whatever it has not sent."""
        if self._transport is not None:
            self._transport.abort()

    def timed_out(self, now: float) -> None:
        if self._lingering or self._closed or self.stalled_until < now:
            # Done with, or a client that does not read what it asked for.
            self.abort()
        elif self._in_message and not self._refused:
            what = "head" if self._in_head else "body"
            limit = self._server.head_timeout if self._in_head else self._server.body_timeout
            self._refuse(RequestTimeout(f"the request's {what} must arrive within {limit:g} s"))
        elif self.idle and not self._queue:
            self._end()

    def _refuse(self, problem: Problem) -> None:
        """Answer ``problem`` after the requests before it, then close; read no more."""
        self._refused = True
        self._in_message = False
        self.deadline = _NEVER
        self._pause_reading()
        self._queue.append(Refusal(problem, self._request.path))
        self._next()

    def _next(self) -> None:
        while self.idle and not self._write_blocked and self._queue:
            item = self._queue.popleft()
            if isinstance(item, Refusal):
                contextvars.Context().run(self._answer_refusal, item.problem, item.path)
                return
            self._queued_bytes -= len(item.body)
            self.idle = False
            # A task per request, in an empty context: nothing bound for one request's logs
            # can leak into another's.
            direct = item.endpoint is not None or item.collect
            answer = self._answer if direct else self._answer_with_app
            self._loop.create_task(answer(item), context=contextvars.Context())
        if not self._queue and self.idle:
            if self._in_message:
                self._send_continue()
            else:
                self.deadline = self._loop.time() + IDLE_TIMEOUT_SECONDS
        if not self._refused and not self._write_blocked and not self._queue_full():
            if self._unfed:
                self._feed_unfed()
            else:
                self._resume_reading()

    def _answer_refusal(self, problem: Problem, path: str, request: Request | None = None) -> None:
        """Answer ``problem`` (no ``instance``, nothing of the request) and close.

        ``path``: the request's, when its head was read that far. ``request``: a request
        read whole but refused for its body, logged as a request; a malformed one is
        logged without its method or path.
        """
        started = time.perf_counter()
        metrics = self._server.metrics
        if request is None:
            request_id = start_request(None)
            log_request(metrics, OTHER, "-", "-", problem.status, started, problem)
        else:
            request_id = start_request(request.text(b"x-request-id"))
            route = metrics.route_of(path)
            log_request(metrics, route, request.method, path, problem.status, started, problem)
        transport = self._transport
        if transport is None:
            return
        # As every answer under AMP's paths: an AMP cache must not reuse it for another origin.
        vary = {"Vary": "Origin"} if path.startswith(AMP_PATH_PREFIX) else None
        transport.write(problem_answer(problem, request_id, keep_alive=False, extra=vary))
        self._end()

    def _decode_or_refuse(self, request: Request) -> bool:
        """Decode the request's body from its content coding (``request.encoding``); when
        it cannot be, the request is refused as one that breaks the front's rules, and
        False returned."""
        try:
            request.body = decoded(request.body, request.encoding, self._server.max_body_bytes)
            request.encoding = b""
        except Problem as problem:
            self.idle = True
            self._answer_refusal(problem, request.path, request)
            return False
        return True

    def _end(self) -> None:
        """Close after the last answer.

        Closing with unread bytes would make the kernel reset the connection, and the client
        could lose the answer: the writing side ends, then what the client still sends is
        read and dropped for a little while (a "lingering close"); a client that does not
        read the answers is dropped by the sweep.
        """
        transport = self._transport
        if transport is None or self._closed or self._lingering:
            return
        self._refused = True
        self.deadline = self._loop.time() + LINGER_SECONDS
        if transport.can_write_eof():
            transport.write_eof()
            self._lingering = True
            self._read_paused = True
            self._resume_reading()
        else:
            self._closed = True
            transport.close()

    async def _answer(self, request: Request) -> None:
        if request.encoding and not self._decode_or_refuse(request):
            return
        started = time.perf_counter()
        request_id = start_request(request.text(b"x-request-id"))
        server = self._server
        problem: Problem | None = None
        content_type: str | None
        try:
            if request.collect:
                status, content_type, payload, extra = await self._collect(request)
            else:
                status, content_type, payload, extra = await self._handoff(request)
        except Exception as exc:
            problem = problem_for(exc, server.metrics, server.settings)
            status, content_type = problem.status, PROBLEM_CONTENT_TYPE
            # A fixed route's path: the endpoint matched it byte for byte (problem_instance).
            payload = orjson.dumps(problem.body(instance=request.path))
            extra = problem.headers()
            if request.collect:
                extra["Vary"] = "Origin"  # as every answer of collect's
        keep_alive = request.keep_alive and not self._last_answer
        if not keep_alive:
            extra["Connection"] = "close"
        elif request.http10:
            extra["Connection"] = "keep-alive"
        # Answered here: the path is one of the front's routes.
        log_request(
            server.metrics, request.path, request.method, request.path, status, started, problem
        )
        self._finish(_response(status, content_type, payload, request_id, extra), keep_alive)

    async def _handoff(self, request: Request) -> _Answer:
        endpoint = cast(Endpoint, request.endpoint)
        media_type = request.text(b"content-type") or "application/octet-stream"
        call = Call(
            request.text(b"authorization"),
            media_type.split(";", 1)[0].strip().lower(),
            request.body,
        )
        status, answer = await endpoint(cast(HandoffApi, self._server.api), call)
        return status, "application/json", orjson.dumps(answer), {}

    async def _collect(self, request: Request) -> _Answer:
        collect = cast(Collect, self._server.collect)
        transport = self._transport
        peername = transport.get_extra_info("peername") if transport is not None else None
        status, headers = await collect(
            request.method, request.target, request.raw_headers, request.body, peername
        )
        return status, None, b"", headers

    async def _answer_with_app(self, request: Request) -> None:
        """Serve ``request`` with the aiohttp application, its answer written by aiohttp."""
        transport = self._transport
        if transport is None:
            self.idle = True
            return
        if request.encoding and not self._decode_or_refuse(request):
            return
        if self._bridge is None:
            self._bridge = AppBridge(self._loop, transport)
            if self._write_blocked:
                self._bridge.pause_writing()
        server = self._server
        writer = StreamWriter(self._bridge, self._loop)
        message = _raw_message(request, closing=self._last_answer)
        payload: StreamReader = EMPTY_PAYLOAD
        if request.body:
            payload = StreamReader(self._bridge, 2 * server.read_limit, loop=self._loop)
            payload.feed_data(request.body)
            payload.feed_eof()
        task = cast("asyncio.Task[None]", asyncio.current_task())
        web_request = cast(
            web.Request,
            server.request_factory(message, payload, self._bridge, writer, task),  # type: ignore[arg-type]
        )
        try:
            response = await self._app_response(request, web_request)
            if self._last_answer:
                response.force_close()
            await response.prepare(web_request)
            await response.write_eof()
        except Exception as exc:
            # A client that left mid-answer; anything else is a defect, and logged as one.
            if not isinstance(exc, ConnectionError):
                logger.error("answer_failed", exc_info=exc)
            self.idle = True
            self.abort()
            return
        self._finish(None, request.keep_alive and response.keep_alive is not False)

    async def _app_response(self, request: Request, web_request: web.Request) -> web.StreamResponse:
        server = self._server
        started = time.perf_counter()
        try:
            return await server.request_handler(web_request)
        except web.HTTPException as exc:
            return exc
        except Exception as exc:
            if web_request.writer.output_size:
                raise  # the handler had started its answer: the connection cannot go on
            # The middleware renders every problem the application raises: what gets here
            # is the unforeseen.
            problem = problem_for(exc, server.metrics, server.settings)
            route = server.metrics.route_of(request.path)
            log_request(
                server.metrics,
                route,
                request.method,
                request.path,
                problem.status,
                started,
                problem,
            )
            return problem_response(problem, web_request)

    def _finish(self, answer: bytes | None, keep_alive: bool) -> None:
        transport = self._transport
        self.idle = self._answered = True
        if transport is None:
            return
        if answer is not None:
            transport.write(answer)  # may call pause_writing
        if not keep_alive or self._last_answer:
            self._end()
            return
        self._next()

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()


def _collect_endpoint(app: web.Application) -> Collect | None:
    """AMP's collect bound to the app's AMP context, or None without ``[amp]``."""
    if app[app_keys.SETTINGS].amp is None or app.get(app_keys.API) is None:
        return None
    # Imported here, as app.py does, so a service without [amp] does not load it.
    from identity_service.amp import collect, context

    return functools.partial(collect.collect_raw, app[context.AMP])


def decoded(body: bytes, coding: bytes, limit: int) -> bytes:
    """``body`` decoded from its content ``coding``, refused above ``limit`` bytes decoded."""
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise UnsupportedContentEncoding("send the body as it is, or gzip or deflate coded")
    view = memoryview(body)
    parts: list[bytes] = []
    size = 0
    decoder = zlib.decompressobj(wbits)
    # Fed a slice at a time: what follows a member's end (unused_data, a copy) is never more
    # than a slice, so a body of many small members costs in proportion to its size.
    for start in range(0, len(body), _FEED_BYTES):
        data: bytes | memoryview = view[start : start + _FEED_BYTES]
        while data:
            if decoder.eof:
                # A gzip stream is one or more members (RFC 1952); a zlib stream is one.
                if wbits == _DEFLATE:
                    raise MalformedRequest(f"the body is not one complete {coding.decode()} stream")
                decoder = zlib.decompressobj(wbits)
            try:
                # Never more than the limit is inflated, however small the coded body.
                part = decoder.decompress(data, limit + 1 - size)
            except zlib.error as exc:
                raise MalformedRequest(f"the body is not valid {coding.decode()} data") from exc
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the body must be at most {limit} bytes once decoded")
            parts.append(part)
            # Under the limit, the slice was read whole: this is what follows a member's end.
            data = decoder.unused_data
    if not decoder.eof:
        raise MalformedRequest(f"the body is not one complete {coding.decode()} stream")
    return b"".join(parts)


def _list_elements(value: bytes) -> list[bytes]:
    """The elements of a list field's value, lower-cased: repeated fields make one list, and
    empty elements are none (RFC 9110, 5.6.1; llhttp reads Transfer-Encoding so)."""
    return [element for element in (e.strip() for e in value.lower().split(b",")) if element]


def _declares_a_body(request: Request) -> bool:
    for raw_name, value in request.raw_headers:
        name = raw_name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and int(value) > 0):
            return True
    return False


def _absolute_path(target: bytes) -> str:
    """The path of a target that is not a path (absolute-form, or one aiohttp's parser will
    refuse): "" when it has none."""
    try:
        return _target_url(target).path
    except MalformedRequest:
        return ""


def _target_url(target: bytes) -> URL:
    """The request target as aiohttp's parser reads it: a path, or an absolute URL's path."""
    text = target.decode("utf-8", "surrogateescape")
    try:
        if text.startswith("/"):
            path, _, query = text.partition("?")
            return URL.build(path=path, query_string=query, encoded=True)
        absolute = URL(text, encoded=True)
        if absolute.absolute and absolute.raw_host:
            return URL.build(
                path=absolute.raw_path, query_string=absolute.raw_query_string, encoded=True
            )
    except ValueError:
        pass
    raise MalformedRequest("the request target must be a path or an absolute URL")


def _raw_message(request: Request, closing: bool) -> RawRequestMessage:
    """The request as aiohttp's own parser would have given it to the application."""
    url = cast(URL, request.url)
    headers = CIMultiDict(
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in request.raw_headers
    )
    # The front has met the expectation (or refused it): the router would send another
    # 100 Continue, after the whole body.
    headers.popall("Expect", None)
    return RawRequestMessage(
        method=request.method,
        path=url.raw_path_qs,
        version=HttpVersion10 if request.http10 else HttpVersion11,
        headers=CIMultiDictProxy(headers),
        raw_headers=tuple(request.raw_headers),
        should_close=closing or not request.keep_alive,
        compression=None,
        upgrade=False,
        chunked=False,
        url=url,
    )


def problem_answer(
    problem: Problem,
    request_id: str | None,
    keep_alive: bool,
    extra: dict[str, str] | None = None,
) -> bytes:
    """The whole answer for a problem found before the request could be served."""
    extra = {**problem.headers(), **(extra or {})}
    if not keep_alive:
        extra["Connection"] = "close"
    payload = orjson.dumps(problem.body(instance=None))
    return _response(problem.status, PROBLEM_CONTENT_TYPE, payload, request_id, extra)


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return formatdate(second, usegmt=True)


def _response(
    status: int,
    content_type: str | None,
    body: bytes,
    request_id: str | None,
    extra: dict[str, str] | None = None,
) -> bytes:
    """The whole answer; without ``content_type``, a bodiless one (no length for a 204)."""
    lines = _STATUS_LINES[status]
    if content_type is not None:
        lines += f"Content-Type: {content_type}\r\n"
    if status != 204:
        lines += f"Content-Length: {len(body)}\r\n"
    lines += f"Date: {_http_date(int(time.time()))}\r\n{_SECURITY_LINES}"
    if request_id is not None:
        lines += f"X-Request-ID: {request_id}\r\n"
    if extra:
        lines += "".join(f"{name}: {value}\r\n" for name, value in extra.items())
    return (lines + "\r\n").encode("latin-1") + body
