"""Delivery through failures, on real Redis: outages, 429s, a killed forwarder, dead letters.

The tests that take ``outbox_redis`` run on one node and (`make topology`) on a 3-master
Cluster, where the forwarder reads, reclaims, trims and dead-letters shard by shard."""

import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from identity_service import app_keys
from identity_service.app import create_app
from identity_service.constants import (
    DEFAULT_STARTED_EVENT,
    KEY_SHARDS,
    dead_letter_key,
    outbox_key,
)
from identity_service.crypto import OutboxSealer
from identity_service.events import split_documents
from identity_service.feeds import (
    RECLAIM_BATCH,
    RETIRE_AFTER_RECLAIM_IDLES,
    FeedEntry,
    RedisFeed,
    legacy_outbox_streams,
    trim_acknowledged,
)
from identity_service.forwarder import Forwarder
from identity_service.metrics import Metrics
from identity_service.outbox import running_forwarders
from identity_service.outbox_admin import (
    DEAD_LETTER_PAGE,
    newest_dead_letters,
    outbox_status,
    replay_dead,
    retire_destination,
)
from identity_service.settings import OutboxSettings, Settings
from identity_service.sinks import DELIVERED, Delivery, StdoutSink
from identity_service.stores.redis import AdminClient
from identity_service.stores.resp import RespClient
from identity_service.streams import entries, text
from identity_service.validation import parse_exchange, parse_prepare
from tests.collector import WRITE_KEY, Answer, Collector, running_collector
from tests.conftest import (
    CHECKOUT_URL,
    SECRET,
    AppClient,
    Server,
    auth,
    exchange,
    make_settings,
    prepare,
    sources_env,
)
from tests.redis_server import RedisServer
from tests.test_amp_actions import amp_config
from tests.test_cli import COMMAND, clean_env
from tests.webhook_receiver import WebhookReceiver

FAST = {
    "batch_max_wait": "0.05",
    "backoff_base": "0.05",
    "backoff_max": "0.2",
    "delivery_timeout": "0.5",
}

ClientMaker = Callable[..., Awaitable[AppClient]]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as running:
        yield running


def delivery_settings(redis: Server, collector: Collector, **env: str) -> Settings:
    return make_settings(
        redis.url,
        destination_url=collector.url,
        destination_write_key=WRITE_KEY,
        **{**FAST, **env},
    )


async def run_handoffs(client: AppClient, count: int) -> None:
    for number in range(count):
        token = (await prepare(client, anonymousId=f"visitor-{number}"))["token"]
        assert (await exchange(client, token))[0] == 200


def assert_duplicates_are_identical(events: list[dict[str, Any]]) -> None:
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        copies[event["messageId"]].append({k: v for k, v in event.items() if k != "sentAt"})
    for same_id in copies.values():
        assert all(copy == same_id[0] for copy in same_id)


async def test_5xx_and_timeouts_lose_nothing(
    aiohttp_client: ClientMaker, outbox_redis: Server, collector: Collector
) -> None:
    collector.plan = [Answer(500), Answer(503), Answer(502), Answer(hold=1.0), Answer(hold=1.0)]
    client = await aiohttp_client(create_app(delivery_settings(outbox_redis, collector)))

    await run_handoffs(client, 20)
    await collector.wait_for(40)

    assert len(collector.message_ids) == 40
    assert [r.status for r in collector.requests[:3]] == [500, 503, 502]
    assert_duplicates_are_identical(collector.events)
    metrics = client.app[app_keys.METRICS]
    assert metrics.value("identity_delivery_retries_total", destination="default") >= 4


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry delays the forwarders wait out, in order."""
    recorded: list[float] = []
    wait = Forwarder._wait

    async def recorded_wait(self: Forwarder, seconds: float, held: list[FeedEntry]) -> bool:
        recorded.append(seconds)
        return await wait(self, seconds, held)

    monkeypatch.setattr(Forwarder, "_wait", recorded_wait)
    return recorded


async def test_429_retry_after_is_honoured(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    collector: Collector,
    waits: list[float],
) -> None:
    collector.plan = [Answer(429, headers={"Retry-After": "1"})]
    client = await aiohttp_client(create_app(delivery_settings(redis_server, collector)))

    await prepare(client)
    await collector.wait_for(1)

    refused, accepted = collector.requests[0], collector.requests[1]
    assert refused.status == 429
    assert waits == [1.0]  # the delay the destination asked for, not the backoff's
    assert [e["messageId"] for e in accepted.events] == [e["messageId"] for e in refused.events]


async def test_429s_without_retry_after_back_off_more_each_time(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    collector: Collector,
    waits: list[float],
) -> None:
    """Throttled without a Retry-After, the forwarder backs off as for failed attempts,
    up to backoff_max, and still does not count them toward the attempts it makes."""
    collector.plan = [Answer(429)] * 5
    settings = delivery_settings(
        redis_server,
        collector,
        backoff_base="0.01",
        backoff_max="0.04",
        delivery_max_attempts="2",
    )
    client = await aiohttp_client(create_app(settings))

    await prepare(client)
    await collector.wait_for(1)

    assert [request.status for request in collector.requests] == [429] * 5 + [200]
    # Full jitter: the nth delay lies between half its ceiling and its ceiling.
    ceilings = [0.01, 0.02, 0.04, 0.04, 0.04]
    assert len(waits) == len(ceilings)
    for delay, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


@pytest.mark.parametrize("status", [503, 429])
async def test_a_retry_after_of_0_backs_off_as_if_none_were_sent(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    collector: Collector,
    waits: list[float],
    status: int,
) -> None:
    """A destination answering with Retry-After: 0 (or a date already past) asks for the
    batch again at once: taken literally, a 503's attempts were all spent in a moment and
    the batch dead-lettered. The delay is the backoff's, for a 503 as for a 429."""
    collector.plan = [Answer(status, headers={"Retry-After": "0"})] * 3
    settings = delivery_settings(
        redis_server,
        collector,
        backoff_base="0.02",
        backoff_max="0.08",
        delivery_max_attempts="4",
    )
    client = await aiohttp_client(create_app(settings))

    await prepare(client)
    await collector.wait_for(1)

    assert [request.status for request in collector.requests] == [status] * 3 + [200]
    ceilings = [0.02, 0.04, 0.08]
    assert len(waits) == len(ceilings)
    for delay, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


async def app_with_prefix(
    aiohttp_client: ClientMaker, redis: Server, collector: Collector, **env: str
) -> tuple[AppClient, str]:
    """A test app on Redis delivering to ``collector``, and its key prefix."""
    settings = delivery_settings(redis, collector, **env)
    assert settings.redis is not None
    return await aiohttp_client(create_app(settings)), settings.redis.key_prefix


