"""Redis down or slow: 503 with Retry-After, the process stays up, and recovers by itself.

The clients listen through the HTTP front, as the service does.
"""

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from identity_service.app import create_app
from identity_service.problems import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from tests.conftest import (
    CHECKOUT_URL,
    AppClient,
    FrontTestServer,
    auth,
    exchange,
    make_settings,
    prepare,
)
from tests.redis_server import RedisServer

ClientMaker = Callable[..., Awaitable[AppClient]]


async def assert_unavailable(response: Any) -> None:
    """A 503 problem with Retry-After."""
    assert response.status == 503
    assert response.content_type == PROBLEM_CONTENT_TYPE
    assert response.headers["Retry-After"] == "2"
    problem = await response.json(content_type=None)
    assert problem["type"] == PROBLEM_TYPE_PREFIX + "service-unavailable"
    assert problem["title"]


async def test_redis_down_answers_503_and_recovers_when_it_returns(
    aiohttp_client: ClientMaker, private_redis: RedisServer
) -> None:
    settings = make_settings(private_redis.url, retry_after="2", redis_timeout="0.5")
    client = await aiohttp_client(FrontTestServer(create_app(settings)))
    token_before = (await prepare(client))["token"]

    private_redis.stop()

    body = {"anonymousId": "a", "destination": CHECKOUT_URL}
    await assert_unavailable(await client.post("/v1/handoffs", json=body, headers=auth("shop")))
    for fallback in (False, True):  # a miss cannot be told from an outage: no new identity
        await assert_unavailable(
            await client.post(
                "/v1/handoffs/exchange",
                json={"token": token_before, "fallback": fallback},
                headers=auth("checkout"),
            )
        )
    await assert_unavailable(await client.get("/readyz"))
    assert (await client.get("/healthz")).status == 200

    private_redis.start()

    assert (await client.get("/readyz")).status == 200
    token_after = (await prepare(client))["token"]
    assert (await exchange(client, token_after))[0] == 200


async def test_redis_too_slow_answers_503(
    aiohttp_client: ClientMaker, private_redis: RedisServer
) -> None:
    settings = make_settings(private_redis.url, retry_after="2", redis_timeout="0.2")
    client = await aiohttp_client(FrontTestServer(create_app(settings)))
    token = (await prepare(client))["token"]

    admin = socket.create_connection(("127.0.0.1", private_redis.port), timeout=5)
    try:
        # Its +OK means every client is held from now on, for a second.
        admin.sendall(b"CLIENT PAUSE 1000 ALL\r\n")
        assert (await asyncio.to_thread(admin.recv, 16)).startswith(b"+OK")
        body = {"anonymousId": "a", "destination": CHECKOUT_URL}
        await assert_unavailable(await client.post("/v1/handoffs", json=body, headers=auth("shop")))
        admin.sendall(b"PING\r\n")  # answered once the pause is over
        assert (await asyncio.to_thread(admin.recv, 16)).startswith(b"+PONG")
    finally:
        admin.close()

    # The store recovers without a restart, and the earlier handoff is intact.
    status, identity = await exchange(client, token)
    assert status == 200
    assert identity["anonymousId"] == "anon-7f3a"


async def test_a_prepare_over_maxmemory_is_refused_and_writes_nothing(
    aiohttp_client: ClientMaker, private_redis: RedisServer
) -> None:
    # Found in review: the script's first write was a DEL, which Redis lets through over
    # maxmemory, and with it the script's HSET and XADD.
    settings = make_settings(private_redis.url, retry_after="2")
    client = await aiohttp_client(FrontTestServer(create_app(settings)))
    admin = Redis.from_url(private_redis.url)
    try:
        await prepare(client)
        handoffs = [key async for key in admin.scan_iter(match="*:handoff:*")]
        events = await outbox_lengths(admin)
        await admin.config_set("maxmemory", "1")
        body = {"anonymousId": "a", "destination": CHECKOUT_URL}
        await assert_unavailable(await client.post("/v1/handoffs", json=body, headers=auth("shop")))
        await admin.config_set("maxmemory", "0")
        assert [key async for key in admin.scan_iter(match="*:handoff:*")] == handoffs
        assert await outbox_lengths(admin) == events
        token = (await prepare(client))["token"]
        assert (await exchange(client, token))[0] == 200
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()


async def outbox_lengths(admin: Redis) -> dict[bytes, int]:
    """The entries of each outbox stream that has any (the forwarder creates them empty)."""
    lengths = {key: await admin.xlen(key) async for key in admin.scan_iter(match="*:outbox")}
    return {key: length for key, length in lengths.items() if length}
