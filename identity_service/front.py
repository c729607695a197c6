"""The HTTP front: the two handoff endpoints without aiohttp's per-request machinery.

Prepare and exchange sit on every cross-domain click, and aiohttp's request and response
objects cost more CPU than the handoff itself. The front is the protocol the listening
socket speaks. It reads plain HTTP/1.x requests for the two endpoints (a POST with a
Content-Length body, no ``Expect``, no ``Transfer-Encoding``), answers them through
handoff_api.py and writes each answer with one ``write``. Anything else (another path or
method, a chunked or oversized body, a head it does not fully understand) hands the
connection, with the bytes not yet answered, to aiohttp's own request handler for the
rest of its life, so the application's routes, middleware and error answers apply as
they always do. Answers, problems and the log line are the ones the middleware makes.
"""

import asyncio
import contextvars
import functools
import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web

from identity_service import app_keys
from identity_service.handoff_api import Call, HandoffApi
from identity_service.middleware import (
    SECURITY_HEADERS,
    log_request,
    problem_for,
    start_request,
)
from identity_service.problems import PROBLEM_CONTENT_TYPE, Problem

MAX_HEAD_BYTES = 8190
IDLE_TIMEOUT_SECONDS = 75.0

# The headers the front reads; any other header is ignored, as aiohttp would.
_READ = {
    *(b"host", b"content-length", b"content-type", b"authorization"),
    *(b"x-request-id", b"connection"),
}
# Headers whose presence needs aiohttp's full handling.
_DECLINE = {b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"}
# A header line: a token, a colon, and a value without control characters (a tab is
# allowed; a bare CR or LF is not, nor is a folded line). Heads with anything else are
# left to aiohttp's parser, which refuses or handles them.
_HEADER_LINE = rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\x00-\x08\x0a-\x1f\x7f]*)\r\n"
_HEADER_BLOCK = re.compile(rb"(?:" + _HEADER_LINE + rb")*")
_HEADER = re.compile(_HEADER_LINE)
_SECURITY_LINES = "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items())

Endpoint = Callable[[HandoffApi, Call], Awaitable[tuple[int, dict[str, Any]]]]
_ENDPOINTS: dict[bytes, Endpoint] = {
    b"/v1/handoffs": HandoffApi.prepare,
    b"/v1/handoffs/exchange": HandoffApi.exchange,
}


