"""A publisher's action webhook for the tests: a real HTTP server on a free loopback port.

It checks each call's ``Identity-Signature`` the way docs/amp.md tells a publisher to (HMAC-
SHA256 over ``"<t>.<body>"``, a constant-time compare, ``t`` within five minutes), answers
what the test scripted (statuses in order, ``"hang"`` past the service's timeout, or
``"late"``: applied, then answered past the timeout, a backend whose answer is lost), and
applies each action once per ``id``, counting every call and application. ``on_call``, when
set, runs at each signed call before it is answered (a test takes Redis down there: an
outage that starts while the service waits for the webhook); ``barrier``, when set, holds
each call until as many have arrived (calls that are in flight at the same moment);
``delay`` holds each call that long before it is answered (a slow backend).
"""

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from identity_service.amp.webhooks import SIGNATURE_HEADER

TOLERANCE_SECONDS = 300
HANG_SECONDS = 30.0

Reply = int | str  # a status, "hang" or "late"

# The secret the tests configure for their actions, and the receiver checks with.
WEBHOOK_SECRET = "add-to-cart-webhook-secret-7c1d9e"


def verify(secret: bytes, header: str | None, body: bytes, now: float) -> bool:
    """Whether ``header`` signs ``body`` with ``secret``, recently: what a receiver checks."""
    if not header:
        return False
    parts = dict(part.partition("=")[::2] for part in header.split(","))
    timestamp, given = parts.get("t", ""), parts.get("v1", "")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


class WebhookReceiver:
    """The webhook of one action; ``url`` once started."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.replies: list[Reply] = []  # consumed in order; 200 once empty
        self.calls: list[dict[str, Any]] = []  # every correctly signed call's document
        self.applied: dict[str, dict[str, Any]] = {}  # by id: what was applied
        self.bad_signatures = 0
        self.on_call: Callable[[], None] | None = None
        self.barrier: asyncio.Barrier | None = None
        self.delay = 0.0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/apply"

    @property
    def applications(self) -> int:
        return len(self.applied)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/apply", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(self.secret, request.headers.get(SIGNATURE_HEADER), body, time.time()):
            self.bad_signatures += 1
            return web.Response(status=401)
        document = orjson.loads(body)
        self.calls.append(document)
        if self.on_call is not None:
            self.on_call()
        if self.barrier is not None:
            await self.barrier.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        reply = self.replies.pop(0) if self.replies else 200
        if reply in ("hang", "late"):
            if reply == "late":
                self.applied.setdefault(document["id"], document)
            await asyncio.sleep(HANG_SECONDS)
            return web.Response(status=504)
        assert isinstance(reply, int)
        if 200 <= reply < 300:
            self.applied.setdefault(document["id"], document)  # idempotent on the hop id
        return web.Response(status=reply)
