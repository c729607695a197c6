"""What the AMP endpoints keep in the store: kept records, rate counters, clientId links and
the rate limits built on them, and an action's one-time record (read, then used up with its
webhook call queued), on the memory store (with a driven clock) and a real Redis."""

import asyncio
import hashlib
import io
import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from identity_service import proxies
from identity_service.amp import links
from identity_service.amp.config import AmpSettings, RateLimit
from identity_service.amp.context import AmpContext
from identity_service.amp.limits import check_limits
from identity_service.constants import DEFAULT_TRUSTED_PROXIES as DEFAULT_TRUSTED_PROXIES_TEXT
from identity_service.constants import (
    KEY_SHARDS,
    MAX_FORWARDED_HOPS,
    handoff_key,
    link_key,
    outbox_key,
    rate_key,
    shard_of,
    shard_tags,
)
from identity_service.crypto import OutboxSealer, TokenSealer
from identity_service.metrics import Metrics
from identity_service.problems import RateLimited, StoreUnavailable
from identity_service.proxies import DEFAULT_TRUSTED_PROXIES, TrustedProxies, read_trusted_proxies
from identity_service.settings import RedisSettings
from identity_service.stores import Counted, Emitted, HandoffStore, Kept, PrepareEvents, memory
from identity_service.stores import resp as resp_module
from identity_service.stores.memory import MemoryStore
from identity_service.stores.redis import RedisStore
from identity_service.streams import text
from tests.conftest import log_lines, make_settings
from tests.redis_server import RedisServer
from tests.secrets_audit import AUDIT
from tests.test_sealing import dump

SEALER = OutboxSealer(b"s" * 32)
LINK_SECRET = b"l" * 32
Advance = Callable[[float], Awaitable[None]]


class Clock:
    """A clock the memory store reads, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def redis_store(url: str, prefix: str = "amp:") -> RedisStore:
    return RedisStore(RedisSettings.from_dsn(url, key_prefix=prefix), SEALER)


@pytest.fixture
async def clocked(
    store_kind: str, redis_server: RedisServer
) -> AsyncIterator[tuple[HandoffStore, Advance]]:
    """A store, and how to let time pass for it: the memory store's clock moves at once;
    Redis counts real time (keep the waits short)."""
    opened: HandoffStore
    if store_kind == "memory":
        clock = Clock()
        opened = MemoryStore(clock=clock)

        async def advance(seconds: float) -> None:
            clock.now += seconds

    else:
        opened = redis_store(redis_server.url, prefix=f"amp{os.urandom(4).hex()}:")

        async def advance(seconds: float) -> None:
            await asyncio.sleep(seconds)

    yield opened, advance
    await opened.close()


@pytest.fixture
def store(clocked: tuple[HandoffStore, Advance]) -> HandoffStore:
    return clocked[0]


@pytest.fixture
def advance(clocked: tuple[HandoffStore, Advance]) -> Advance:
    return clocked[1]


def new_id() -> bytes:
    return os.urandom(32)


# -- keep and peek ----------------------------------------------------------------------


async def test_peek_returns_what_keep_kept_and_leaves_it(store: HandoffStore) -> None:
    key_id = new_id()
    await store.keep(key_id, b"sealed-link", 60)
    assert await store.peek(key_id) == b"sealed-link"
    assert await store.peek(key_id) == b"sealed-link"
    assert await store.peek(new_id()) is None


async def test_keep_replaces(store: HandoffStore) -> None:
    key_id = new_id()
    await store.keep(key_id, b"first", 60)
    await store.keep(key_id, b"second", 60)
    assert await store.peek(key_id) == b"second"


async def test_kept_records_expire_after_their_ttl(store: HandoffStore, advance: Advance) -> None:
    short, long = new_id(), new_id()
    await store.keep(short, b"short", 1)
    await store.keep(long, b"long", 30)
    await advance(1.1)
    assert await store.peek(short) is None
    assert await store.peek(long) == b"long"


async def test_kept_records_and_handoffs_do_not_mix(store: HandoffStore) -> None:
    handoff, kept = new_id(), new_id()
    await store.put(handoff, b"handoff", 60, None)
    await store.keep(kept, b"kept", 60)
    assert await store.peek(handoff) is None
    assert await store.take(kept, None) is None
    assert await store.peek(kept) == b"kept"
    assert await store.take(handoff, None) == b"handoff"


# -- an action's record: read, then take_and_emit ---------------------------------------------

ACTION_DESTINATION = "amp-action-add-to-cart"


def webhook_call() -> list[dict[str, Any]]:
    return [{"id": str(uuid.uuid4()), "action": "add-to-cart", "anonymousId": "v"}]


async def addressed_calls(store: HandoffStore, queue: memory.MemoryQueue | None) -> list[bytes]:
    """The queued entries addressed to the action's destination (Redis: each field ``only``)."""
    if queue is not None:
        return [event for _, event in queue.events]
    assert isinstance(store, RedisStore)
    prefix = store._prefix
    found = []
    for shard in range(KEY_SHARDS):
        stream = outbox_key(prefix, shard)
        for _, fields in await store.commands.call(stream, "XRANGE", stream, "-", "+"):
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            assert pairs[b"only"] == ACTION_DESTINATION.encode()
            found.append(pairs[b"j"])
    return found


