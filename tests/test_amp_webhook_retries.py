"""An AMP action whose webhook fails is queued in the outbox and retried like events.

Against a real webhook receiver (tests/webhook_receiver.py), a real Segment-compatible
collector (tests/collector.py) and both stores: the visitor's answer comes within the
bounded wait (202 at submit, 303 at the end of the hop), and once the webhook is back the
action is applied exactly once (every raw call counted, all with one ``id``). A refusal in
the outbox is a dead letter that ``outbox replay-dead`` sends again, and analytics events
and webhook bodies never reach each other's destination.
"""

import asyncio
import functools
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import DummyCookieJar

from identity_service import app_keys
from identity_service.amp import webhooks
from identity_service.amp.config import ActionSettings, AmpSettings
from identity_service.amp.context import AMP
from identity_service.app import create_app
from identity_service.constants import MAX_EVENT_BYTES
from identity_service.settings import ConfigError, Destination, Settings
from identity_service.sinks import DELIVERED, WebhookSink
from tests.collector import WRITE_KEY, Collector, running_collector
from tests.conftest import SECRET, AppClient, FrontTestServer, make_settings, sources_env
from tests.redis_server import RedisServer
from tests.test_amp_actions import (
    CACHE,
    DONE_URL,
    FIELDS,
    FROM_CACHE,
    PUBLISHER,
    SAME_ORIGIN,
    SUBMIT,
    VISITOR,
    WITH_COOKIE,
    amp_config,
    form,
    hop,
    metric,
    set_cookie_value,
)
from tests.test_cli import COMMAND, clean_env
from tests.test_forwarder import raw_destination
from tests.webhook_receiver import WEBHOOK_SECRET, Reply, WebhookReceiver

DESTINATION = "amp-action-add-to-cart"
FAST_DELIVERY = {
    "batch_max_wait": "0.01",
    "backoff_base": "0.05",
    "backoff_max": "0.2",
    "delivery_timeout": "0.5",
}
# How a test takes the webhook down: its receiver stopped (connections refused), or
# answering 503 to the three attempts in the request and the outbox's first two.
DOWN_MODES = ["stopped", "503"]
DOWN_503_REPLIES = 5

RetryClient = Callable[..., Awaitable[AppClient]]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as running:
        yield running


def _client_builder(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings: Callable[..., Settings],
    receiver: WebhookReceiver,
    collector: Collector,
) -> RetryClient:
    """Builds a client of a service made by ``settings``, with the add-to-cart action and a
    Segment destination, whose forwarders retry fast. Cookies are sent by hand (no jar)."""

    async def build() -> AppClient:
        made = settings(
            amp=amp_config(receiver.url),
            destination_url=collector.url,
            destination_write_key=WRITE_KEY,
            **FAST_DELIVERY,
        )
        return await aiohttp_client(FrontTestServer(create_app(made)), cookie_jar=DummyCookieJar())

    return build


@pytest.fixture
def retry_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings_for: Callable[..., Settings],
    receiver: WebhookReceiver,
    collector: Collector,
) -> RetryClient:
    """A client of the service on each store (``settings_for``)."""
    return _client_builder(aiohttp_client, settings_for, receiver, collector)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own that keeps its data across a stop and a start (an
    append-only file, written at each command), as a production Redis that restarts does."""
    server = RedisServer(tmp_path, appendonly="yes", appendfsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def outage_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    receiver: WebhookReceiver,
    collector: Collector,
    durable_redis: RedisServer,
) -> RetryClient:
    """As ``retry_client``, on ``durable_redis``, which the test stops and starts."""
    settings = functools.partial(make_settings, durable_redis.url)
    return _client_builder(aiohttp_client, settings, receiver, collector)


async def fail_with_redis_stopping(
    client: AppClient,
    receiver: WebhookReceiver,
    redis: RedisServer,
    complete: str,
    replies: tuple[Reply, ...] = (500, 500, 500),
) -> aiohttp.ClientResponse:
    """Land on ``complete`` while the webhook answers ``replies`` (by default 500 to every
    attempt: its failure cannot be queued) and Redis stops at the first call."""
    receiver.replies = list(replies)
    receiver.on_call = redis.stop
    try:
        return await client.get(complete, allow_redirects=False)
    finally:
        receiver.on_call = None


@pytest.fixture(params=DOWN_MODES)
def down(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


async def eventually(check: Callable[[], bool], seconds: float = 15.0) -> None:
    """Wait until ``check()`` holds."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.02)


