"""Real servers on loopback for the framework tests: werkzeug (WSGI), uvicorn (ASGI) and
aiohttp, each in a thread of its own (the ASGI and aiohttp ones with their own event loop,
in which their ``AsyncIdentityClient`` is made, used and closed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from aiohttp import web
from conftest import DEV_WRITE_KEY
from identity_client import AsyncIdentityClient
from werkzeug.serving import WSGIRequestHandler, make_server

from tests.redis_server import free_port

if TYPE_CHECKING:
    from identity_client.middleware import ASGIApp, WSGIApp

STARTUP_SECONDS = 20.0


class QuietHandler(WSGIRequestHandler):
    """No access log: the handoff request's line would show its token."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


@contextmanager
def serving_wsgi(app: WSGIApp) -> Iterator[str]:
    """``app`` served by werkzeug's threaded server; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def serving_async(
    service_url: str, serve: Callable[[AsyncIdentityClient, int, asyncio.Event], Any]
) -> Iterator[str]:
    """Run ``serve(client, port, stop)`` in a thread's event loop with a fresh client."""
    port = free_port()
    ready = threading.Event()
    stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        stopping = asyncio.Event()
        stop.append((asyncio.get_running_loop(), stopping))
        async with AsyncIdentityClient(service_url, DEV_WRITE_KEY) as client:
            await serve(client, port, stopping)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://localhost:{port}"
    _wait_until_listening(port, ready, failure)
    try:
        yield url
    finally:
        loop, stopping = stop[0]
        loop.call_soon_threadsafe(stopping.set)
        thread.join(STARTUP_SECONDS)
    if failure:
        raise failure[0]


def _wait_until_listening(port: int, ended: threading.Event, failure: list[BaseException]) -> None:
    import socket
    import time

    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if ended.is_set():
            raise RuntimeError("the server stopped before it listened") from (
                failure[0] if failure else None
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def serving_asgi(
    service_url: str, build: Callable[[AsyncIdentityClient], ASGIApp], root_path: str = ""
) -> Iterator[str]:
    """The ASGI app ``build(client)`` served by uvicorn (``root_path``: its ``--root-path``,
    the prefix a proxy took off the path)."""

    async def serve(client: AsyncIdentityClient, port: int, stopping: asyncio.Event) -> None:
        config = uvicorn.Config(
            build(client),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
            access_log=False,
            root_path=root_path,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        await stopping.wait()
        server.should_exit = True
        await task

    with serving_async(service_url, serve) as url:
        yield url


@contextmanager
def serving_aiohttp(
    service_url: str, build: Callable[[AsyncIdentityClient], web.Application]
) -> Iterator[str]:
    """The aiohttp application ``build(client)`` served by aiohttp's own server."""

    async def serve(client: AsyncIdentityClient, port: int, stopping: asyncio.Event) -> None:
        runner = web.AppRunner(build(client), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await stopping.wait()
        finally:
            await runner.cleanup()

    with serving_async(service_url, serve) as url:
        yield url
