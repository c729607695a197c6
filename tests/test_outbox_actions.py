"""``IDENTITY_OUTBOX=actions``: the outbox carries the AMP actions' webhook calls alone.

A deployment that uses AMP actions and wants no analytics events. Against real
redis-server processes (and the embedded store), a real webhook receiver
(tests/webhook_receiver.py) and real ``serve`` and ``forward`` processes: a handoff and
AMP hits write no event, a webhook call that fails is still queued and retried until
applied, the streams are trimmed once it is, and nothing says events wait for a
destination (no ``(none)`` backlog, no start warning).
"""

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import DummyCookieJar
from redis.asyncio import Redis

from identity_service import app_keys
from identity_service.app import create_app
from identity_service.constants import KEY_SHARDS, outbox_key
from identity_service.scrape import NO_DESTINATION
from identity_service.settings import Settings
from identity_service.stores.memory import MemoryQueue, MemoryStore
from identity_service.stores.redis import AdminClient, connect
from tests.conftest import (
    SECRET,
    AppClient,
    FrontTestServer,
    exchange,
    make_settings,
    prepare,
    sources_env,
)
from tests.redis_server import RedisServer
from tests.test_amp_actions import SAME_ORIGIN, SUBMIT, WITH_COOKIE, amp_config, form, metric
from tests.test_amp_collect import CACHE, CACHE_CLIENT_ID, hit
from tests.test_amp_collect import VISITOR as COLLECT_VISITOR
from tests.test_amp_webhook_retries import DESTINATION, FAST_DELIVERY, eventually
from tests.test_cli import COMMAND, Service, clean_env, redis_env
from tests.webhook_receiver import WebhookReceiver

ActionsClient = Callable[..., Awaitable[AppClient]]
# The webhook's answers to the three attempts within the visitor's wait: the call is queued.
FAILING = [503, 503, 503]


@pytest.fixture
def actions_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]], receiver: WebhookReceiver
) -> ActionsClient:
    """Builds a client of a service with the add-to-cart action and ``outbox=actions``,
    made by ``settings`` (a store's), forwarders retrying fast. Cookies are sent by hand."""

    async def build(settings: Callable[..., Settings], **env: str) -> AppClient:
        made = settings(amp=amp_config(receiver.url), outbox="actions", **FAST_DELIVERY, **env)
        server = FrontTestServer(create_app(made))
        return await aiohttp_client(server, cookie_jar=DummyCookieJar())

    return build


async def handoff_and_hits(client: AppClient) -> None:
    """What would each emit events: a handoff prepared and exchanged, an exchange that
    falls back to a generated id, and AMP hits: from a cache with the visitor's cookie
    (which links the clientId), then without it (the link read), and of a clientId with no
    link."""
    prepared = await prepare(client, userId="user-actions-4d1f")
    status, _ = await exchange(client, prepared["token"])
    assert status == 200
    status, _ = await exchange(client, "no-such-token", fallback=True)
    assert status == 200
    with_cookie = await hit(client, origin=CACHE, cookie=COLLECT_VISITOR, ampId=CACHE_CLIENT_ID)
    linked = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)
    unlinked = await hit(client, origin=CACHE, ampId="cache-cid-unlinked-7e2a")
    assert (with_cookie.status, linked.status, unlinked.status) == (204, 204, 204)


async def queue_a_failing_call(client: AppClient, receiver: WebhookReceiver) -> None:
    """Submit the action while the webhook fails: 202, queued for the outbox."""
    receiver.replies = list(FAILING)
    response = await client.post(SUBMIT, data=form(), headers={**SAME_ORIGIN, **WITH_COOKIE})
    assert response.status == 202, await response.text()
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="queued") == 1


async def applied_once(receiver: WebhookReceiver) -> None:
    """The queued call is applied, once: every call the same ``id``."""
    await eventually(lambda: receiver.applications == 1)
    assert len(receiver.calls) == len(FAILING) + 1
    assert len({call["id"] for call in receiver.calls}) == 1


async def outbox_entries(redis: AdminClient, prefix: str) -> list[dict[Any, Any]]:
    """The fields of every entry of every shard's outbox stream under ``prefix``."""
    streams = [outbox_key(prefix, shard) for shard in range(KEY_SHARDS)]
    entries = [entry for stream in streams for entry in await redis.xrange(stream) or []]
    return [fields or {} for _, fields in entries]


