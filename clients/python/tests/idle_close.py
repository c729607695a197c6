"""A real HTTP/1.1 server on loopback (raw asyncio, in a thread of its own) that closes
connections kept alive between requests as a test tells it to, as the service's front does at
its connection limit (and nginx at its keepalive_timeout), and counts what it got."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

# What the server does with one request, by its place (connection, request on it), both from 1:
#   "answer": answers it, keeping the connection alive;
#   "close": reads the whole request, then closes (FIN) without a byte of answer;
#   "close-on-arrival": closes as soon as the request's first bytes arrive, unread (the
#     kernel then resets the connection: ECONNRESET on the client's side);
#   "partial": answers its head and half its body, then closes.
Action = Literal["answer", "close", "close-on-arrival", "partial"]
_SECOND: dict[str, Action] = {
    "second": "close",
    "arrival": "close-on-arrival",
    "partial": "partial",
}


@dataclass
class Request:
    """A request as the server got it: on which connection, its place there, path and body."""

    connection: int
    number: int
    path: str
    body: bytes


@dataclass
class IdleCloser:
    """The server's URL, what it got (``requests``; ``connections`` accepted) and the rule
    it follows: ``action(connection, number)``."""

    url: str = ""
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    rule: str = "second"

    def action(self, connection: int, number: int) -> Action:
        """``rule``: "second" closes the second request of every connection, as a server
        closing a kept-alive connection does; "arrival" closes it as it arrives; "first"
        closes the first request of the first connection (a fresh one); "after-first"
        closes every request but that one; "partial" cuts the second request's answer short."""
        if self.rule == "after-first":
            return "answer" if (connection, number) == (1, 1) else "close"
        if self.rule == "first":
            return "close" if (connection, number) == (1, 1) else "answer"
        if number != 2:
            return "answer"
        return _SECOND[self.rule]

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]


def _answer(path: str, body: bytes) -> bytes:
    """The service's answer to a prepare or an exchange (the exchanged token as the id)."""
    if path == "/v1/handoffs":
        status = "201 Created"
        data: dict[str, object] = {
            "token": f"token-{json.loads(body)['anonymousId']}",
            "redirectUrl": "https://b.example.com/?handoff_token=t",
            "expiresAt": "2030-01-01T00:00:00+00:00",
            "expiresIn": 300,
        }
    else:
        status = "200 OK"
        data = {"anonymousId": f"from-{json.loads(body)['token']}", "source": "handoff"}
    content = json.dumps(data).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n\r\n"
    )
    return head.encode() + content


async def _serve(
    state: IdleCloser, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    state.connections += 1
    connection = state.connections
    number = 0
    try:
        while True:
            try:
                start = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client closed the connection
            number += 1
            action = state.action(connection, number)
            path = start.split(b" ")[1].decode()
            if action == "close-on-arrival":
                state.requests.append(Request(connection, number, path, b""))
                writer.transport.abort()  # unread bytes: the kernel sends a reset
                return
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            state.requests.append(Request(connection, number, path, body))
            if action == "close":
                return  # the finally's close: a FIN, no byte of answer
            answer = _answer(path, body)
            if action == "partial":
                body_at = answer.index(b"\r\n\r\n") + 4
                writer.write(answer[: body_at + (len(answer) - body_at) // 2])
                await writer.drain()
                return
            writer.write(answer)
            await writer.drain()
    finally:
        writer.close()


@contextmanager
def idle_closer(rule: str = "second") -> Iterator[IdleCloser]:
    """The server, following ``rule`` (``IdleCloser.action``), for the ``with`` block."""
    state = IdleCloser(rule=rule)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: asyncio.Server | None = None

    async def start() -> None:
        nonlocal server
        server = await asyncio.start_server(lambda r, w: _serve(state, r, w), "127.0.0.1", 0)
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    started.wait(5)
    try:
        yield state
    finally:

        async def stop() -> None:
            assert server is not None
            server.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