@pytest.fixture
def action_queue(store: HandoffStore) -> memory.MemoryQueue | None:
    """The memory store's queue of the action's destination (Redis: None)."""
    if isinstance(store, MemoryStore):
        return store.outbox.subscribe(ACTION_DESTINATION, addressed_only=True)
    return None


async def test_read_returns_what_put_stored_and_leaves_it(store: HandoffStore) -> None:
    lookup_id, kept = new_id(), new_id()
    await store.put(lookup_id, b"sealed-action", 60, None)
    await store.keep(kept, b"kept", 60)
    assert await store.read(lookup_id) == b"sealed-action"
    assert await store.read(lookup_id) == b"sealed-action"
    assert await store.read(new_id()) is None
    assert await store.read(kept) is None  # kept records are not handoffs
    assert await store.take(lookup_id, None) == b"sealed-action"
    assert await store.read(lookup_id) is None


async def test_read_sees_no_expired_record(store: HandoffStore, advance: Advance) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"sealed-action", 1, None)
    await advance(1.1)
    assert await store.read(lookup_id) is None


async def test_take_and_emit_queues_the_call_and_uses_the_record_up(
    store: HandoffStore, action_queue: memory.MemoryQueue | None
) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"sealed-action", 60, None)
    before = len(await addressed_calls(store, action_queue))
    await store.take_and_emit(lookup_id, webhook_call(), ACTION_DESTINATION)
    assert await store.read(lookup_id) is None
    assert await store.take(lookup_id, None) is None
    assert len(await addressed_calls(store, action_queue)) == before + 1
    # A record gone meanwhile (expired within the webhook's wait): the call is queued still.
    await store.take_and_emit(lookup_id, webhook_call(), ACTION_DESTINATION)
    assert len(await addressed_calls(store, action_queue)) == before + 2