async def trimmed(redis: AdminClient, prefix: str) -> None:
    """Wait until the outbox streams are empty: what was delivered is trimmed."""
    deadline = asyncio.get_running_loop().time() + 15
    while await outbox_entries(redis, prefix):
        assert asyncio.get_running_loop().time() < deadline, "the streams were not trimmed"
        await asyncio.sleep(0.1)


async def test_on_redis_only_the_webhook_call_is_written_and_forward_delivers_it(
    actions_client: ActionsClient,
    redis_server: RedisServer,
    redis_client: Redis,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    """With the forwarder apart (``IDENTITY_FORWARDER=off``), nothing reads the streams:
    after a handoff, AMP hits and a failed webhook call, they hold that call alone
    (addressed to its action). Then ``identity-service forward`` delivers it, without a
    warning about events, and trims the streams."""

    def on_redis(**env: str) -> Settings:
        return make_settings(redis_server.url, **env)

    client = await actions_client(on_redis, forwarder="off")
    settings = client.app[app_keys.SETTINGS]
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    await handoff_and_hits(client)
    await queue_a_failing_call(client, receiver)
    entries = await outbox_entries(redis_client, prefix)
    assert [fields.get(b"only") for fields in entries] == [DESTINATION.encode()]

    fast = {f"IDENTITY_{name.upper()}": value for name, value in FAST_DELIVERY.items()}
    env = clean_env(
        IDENTITY_REDIS_URL=redis_server.url,
        IDENTITY_REDIS_KEY_PREFIX=prefix,
        IDENTITY_SOURCES=sources_env(),
        IDENTITY_SECRET=SECRET,
        IDENTITY_AMP=amp_config(receiver.url),
        IDENTITY_OUTBOX="actions",
        IDENTITY_FORWARDER_METRICS_PORT="off",
        **fast,
    )
    forward = await asyncio.create_subprocess_exec(
        COMMAND,
        "forward",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await applied_once(receiver)
        await trimmed(redis_client, prefix)
    finally:
        forward.send_signal(signal.SIGTERM)
        _, stderr = await forward.communicate()
    assert forward.returncode == 0, stderr.decode()
    assert b"warning" not in stderr, stderr.decode()


async def test_a_failed_webhook_call_is_retried_and_no_event_is_emitted(
    actions_client: ActionsClient,
    settings_for: Callable[..., Settings],
    receiver: WebhookReceiver,
) -> None:
    """On each store, the forwarders in ``serve``: the queued call is applied once, and
    no event reaches the outbox (the embedded store's: a queue of every event, watched;
    Redis's: trimmed once the call is delivered, as with an events destination). The
    scrape shows the action's backlog, never events waiting for a destination."""
    client = await actions_client(settings_for)
    store = client.app[app_keys.STORE]
    every_event: MemoryQueue | None = None
    if isinstance(store, MemoryStore):
        every_event = store.outbox.subscribe("every-event")
    await handoff_and_hits(client)
    await queue_a_failing_call(client, receiver)
    await applied_once(receiver)
    if every_event is not None:
        assert [document for _, document in every_event.events] == []
        assert [queue.name for queue in store.outbox.queues] == [DESTINATION, "every-event"]
    else:
        settings = client.app[app_keys.SETTINGS]
        assert settings.redis is not None
        async with connect(settings.redis) as redis:
            await trimmed(redis, settings.redis.key_prefix)
    scraped = await (await client.get("/metrics")).text()
    assert f'identity_outbox_pending{{destination="{DESTINATION}"}}' in scraped
    assert NO_DESTINATION not in scraped


async def test_serve_names_actions_for_no_events_and_in_that_mode_does_not_warn(
    tmp_path: Path, private_redis: RedisServer, receiver: WebhookReceiver
) -> None:
    """On Redis with AMP actions and no events destination, the start's one warning names
    ``IDENTITY_OUTBOX=actions`` (``off`` would drop the queued webhook calls too); with
    it, there is nothing to warn of."""
    warnings: dict[str, list[str]] = {}
    for mode in ("on", "actions"):
        (tmp_path / mode).mkdir()
        env = redis_env(private_redis, IDENTITY_AMP=amp_config(receiver.url), IDENTITY_OUTBOX=mode)
        service = await asyncio.to_thread(Service, tmp_path / mode, env)
        assert await asyncio.to_thread(service.stop) == 0
        warnings[mode] = [line for line in service.stderr.splitlines() if "warning" in line]
    assert len(warnings["on"]) == 1, warnings
    assert "no events destination" in warnings["on"][0]
    assert "IDENTITY_OUTBOX=actions" in warnings["on"][0]
    assert "IDENTITY_OUTBOX=off" not in warnings["on"][0]
    assert warnings["actions"] == []