async def take_down(receiver: WebhookReceiver, mode: str) -> None:
    if mode == "stopped":
        await receiver.stop()
    else:
        receiver.replies = [503] * DOWN_503_REPLIES


async def bring_back(receiver: WebhookReceiver, mode: str, port: int) -> None:
    """Restart a stopped receiver on its port, after the outbox retried into the void."""
    if mode == "stopped":
        await asyncio.sleep(0.4)
        await receiver.start(port)


def raw_calls(mode: str) -> int:
    """The calls the receiver answers until it applies the action: one when it was stopped
    (refused connections are no calls), else every 503 and then the 200."""
    return 1 if mode == "stopped" else DOWN_503_REPLIES + 1


async def applied_once(receiver: WebhookReceiver, mode: str) -> dict[str, Any]:
    """Wait for the action; after a moment more, check that nothing came again."""
    await eventually(lambda: receiver.applications == 1)
    await asyncio.sleep(0.5)
    assert receiver.applications == 1
    assert len(receiver.calls) == raw_calls(mode)
    assert len({call["id"] for call in receiver.calls}) == 1
    # The same JSON on every attempt: queued as it was first sent.
    assert all(call == receiver.calls[0] for call in receiver.calls)
    return next(iter(receiver.applied.values()))


async def test_a_submit_while_the_webhook_is_down_is_queued_and_applied_once(
    retry_client: RetryClient, receiver: WebhookReceiver, down: str
) -> None:
    client = await retry_client()
    port = receiver.port
    await take_down(receiver, down)
    bound = webhooks.wait_bound(client.app[AMP].amp)
    started = time.monotonic()
    response = await client.post(SUBMIT, data=form(), headers={**FROM_CACHE, **WITH_COOKIE})
    assert time.monotonic() - started < bound + 0.5
    assert response.status == 202, await response.text()
    assert await response.json() == {"status": "queued"}
    assert response.headers["Access-Control-Allow-Origin"] == CACHE
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Vary"] == "Origin"
    assert "Set-Cookie" not in response.headers  # the visitor's own cookie: not set again
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="queued") == 1

    await bring_back(receiver, down, port)
    applied = await applied_once(receiver, down)
    assert (applied["anonymousId"], applied["fields"]) == (VISITOR, FIELDS)
    assert applied["context"] == "cache_with_cookie"
    delivered = metric(client, "identity_events_delivered_total", destination=DESTINATION)
    assert delivered == 1


async def test_a_hop_whose_webhook_is_down_lands_on_done_url_and_is_applied_once(
    retry_client: RetryClient, receiver: WebhookReceiver, down: str
) -> None:
    client = await retry_client()
    complete = await hop(client)
    port = receiver.port
    await take_down(receiver, down)
    bound = webhooks.wait_bound(client.app[AMP].amp)
    started = time.monotonic()
    landing = await client.get(complete, headers=WITH_COOKIE, allow_redirects=False)
    assert time.monotonic() - started < bound + 0.5
    assert landing.status == 303, await landing.text()
    assert landing.headers["Location"] == DONE_URL
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="queued") == 1
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="completed") == 1

    await bring_back(receiver, down, port)
    applied = await applied_once(receiver, down)
    assert (applied["anonymousId"], applied["context"]) == (VISITOR, "origin_hop")
    # The token was used up: a replay lands with nothing applied, nothing sent.
    replay = await client.get(complete, headers=WITH_COOKIE, allow_redirects=False)
    assert (replay.status, replay.headers["Location"]) == (303, DONE_URL)
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == raw_calls(down) and receiver.applications == 1


async def test_a_landing_that_fails_on_a_store_outage_sets_no_cookie(
    outage_client: RetryClient, receiver: WebhookReceiver, durable_redis: RedisServer
) -> None:
    client = await outage_client()
    complete = await hop(client)
    failed = await fail_with_redis_stopping(client, receiver, durable_redis, complete)
    assert failed.status == 503, await failed.text()
    assert (await failed.json(content_type=None))["type"].endswith(":service-unavailable")
    assert "Set-Cookie" not in failed.headers
    assert receiver.applications == 0