async def test_redis_take_and_emit_that_fails_keeps_the_record(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    store = redis_store(redis_server.url, prefix="amptake:")
    lookup_id = new_id()
    # Every outbox stream is a string: the call's XADD fails inside the script.
    for shard in range(KEY_SHARDS):
        await redis_client.set(outbox_key("amptake:", shard), "not a stream")
    try:
        await store.put(lookup_id, b"sealed-action", 60, None)
        with pytest.raises(StoreUnavailable):
            await store.take_and_emit(lookup_id, webhook_call(), ACTION_DESTINATION)
        assert await store.read(lookup_id) == b"sealed-action"  # usable for a retry
    finally:
        await store.close()


# -- hit -------------------------------------------------------------------------------------


async def test_hit_counts_each_counter_in_its_window(store: HandoffStore) -> None:
    first, second = new_id(), new_id()
    assert await store.hit([]) == []
    results = await store.hit([(first, 60), (second, 30)])
    assert [count for count, _ in results] == [1, 1]
    assert 59 < results[0][1] <= 60 and 29 < results[1][1] <= 30
    for expected in (2, 3):
        results = await store.hit([(first, 60), (second, 30)])
        assert [count for count, _ in results] == [expected, expected]
    assert [count for count, _ in await store.hit([(first, 60)])] == [4]


async def test_hit_reports_the_time_left_and_starts_a_new_window_after_it(
    store: HandoffStore, advance: Advance
) -> None:
    counter = new_id()
    await store.hit([(counter, 1)])
    await advance(0.5)
    [(count, left)] = await store.hit([(counter, 1)])
    assert count == 2
    assert 0.3 < left <= 0.5  # a fixed window: the second hit did not extend it
    await advance(0.6)
    [(count, left)] = await store.hit([(counter, 1)])
    assert count == 1
    assert 0.9 < left <= 1


async def test_memory_store_sweeps_kept_records_and_counters_on_write() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    for _ in range(100):
        await store.keep(new_id(), b"x", 1)
        await store.hit([(new_id(), 1)])
    clock.now += 2
    await store.keep(new_id(), b"y", 60)
    await store.hit([(new_id(), 60)])
    assert (len(store._kept), len(store._counters)) == (1, 1)


async def test_memory_store_caps_kept_records_dropping_the_soonest_to_expire() -> None:
    assert memory.MAX_KEPT == 100_000
    clock = Clock()
    store = MemoryStore(clock=clock, max_kept=3)
    soon, later, middle, newest = new_id(), new_id(), new_id(), new_id()
    await store.keep(soon, b"soon", 10)
    await store.keep(later, b"later", 30)
    await store.keep(middle, b"middle", 20)
    await store.keep(later, b"later again", 40)  # a replacement takes no room
    assert len(store._kept) == 3
    await store.keep(newest, b"newest", 60)  # full: the soonest to expire makes room
    assert len(store._kept) == 3
    assert await store.peek(soon) is None
    assert [await store.peek(key) for key in (later, middle, newest)] == [
        b"later again",
        b"middle",
        b"newest",
    ]
    clock.now += 25  # middle has expired: it alone makes room for the next one
    await store.keep(new_id(), b"next", 60)
    assert len(store._kept) == 3
    assert [await store.peek(key) for key in (later, newest)] == [b"later again", b"newest"]
    for _ in range(1000):  # many more than the cap: memory stays bounded
        await store.keep(new_id(), b"x", 3600)
    assert len(store._kept) == 3
    assert len(store._kept._expiries) <= 2 * 3 + memory.HEAP_SLACK


async def test_memory_counters_leave_one_expiry_entry_per_window() -> None:
    store = MemoryStore(clock=Clock())
    counter = new_id()
    for _ in range(5000):
        await store.hit([(counter, 60)])
    assert len(store._counters._expiries) == 1


# -- Redis: key layout, one write, errors ---------------------------------------------------


async def test_redis_link_and_rate_keys_carry_prefix_hash_tag_and_ttl(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    store = redis_store(redis_server.url, prefix="ampkeys:")
    try:
        key_id, counter = new_id(), new_id()
        await store.keep(key_id, b"x", 120)
        await store.hit([(counter, 30)])
        kept, rate = link_key("ampkeys:", key_id), rate_key("ampkeys:", counter)
        assert kept == f"ampkeys:{{{shard_tags(KEY_SHARDS)[shard_of(key_id)]}}}:link:{key_id.hex()}"
        assert (
            rate == f"ampkeys:{{{shard_tags(KEY_SHARDS)[shard_of(counter)]}}}:rate:{counter.hex()}"
        )
        assert 118_000 < await redis_client.pttl(kept) <= 120_000
        assert 28_000 < await redis_client.pttl(rate) <= 30_000
    finally:
        await store.close()


async def test_redis_writes_each_ttl_with_its_value(private_redis: RedisServer) -> None:
    store = redis_store(private_redis.url)
    admin = Redis.from_url(private_redis.url)
    try:
        await store.hit([(new_id(), 60)])  # loads the script
        await admin.config_resetstat()
        await store.keep(new_id(), b"x", 60)
        kept = await admin.info("commandstats")
        await admin.config_resetstat()
        await store.hit([(new_id(), 60)])
        counted = await admin.info("commandstats")
    finally:
        await admin.aclose()
        await store.close()
    # The record and its TTL: one SET, no separate EXPIRE that a crash could miss.
    assert kept["cmdstat_set"]["calls"] == 1
    assert not {"cmdstat_expire", "cmdstat_pexpire", "cmdstat_eval"} & kept.keys()
    # A counter: one script call (its INCR, PTTL and PEXPIRE run inside it).
    assert counted["cmdstat_evalsha"]["calls"] == 1
    assert "cmdstat_eval" not in counted and "cmdstat_set" not in counted


async def test_redis_hit_sends_a_requests_counters_in_one_write(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = redis_store(private_redis.url)
    writes: list[int] = []
    flush = resp_module.Connection._flush

    def counted_flush(self: Any) -> None:
        writes.append(len(self._outgoing))
        flush(self)

    try:
        await store.hit([(new_id(), 60)])  # connects and loads the script
        monkeypatch.setattr(resp_module.Connection, "_flush", counted_flush)
        results = await store.hit([(new_id(), 60), (new_id(), 60)])
        assert [count for count, _ in results] == [1, 1]
        assert writes == [2]
    finally:
        await store.close()


async def test_redis_hit_gives_a_counter_without_ttl_one(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    store = redis_store(redis_server.url, prefix="ampnottl:")
    try:
        counter = new_id()
        await redis_client.set(rate_key("ampnottl:", counter), 5)
        [(count, left)] = await store.hit([(counter, 10)])
        assert (count, left) == (6, 10)
        assert 0 < await redis_client.pttl(rate_key("ampnottl:", counter)) <= 10_000
    finally:
        await store.close()


async def test_redis_hit_and_write_is_one_script_call_in_one_write(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = redis_store(private_redis.url)
    admin = Redis.from_url(private_redis.url)
    writes: list[int] = []
    flush = resp_module.Connection._flush

    def counted_flush(self: Any) -> None:
        writes.append(len(self._outgoing))
        flush(self)

    message_id = str(uuid.uuid4())
    event = Emitted(message_id.encode(), [{"type": "page", "messageId": message_id}])
    counters = [Counted(new_id(), 60, 10), Counted(new_id(), 60, 10)]
    try:
        await store.hit_and_write([Counted(new_id(), 60, 10)])  # connects, loads the script
        await admin.config_resetstat()
        monkeypatch.setattr(resp_module.Connection, "_flush", counted_flush)
        outcome = await store.hit_and_write(counters, emit=event, keep=Kept(new_id(), b"x", 60))
        counted = await admin.info("commandstats")
    finally:
        await admin.aclose()
        await store.close()
    assert outcome.kept and writes == [1]
    # The two counters, the event and the link: one EVALSHA (what runs in it counts too).
    assert counted["cmdstat_evalsha"]["calls"] == 1
    assert counted["cmdstat_incr"]["calls"] == 2
    assert counted["cmdstat_xadd"]["calls"] == counted["cmdstat_set"]["calls"] == 1
    assert "cmdstat_eval" not in counted


async def test_redis_hit_and_write_that_fails_leaves_no_link(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    store = redis_store(redis_server.url, prefix="amphalf:")
    message_id = str(uuid.uuid4())
    event = Emitted(message_id.encode(), [{"type": "page", "messageId": message_id}])
    counter, link = Counted(new_id(), 60, 10), Kept(new_id(), b"x", 60)
    # Every outbox stream is a string: the event's XADD fails inside the script.
    for shard in range(KEY_SHARDS):
        await redis_client.set(outbox_key("amphalf:", shard), "not a stream")
    try:
        with pytest.raises(StoreUnavailable):
            await store.hit_and_write([counter], emit=event, keep=link)
        assert await store.peek(link.key_id) is None  # the link goes after the event
        # The request was counted before, as a refused or failed one is.
        assert [count for count, _ in await store.hit([(counter.counter_id, 60)])] == [2]
    finally:
        await store.close()


async def test_stopped_redis_makes_each_operation_unavailable(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(
        RedisSettings.from_dsn(private_redis.url, key_prefix="down:", timeout=0.5), SEALER
    )
    try:
        await store.keep(new_id(), b"x", 60)
        private_redis.stop()
        operations: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.keep(new_id(), b"x", 60),
            lambda: store.peek(new_id()),
            lambda: store.hit([(new_id(), 60)]),
            lambda: store.hit([(new_id(), 60), (new_id(), 60)]),
            lambda: store.read(new_id()),
            lambda: store.claim(new_id(), b"owner", 30),
            lambda: store.release(new_id(), b"owner"),
            lambda: store.take_and_emit(new_id(), webhook_call(), ACTION_DESTINATION),
        ]
        for operation in operations:
            with pytest.raises(StoreUnavailable):
                await operation()
        private_redis.start()
        assert [count for count, _ in await store.hit([(new_id(), 60)])] == [1]
    finally:
        await store.close()


# -- clientId links --------------------------------------------------------------------------

AMP = AmpSettings(
    public_url="https://www.example.com/identity",
    publisher_origins=frozenset({"https://www.example.com"}),
    source="shop",
    allowed_origins=frozenset({"https://www.example.com"}),
    link_ttl=3600,
    limit_per_ip=RateLimit(5, 60),
    limit_per_client=RateLimit(3, 60),
)
CLIENT_ID = "amp-9Zx3kQpL0vWmA7cYt2bN1e"
VISITOR = "anon-4b7e1c9a-55d2"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def amp_context(
    store: HandoffStore, http: aiohttp.ClientSession, link_secret: bytes = LINK_SECRET
) -> AmpContext:
    return AmpContext(
        settings=make_settings(),
        amp=AMP,
        store=store,
        metrics=Metrics(),
        action_sealer=TokenSealer(b"a" * 32),
        link_sealer=TokenSealer(link_secret),
        http=http,
    )


@pytest.fixture
def ctx(store: HandoffStore, http: aiohttp.ClientSession) -> AmpContext:
    AUDIT.identity(VISITOR, "anonymousId")
    return amp_context(store, http)


async def test_a_link_leads_from_the_client_id_to_the_visitor(ctx: AmpContext) -> None:
    assert await links.linked_visitor(ctx, CLIENT_ID) is None
    await links.record_link(ctx, CLIENT_ID, VISITOR)
    assert await links.linked_visitor(ctx, CLIENT_ID) == VISITOR
    assert await links.linked_visitor(ctx, CLIENT_ID + "x") is None
    assert ctx.metrics.value("identity_amp_links_recorded_total") == 1


async def test_a_new_link_replaces_the_old(ctx: AmpContext) -> None:
    await links.record_link(ctx, CLIENT_ID, VISITOR)
    await links.record_link(ctx, CLIENT_ID, "anon-other-visitor")
    assert await links.linked_visitor(ctx, CLIENT_ID) == "anon-other-visitor"


async def test_a_link_lasts_link_ttl(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    ctx = amp_context(MemoryStore(clock=clock), http)
    await links.record_link(ctx, CLIENT_ID, VISITOR)
    clock.now += AMP.link_ttl - 1
    assert await links.linked_visitor(ctx, CLIENT_ID) == VISITOR
    clock.now += 2
    assert await links.linked_visitor(ctx, CLIENT_ID) is None


async def test_links_do_not_read_under_another_secret(
    ctx: AmpContext, http: aiohttp.ClientSession
) -> None:
    await links.record_link(ctx, CLIENT_ID, VISITOR)
    rotated = amp_context(ctx.store, http, link_secret=b"r" * 32)
    assert await links.linked_visitor(rotated, CLIENT_ID) is None


async def test_a_record_that_does_not_open_is_no_link(ctx: AmpContext) -> None:
    key_id = ctx.link_sealer.lookup_id(links.link_token(CLIENT_ID))
    await ctx.store.keep(key_id, b"\x01" + os.urandom(40), 60)
    assert await links.linked_visitor(ctx, CLIENT_ID) is None
    # Another clientId's sealed link, moved under this key, does not open either.
    other = links.link_token("amp-other")
    moved = ctx.link_sealer.seal(other, key_id, orjson.dumps({"anonymousId": VISITOR}))
    await ctx.store.keep(key_id, moved, 60)
    assert await links.linked_visitor(ctx, CLIENT_ID) is None


@pytest.mark.parametrize(
    "client_id", ["", "x" * 129, "amp-with space", "amp-\u00e9", "amp-\n", "amp-\x00"]
)
async def test_invalid_client_ids_are_refused(ctx: AmpContext, client_id: str) -> None:
    with pytest.raises(ValueError, match="clientId"):
        await links.record_link(ctx, client_id, VISITOR)
    with pytest.raises(ValueError, match="clientId"):
        await links.linked_visitor(ctx, client_id)
    assert ctx.metrics.value("identity_amp_links_recorded_total") == 0


@pytest.mark.parametrize(
    "client_id",
    [
        "amp-" + "A" * 22,
        "x" * 128,
        "GA1.2.123456789.1700000000",
        # a cache's clientId: base64 of a SHA-384
        "Ez1vN7o+Lp0w/k3yQm9s8dF2uXcB6rT4aH5jK0lM1nO2pQ3rS4tU5vW6xY7zA8bC",
    ],
)
async def test_amp_client_ids_are_accepted(ctx: AmpContext, client_id: str) -> None:
    assert links.check_client_id(client_id) == client_id
    await links.record_link(ctx, client_id, VISITOR)
    assert await links.linked_visitor(ctx, client_id) == VISITOR


@pytest.mark.parametrize("anonymous_id", ["", "a" * 256])
async def test_links_to_invalid_anonymous_ids_are_refused(
    ctx: AmpContext, anonymous_id: str
) -> None:
    with pytest.raises(ValueError, match="anonymousId"):
        await links.record_link(ctx, CLIENT_ID, anonymous_id)


# -- rate limits -----------------------------------------------------------------------------


async def test_requests_over_the_address_limit_are_refused(ctx: AmpContext) -> None:
    for _ in range(AMP.limit_per_ip.requests):
        await check_limits(ctx, "8.8.8.8", None)
    with pytest.raises(RateLimited) as refused:
        await check_limits(ctx, "8.8.8.8", None)
    assert refused.value.status == 429
    assert refused.value.headers() == {"Retry-After": "60"}
    assert ctx.metrics.value("identity_amp_refusals_total", reason="rate_ip") == 1
    await check_limits(ctx, "8.8.4.4", None)  # another address has its own counter


async def test_requests_over_the_client_id_limit_are_refused(ctx: AmpContext) -> None:
    addresses = ["1.1.1.1", "1.0.0.1", "9.9.9.9"]  # one clientId, several addresses
    for address in addresses:
        await check_limits(ctx, address, CLIENT_ID)
    with pytest.raises(RateLimited) as refused:
        await check_limits(ctx, "149.112.112.112", CLIENT_ID)
    assert refused.value.headers() == {"Retry-After": "60"}
    assert ctx.metrics.value("identity_amp_refusals_total", reason="rate_client") == 1
    assert ctx.metrics.value("identity_amp_refusals_total", reason="rate_ip") == 0
    await check_limits(ctx, "149.112.112.112", "amp-another-client")


async def test_retry_after_is_the_rest_of_the_window_rounded_up(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    ctx = amp_context(MemoryStore(clock=clock), http)
    for _ in range(AMP.limit_per_ip.requests):
        await check_limits(ctx, "8.8.8.8", None)
    clock.now += 10.4
    with pytest.raises(RateLimited) as refused:
        await check_limits(ctx, "8.8.8.8", None)
    assert refused.value.retry_after == math.ceil(60 - 10.4) == 50
    clock.now += 49.7
    await check_limits(ctx, "8.8.8.8", None)  # a new window


async def test_an_ipv6_host_is_counted_by_its_slash_64(ctx: AmpContext) -> None:
    for host in range(AMP.limit_per_ip.requests):
        await check_limits(ctx, f"2001:db8:1:2::{host + 1:x}", None)
    with pytest.raises(RateLimited):
        await check_limits(ctx, "2001:db8:1:2:ffff::1", None)
    await check_limits(ctx, "2001:db8:1:3::1", None)


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("8.8.8.8", None, "8.8.8.8"),
        ("8.8.8.8", "1.2.3.4", "8.8.8.8"),  # a public peer is the client: its header is a claim
        ("127.0.0.1", "6.6.6.6, 8.8.8.8", "8.8.8.8"),  # the proxy's own entry is the last
        ("10.1.2.3", "8.8.8.8", "8.8.8.8"),
        ("::1", "2001:4860::8888", "2001:4860::8888"),
        ("::ffff:192.168.1.1", "::ffff:8.8.8.8", "8.8.8.8"),
        ("127.0.0.1", "8.8.8.8, not-an-address", "127.0.0.1"),
        ("127.0.0.1", None, "127.0.0.1"),
        ("100.64.3.4", "8.8.8.8", "8.8.8.8"),  # RFC 6598: a pod network's proxy
        ("172.31.255.1", "8.8.8.8", "8.8.8.8"),
        ("fd12:3456::1", "2001:4860::8888", "2001:4860::8888"),
        ("fe80::1", "8.8.8.8", "8.8.8.8"),
        ("2001:0:5ef5:79fd::1", "1.2.3.4", "2001:0:5ef5:79fd::1"),  # Teredo: routed
        ("198.18.0.1", "1.2.3.4", "198.18.0.1"),  # benchmarking range: no proxy of ours
        ("172.32.0.1", "1.2.3.4", "172.32.0.1"),  # just past 172.16.0.0/12
        (None, "8.8.8.8", "8.8.8.8"),  # a Unix socket: the proxy is local
        (None, None, "unix"),
        # Defect: an entry with the client's port (Azure's Application Gateway writes one)
        # was no address: every visitor shared the proxy's counter, and one over the limit
        # throttled them all.
        ("10.0.0.4", "6.6.6.6, 203.0.113.7:50712", "203.0.113.7"),
        ("10.0.0.4", "[2001:db8::7]:50712", "2001:db8::7"),
        ("10.0.0.4", "[::ffff:203.0.113.7]:443", "203.0.113.7"),
        ("10.0.0.4", "2001:db8::7:443", "2001:db8::7:443"),  # a whole IPv6 address
        ("10.0.0.4", "[2001:db8::7]", "10.0.0.4"),
        ("10.0.0.4", "203.0.113.7:", "10.0.0.4"),
        ("10.0.0.4", "203.0.113.7:123456", "10.0.0.4"),
        ("10.0.0.4", "example.com:80", "10.0.0.4"),
        ("8.8.8.8", "203.0.113.7:50712", "8.8.8.8"),  # a public peer's claim, as before
        # The last entry alone, even a private one: a load balancer's SNAT hands the client
        # over from a node's 10.x address to an ingress that appends; walking past it would
        # read the client's own claim (each client its own counter).
        ("10.244.1.7", "6.6.6.6, 10.0.3.4", "10.0.3.4"),
        ("10.244.1.7", "6.6.6.6, 10.0.3.4:31512", "10.0.3.4"),
        ("127.0.0.1", "6.6.6.6, 192.168.0.9", "192.168.0.9"),
    ],
)
def test_client_ip(peer: str | None, forwarded: str | None, expected: str) -> None:
    """The default trusted proxies: loopback and private peers, and the last entry alone,
    as before the setting."""
    assert DEFAULT_TRUSTED_PROXIES.client_ip(peer, forwarded) == expected


def test_the_default_networks_listed_are_walked_past() -> None:
    """Listed by the operator, the same networks are proxies of theirs: walked past."""
    listed = trusting(*DEFAULT_TRUSTED_PROXIES_TEXT)
    assert listed.networks == DEFAULT_TRUSTED_PROXIES.networks and listed.recursive
    assert listed != DEFAULT_TRUSTED_PROXIES
    assert listed.client_ip("10.244.1.7", "6.6.6.6, 10.0.3.4") == "6.6.6.6"


# -- the client's address behind trusted proxies (IDENTITY_TRUSTED_PROXIES) --------------------


def trusting(*entries: str) -> TrustedProxies:
    """The trusted proxies a setting of ``entries`` gives."""
    trusted, problems = read_trusted_proxies(list(entries))
    assert trusted is not None, problems
    return trusted


# A CDN's public range in front of the publisher's ingress, on the pod network.
CDN, INGRESS = "198.51.100.0/24", "10.0.0.0/8"
# An IPv6 pod network and CDN.
V6 = ("fd00::/8", "2001:db8:ff::/48")


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "expected"),
    [
        # Defect: any private peer was trusted: another pod could name any address.
        ((INGRESS,), "192.168.1.5", "203.0.113.7", "192.168.1.5"),
        ((INGRESS,), "127.0.0.1", "203.0.113.7", "127.0.0.1"),
        ((INGRESS,), "10.0.0.4", "203.0.113.7", "203.0.113.7"),
        ((INGRESS,), "::ffff:10.0.0.4", "203.0.113.7", "203.0.113.7"),
        (("10.0.0.4",), "10.0.0.5", "203.0.113.7", "10.0.0.5"),  # an address is its /32
        # Defect: only the last entry was read, the CDN's: every visitor one counter.
        ((INGRESS, CDN), "10.0.0.4", "6.6.6.6, 203.0.113.7, 198.51.100.20", "203.0.113.7"),
        ((INGRESS, CDN), "10.0.0.4", "203.0.113.7:50712, 198.51.100.20", "203.0.113.7"),
        ((INGRESS,), "10.0.0.4", "203.0.113.7, 198.51.100.20", "198.51.100.20"),  # CDN unlisted
        ((INGRESS, CDN), "10.0.0.4", "203.0.113.7, 10.1.2.3, 198.51.100.9", "203.0.113.7"),
        ((INGRESS, CDN), "198.51.100.9", "203.0.113.7", "203.0.113.7"),  # the CDN, direct
        # IPv6, with and without ports, and a peer of the other family.
        (V6, "fd00::1", "2001:db8:1::5, 2001:db8:ff::9", "2001:db8:1::5"),
        (V6, "fd00::1", "[2001:db8:1::5]:443, [2001:db8:ff::9]:80", "2001:db8:1::5"),
        (V6, "fd00::1", "2001:db8:1::5, [::ffff:10.0.0.9]:80", "10.0.0.9"),  # IPv4 unlisted
        (("fd00::/8",), "10.0.0.4", "2001:db8:1::5", "10.0.0.4"),
        (("fd00::/8", INGRESS), "10.0.0.4", "2001:db8:1::5, fd00::7", "2001:db8:1::5"),
        # Every entry trusted: the leftmost.
        ((INGRESS,), "10.0.0.4", "10.0.0.9, 10.0.0.8", "10.0.0.9"),
        ((INGRESS,), "10.0.0.4", "10.0.0.9", "10.0.0.9"),
        # An entry that is no address ends the walk with the peer: the proxy's counter.
        ((INGRESS, CDN), "10.0.0.4", "203.0.113.7, not-an-address, 198.51.100.20", "10.0.0.4"),
        ((INGRESS,), "10.0.0.4", "not-an-address, 10.0.0.9", "10.0.0.4"),
        ((INGRESS,), "10.0.0.4", "203.0.113.7, , 10.0.0.9", "10.0.0.4"),
        ((INGRESS,), "10.0.0.4", "not-an-address, 203.0.113.7", "203.0.113.7"),  # never read
        # A Unix socket's peer is trusted, whatever the networks.
        ((INGRESS,), None, "203.0.113.7, 10.0.0.9", "203.0.113.7"),
        ((INGRESS,), None, None, "unix"),
        # off: no peer is trusted, the header is never read.
        (("off",), "127.0.0.1", "203.0.113.7", "127.0.0.1"),
        (("off",), "10.0.0.4", "203.0.113.7", "10.0.0.4"),
        (("off",), None, "203.0.113.7", "unix"),
    ],
)  # fmt: skip
def test_the_client_is_the_rightmost_entry_no_trusted_proxy_wrote(
    trusted: tuple[str, ...], peer: str | None, forwarded: str | None, expected: str
) -> None:
    assert trusting(*trusted).client_ip(peer, forwarded) == expected


def test_a_header_of_ten_thousand_entries_is_read_as_far_as_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect: a hostile header's every entry would be parsed and checked on the hot path.
    Now at most MAX_FORWARDED_HOPS entries are read, from the right; past them, the
    leftmost read is the client, as when every entry is trusted."""
    read: list[str] = []
    forwarded_address = proxies.forwarded_address

    def counting(entry: str) -> proxies.Address | None:
        read.append(entry)
        return forwarded_address(entry)

    monkeypatch.setattr(proxies, "forwarded_address", counting)
    hops = [f"10.0.{n // 250}.{n % 250 + 1}" for n in range(10_000)]  # proxies, all trusted
    trusted = trusting(INGRESS)
    bound = MAX_FORWARDED_HOPS
    assert trusted.client_ip("10.0.0.4", ", ".join(["203.0.113.7", *hops])) == hops[-bound]
    assert read == hops[: -bound - 1 : -1] and len(read) == bound == 16
    # One entry fewer than the bound past the client: the client is read.
    short = ", ".join(["203.0.113.7", *["10.0.0.9"] * (bound - 1)])
    assert trusted.client_ip("10.0.0.4", short) == "203.0.113.7"


def test_an_answer_is_never_another_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each TrustedProxies caches its own answers: the networks are part of the answer."""
    assert DEFAULT_TRUSTED_PROXIES.client_ip("192.168.1.5", "203.0.113.7") == "203.0.113.7"
    assert trusting(INGRESS).client_ip("192.168.1.5", "203.0.113.7") == "192.168.1.5"
    assert trusting("off").client_ip("10.0.0.4", "203.0.113.7") == "10.0.0.4"
    assert DEFAULT_TRUSTED_PROXIES.client_ip("10.0.0.4", "203.0.113.7") == "203.0.113.7"
    assert trusting(INGRESS).client_ip("10.0.0.4", "6.6.6.6, 10.0.3.4") == "6.6.6.6"
    assert DEFAULT_TRUSTED_PROXIES.client_ip("10.0.0.4", "6.6.6.6, 10.0.3.4") == "10.0.3.4"


# -- what Redis holds --------------------------------------------------------------------------


async def test_a_dump_of_redis_holds_neither_client_ids_nor_visitors_nor_addresses(
    redis_server: RedisServer, redis_client: Redis, http: aiohttp.ClientSession
) -> None:
    store = redis_store(redis_server.url, prefix="ampdump:")
    ctx = amp_context(store, http)
    AUDIT.identity(VISITOR, "anonymousId")
    address = "203.0.113.77"
    try:
        await links.record_link(ctx, CLIENT_ID, VISITOR)
        await check_limits(ctx, address, CLIENT_ID)
        contents = await dump(redis_client)
    finally:
        await store.close()
    assert b"ampdump:" in contents and b":link:" in contents and b":rate:" in contents
    token = links.link_token(CLIENT_ID).raw
    forbidden = [
        CLIENT_ID.encode(),
        VISITOR.encode(),
        address.encode(),
        token,
        token.hex().encode(),
        hashlib.sha256(CLIENT_ID.encode()).hexdigest().encode(),
    ]
    for value in forbidden:
        assert value not in contents


async def test_redis_spreads_text_hints_and_many_shards_over_every_shard(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """AMP events are emitted under their messageId (a UUID's text, 22 possible first
    bytes) and a kept record under a 32-byte id: both must reach every shard, however many
    there are (up to the 1024 allowed), or a Cluster's masters get unequal shares."""
    store = RedisStore(RedisSettings.from_dsn(redis_server.url, key_prefix="spread:"), SEALER)
    try:
        for _ in range(300):
            await store.emit(str(uuid.uuid4()).encode(), [{"type": "track"}])
        streams = {outbox_key("spread:", shard) for shard in range(KEY_SHARDS)}
        filled = {text(key) for key in await redis_client.keys("spread:*:outbox")}
        assert filled == streams
    finally:
        await store.close()
    reached = {link_key("x:", os.urandom(32), 512) for _ in range(20_000)}
    assert {key.split("}")[0] for key in reached} == {f"x:{{{tag}" for tag in shard_tags(512)}


async def test_redis_over_maxmemory_refuses_each_write_whole_and_lets_an_exchange_through(
    private_redis: RedisServer,
) -> None:
    """Over maxmemory Redis refuses a script's first write that grows the data, and lets the
    rest through once one is done: every script's first write is one that grows (INCR,
    XADD, SET), so each is refused whole; an exchange deletes first (docs/security.md)."""
    store = redis_store(private_redis.url, prefix="oom:")
    admin = Redis.from_url(private_redis.url)
    counter, link, action, handoff = Counted(new_id(), 60, 5), new_id(), new_id(), new_id()
    event = Emitted(b"hint", [{"type": "page", "messageId": str(uuid.uuid4())}], "shop")
    try:
        await store.hit_and_write([counter], peek=link)
        await store.put(action, b"sealed-action", 60, None)
        await store.put(handoff, b"sealed-handoff", 60, PrepareEvents([], {"event": "t"}))
        keys = sorted(await admin.keys("oom:*"))
        await admin.config_set("maxmemory", "1")
        writes: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.hit([(counter.counter_id, 60)]),
            lambda: store.hit_and_write([counter], emit=event, keep=Kept(link, b"x", 60)),
            lambda: store.keep(link, b"x", 60),
            lambda: store.emit(b"hint", event.events),
            lambda: store.take_and_emit(action, webhook_call(), ACTION_DESTINATION),
        ]
        for write in writes:
            with pytest.raises(StoreUnavailable, match="OOM"):
                await write()
        assert await store.take(handoff, {"source": "checkout"}) == b"sealed-handoff"
        await admin.config_set("maxmemory", "0")
        outbox = outbox_key("oom:", shard_of(handoff))
        assert await admin.xlen(outbox) == 1  # the exchange's completion entry
        keys.remove(handoff_key("oom:", handoff).encode())
        assert sorted(await admin.keys("oom:*")) == sorted([*keys, outbox.encode()])
        assert [count for count, _ in await store.hit([(counter.counter_id, 60)])] == [2]
        assert await store.read(action) == b"sealed-action"
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
        await store.close()


async def test_memory_store_caps_rate_counters_refusing_a_new_one_whole(
    json_log: io.BytesIO,
) -> None:
    """Unique clientIds made a counter each, without bound. Past ``max_counters`` live
    counters, a hit that needs a new one is refused whole (StoreUnavailable: 503), as Redis
    over maxmemory refuses it, and counts nothing; live counters go on counting (dropping
    one would restart its count), and expired windows make room."""
    assert memory.MAX_COUNTERS == 100_000
    clock = Clock()
    store = MemoryStore(clock=clock, max_counters=3)
    first, second, short = new_id(), new_id(), new_id()
    assert [c for c, _ in await store.hit([(first, 60), (second, 60)])] == [1, 1]
    assert [c for c, _ in await store.hit([(short, 10)])] == [1]
    with pytest.raises(StoreUnavailable, match="rate counters full"):
        await store.hit([(new_id(), 60)])
    with pytest.raises(StoreUnavailable):  # a known counter beside a new one: neither counts
        await store.hit([(first, 60), (new_id(), 60)])
    with pytest.raises(StoreUnavailable):
        await store.hit_and_write(
            [Counted(first, 60, 5), Counted(new_id(), 60, 5)],
            emit=Emitted(b"hint", [{"type": "page"}], "shop"),
        )
    assert not any(queue.events for queue in store.outbox.queues)
    assert [c for c, _ in await store.hit([(first, 60), (second, 60)])] == [2, 2]
    for _ in range(1000):  # a flood of new ids: memory stays bounded
        with pytest.raises(StoreUnavailable):
            await store.hit([(new_id(), 60)])
    assert len(store._counters) == 3
    clock.now += 10  # the short window ended: its room is a new counter's
    fresh = new_id()
    assert [c for c, _ in await store.hit([(fresh, 60)])] == [1]
    assert [c for c, _ in await store.hit([(first, 60), (fresh, 60)])] == [3, 2]
    warnings = [line for line in log_lines(json_log) if line["level"] == "warning"]
    assert [line["event"] for line in warnings] == ["memory_store_counters_full"]
    assert warnings[0]["max_counters"] == 3
