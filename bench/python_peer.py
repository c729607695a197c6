"""The Node peers' handoff (handoff-peer.js) in Python, on the service's own stack.

What a flow costs in Python on uvloop, llhttp (httptools), the service's RESP client
(stores/resp.py), orjson and aiohttp's client, without what identity-service adds: the
same requests, Redis commands (SET EX, GETDEL) and events as the Fastify peer, with its
design (events kept in the process and posted in batches of 100 or every 500 ms, as
@segment/analytics-node does), and none of the service's guarantees (no sealing, no
outbox, no validation beyond the peer's, no request log, no metrics, no limits). Set
beside the service and Fastify in one run, it tells what the stack costs, and what the
guarantees do.

PORT, REDIS_URL, WRITE_KEY, ORIGIN, SEGMENT_HOST, SEGMENT_WRITE_KEY from the environment,
as the Node peers read them. A benchmark's peer, not an example to copy: it refuses
nothing a client could send wrong beyond what handoff-peer.js refuses.
"""

import asyncio
import base64
import os
import secrets
import signal
import time
import uuid
from http import HTTPStatus
from typing import Any

import aiohttp
import httptools
import orjson
import uvloop
from yarl import URL

from identity_service.clock import iso_time
from identity_service.stores.resp import RespClient

BATCH_EVENTS = 100
FLUSH_SECONDS = 0.5
TTL_SECONDS = 300
LIBRARY = {"name": "bench-python-peer", "version": "1"}


class Analytics:
    """Events kept in the process, posted as ``{"batch": [...]}`` to SEGMENT_HOST/v1/batch."""

    def __init__(self, host: str, write_key: str) -> None:
        self._url = host.rstrip("/") + "/v1/batch"
        basic = base64.b64encode(f"{write_key}:".encode()).decode()
        self._headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
        self._queue: list[dict[str, Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def enqueue(self, kind: str, fields: dict[str, Any]) -> None:
        fields.update(
            type=kind,
            messageId=str(uuid.uuid4()),
            timestamp=iso_time(time.time()),
            context={**fields.get("context", {}), "library": LIBRARY},
        )
        self._queue.append(fields)
        if len(self._queue) >= BATCH_EVENTS:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue:
            batch, self._queue = self._queue, []
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        sent_at = iso_time(time.time())
        for event in batch:
            event["sentAt"] = sent_at
        body = orjson.dumps({"batch": batch})
        async with self._session.post(self._url, data=body, headers=self._headers) as answer:
            await answer.read()

    async def close(self) -> None:
        self.flush()
        await asyncio.gather(*self._sending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


class Peer:
    """prepare and exchange as handoff-peer.js has them; each returns (status, answer)."""

    def __init__(self, redis: RespClient, analytics: Analytics, origin: str) -> None:
        self._redis = redis
        self._analytics = analytics
        self._origin = origin

    async def prepare(self, body: Any) -> tuple[int, dict[str, Any]]:
        body = body if isinstance(body, dict) else {}
        try:
            url = URL(body["destination"])
        except (KeyError, TypeError, ValueError):
            return 400, {"title": "destination must be a URL"}
        if str(url.origin()) != self._origin:
            return 403, {"title": "not allowed"}
        token = secrets.token_urlsafe(32)
        record = {
            "anonymousId": body.get("anonymousId"),
            "userId": body.get("userId"),
            "traits": body.get("traits", {}),
            "context": body.get("context", {}),
            "consent": body.get("consent", {}),
            "destination": body["destination"],
        }
        await self._redis.execute("SET", f"handoff:{token}", orjson.dumps(record), "EX", 300)
        self._analytics.enqueue(
            "track",
            {
                "anonymousId": record["anonymousId"],
                "userId": record["userId"],
                "event": "Cross-Domain Handoff Started",
                "context": record["context"],
            },
        )
        return 201, {
            "token": token,
            "expiresIn": TTL_SECONDS,
            "expiresAt": iso_time(time.time() + TTL_SECONDS),
            "redirectUrl": str(url.update_query(handoff_token=token)),
        }

    async def exchange(self, body: Any) -> tuple[int, dict[str, Any]]:
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            return 400, {"title": "token is required"}
        stored = await self._redis.execute("GETDEL", f"handoff:{token}")
        if stored is None:
            return 404, {"title": "unknown token"}
        record = orjson.loads(stored)
        identity = {"anonymousId": record["anonymousId"], "userId": record["userId"]}
        context = record["context"]
        self._analytics.enqueue(
            "track", {**identity, "event": "Cross-Domain Handoff Completed", "context": context}
        )
        if record["userId"]:
            self._analytics.enqueue(
                "identify", {**identity, "traits": record["traits"], "context": context}
            )
        return 200, {**record, "source": "handoff"}


class Connection(asyncio.Protocol):
    """Keep-alive HTTP/1.1: a task per request, answers in order (wrk does not pipeline)."""

    def __init__(self, peer: Peer, authorization: bytes) -> None:
        self._peer = peer
        self._authorization = authorization
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._auth = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    def on_message_begin(self) -> None:
        self._url, self._auth, self._body = b"", b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._auth = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self._answer(self._url, self._auth, self._body))

    async def _answer(self, path: bytes, auth: bytes, chunks: list[bytes]) -> None:
        if auth != self._authorization:
            status, answer = 401, {"title": "Unauthorized"}
        else:
            try:
                body = orjson.loads(b"".join(chunks))
            except orjson.JSONDecodeError:
                body = None
            if path == b"/v1/handoffs":
                status, answer = await self._peer.prepare(body)
            elif path == b"/v1/handoffs/exchange":
                status, answer = await self._peer.exchange(body)
            else:
                status, answer = 404, {"title": "Not Found"}
        payload = orjson.dumps(answer)
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json; "
            f"charset=utf-8\r\nContent-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n"
        )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(head.encode() + payload)


async def serve() -> None:
    env = os.environ
    redis = RespClient(env["REDIS_URL"], timeout=5.0)
    analytics = Analytics(env["SEGMENT_HOST"], env["SEGMENT_WRITE_KEY"])
    peer = Peer(redis, analytics, env["ORIGIN"])
    authorization = f"Bearer {env['WRITE_KEY']}".encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(peer, authorization), "127.0.0.1", int(env["PORT"])
    )
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    # As the Node peers stop: close the server, deliver what is queued, exit.
    server.close()
    await analytics.close()
    await redis.close()


if __name__ == "__main__":
    uvloop.run(serve())