async def test_a_permanent_4xx_dead_letters_and_replay_delivers(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    redis_client = outbox_client
    collector.plan = [Answer(400)]
    client, prefix = await app_with_prefix(aiohttp_client, outbox_redis, collector)

    await prepare(client)
    (status,) = await wait_for_dead(redis_client, prefix, 1)
    assert collector.events == []
    assert status.pending == 0 and status.in_flight == 0

    assert await replay_dead(redis_client, prefix, ["default"]) == 1
    await collector.wait_for(1)
    (status,) = await outbox_status(redis_client, prefix, ["default"])
    assert status.dead == 0


async def test_too_many_attempts_dead_letters_with_the_reason(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    redis_client = outbox_client
    collector.plan = [Answer(500)] * 3
    client, prefix = await app_with_prefix(
        aiohttp_client, outbox_redis, collector, delivery_max_attempts="2"
    )

    await prepare(client)
    await wait_for_dead(redis_client, prefix, 1)

    reasons = []
    for shard in range(KEY_SHARDS):
        dead = dead_letter_key(prefix, shard, "default")
        reasons += [fields[b"reason"] for _, fields in await entries(redis_client, dead)]
    assert reasons == [b"too many attempts"]
    assert len(collector.requests) == 2


async def test_outbox_dead_shows_the_newest_reasons_and_attempts_and_nothing_else(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    redis_client: Redis,
    collector: Collector,
) -> None:
    # The first batch is refused for good (400) after one send; the second fails twice
    # (500) and is given up after delivery_max_attempts.
    collector.plan = [Answer(400), Answer(500), Answer(500)]
    client, prefix = await app_with_prefix(
        aiohttp_client, redis_server, collector, delivery_max_attempts="2"
    )
    await prepare(client, anonymousId="anon-refused-31c9")
    await wait_for_dead(redis_client, prefix, 1)
    await prepare(client, anonymousId="anon-retried-58e0")
    await wait_for_dead(redis_client, prefix, 2)
    message_ids = {event["messageId"] for r in collector.requests for event in r.events}
    assert len(message_ids) == 2

    def dead(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [COMMAND, "outbox", "dead", *args],
            env=command_env(redis_server, collector, prefix),
            capture_output=True,
            text=True,
            timeout=30,
        )

    as_json = await asyncio.to_thread(dead, "--json")
    assert as_json.returncode == 0, as_json.stderr
    letters = json.loads(as_json.stdout)
    assert [{k: v for k, v in letter.items() if k != "failedAt"} for letter in letters] == [
        {"destination": "default", "reason": "too many attempts", "attempts": 2},
        {"destination": "default", "reason": "http 400", "attempts": 1},
    ]
    assert letters[0]["failedAt"] >= letters[1]["failedAt"]
    assert letters[0]["failedAt"].endswith("Z")

    newest = await asyncio.to_thread(dead, "default", "--limit", "1")
    assert newest.returncode == 0, newest.stderr
    header, line = newest.stdout.splitlines()
    assert header.split() == ["failed", "at", "destination", "attempts", "reason"]
    assert line.split()[1:] == ["default", "2", "too", "many", "attempts"]
    assert (await asyncio.to_thread(dead, "elsewhere")).stdout == "no dead letters\n"
    assert (await asyncio.to_thread(dead, "--limit", "0")).returncode == 2

    for shown in (as_json.stdout, newest.stdout):
        for secret in (WRITE_KEY, "anon-refused-31c9", "anon-retried-58e0", *message_ids):
            assert secret not in shown


async def test_outbox_dead_reads_pages_and_survives_damaged_letters(redis_client: Redis) -> None:
    """Many letters over several shards: the newest come first, however the pages fall;
    a letter whose fields do not read shows its entry id's time and no attempts."""
    prefix = "dead-pages-9f2c:"
    written: list[int] = []
    for number in range(2 * DEAD_LETTER_PAGE + 30):
        shard = 0 if number % 5 else 3  # most in one shard: several pages of it are read
        failed_at = 1_700_000_000_000 + number * 1000
        await redis_client.xadd(
            dead_letter_key(prefix, shard, "default"),
            {"j": "{}", "reason": f"http {400 + number % 3}", "failed_at": failed_at,
             "attempts": 1},
        )  # fmt: skip
        written.append(failed_at)
    damaged = dead_letter_key(prefix, 7, "default")
    await redis_client.xadd(damaged, {"reason": "hand-made", "failed_at": "x", "attempts": "y"})
    await redis_client.xadd(damaged, {"reason": "far future", "failed_at": "9" * 30})

    newest = await newest_dead_letters(redis_client, prefix, ["default"], 7)
    # Both damaged ones take their entry ids' time (now): the newest, in either order.
    assert {letter.reason for letter in newest[:2]} == {"far future", "hand-made"}
    assert [letter.attempts for letter in newest[:2]] == [None, None]
    assert [letter.failed_at_ms for letter in newest[2:]] == sorted(written)[-5:][::-1]
    every = await newest_dead_letters(redis_client, prefix, ["default"], 1000)
    assert len(every) == len(written) + 2
    times = [letter.failed_at_ms for letter in every]
    assert times == sorted(times, reverse=True)
    assert all(letter.as_json()["failedAt"].endswith("Z") for letter in every)


async def wait_for_dead(redis: AdminClient, prefix: str, count: int) -> list[Any]:
    for _ in range(300):
        report = await outbox_status(redis, prefix, ["default"])
        if report[0].dead >= count:
            return report
        await asyncio.sleep(0.02)
    raise AssertionError("nothing was dead-lettered")


def command_env(redis: Server, collector: Collector, prefix: str) -> dict[str, str]:
    """The environment of an ``identity-service`` command sharing the test app's outbox."""
    return clean_env(
        IDENTITY_REDIS_URL=redis.url,
        IDENTITY_REDIS_KEY_PREFIX=prefix,
        IDENTITY_SECRET=SECRET,
        IDENTITY_SOURCES=sources_env(),
        IDENTITY_DESTINATION_URL=collector.url,
        IDENTITY_DESTINATION_WRITE_KEY=WRITE_KEY,
    )


def start_forwarder(redis: Server, collector: Collector, prefix: str) -> subprocess.Popen[bytes]:
    # Taken over soon after a kill: reclaim_idle as short as the send it must outlast allows.
    env = {
        **command_env(redis, collector, prefix),
        "IDENTITY_RECLAIM_IDLE": "2",
        "IDENTITY_BATCH_MAX_WAIT": "0.05",
        "IDENTITY_DELIVERY_TIMEOUT": "0.9",
    }
    return subprocess.Popen([COMMAND, "forward"], env=env, stdout=subprocess.DEVNULL)


async def test_a_forwarder_killed_before_its_ack_is_taken_over(
    aiohttp_client: ClientMaker, outbox_redis: Server, collector: Collector
) -> None:
    redis_server = outbox_redis
    prefix = f"kill{os.getpid()}:"
    settings = delivery_settings(redis_server, collector, redis_key_prefix=prefix, forwarder="off")
    client = await aiohttp_client(create_app(settings))
    await run_handoffs(client, 5)
    collector.plan = [Answer(hold=60)]  # the first batch is received, never answered

    first = start_forwarder(redis_server, collector, prefix)
    try:
        for _ in range(500):
            if collector.requests:
                break
            await asyncio.sleep(0.02)
        sent = {e["messageId"] for e in collector.requests[0].events}
        assert len(sent) == 10
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()

    second = start_forwarder(redis_server, collector, prefix)
    try:
        await collector.wait_for(10)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
    assert collector.message_ids == sent

    status = await asyncio.to_thread(
        subprocess.run,
        [COMMAND, "outbox", "status", "--json"],
        env=command_env(redis_server, collector, prefix),
        capture_output=True,
        check=True,
        text=True,
    )
    (report,) = json.loads(status.stdout)
    assert report == {
        "destination": "default",
        "pending": 0,
        "inFlight": 0,
        "deadLetters": 0,
        "oldestAgeSeconds": None,
    }


async def test_ten_thousand_handoffs_arrive_once_each(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    settings = delivery_settings(outbox_redis, collector, batch_max_wait="0.2")
    assert settings.redis is not None
    client = await aiohttp_client(create_app(settings))
    service = client.app[app_keys.HANDOFFS]
    shop, checkout = (s for s in settings.sources if s.name in ("shop", "checkout"))
    handoffs = 10_000

    async def one(number: int) -> None:
        request = parse_prepare(
            {"anonymousId": f"v-{number}", "destination": CHECKOUT_URL}, settings.max_ttl
        )
        prepared = await service.prepare(shop, request)
        await service.exchange(checkout, parse_exchange({"token": prepared.token}))

    for start in range(0, handoffs, 200):
        await asyncio.gather(*(one(n) for n in range(start, start + 200)))
    await collector.wait_for(2 * handoffs, seconds=120)

    assert len(collector.message_ids) == 2 * handoffs
    assert_duplicates_are_identical(collector.events)
    assert all(len(r.events) <= 100 for r in collector.requests)
    for _ in range(100):  # the forwarder trims what was acknowledged, once a second
        lengths = [
            await outbox_client.xlen(outbox_key(settings.redis.key_prefix, s))
            for s in range(KEY_SHARDS)
        ]
        if sum(lengths) == 0:
            break
        await asyncio.sleep(0.05)
    assert sum(lengths) == 0


async def test_trimming_keeps_what_any_group_has_not_acknowledged(
    outbox_client: AdminClient,
) -> None:
    redis_client = outbox_client
    prefix = f"trim-test-{os.getpid()}:"
    stream = outbox_key(prefix, 0)
    ids = [await redis_client.xadd(stream, {"j": str(n)}) for n in range(6)]
    for group in ("a", "b", "elsewhere"):  # "elsewhere": another process's destination
        await redis_client.xgroup_create(stream, group, id="0")
    await redis_client.xreadgroup("a", "c1", {stream: ">"}, count=6)
    await redis_client.xack(stream, "a", *ids[:4])
    await redis_client.xreadgroup("b", "c1", {stream: ">"}, count=3)
    await redis_client.xack(stream, "b", *ids[:3])
    await redis_client.xreadgroup("elsewhere", "c1", {stream: ">"}, count=2)
    await redis_client.xack(stream, "elsewhere", ids[0])

    await trim_acknowledged(redis_client, stream)
    # "elsewhere" still needs 1 (pending), though neither a nor b does.
    assert [entry_id for entry_id, _ in await entries(redis_client, stream)] == ids[1:]

    assert await retire_destination(redis_client, prefix, "elsewhere") == 1
    await trim_acknowledged(redis_client, stream)
    # a has 4 and 5 pending; b acked 0-2 and never read 3-5: 3 is the oldest still needed.
    assert [entry_id for entry_id, _ in await entries(redis_client, stream)] == ids[3:]
    await redis_client.delete(stream)


async def prepare_once_redis_answers(client: AppClient, anonymous_id: str) -> None:
    """Prepare a handoff as soon as the app's store answers again (it was restarted)."""
    for _ in range(100):
        response = await client.post(
            "/v1/handoffs",
            json={"anonymousId": anonymous_id, "destination": CHECKOUT_URL},
            headers=auth("shop"),
        )
        if response.status == 201:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the store did not answer again")


async def test_delivery_resumes_after_redis_restarts_empty(
    aiohttp_client: ClientMaker, private_redis: RedisServer, collector: Collector
) -> None:
    client, _ = await app_with_prefix(aiohttp_client, private_redis, collector)
    await prepare(client, anonymousId="before")
    await collector.wait_for(1)

    private_redis.stop()
    await asyncio.sleep(1.5)  # the forwarder meets the outage
    private_redis.start()  # without persistence: its consumer groups are gone too

    await prepare_once_redis_answers(client, "after")
    await collector.wait_for(2, seconds=15)
    assert {e["anonymousId"] for e in collector.events} == {"before", "after"}


async def test_delivery_resumes_after_redis_restarts_empty_under_held_entries(
    aiohttp_client: ClientMaker, private_redis: RedisServer, collector: Collector
) -> None:
    """A read takes a share of a batch from every shard, and the forwarder holds what its
    batch does not take. Redis restarts empty while the batch is retried: the groups are
    made again, and what the forwarder had read before (gone from Redis, still in hand) is
    delivered, then what is written after."""
    settings = delivery_settings(
        private_redis,
        collector,
        forwarder="off",
        batch_max_events="2",
        delivery_max_attempts="1000",
    )
    client = await aiohttp_client(create_app(settings))
    before = {f"before-{number}" for number in range(20)}
    for anonymous_id in before:  # over most of the 16 shards
        await prepare(client, anonymousId=anonymous_id)
    collector.plan = [Answer(500)] * 10_000
    async with running_forwarders(settings, Metrics()) as (forwarder,):
        for _ in range(250):
            if forwarder._held and collector.requests:
                break
            await asyncio.sleep(0.02)
        assert forwarder._held
        # What the forwarder has read: the batch it retries, and what it holds for the next.
        in_hand = {event["anonymousId"] for event in collector.requests[-1].events}
        in_hand |= {
            orjson.loads(e)["anonymousId"] for entry in forwarder._held for e in entry.events
        }

        private_redis.stop()
        private_redis.start()
        collector.plan = []

        await prepare_once_redis_answers(client, "after")
        await collector.wait_for(len(in_hand) + 1, seconds=15)
    # The rest of before, never read, was lost with the data.
    assert {e["anonymousId"] for e in collector.events} == {*in_hand, "after"}


async def test_a_redis_stall_during_a_retry_delay_does_not_drop_the_batch(
    aiohttp_client: ClientMaker, private_redis: RedisServer, collector: Collector
) -> None:
    """A keep-alive of the retry delay fails while Redis stalls: the batch is still sent
    again when the delay is over, not left pending for a reclaim a minute later."""
    collector.plan = [Answer(503, headers={"Retry-After": "3"})]
    client, _ = await app_with_prefix(aiohttp_client, private_redis, collector, redis_timeout="0.2")
    await prepare(client)
    for _ in range(250):
        if collector.requests:
            break
        await asyncio.sleep(0.02)
    blocker = socket.create_connection(("127.0.0.1", private_redis.port))
    try:
        # Longer than the interval of the keep-alives (1 s): one of them meets the stall.
        blocker.sendall(b"DEBUG SLEEP 1.5\r\n")
        await collector.wait_for(1, seconds=10)
    finally:
        blocker.close()
    refused, accepted = collector.requests
    assert (refused.status, accepted.status) == (503, 200)
    assert [e["messageId"] for e in accepted.events] == [e["messageId"] for e in refused.events]


async def test_started_and_fallback_events_are_queued_one_json_document_a_line(
    aiohttp_client: ClientMaker, redis_server: RedisServer, redis_client: Redis
) -> None:
    settings = make_settings(redis_server.url, forwarder="off")
    assert settings.redis is not None
    client = await aiohttp_client(create_app(settings))
    await prepare(client, anonymousId="visitor-lines")
    status, _ = await exchange(client, "unknown-token", fallback=True)
    assert status == 200
    queued = [
        fields
        for shard in range(KEY_SHARDS)
        for _, fields in await entries(redis_client, outbox_key(settings.redis.key_prefix, shard))
    ]
    assert [set(fields) for fields in queued] == [{b"j"}, {b"j"}]
    sealer = OutboxSealer(settings.secret)
    documents = [doc for fields in queued for doc in sealer.open(fields[b"j"]).split(b"\n")]
    events = sorted(json.loads(document)["event"] for document in documents)
    assert events == ["Cross-Domain Handoff Completed", "Cross-Domain Handoff Started"]


async def test_an_entry_an_earlier_version_queued_is_delivered(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    redis_client: Redis,
    collector: Collector,
) -> None:
    """Entries in the format written before ``j`` (``e``: one JSON list) still drain."""
    settings = delivery_settings(redis_server, collector)
    assert settings.redis is not None
    events = [{"type": "track", "event": f"Older {n}", "messageId": f"older-{n}"} for n in (1, 2)]
    sealed = OutboxSealer(settings.secret).seal(json.dumps(events).encode())
    await redis_client.xadd(outbox_key(settings.redis.key_prefix, 3), {"e": sealed})
    await aiohttp_client(create_app(settings))
    await collector.wait_for(2)
    assert sorted(e["messageId"] for e in collector.events) == ["older-1", "older-2"]
    assert all(e["sentAt"].endswith("Z") for e in collector.events)


async def test_entries_left_in_the_streams_of_an_earlier_version_are_delivered(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    redis_client: Redis,
    collector: Collector,
) -> None:
    """0.3.0's streams (tags ``{0}``…``{15}``) are read while they exist: an upgrade strands
    no entry, with the groups 0.3.0 made or without."""
    settings = delivery_settings(redis_server, collector)
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    sealer = OutboxSealer(settings.secret)
    for shard, group in ((3, True), (12, False)):
        event = {"type": "track", "event": "Before", "messageId": f"before-{shard}"}
        stream = f"{prefix}{{{shard}}}:outbox"
        await redis_client.xadd(stream, {"j": sealer.seal(json.dumps(event).encode())})
        if group:
            await redis_client.xgroup_create(stream, "default", id="0")
    await aiohttp_client(create_app(settings))
    await collector.wait_for(2)
    assert sorted(e["messageId"] for e in collector.events) == ["before-12", "before-3"]


async def test_a_cancelled_blocking_read_claims_nothing_that_arrives_after(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    prefix = f"cancelled-read-{os.getpid()}:"
    commands = RespClient(redis_server.url, timeout=3.0)
    feed = RedisFeed(
        redis_client, commands, prefix, "default", OutboxSealer(SECRET.encode()), 60, ["default"]
    )
    try:
        assert await feed.read(10, wait=0.01) == []  # creates the groups
        read = asyncio.ensure_future(feed.read(10, wait=2.0))
        await asyncio.sleep(0.1)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        stream = outbox_key(prefix, 0)
        await redis_client.xadd(stream, {"e": b"x"})
        await asyncio.sleep(0.3)
        # Nobody holds it: the next reader gets it.
        assert (await redis_client.xpending(stream, "default"))["pending"] == 0
    finally:
        await commands.close()
        await redis_client.delete(*(outbox_key(prefix, shard) for shard in range(KEY_SHARDS)))


async def test_a_stop_lets_a_read_that_took_entries_end_and_leaves_none_pending(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """A stop that comes while a read opens the entries the store handed it (it lets
    requests through between shards) does not cancel it: cancelled, it would leave them
    pending under this consumer until another reclaimed them, after reclaim_idle."""
    prefix = f"stop-while-taking-{os.getpid()}:"
    sealer = OutboxSealer(SECRET.encode())
    commands = RespClient(redis_server.url, timeout=3.0)
    feed = RedisFeed(redis_client, commands, prefix, "default", sealer, 60, ["default"])
    forwarder = Forwarder("default", feed, StdoutSink(), OutboxSettings(), Metrics())
    streams = [outbox_key(prefix, shard) for shard in range(KEY_SHARDS)]
    try:
        assert await feed.read(10, wait=0.01) == []  # creates the groups
        for number, stream in enumerate(streams):
            event = {"type": "track", "event": "Queued", "messageId": f"queued-{number}"}
            await redis_client.xadd(stream, {"j": sealer.seal(json.dumps(event).encode())})

        async def stop_once_taking() -> None:
            while not feed.taking:  # noqa: ASYNC110 (a flag of the feed, polled each turn)
                await asyncio.sleep(0)
            forwarder.stopping.set()

        stopper = asyncio.ensure_future(stop_once_taking())
        read = await forwarder._read(100, 1.0)
        await stopper
        assert sorted(orjson.loads(entry.events[0])["messageId"] for entry in read) == sorted(
            f"queued-{number}" for number in range(KEY_SHARDS)
        )
        # Handed on, not stranded: all of them are this consumer's, in the forwarder's hands
        # for its last batch; nothing was left behind unread.
        pending = [(await redis_client.xpending(s, "default"))["pending"] for s in streams]
        assert sum(pending) == len(read)
    finally:
        await commands.close()
        await redis_client.delete(*streams)


async def test_dead_letters_of_an_earlier_version_are_counted_and_replayed(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """0.3.0 kept dead letters under tags ``{0}``…``{15}``: after an upgrade ``outbox
    status`` still counts them and ``replay-dead`` still re-queues them."""
    prefix = f"legacy-dead-{os.getpid()}:"
    legacy = f"{prefix}{{5}}:dead:default"
    await redis_client.xadd(legacy, {"j": b"sealed", "reason": b"HTTP 400", "failed_at": b"1"})
    try:
        (status,) = await outbox_status(redis_client, prefix, ["default"])
        assert status.dead == 1
        assert await replay_dead(redis_client, prefix, ["default"]) == 1
        (status,) = await outbox_status(redis_client, prefix, ["default"])
        assert (status.dead, status.pending) == (0, 1)
    finally:
        await redis_client.delete(
            legacy, *(outbox_key(prefix, shard) for shard in range(KEY_SHARDS))
        )


async def test_outbox_dead_reads_a_letter_whose_reason_is_not_utf8(redis_client: Redis) -> None:
    """A damaged letter's reason that is not UTF-8 is shown as far as it reads, not a
    UnicodeDecodeError traceback of `outbox dead`."""
    prefix = f"dead-bytes-{os.getpid()}:"
    dead = dead_letter_key(prefix, 2, "default")
    await redis_client.xadd(dead, {"reason": b"http \xff\xfe", "failed_at": b"1", "attempts": 1})
    try:
        (letter,) = await newest_dead_letters(redis_client, prefix, ["default"], 5)
        assert letter.reason.startswith("http ")
        assert (letter.failed_at_ms, letter.attempts) == (1, 1)
    finally:
        await redis_client.delete(dead)


async def test_retire_removes_the_group_from_the_streams_of_an_earlier_version_too(
    redis_client: Redis,
) -> None:
    """The forwarders still read (and trim) 0.3.0's streams (tags ``{0}``…``{15}``) after an
    upgrade: a group left there by `outbox retire` would keep their entries for ever."""
    prefix = f"retire-legacy-{os.getpid()}:"
    legacy = f"{prefix}{{7}}:outbox"
    await redis_client.xadd(legacy, {"j": b"sealed"})
    await redis_client.xgroup_create(legacy, "old-warehouse", id="0")
    try:
        assert await retire_destination(redis_client, prefix, "old-warehouse") == 1
        assert await redis_client.xinfo_groups(legacy) == []
        await trim_acknowledged(redis_client, legacy)
    finally:
        await redis_client.delete(legacy)


@pytest.mark.parametrize("shards", [KEY_SHARDS, 4, 1])
async def test_retire_takes_the_group_off_every_stream_the_feed_reads(
    redis_server: RedisServer, redis_client: Redis, shards: int
) -> None:
    """The feed and `outbox retire` find 0.3.0's streams by one rule (those of its tags
    that are not today's keys, none on a Cluster), whatever the number of shards: a group
    left on a stream the feed reads would keep its entries for ever."""
    prefix = f"retire-rule-{shards}-{os.getpid()}:"
    old_streams = [stream for stream, _ in legacy_outbox_streams(redis_client, prefix, shards)]
    current = [outbox_key(prefix, shard, shards) for shard in range(shards)]
    assert old_streams and set(old_streams).isdisjoint(current)
    for stream in old_streams:
        await redis_client.xadd(stream, {"j": b"sealed"})
    commands = RespClient(redis_server.url, timeout=3.0)
    feed = RedisFeed(
        redis_client, commands, prefix, "gone", OutboxSealer(SECRET.encode()), 60, ["gone"],
        shards=shards,
    )  # fmt: skip
    try:
        await feed.maintain()  # makes its groups on the streams it reads
        read = [s for s in current + old_streams if await redis_client.xinfo_groups(s)]
        assert read == current + old_streams
        assert await retire_destination(redis_client, prefix, "gone", shards) == len(read)
        assert [s for s in read if await redis_client.xinfo_groups(s)] == []
    finally:
        await commands.close()
        await redis_client.delete(*current, *old_streams)


@pytest.mark.topology
async def test_a_cluster_that_goes_away_again_after_restarting_empty_keeps_the_batch(
    tmp_path: Path, collector: Collector
) -> None:
    """The forwarder waits out a retry delay; the Cluster restarts empty (a keep-alive meets
    NOGROUP, so the next one makes the groups again first), then goes away once more: that
    keep-alive meets redis-py's RedisClusterException (no RedisError), which must not drop
    the batch, the only copy left, from the forwarder's hands."""
    import structlog.testing

    from identity_service.stores.redis import connect
    from tests.redis_topologies import Cluster

    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        settings = delivery_settings(cluster, collector, forwarder="off")
        assert settings.redis is not None
        event = {"type": "track", "event": "Before", "messageId": "before-cluster-flap"}
        admin = connect(settings.redis)
        try:
            sealed = OutboxSealer(settings.secret).seal(json.dumps(event).encode())
            await admin.xadd(outbox_key(settings.redis.key_prefix, 5), {"j": sealed})
        finally:
            await admin.aclose()
        collector.plan = [Answer(503, headers={"Retry-After": "12"})]

        async def logged_until(check: Callable[[Any], bool], seconds: float) -> None:
            for _ in range(int(seconds / 0.05)):
                if any(check(line) for line in logged):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"not logged: {logged}")

        with structlog.testing.capture_logs() as logged:
            async with running_forwarders(settings, Metrics()):
                for _ in range(500):
                    if collector.requests:
                        break
                    await asyncio.sleep(0.02)
                assert collector.requests, "the batch was not sent"
                for node in cluster.nodes:
                    node.stop()
                for node in cluster.nodes:
                    node.start()  # the same nodes.conf: the same Cluster, without its data
                await logged_until(lambda line: line.get("error") == "ResponseError", 8)
                for node in cluster.nodes:
                    node.stop()
                await asyncio.sleep(2.5)
                for node in cluster.nodes:
                    node.start()
                await collector.wait_for(1, seconds=25)
        assert [e["messageId"] for e in collector.events] == ["before-cluster-flap"]
        assert not [line for line in logged if line["event"] == "forwarder_error"]
    finally:
        cluster.stop()


class AnsweringSink:
    """Records the messageIds of each batch, and answers from ``answers`` (then delivered)."""

    def __init__(self, answers: list[Delivery] | None = None) -> None:
        self.sent: list[list[str]] = []
        self.answers = answers or []

    async def send(self, events: list[bytes]) -> Delivery:
        self.sent.append([orjson.loads(event)["messageId"] for event in events])
        return self.answers.pop(0) if self.answers else DELIVERED

    async def close(self) -> None:
        return None


async def test_entries_a_forwarder_reclaimed_stay_its_own_while_it_retries(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """A forwarder takes over a dead one's entries (XAUTOCLAIM), more than its next batch
    needs, then waits out a retry delay: the entries it reclaimed and has not batched yet
    are kept claimed too, so no other forwarder takes them over meanwhile and sends them
    a second time."""
    prefix = f"reclaimed-kept-{os.getpid()}:"
    sealer = OutboxSealer(SECRET.encode())
    streams = [outbox_key(prefix, shard) for shard in range(KEY_SHARDS)]
    stream = streams[0]
    await redis_client.xgroup_create(stream, "default", id="0", mkstream=True)
    for number in range(3):
        event = {"type": "track", "event": "Queued", "messageId": f"dead-{number}"}
        await redis_client.xadd(stream, {"j": sealer.seal(json.dumps(event).encode())})
    # A forwarder read them, then died.
    await redis_client.xreadgroup("default", "dead-forwarder", {stream: ">"}, count=3)
    await asyncio.sleep(0.6)  # idle past reclaim_idle

    settings = OutboxSettings(batch_max_events=1, batch_max_wait=0.01, reclaim_idle=0.5)
    clients = [RespClient(redis_server.url, timeout=3.0) for _ in range(2)]
    feeds = [
        RedisFeed(redis_client, client, prefix, "default", sealer, 0.5, ["default"])
        for client in clients
    ]
    first_sink = AnsweringSink([Delivery("retry", "http 503", retry_after=3.0)])
    second_sink = AnsweringSink()
    first = Forwarder("default", feeds[0], first_sink, settings, Metrics())
    second = Forwarder("default", feeds[1], second_sink, settings, Metrics())
    tasks = [asyncio.create_task(first.run())]
    try:
        for _ in range(250):
            if first_sink.sent:
                break
            await asyncio.sleep(0.02)
        assert first_sink.sent, "the reclaimed entries were not sent"
        tasks.append(asyncio.create_task(second.run()))
        await asyncio.sleep(1.5)  # the first waits out its delay; the second reclaims
        assert second_sink.sent == []
        for _ in range(250):
            if len({m for batch in first_sink.sent for m in batch}) == 3:
                break
            await asyncio.sleep(0.02)
    finally:
        for forwarder in (first, second):
            forwarder.stopping.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.close()
        await redis_client.delete(*streams)
    delivered = [m for batch in first_sink.sent[1:] + second_sink.sent for m in batch]
    assert sorted(delivered) == ["dead-0", "dead-1", "dead-2"]


class CallByCallSink(AnsweringSink):
    """An AMP action's webhook as the forwarder sees it: a call per body, each taking
    ``seconds`` (within the delivery timeout), all answered 2xx."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def send(self, events: list[bytes]) -> Delivery:
        for event in events:
            await asyncio.sleep(self.seconds)
            self.sent.append([orjson.loads(event)["messageId"]])
        return DELIVERED


async def test_a_webhook_batch_longer_than_the_reclaim_idle_time_stays_its_forwarders(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """A webhook gets each queued body as a call of its own, each up to the delivery
    timeout: a batch of several may take longer than reclaim_idle, which the settings hold
    above one call only. Its entries stay claimed while it is sent, so a second forwarder
    does not take the batch over mid-send and send it again."""
    prefix = f"webhook-batch-{os.getpid()}:"
    sealer = OutboxSealer(SECRET.encode())
    streams = [outbox_key(prefix, shard) for shard in range(KEY_SHARDS)]
    destination = "amp-action-cart"
    for number in range(6):
        body = {"id": f"call-{number}", "messageId": f"call-{number}"}
        entry = {"j": sealer.seal(json.dumps(body).encode()), "only": destination}
        await redis_client.xadd(streams[number % KEY_SHARDS], entry)  # type: ignore[arg-type]
    # Settings the service takes: reclaim_idle above a call, its batch's wait and a second.
    settings = OutboxSettings(batch_max_wait=0.01, delivery_timeout=0.5, reclaim_idle=2.0)
    clients = [RespClient(redis_server.url, timeout=3.0) for _ in range(2)]
    sinks = [CallByCallSink(0.45), CallByCallSink(0.0)]
    forwarders = [
        Forwarder(
            destination,
            RedisFeed(redis_client, client, prefix, destination, sealer, 2.0, [destination], True),
            sink,
            settings,
            Metrics(),
            batched=False,
        )
        for client, sink in zip(clients, sinks, strict=True)
    ]
    tasks = [asyncio.create_task(forwarders[0].run())]
    try:
        for _ in range(250):
            if sinks[0].sent:  # the first read all six, and is calling
                break
            await asyncio.sleep(0.02)
        tasks.append(asyncio.create_task(forwarders[1].run()))
        for _ in range(300):  # six calls of 0.45 s: 2.7 s
            if len(sinks[0].sent) == 6:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # the second's next reclaim, had the entries gone idle
    finally:
        for forwarder in forwarders:
            forwarder.stopping.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.close()
        await redis_client.delete(*streams)
    sent = [m for sink in sinks for batch in sink.sent for m in batch]
    assert sorted(sent) == [f"call-{number}" for number in range(6)]


async def test_an_entry_whose_only_is_not_utf8_blocks_nothing(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """``only`` is not sealed: a damaged or hand-made entry may hold bytes that are not
    UTF-8. It is another destination's (acknowledged and skipped), not an error raised out
    of the read, which left every entry of that read pending, reclaimed with it and raised
    again, for ever: the events beside it were never delivered, the stream never trimmed."""
    prefix = f"only-bytes-{os.getpid()}:"
    sealer = OutboxSealer(SECRET.encode())
    streams = [outbox_key(prefix, shard) for shard in range(KEY_SHARDS)]
    stream = streams[0]
    await redis_client.xgroup_create(stream, "default", id="0", mkstream=True)

    def queued(message_id: str) -> dict[Any, Any]:
        event = {"type": "track", "event": "Queued", "messageId": message_id}
        return {"j": sealer.seal(json.dumps(event).encode())}

    await redis_client.xadd(stream, queued("before"))
    await redis_client.xadd(stream, {**queued("damaged"), "only": b"\xffdefault"})
    await redis_client.xadd(stream, queued("after"))
    settings = OutboxSettings(batch_max_wait=0.01, reclaim_idle=0.5)
    commands = RespClient(redis_server.url, timeout=3.0)
    feed = RedisFeed(redis_client, commands, prefix, "default", sealer, 0.5, ["default"])
    sink = AnsweringSink()
    forwarder = Forwarder("default", feed, sink, settings, Metrics())
    task = asyncio.create_task(forwarder.run())
    try:
        for _ in range(150):
            if sink.sent:
                break
            await asyncio.sleep(0.02)
        assert [m for batch in sink.sent for m in batch] == ["before", "after"]
        assert (await redis_client.xpending(stream, "default"))["pending"] == 0
    finally:
        forwarder.stopping.set()
        await task
        await commands.close()
        await redis_client.delete(*streams)


async def test_replay_dead_moves_a_page_at_a_time_up_to_where_it_started(
    private_redis: RedisServer,
) -> None:
    """`replay-dead` read each dead-letter stream whole in one XRANGE: Redis built the
    whole reply in its memory (a day of refusals is gigabytes, on the Redis that holds the
    outbox) and the command held it in its own. Here the reply's limit on a client is 1 MB:
    the whole-stream read was cut off and nothing moved. Letters added while it runs (the
    destination refusing them again) wait for the next replay."""
    redis_client = Redis.from_url(private_redis.url)
    prefix = "replay-pages:"
    dead = dead_letter_key(prefix, 3, "default")
    stream = outbox_key(prefix, 3)
    try:
        await redis_client.config_set("client-output-buffer-limit", "normal 1mb 1mb 0")
        letter = {"j": os.urandom(20_000), "reason": b"http 400", "failed_at": b"1"}
        for _ in range(120):
            await redis_client.xadd(dead, letter)  # type: ignore[arg-type]
        xrange = redis_client.xrange

        async def refused_again(*args: Any, **options: Any) -> Any:
            # The destination refuses the replayed letters at once: a letter comes back.
            await redis_client.xadd(dead, letter)  # type: ignore[arg-type]
            return await xrange(*args, **options)

        redis_client.xrange = refused_again  # type: ignore[method-assign]
        assert await replay_dead(redis_client, prefix, ["default"]) == 120
        redis_client.xrange = xrange  # type: ignore[method-assign]
        assert await redis_client.xlen(stream) == 120
        assert await redis_client.xlen(dead) > 0  # the letters that came back meanwhile
        (_, fields), *_ = await entries(redis_client, stream, count=1)
        assert fields == {b"j": letter["j"], b"only": b"default"}
    finally:
        await redis_client.aclose()


async def test_outbox_status_counts_a_backlog_redis_cannot_say_in_pages(
    private_redis: RedisServer,
) -> None:
    """Where Redis cannot say a group's lag (before Redis 7, or an entry deleted past its
    last read), `outbox status` counted the unread entries by reading them all in one
    XRANGE: a reply the size of the backlog, built whole in Redis's memory, when the
    command is run because the backlog is long. Here a client's replies may hold 1 MB: the
    whole read was cut off and the command failed."""
    redis_client = Redis.from_url(private_redis.url)
    prefix = "status-pages:"
    stream = outbox_key(prefix, 5)
    try:
        await redis_client.config_set("client-output-buffer-limit", "normal 1mb 1mb 0")
        ids = [await redis_client.xadd(stream, {"j": os.urandom(5_000)}) for _ in range(400)]
        await redis_client.xgroup_create(stream, "default", id="0")
        await redis_client.xreadgroup("default", "forwarder", {stream: ">"}, count=1)
        await redis_client.xdel(stream, ids[100])
        (group,) = await redis_client.xinfo_groups(stream)
        assert group["lag"] is None
        (status,) = await outbox_status(redis_client, prefix, ["default"])
        assert (status.pending, status.in_flight) == (398, 1)
    finally:
        await redis_client.aclose()


async def test_an_entry_deleted_while_pending_is_acknowledged_not_left_pending(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """An entry deleted while pending (an operator's XDEL of a poison entry) comes back from
    Redis 6.2's XAUTOCLAIM without fields, and stays pending there (7.0 drops it from the
    pending list itself). It was skipped and left pending: the group's oldest pending entry
    for ever, below which the stream is trimmed, so the outbox was never trimmed again.
    Here the reply is 6.2's (this Redis is newer); the pending list is Redis's own."""
    prefix = f"deleted-pending-{os.getpid()}:"
    sealer = OutboxSealer(SECRET.encode())
    stream = outbox_key(prefix, 0)
    await redis_client.xgroup_create(stream, "default", id="0", mkstream=True)
    deleted = await redis_client.xadd(stream, {"j": b"poison"})
    await redis_client.xreadgroup("default", "dead-forwarder", {stream: ">"})
    await redis_client.xdel(stream, deleted)
    commands = RespClient(redis_server.url, timeout=3.0)
    feed = RedisFeed(redis_client, commands, prefix, "default", sealer, 0.5, ["default"])
    try:
        assert (await redis_client.xpending(stream, "default"))["pending"] == 1
        assert await feed._decode_all(stream, [(deleted, None)]) == []
        assert (await redis_client.xpending(stream, "default"))["pending"] == 0
    finally:
        await commands.close()
        await redis_client.delete(stream)


def quickly_reclaiming(settings: Settings, reclaim_idle: float) -> Settings:
    """``settings`` with a short ``reclaim_idle``: consumers are retired after ten of them
    (``RETIRE_AFTER_RECLAIM_IDLES``). The settings refuse one this short with their
    delivery timeout; the tests' destinations answer at once."""
    outbox = dataclasses.replace(settings.outbox, reclaim_idle=reclaim_idle)
    return dataclasses.replace(settings, outbox=outbox)


async def group_consumers(
    redis: AdminClient, prefix: str, group: str = "default"
) -> list[dict[str, int]]:
    """Each shard stream's consumers of ``group``, with their pending entries (a consumer
    is made on a stream by the first command that hands it entries there)."""
    return [
        {text(c["name"]): c["pending"] for c in await redis.xinfo_consumers(stream, group)}
        for stream in (outbox_key(prefix, shard) for shard in range(KEY_SHARDS))
    ]


def consumer_names(consumers: list[dict[str, int]]) -> set[str]:
    return {name for names in consumers for name in names}


async def test_forwarders_started_again_and_again_leave_no_consumers_behind(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    """Each forwarder start joins the groups under a new consumer name (host, pid, random
    suffix). A forwarder deletes the consumers idle for ten reclaim_idle times with nothing
    pending: a group holds those of the forwarders that ran lately, not every one that
    ever ran. Events written between the starts all arrive."""
    settings = quickly_reclaiming(
        delivery_settings(outbox_redis, collector, forwarder="off"), reclaim_idle=0.4
    )
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    retire_after = RETIRE_AFTER_RECLAIM_IDLES * settings.outbox.reclaim_idle
    client = await aiohttp_client(create_app(settings))
    starts = 4
    for start in range(starts):
        await run_handoffs(client, 2)
        async with running_forwarders(settings, Metrics()):
            await collector.wait_for(4 * (start + 1))
    # Each start left its consumer (the starts took less than the bound, 4 s).
    consumers = await group_consumers(outbox_client, prefix)
    assert len(consumer_names(consumers)) == starts, consumers
    assert all(pending == 0 for names in consumers for pending in names.values())

    await asyncio.sleep(retire_after + 0.5)
    await run_handoffs(client, 2)
    async with running_forwarders(settings, Metrics()):
        await collector.wait_for(4 * (starts + 1))
        for _ in range(100):
            consumers = await group_consumers(outbox_client, prefix)
            if len(consumer_names(consumers)) == 1:
                break
            await asyncio.sleep(0.05)
    # The live forwarder's consumer alone, on every shard it read.
    assert len(consumer_names(consumers)) == 1, consumers
    assert len(collector.message_ids) == 4 * (starts + 1)


async def test_a_dead_forwarders_consumer_stays_until_its_entries_are_delivered(
    outbox_redis: Server, outbox_client: AdminClient, collector: Collector
) -> None:
    """A forwarder died holding more entries than one reclaim takes over (XAUTOCLAIM takes
    RECLAIM_BATCH at a time), and its consumer has been idle past the bound: its consumer
    is deleted only once nothing is pending under it (XGROUP DELCONSUMER would drop what
    is, which would then be delivered by no one), after every entry was delivered."""
    settings = quickly_reclaiming(
        delivery_settings(outbox_redis, collector, batch_max_events="50"), reclaim_idle=0.2
    )
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    sealer = OutboxSealer(SECRET.encode())
    stream = outbox_key(prefix, 0)
    await outbox_client.xgroup_create(stream, "default", id="0", mkstream=True)
    held = RECLAIM_BATCH + 50
    for number in range(held):
        event = {"type": "track", "event": "Queued", "messageId": f"held-{number}"}
        await outbox_client.xadd(stream, {"j": sealer.seal(json.dumps(event).encode())})
    await outbox_client.xreadgroup("default", "dead-forwarder", {stream: ">"}, count=held)
    await asyncio.sleep(RETIRE_AFTER_RECLAIM_IDLES * settings.outbox.reclaim_idle + 0.5)

    async with running_forwarders(settings, Metrics()):
        await collector.wait_for(held, seconds=20)
        for _ in range(100):
            if "dead-forwarder" not in (await group_consumers(outbox_client, prefix))[0]:
                break
            await asyncio.sleep(0.05)
        consumers = await group_consumers(outbox_client, prefix)
    assert "dead-forwarder" not in consumers[0], consumers[0]
    assert collector.message_ids == {f"held-{number}" for number in range(held)}
    (status,) = await outbox_status(outbox_client, prefix, ["default"])
    assert (status.pending, status.in_flight, status.dead) == (0, 0, 0)


async def test_a_batch_refused_for_one_event_dead_letters_that_event_alone(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    """The destination refuses with a 400 every batch holding one of two marked events
    (Segment refusing a malformed event refuses its batch): the batch is split in halves,
    again and again, until each marked event is sent alone. Those two are dead-lettered,
    every other event is delivered, and the splitting costs at most 2 log2(n) sends per
    refused event."""
    settings = delivery_settings(outbox_redis, collector, forwarder="off")
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    client = await aiohttp_client(create_app(settings))
    handoffs, refused = 30, {"visitor-7", "visitor-19"}
    await run_handoffs(client, handoffs)  # a started and a completed event each

    def marked(event: dict[str, Any]) -> bool:
        return event["anonymousId"] in refused and event["event"] == DEFAULT_STARTED_EVENT

    collector.refuses = marked
    metrics = Metrics()
    async with running_forwarders(settings, metrics):
        await collector.wait_for(2 * handoffs - len(refused))
        for _ in range(300):  # the last acknowledgement may still be on its way
            (status,) = await outbox_status(outbox_client, prefix, ["default"])
            if (status.pending, status.in_flight, status.dead) == (0, 0, len(refused)):
                break
            await asyncio.sleep(0.02)
    assert (status.pending, status.in_flight, status.dead) == (0, 0, len(refused))
    delivered = collector.events
    assert len(delivered) == len(collector.message_ids) == 2 * handoffs - len(refused)
    assert not any(marked(event) for event in delivered)
    sealer = OutboxSealer(SECRET.encode())
    letters = [
        orjson.loads(document)
        for shard in range(KEY_SHARDS)
        for _, fields in await entries(outbox_client, dead_letter_key(prefix, shard, "default"))
        for document in split_documents(sealer.open(fields[b"j"]))
    ]
    assert sorted(letter["anonymousId"] for letter in letters) == sorted(refused)
    assert all(marked(letter) for letter in letters)
    sends = len(collector.requests)
    assert sends <= 2 + 2 * len(refused) * math.ceil(math.log2(2 * handoffs))
    assert metrics.value("identity_events_dead_lettered_total", destination="default") == 2
    assert metrics.value("identity_events_delivered_total", destination="default") == len(delivered)
    assert metrics.value("identity_delivery_attempts_total", destination="default") == sends


async def test_the_halves_waiting_during_a_split_stay_their_forwarders(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    """A batch of 20 is refused (400) and split; its first half is answered 503, slowly,
    eight times, which takes longer than reclaim_idle. The second half, waiting for its
    turn, stays claimed all along: a second forwarder reclaims none of it, every event is
    delivered once, and the event refused alone (the batch's last) is dead-lettered once,
    by the forwarder that read it."""
    settings = quickly_reclaiming(
        delivery_settings(outbox_redis, collector, forwarder="off", batch_max_events="20"),
        reclaim_idle=1.0,
    )
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    client = await aiohttp_client(create_app(settings))
    await run_handoffs(client, 10)  # 20 entries, an event each
    collector.plan = [Answer(400)] + [Answer(503, hold=0.3)] * 8
    async with running_forwarders(settings, Metrics()):
        for _ in range(250):
            if collector.requests:
                break
            await asyncio.sleep(0.02)
        assert collector.requests, "the first forwarder sent nothing"
        refused = collector.requests[0].events[-1]["messageId"]  # in the half that waits
        collector.refuses = lambda event: event["messageId"] == refused
        second = Metrics()
        async with running_forwarders(settings, second):
            await collector.wait_for(19)
            for _ in range(300):  # the last dead letter may still be on its way
                (status,) = await outbox_status(outbox_client, prefix, ["default"])
                if (status.pending, status.in_flight, status.dead) == (0, 0, 1):
                    break
                await asyncio.sleep(0.02)
    # The second took nothing over: it sent nothing (a taken-over entry is sent at once).
    assert second.value("identity_delivery_attempts_total", destination="default") == 0
    assert len(collector.events) == len(collector.message_ids) == 19
    assert refused not in collector.message_ids
    letters = [
        letter
        for shard in range(KEY_SHARDS)
        for letter in await entries(outbox_client, dead_letter_key(prefix, shard, "default"))
    ]
    assert len(letters) == 1, letters


async def test_a_stop_during_a_split_leaves_the_batch_pending_for_a_reclaim(
    aiohttp_client: ClientMaker,
    outbox_redis: Server,
    outbox_client: AdminClient,
    collector: Collector,
) -> None:
    """The forwarder stops while the destination refuses a batch of 6 with a 400 (it
    refuses every event): no split follows, nothing is dead-lettered, and the entries
    stay pending under its consumer; the next forwarder takes them over after
    reclaim_idle and delivers them all."""
    settings = quickly_reclaiming(
        delivery_settings(outbox_redis, collector, forwarder="off"), reclaim_idle=0.5
    )
    assert settings.redis is not None
    prefix = settings.redis.key_prefix
    client = await aiohttp_client(create_app(settings))
    await run_handoffs(client, 3)
    collector.plan = [Answer(400, hold=0.3)]
    collector.refuses = lambda event: True
    async with running_forwarders(settings, Metrics()):
        for _ in range(250):
            if collector.requests:
                break
            await asyncio.sleep(0.02)
    # Stopped during the first send.
    assert len(collector.requests) == 1
    (status,) = await outbox_status(outbox_client, prefix, ["default"])
    assert (status.pending, status.in_flight, status.dead) == (0, 6, 0)

    collector.refuses = lambda event: False
    async with running_forwarders(settings, Metrics()):
        await collector.wait_for(6)
    assert len(collector.events) == 6


async def test_with_only_amp_actions_configured_the_events_wait_for_a_destination(
    aiohttp_client: ClientMaker,
    redis_server: RedisServer,
    redis_client: Redis,
    receiver: WebhookReceiver,
    collector: Collector,
) -> None:
    """On Redis with AMP actions and no events destination, the actions' forwarders skip
    (and acknowledge) the events: their groups alone need nothing of them. The events
    wait all the same, as the start's warning says, not trimmed away: a destination
    configured later receives them."""
    settings = make_settings(redis_server.url, amp=amp_config(receiver.url), **FAST)
    assert settings.redis is not None
    assert settings.outbox.destinations and not settings.outbox.events_destinations
    prefix = settings.redis.key_prefix
    streams = [outbox_key(prefix, shard) for shard in range(KEY_SHARDS)]
    client = await aiohttp_client(create_app(settings))
    await prepare(client, anonymousId="waiting")
    await asyncio.sleep(2.5)  # the action's forwarder read, acknowledged and trimmed meanwhile
    assert sum([await redis_client.xlen(stream) for stream in streams]) == 1

    later = delivery_settings(redis_server, collector, redis_key_prefix=prefix)
    async with running_forwarders(later, Metrics()):
        await collector.wait_for(1)
    assert [event["anonymousId"] for event in collector.events] == ["waiting"]
