"""A real HTTP server on loopback that answers what a test tells it to: answers the service
never gives (malformed, undecodable, echoing the request) and answers that trickle in."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    """What to send: ``status``, ``headers`` and ``body``; with ``drip`` (seconds), the
    headers (``drip_headers``: them too) then the body one byte every ``drip`` seconds."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drip: float | None = None
    drip_headers: bool = False


@dataclass
class Seen:
    """A request as the server got it."""

    path: str
    headers: dict[str, str]
    body: bytes


Respond = Callable[[Seen], Answer]


class Misbehaving:
    """Answers every POST with ``respond(request)``."""

    def __init__(self) -> None:
        self.respond: Respond = lambda seen: Answer(404)
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen = Seen(self.path, dict(self.headers.items()), body)
                answer = owner.respond(seen)
                head = f"HTTP/1.1 {answer.status} X\r\n".encode()
                headers = {"Content-Length": str(len(answer.body)), **answer.headers}
                for name, value in headers.items():
                    head += f"{name}: {value}\r\n".encode("latin-1")
                head += b"\r\n"
                try:
                    if answer.drip is None:
                        self.wfile.write(head + answer.body)
                    elif answer.drip_headers:
                        owner.trickle(self, head + answer.body, answer.drip)
                    else:
                        self.wfile.write(head)
                        self.wfile.flush()
                        owner.trickle(self, answer.body, answer.drip)
                    self.wfile.flush()
                except OSError:  # the client gave up: what the timeout tests expect
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def trickle(self, handler: BaseHTTPRequestHandler, data: bytes, every: float) -> None:
        for byte in data:
            if self.stopping.wait(every):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def misbehaving() -> Iterator[Misbehaving]:
    server = Misbehaving()
    try:
        yield server
    finally:
        server.close()


def elapsed(since: float) -> float:
    return time.monotonic() - since
