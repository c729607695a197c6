"""A lean Segment-compatible batch API for the benchmark: it counts, and keeps nothing else.

    python bench/collector.py PORT WRITE_KEY

POST /v1/batch takes a (gzipped) batch with the write key as HTTP Basic user or as the
body's ``writeKey``; GET /stats answers ``{"events": n, "batches": b, "unique": m}`` (m
counts distinct messageIds, kept as hashes so a soak of millions of events stays small);
POST /reset starts the counts again.
"""

import base64
import sys

import orjson
from aiohttp import web


class Counts:
    def __init__(self) -> None:
        self.events = 0
        self.batches = 0
        self.unique: set[int] = set()


def make_app(write_key: str) -> web.Application:
    counts = Counts()
    expected = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()

    async def batch(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        # Segment's API takes the write key with HTTP Basic or in the body (analytics-node).
        if request.headers.get("Authorization") != expected and body.get("writeKey") != write_key:
            return web.json_response({"error": "bad write key"}, status=401)
        events = body["batch"]
        counts.events += len(events)
        counts.batches += 1
        counts.unique.update(hash(event["messageId"]) for event in events)
        return web.json_response({})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {"events": counts.events, "batches": counts.batches, "unique": len(counts.unique)}
        )

    async def reset(request: web.Request) -> web.Response:
        counts.events, counts.batches, counts.unique = 0, 0, set()
        return web.json_response({})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/batch", batch)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    return app


if __name__ == "__main__":
    web.run_app(
        make_app(sys.argv[2]),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        print=None,
        access_log=None,
    )