class Head:
    """The parts of a request head the front uses."""

    __slots__ = ("content_length", "endpoint", "headers", "http10", "keep_alive", "path")

    def __init__(
        self, path: str, endpoint: Endpoint, content_length: int, headers: dict[bytes, bytes]
    ) -> None:
        self.path = path
        self.endpoint = endpoint
        self.content_length = content_length
        self.headers = headers
        self.keep_alive = True
        self.http10 = False

    def text(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


def parse_head(head: bytes) -> Head | None:
    """The head of a request the front serves, or None to leave it to aiohttp.

    ``head`` ends before the blank line that closes it.
    """
    request_line, _, header_lines = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    endpoint = _ENDPOINTS.get(parts[1])
    if endpoint is None:
        return None
    block = header_lines + b"\r\n" if header_lines else b""
    if _HEADER_BLOCK.fullmatch(block) is None:
        return None
    headers: dict[bytes, bytes] = {}
    for raw_name, value in _HEADER.findall(block):
        name = raw_name.lower()
        if name in _DECLINE:
            return None
        if name in _READ:
            if name in headers:
                return None
            headers[name] = value.strip(b" \t")
    if parts[2] == b"HTTP/1.1" and b"host" not in headers:
        return None  # aiohttp answers 400
    length = headers.get(b"content-length")
    if length is None or not length.isdigit() or len(length) > 9:
        return None
    parsed = Head(parts[1].decode("ascii"), endpoint, int(length), headers)
    options = {option.strip() for option in headers.get(b"connection", b"").lower().split(b",")}
    parsed.http10 = parts[2] == b"HTTP/1.0"
    if parsed.http10:
        parsed.keep_alive = b"keep-alive" in options and b"close" not in options
    else:
        parsed.keep_alive = b"close" not in options
    return parsed


class FrontServer(web.Server):
    """aiohttp's protocol factory, with the front as the protocol new connections get."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        # What Application._make_handler builds, with the front in front of it.
        handle = cast(Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], app._handle)
        super().__init__(handle, request_factory=app._make_request, **kwargs)
        # The app has started (its cleanup_ctx ran): what requests need is read once here.
        self.api = app[app_keys.API]
        self.metrics = app[app_keys.METRICS]
        self.settings = app[app_keys.SETTINGS]
        # Unread bytes a connection may hold before it is no longer read.
        self.read_limit = MAX_HEAD_BYTES + self.settings.max_body_bytes
        self.front_connections: set[FrontProtocol] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> "FrontProtocol":  # type: ignore[override]
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(IDLE_TIMEOUT_SECONDS / 4, self._sweep_idle)
        return FrontProtocol(self)

    def aiohttp_handler(self) -> asyncio.Protocol:
        return super().__call__()

    def pre_shutdown(self) -> None:
        for connection in list(self.front_connections):
            connection.close_when_idle()
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Let the front's requests finish, then aiohttp's, all within one ``timeout``."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self._loop.time() + (timeout if timeout is not None else 60.0)
        # Polled: it runs once, at shutdown, over connections that each finish on their own.
        while any(c.busy for c in self.front_connections) and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for connection in list(self.front_connections):
            connection.abort()
        await super().shutdown(max(0.0, deadline - self._loop.time()))

    def _sweep_idle(self) -> None:
        horizon = self._loop.time() - IDLE_TIMEOUT_SECONDS
        for connection in list(self.front_connections):
            if connection.idle and connection.last_active < horizon:
                connection.abort()
        self._sweeper = self._loop.call_later(IDLE_TIMEOUT_SECONDS / 4, self._sweep_idle)


class FrontRunner(web.AppRunner):
    """An AppRunner whose sites listen with the front (see the module docstring)."""

    async def _make_server(self) -> web.Server:
        await super()._make_server()
        return FrontServer(self.app, loop=asyncio.get_running_loop(), **self._kwargs)


class FrontProtocol(asyncio.Protocol):
    """One client connection while the front serves it; requests are answered in order."""

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self._loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._closing = False
        self._read_paused = False
        self._write_blocked = False
        self.idle = True  # no request of this connection is being answered
        self.last_active = self._loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        self._server.front_connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.front_connections.discard(self)
        self._transport = None

    @property
    def busy(self) -> bool:
        """A request is being answered, or its bytes have started to arrive."""
        return not self.idle or bool(self._buffer)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.last_active = self._loop.time()
        if self.idle and not self._write_blocked:
            self._next_request()
        if len(self._buffer) > self._server.read_limit:
            # A client sending far ahead of the answers waits until they are written.
            self._pause_reading()

    def pause_writing(self) -> None:
        # A client that does not read its answers gets no more of them, and is not read.
        self._write_blocked = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        if self.idle:
            self._next_after_answer()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self.busy:
            self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()

    def _next_request(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES or (buffer and not b"POST ".startswith(buffer[:5])):
                self._hand_over()
            return
        head = parse_head(bytes(buffer[:end])) if end <= MAX_HEAD_BYTES else None
        if head is None or head.content_length > self._server.settings.max_body_bytes:
            self._hand_over()
            return
        body_end = end + 4 + head.content_length
        if len(buffer) < body_end:
            return
        body = bytes(buffer[end + 4 : body_end])
        del buffer[:body_end]
        self.idle = False
        # A task per request, in an empty context: nothing bound for one request's logs
        # can leak into another's.
        self._loop.create_task(self._answer(head, body), context=contextvars.Context())

    async def _answer(self, head: Head, body: bytes) -> None:
        started = time.perf_counter()
        request_id = start_request(head.text(b"x-request-id"))
        server = self._server
        media_type = head.text(b"content-type") or "application/octet-stream"
        call = Call(head.text(b"authorization"), media_type.split(";", 1)[0].strip().lower(), body)
        problem: Problem | None = None
        extra: dict[str, str] = {}
        try:
            status, answer = await head.endpoint(server.api, call)
            content_type, payload = "application/json", orjson.dumps(answer)
        except Exception as exc:
            problem = problem_for(exc, server.metrics, server.settings)
            status, content_type = problem.status, PROBLEM_CONTENT_TYPE
            payload = orjson.dumps(problem.body(instance=head.path))
            extra = problem.headers()
        keep_alive = head.keep_alive and not self._closing
        if not keep_alive:
            extra["Connection"] = "close"
        elif head.http10:
            extra["Connection"] = "keep-alive"
        self._finish(_response(status, content_type, payload, request_id, extra), keep_alive)
        log_request("POST", head.path, status, started, problem)

    def _finish(self, response: bytes, keep_alive: bool) -> None:
        transport = self._transport
        self.idle = True
        if transport is None:
            return
        transport.write(response)  # may call pause_writing
        self.last_active = self._loop.time()
        if not keep_alive:
            transport.close()
            return
        if not self._write_blocked:
            self._next_after_answer()

    def _next_after_answer(self) -> None:
        if self._buffer:
            self._next_request()
        if len(self._buffer) <= self._server.read_limit:
            self._resume_reading()

    def _hand_over(self) -> None:
        """Give the connection and its unanswered bytes to aiohttp's request handler."""
        transport = self._transport
        if transport is None:
            return
        self._server.front_connections.discard(self)
        self._resume_reading()  # aiohttp's handler reads from here on
        self._transport = None
        handler = self._server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        pending, self._buffer = bytes(self._buffer), bytearray()
        if pending:
            handler.data_received(pending)


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return formatdate(second, usegmt=True)


def _response(
    status: int,
    content_type: str,
    body: bytes,
    request_id: str,
    extra: dict[str, str] | None = None,
) -> bytes:
    lines = (
        f"{_STATUS_LINES[status]}Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nDate: {_http_date(int(time.time()))}\r\n{_SECURITY_LINES}"
        f"X-Request-ID: {request_id}\r\n"
    )
    if extra:
        lines += "".join(f"{name}: {value}\r\n" for name, value in extra.items())
    return (lines + "\r\n").encode("latin-1") + body