@pytest.mark.parametrize("again", ["applied", "queued"])
async def test_a_hop_whose_webhook_fails_in_a_store_outage_can_be_retried_and_applies_once(
    outage_client: RetryClient, receiver: WebhookReceiver, durable_redis: RedisServer, again: str
) -> None:
    """The webhook fails and Redis goes down before the failure can be queued: nothing
    records the call, so the hop must stay usable. The visitor's reload, once Redis is
    back, applies the action (at once, or through the outbox when the webhook fails again),
    exactly once, to the visitor the landing's cookie names."""
    client = await outage_client()
    complete = await hop(client)
    failed = await fail_with_redis_stopping(client, receiver, durable_redis, complete)
    assert failed.status == 503, await failed.text()
    assert "Retry-After" in failed.headers

    durable_redis.start()
    if again == "queued":
        receiver.replies = [500] * 3  # the reload's three attempts; the outbox's first is 200
    landing = await client.get(complete, allow_redirects=False)
    assert landing.status == 303, await landing.text()
    # The failed landing could not end its lease in a Redis that was down: the reload
    # waited for it to end by itself (wait_bound plus 2 s from that landing's start).
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="waited") == 1
    assert landing.headers["Location"] == DONE_URL
    visitor = set_cookie_value(landing)
    await eventually(lambda: receiver.applications == 1)
    await asyncio.sleep(0.5)
    calls = len(receiver.calls)
    assert calls == (3 + 1 if again == "applied" else 3 + 3 + 1)
    assert len({call["id"] for call in receiver.calls}) == 1
    [applied] = receiver.applied.values()
    assert (applied["anonymousId"], applied["fields"]) == (visitor, FIELDS)
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="completed") == 1

    # Now the token is used up: a reload lands with nothing sent again.
    cookie = {"Cookie": f"ajs_anonymous_id={visitor}"}
    replay = await client.get(complete, headers=cookie, allow_redirects=False)
    assert (replay.status, replay.headers["Location"]) == (303, DONE_URL)
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == calls and receiver.applications == 1


async def test_a_reload_after_a_failed_landing_sets_the_id_the_webhook_applied(
    outage_client: RetryClient, receiver: WebhookReceiver, durable_redis: RedisServer
) -> None:
    """The webhook applied the action but its answer came too late, its retries failed, and
    Redis went down before the failure could be queued: 503, no cookie. The reload, still
    without a cookie, was given a new id, while the webhook (deduplicating on the hop's id)
    kept the first: the browser's cookie and the applied action named two visitors. Every
    landing of one hop now offers the id sealed in it at submit."""
    client = await outage_client()
    complete = await hop(client)
    failed = await fail_with_redis_stopping(
        client, receiver, durable_redis, complete, replies=("late", 500, 500)
    )
    assert failed.status == 503, await failed.text()
    assert "Set-Cookie" not in failed.headers
    [applied] = receiver.applied.values()

    durable_redis.start()
    landing = await client.get(complete, allow_redirects=False)
    assert landing.status == 303, await landing.text()
    assert set_cookie_value(landing) == applied["anonymousId"]
    assert len(receiver.calls) == 4
    assert {(call["id"], call["anonymousId"]) for call in receiver.calls} == {
        (applied["id"], applied["anonymousId"])
    }
    assert receiver.applications == 1


async def test_a_hop_applied_as_the_store_goes_down_lands_and_is_not_applied_twice(
    outage_client: RetryClient, receiver: WebhookReceiver, durable_redis: RedisServer
) -> None:
    """The webhook applies the action, and Redis is down when the token is to be used up:
    the landing stands (303, the cookie of the id the webhook got); the token lasts until
    its TTL, and a reload calls again with the same id, which the webhook deduplicates."""
    client = await outage_client()
    complete = await hop(client)
    landing = await fail_with_redis_stopping(
        client, receiver, durable_redis, complete, replies=(200,)
    )
    assert landing.status == 303, await landing.text()
    visitor = set_cookie_value(landing)
    [applied] = receiver.applied.values()
    assert applied["anonymousId"] == visitor

    durable_redis.start()
    cookie = {"Cookie": f"ajs_anonymous_id={visitor}"}
    reload = await client.get(complete, headers=cookie, allow_redirects=False)
    assert (reload.status, reload.headers["Location"]) == (303, DONE_URL)
    assert len({call["id"] for call in receiver.calls}) == 1
    assert receiver.applications == 1
    again = await client.get(complete, headers=cookie, allow_redirects=False)
    assert again.status == 303
    assert len(receiver.calls) == 2  # used up by the reload


async def test_a_hop_whose_token_expires_during_a_failing_webhook_is_queued(
    retry_client: RetryClient, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token lives ``action_ttl`` (5 s at least), the visitor may wait longer for the
    webhook (``wait_bound``): a token that expires meanwhile is no reason to drop the call."""
    client = await retry_client()
    store = client.app[AMP].store
    if not hasattr(store, "_clock"):
        pytest.skip("the memory store's clock is driven; a Redis key's expiry is Redis's own")
    complete = await hop(client)
    real = store._clock
    receiver.replies = [503] * 3  # the landing's attempts; the outbox's first is 200
    # At the first call, the token's 60 s are over.
    receiver.on_call = lambda: monkeypatch.setattr(store, "_clock", lambda: real() + 61)
    landing = await client.get(complete, allow_redirects=False)
    assert landing.status == 303, await landing.text()
    visitor = set_cookie_value(landing)
    await eventually(lambda: receiver.applications == 1)
    [applied] = receiver.applied.values()
    assert applied["anonymousId"] == visitor
    assert metric(client, "identity_amp_hops_total", action="add-to-cart", stage="queued") == 1


async def test_a_queued_call_over_the_batch_apis_event_size_is_sent_whole(
    retry_client: RetryClient, receiver: WebhookReceiver
) -> None:
    """A form within max_form_bytes (16 KB) whose values JSON escapes (a control character
    becomes six bytes): its queued body is several times Segment's 32 KB an event, which
    applies to batches of events, not to a webhook's calls."""
    client = await retry_client()
    receiver.replies = [503, 503, 503]  # the request's three attempts
    fields = {f"note{number}": "\x01" * 3500 for number in range(4)}
    response = await client.post(SUBMIT, data=form(fields), headers={**SAME_ORIGIN, **WITH_COOKIE})
    assert response.status == 202, await response.text()

    await eventually(lambda: receiver.applications == 1, seconds=10)
    applied = next(iter(receiver.applied.values()))
    assert applied["fields"] == fields
    assert len(orjson.dumps(applied)) > 2 * MAX_EVENT_BYTES
    assert metric(client, "identity_events_dead_lettered_total", destination=DESTINATION) == 0


async def test_a_refusal_in_the_outbox_is_a_dead_letter(
    retry_client: RetryClient, receiver: WebhookReceiver, store_kind: str
) -> None:
    client = await retry_client()
    receiver.replies = [503, 503, 503, 422]  # the request's three attempts, then refused
    response = await client.post(SUBMIT, data=form(), headers={**SAME_ORIGIN, **WITH_COOKIE})
    assert response.status == 202, await response.text()

    await eventually(
        lambda: metric(client, "identity_events_dead_lettered_total", destination=DESTINATION) == 1
    )
    await asyncio.sleep(0.3)
    assert len(receiver.calls) == 4 and receiver.applications == 0
    if store_kind == "redis":
        await _replayed_by_the_cli(client, receiver)


async def _replayed_by_the_cli(client: AppClient, receiver: WebhookReceiver) -> None:
    """``outbox status`` lists the dead letter under the action's destination, and
    ``outbox replay-dead`` sends it again: applied once, with the same id."""
    settings = client.app[app_keys.SETTINGS]
    assert settings.redis is not None
    env = clean_env(
        IDENTITY_REDIS_URL=settings.redis.url,
        IDENTITY_REDIS_KEY_PREFIX=settings.redis.key_prefix,
        IDENTITY_AMP=amp_config(receiver.url),
        IDENTITY_SOURCES=sources_env(),
        IDENTITY_SECRET=SECRET,
        IDENTITY_DESTINATION_URL=settings.outbox.destinations[0].url,
        IDENTITY_DESTINATION_WRITE_KEY=WRITE_KEY,
    )

    def outbox(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [COMMAND, "outbox", *args], env=env, capture_output=True, text=True, timeout=30
        )

    status = await asyncio.to_thread(outbox, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = {row["destination"]: row for row in json.loads(status.stdout)}
    assert set(report) == {"default", DESTINATION}
    assert report[DESTINATION]["deadLetters"] == 1
    assert report["default"]["deadLetters"] == 0
    table = await asyncio.to_thread(outbox, "status")
    assert DESTINATION in table.stdout

    replayed = await asyncio.to_thread(outbox, "replay-dead")
    assert replayed.returncode == 0, replayed.stderr
    assert "re-queued 1 dead letters" in replayed.stdout
    await eventually(lambda: receiver.applications == 1)
    assert len({call["id"] for call in receiver.calls}) == 1


async def test_events_and_webhook_bodies_never_reach_each_others_destination(
    retry_client: RetryClient, receiver: WebhookReceiver, collector: Collector
) -> None:
    client = await retry_client()
    receiver.replies = [503, 503, 503]  # queued, then delivered by the outbox
    response = await client.post(SUBMIT, data=form(), headers={**SAME_ORIGIN, **WITH_COOKIE})
    assert response.status == 202, await response.text()
    hit = await client.get(
        "/v1/amp/collect",
        params={"ampId": "amp-Xy3kq_origin", "url": f"{PUBLISHER}/article"},
        headers={**SAME_ORIGIN, **WITH_COOKIE},
    )
    assert hit.status == 204, await hit.text()

    await collector.wait_for(1)
    await eventually(lambda: receiver.applications == 1)
    await asyncio.sleep(0.5)
    # The page call reached Segment, and only it; the webhook saw its action, and only it.
    assert [event["type"] for event in collector.events] == ["page"]
    assert all("action" not in event for event in collector.events)
    assert len(receiver.calls) == 4
    assert all(call["action"] == "add-to-cart" for call in receiver.calls)
    assert receiver.bad_signatures == 0


def test_each_action_has_an_outbox_destination_after_the_events_ones() -> None:
    amp = json.loads(amp_config("http://127.0.0.1:9/apply"))
    amp["actions"]["wish_list"] = {**amp["actions"]["add-to-cart"]}
    settings = make_settings(amp=json.dumps(amp))
    stdout, cart, wish = settings.outbox.destinations
    assert (stdout.name, stdout.kind, stdout.addressed_only) == ("stdout", "stdout", False)
    assert (cart.name, cart.kind, cart.addressed_only) == (DESTINATION, "webhook", True)
    assert (cart.url, cart.secret) == ("http://127.0.0.1:9/apply", WEBHOOK_SECRET.encode())
    assert WEBHOOK_SECRET not in repr(cart)
    assert wish.name == "amp-action-wish_list"
    assert [d.name for d in make_settings().outbox.destinations] == ["stdout"]


def test_an_events_destination_may_not_take_an_actions_name() -> None:
    taken = json.dumps({DESTINATION: {"url": "https://api.example.com", "write_key": "wk"}})
    with pytest.raises(ConfigError) as caught:
        make_settings(amp=amp_config("http://127.0.0.1:9/apply"), destinations=taken)
    assert caught.value.problems == [f"destination name {DESTINATION!r} is used twice"]


async def test_the_webhook_sink_signs_each_body_and_retries_the_whole_batch(
    receiver: WebhookReceiver,
) -> None:
    sink = WebhookSink(
        Destination(DESTINATION, "webhook", url=receiver.url, secret=WEBHOOK_SECRET.encode()),
        timeout=0.5,
    )
    bodies = [orjson.dumps({"id": f"hop-{n}", "action": "add-to-cart"}) for n in (1, 2, 3)]
    try:
        receiver.replies = [200, 503]
        assert (await sink.send(bodies)).outcome == "retry"  # stops at the failed body
        assert [call["id"] for call in receiver.calls] == ["hop-1", "hop-2"]
        assert await sink.send(bodies) == DELIVERED  # the whole batch again, in order
        assert [call["id"] for call in receiver.calls[2:]] == ["hop-1", "hop-2", "hop-3"]
        assert receiver.applications == 3  # hop-1 twice at the receiver, applied once
        receiver.replies = [422]
        refused = await sink.send(bodies[:1])
        assert (refused.outcome, refused.reason) == ("rejected", "http 422")
        await receiver.stop()
        assert (await sink.send(bodies[:1])).outcome == "retry"  # nobody listening
    finally:
        await sink.close()


@pytest.mark.parametrize(
    ("head", "applied"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", True),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 1000\r\n\r\n", False),
    ],
    ids=["2xx", "5xx"],
)
async def test_a_webhook_answer_is_its_status_whatever_its_body_does(
    head: bytes, applied: bool
) -> None:
    """A webhook that answered 2xx and then sends its body slowly, or never ends it, has
    applied the action: its call is not a timeout, retried (and queued, and applied again).
    Read whole, the body held the visitor for every attempt's timeout."""
    amp = AmpSettings("", frozenset(), "", frozenset(), webhook_timeout=0.5, webhook_attempts=3)
    async with raw_destination(head, b'{"ok":', hang=True) as url:
        action = ActionSettings("cart", f"{url}/apply", b"s" * 32)
        async with aiohttp.ClientSession() as http:
            outcome = await webhooks.call(http, amp, action, b'{"id":"hop-1"}')
    assert (outcome.applied, outcome.attempts) == (applied, 1 if applied else 3)
    assert outcome.reason == ("" if applied else "status 503")
