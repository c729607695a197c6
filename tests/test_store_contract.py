"""The contract every store meets, run against the memory store and a real Redis: one
node, and (`make topology`) a 3-master Cluster and a master behind three sentinels."""

import asyncio
import contextlib
import os
import signal
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from identity_service.constants import KEY_SHARDS, handoff_key, lease_key, outbox_key
from identity_service.crypto import OutboxSealer
from identity_service.feeds import Feed, MemoryFeed, RedisFeed
from identity_service.metrics import Metrics
from identity_service.problems import StoreUnavailable
from identity_service.settings import RedisSettings
from identity_service.stores import Counted, Emitted, HandoffStore, Kept
from identity_service.stores import resp as resp_module
from identity_service.stores.memory import MemoryOutbox, MemoryQueue, MemoryStore
from identity_service.stores.redis import RedisStore, connect
from identity_service.stores.replication import Waits
from identity_service.stores.topology import Commands, lean_client
from tests.conftest import TOPOLOGY_KINDS, store_url
from tests.redis_server import RedisServer
from tests.redis_topologies import info_field, wait_until

SEALER = OutboxSealer(b"s" * 32)


@pytest.fixture(params=["memory", "redis", *TOPOLOGY_KINDS])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def redis_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    return store_url(store_kind, request)


@pytest.fixture
async def store(redis_url: str | None) -> AsyncIterator[HandoffStore]:
    opened: HandoffStore
    if redis_url is None:
        opened = MemoryStore()
    else:
        opened = RedisStore(RedisSettings.from_dsn(redis_url, key_prefix="contract:"), SEALER)
    yield opened
    await opened.close()


def new_id() -> bytes:
    return os.urandom(32)


async def test_take_returns_what_put_stored_once(store: HandoffStore) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"sealed-record", 60, None)
    assert await store.take(lookup_id, None) == b"sealed-record"
    assert await store.take(lookup_id, None) is None


async def test_take_of_an_unknown_id_is_none(store: HandoffStore) -> None:
    assert await store.take(new_id(), None) is None


async def test_put_replaces(store: HandoffStore) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"first", 60, None)
    await store.put(lookup_id, b"second", 60, None)
    assert await store.take(lookup_id, None) == b"second"


async def test_records_expire_after_their_ttl(store: HandoffStore) -> None:
    short, long = new_id(), new_id()
    await store.put(short, b"short", 1, None)
    await store.put(long, b"long", 30, None)
    await asyncio.sleep(1.2)
    assert await store.take(short, None) is None
    assert await store.take(long, None) == b"long"


async def test_concurrent_takes_hand_a_record_out_once(store: HandoffStore) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"once", 60, None)
    results = await asyncio.gather(*(store.take(lookup_id, None) for _ in range(200)))
    assert results.count(b"once") == 1
    assert results.count(None) == 199


# -- leases: one landing of an AMP origin hop at a time ---------------------------------------


async def test_claim_leases_the_record_to_one_owner_until_released(store: HandoffStore) -> None:
    lookup_id, first, second = new_id(), b"first-owner", b"second-owner"
    assert await store.claim(lookup_id, first, 30) is None  # no record: nothing to lease
    await store.put(lookup_id, b"sealed-action", 60, None)
    claim = await store.claim(lookup_id, first, 30)
    assert claim is not None and (claim.record, claim.claimed) == (b"sealed-action", True)
    other = await store.claim(lookup_id, second, 30)
    assert other is not None and other.record == b"sealed-action" and not other.claimed
    assert 28 < other.leased_for <= 30  # the first owner's lease, not renewed by the ask
    await store.release(lookup_id, second)  # not its lease: nothing ends
    again = await store.claim(lookup_id, second, 30)
    assert again is not None and not again.claimed
    await store.release(lookup_id, first)
    taken = await store.claim(lookup_id, second, 30)
    assert taken is not None and taken.claimed
    assert await store.read(lookup_id) == b"sealed-action"  # the record stays throughout


async def test_a_lease_ends_with_its_time(store: HandoffStore) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"sealed-action", 60, None)
    first = await store.claim(lookup_id, b"first-owner", 0.3)
    assert first is not None and first.claimed
    await asyncio.sleep(0.4)
    second = await store.claim(lookup_id, b"second-owner", 30)
    assert second is not None and second.claimed
    await store.release(lookup_id, b"first-owner")  # ran out: the second owner's stays
    third = await store.claim(lookup_id, b"third-owner", 30)
    assert third is not None and not third.claimed


async def test_concurrent_claims_lease_a_record_to_one_owner(store: HandoffStore) -> None:
    lookup_id = new_id()
    await store.put(lookup_id, b"once", 60, None)
    claims = await asyncio.gather(*(store.claim(lookup_id, b"%d" % i, 30) for i in range(100)))
    assert all(claim is not None and claim.record == b"once" for claim in claims)
    assert sum(claim is not None and claim.claimed for claim in claims) == 1


async def test_ping_answers(store: HandoffStore) -> None:
    await store.ping()


async def test_memory_store_sweeps_expired_records_on_write() -> None:
    store = MemoryStore()
    for _ in range(10):
        await store.put(new_id(), b"x", 1, None)
    await asyncio.sleep(1.1)
    await store.put(new_id(), b"y", 60, None)
    assert len(store) == 1


async def test_redis_store_over_a_unix_socket(redis_server: RedisServer) -> None:
    store = RedisStore(RedisSettings.from_dsn(redis_server.unix_url, key_prefix="unix:"), SEALER)
    try:
        lookup_id = new_id()
        await store.put(lookup_id, b"over-unix", 60, None)
        assert await store.take(lookup_id, None) == b"over-unix"
    finally:
        await store.close()


async def test_redis_keys_carry_prefix_hash_tag_and_ttl(redis_server: RedisServer) -> None:
    redis_settings = RedisSettings.from_dsn(redis_server.url, key_prefix="tagged:")
    store = RedisStore(redis_settings, SEALER)
    try:
        lookup_id = new_id()
        await store.put(lookup_id, b"x", 120, None)
        key = handoff_key("tagged:", lookup_id)
        assert key.startswith("tagged:{") and key.index("}") < key.index(lookup_id.hex())
        async with connect(redis_settings) as redis:
            ttl = await redis.ttl(key)
        assert 0 < ttl <= 120  # set with the record, in the same script
        # An AMP hop's lease: the record's hash tag (one script, one Cluster slot), its TTL.
        await store.claim(lookup_id, b"owner", 5)
        lease = lease_key("tagged:", lookup_id)
        assert lease.partition("}")[0] == key.partition("}")[0]
        assert lease.endswith(f":lease:{lookup_id.hex()}")
        async with connect(redis_settings) as redis:
            assert 4000 < await redis.pttl(lease) <= 5000
    finally:
        await store.close()


class TracedGrowth:
    """How much more memory Python holds at the end of the block than at its start."""

    def __enter__(self) -> "TracedGrowth":
        self._started_here = not tracemalloc.is_tracing()
        if self._started_here:
            tracemalloc.start()
        self.bytes = 0
        self._before = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *_exc: object) -> None:
        self.bytes = tracemalloc.get_traced_memory()[0] - self._before
        if self._started_here:
            tracemalloc.stop()


async def test_memory_store_forgets_taken_handoffs_before_they_would_expire() -> None:
    store = MemoryStore()
    expiring, kept = new_id(), new_id()
    await store.put(expiring, b"expiring", 1, None)
    await store.put(kept, b"kept", 60, None)
    with TracedGrowth() as growth:
        for _ in range(20_000):
            lookup_id = new_id()
            await store.put(lookup_id, b"record", 300, None)
            assert await store.take(lookup_id, None) == b"record"
    # Each taken handoff used to leave about 150 bytes behind for its whole TTL.
    assert growth.bytes < 20_000 * 20
    await asyncio.sleep(1.1)
    await store.put(new_id(), b"sweep", 60, None)
    assert len(store) == 2  # the expired record was swept: the rebuilt heap still had it
    assert await store.take(expiring, None) is None
    assert await store.take(kept, None) == b"kept"


def test_queued_events_hold_about_their_own_size() -> None:
    outbox = MemoryOutbox()
    queue = outbox.subscribe()
    event = {"type": "track", "event": "Handoff Started", "properties": {"note": "x" * 500}}
    with TracedGrowth() as growth:
        outbox.extend([event] * 2_000)
    assert len(queue.events) == 2_000
    # A result of orjson.dumps sits in a buffer of at least 4 KiB (orjson 3.12 and later).
    assert growth.bytes < 2_000 * 1_000


async def test_emit_only_reaches_the_addressed_destination_alone(
    store: HandoffStore, redis_url: str | None
) -> None:
    """Entries addressed to a destination (an AMP action's webhook body) reach it alone;
    an addressed-only destination takes nothing else (analytics events)."""
    names = ["segment", "amp-action-cart"]
    feeds: dict[str, Feed]
    clients: list[Commands] = []
    redis = None
    if redis_url is None:
        assert isinstance(store, MemoryStore)
        feeds = {
            name: MemoryFeed(store.outbox.subscribe(name, name.startswith("amp-")))
            for name in names
        }
    else:
        redis_settings = RedisSettings.from_dsn(redis_url)
        redis = connect(redis_settings)
        for shard in range(KEY_SHARDS):
            await redis.delete(outbox_key("contract:", shard))
        feeds = {}
        for name in names:
            clients.append(lean_client(redis_settings, timeout=3.0))
            feeds[name] = RedisFeed(
                redis, clients[-1], "contract:", name, SEALER, 60, names, name.startswith("amp-")
            )
            assert await feeds[name].read(10, wait=0.01) == []  # creates the groups
    try:
        await store.emit(b"hint-1", [{"type": "page", "messageId": "m-1"}])
        await store.emit(b"hint-2", [{"id": "hop-1", "action": "cart"}], only="amp-action-cart")
        await store.emit(b"hint-3", [{"type": "track", "messageId": "m-2"}])
        read = {name: await _read_all(feed) for name, feed in feeds.items()}
    finally:
        for client in clients:
            await client.close()
        if redis is not None:
            await redis.aclose()
    assert sorted((orjson.loads(event) for event in read["segment"]), key=str) == [
        {"type": "page", "messageId": "m-1"},
        {"type": "track", "messageId": "m-2"},
    ]
    assert [orjson.loads(event) for event in read["amp-action-cart"]] == [
        {"id": "hop-1", "action": "cart"}
    ]


async def _read_all(feed: Feed) -> list[bytes]:
    """Every event the feed hands out now: Redis hands out one entry per shard a read, and
    a read whose entries were all for other destinations hands out none."""
    events: list[bytes] = []
    for _ in range(5):
        entries = await feed.read(10, wait=0.05)
        events.extend(event for entry in entries for event in entry.events)
    return events


async def test_wait_goes_in_the_scripts_write_and_a_shortfall_still_succeeds(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IDENTITY_REDIS_WAIT: WAIT leaves with the script (one round trip); with no replica
    to confirm, the call still succeeds, counted and logged (docs/redis-topologies.md)."""
    metrics = Metrics()
    settings = RedisSettings.from_dsn(private_redis.url, key_prefix="wait:", wait=(1, 10))
    store = RedisStore(settings, SEALER, metrics=metrics)
    writes: list[int] = []
    flush = resp_module.Connection._flush

    def counted_flush(self: resp_module.Connection) -> None:
        writes.append(len(self._outgoing))
        flush(self)

    try:
        await store.put(new_id(), b"load the script", 60, None)
        monkeypatch.setattr(resp_module.Connection, "_flush", counted_flush)
        lookup_id = new_id()
        await store.put(lookup_id, b"replicated?", 60, None)
        # The exchange script is new to Redis: EVALSHA and WAIT, NOSCRIPT, then EVAL and
        # a WAIT after it (the first WAIT came before the script ran).
        assert await store.take(lookup_id, None) == b"replicated?"
        assert writes == [2, 2, 1, 1]
        writes.clear()
        lookup_id = new_id()
        await store.put(lookup_id, b"again", 60, None)
        assert await store.take(lookup_id, None) == b"again"
        assert writes == [2, 2]  # each script with its WAIT, in one write
    finally:
        await store.close()
    assert metrics.value("identity_redis_wait_short_total", operation="prepare") == 3
    assert metrics.value("identity_redis_wait_short_total", operation="exchange") == 2


async def test_concurrent_requests_share_one_wait_while_one_is_in_flight(
    private_redis: RedisServer,
) -> None:
    """Redis holds a connection while its WAIT waits: a WAIT per request would queue them
    all behind each other's timeout. The first request's WAIT goes with its script; the
    others, sent meanwhile, share the one WAIT sent when it returns."""
    metrics = Metrics()
    settings = RedisSettings.from_dsn(private_redis.url, key_prefix="waits:", wait=(1, 100))
    store = RedisStore(settings, SEALER, metrics=metrics)
    admin = connect(settings)
    try:
        await store.put(new_id(), b"load the script", 60, None)
        await admin.config_resetstat()
        await asyncio.gather(*(store.put(new_id(), b"record", 60, None) for _ in range(50)))
        stats = await admin.info("commandstats")
    finally:
        await store.close()
        await admin.aclose()
    assert stats["cmdstat_evalsha"]["calls"] == 50
    assert stats["cmdstat_wait"]["calls"] == 2
    assert metrics.value("identity_redis_wait_short_total", operation="prepare") == 51


@contextlib.asynccontextmanager
async def synced_replica(master: RedisServer, tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A replica of ``master``, once it has synced; stopped after."""
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica", replicaof=f"127.0.0.1 {master.port}")
    replica.start()
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: info_field(replica.port, "replication", "master_link_status") == "up",
            10,
            "the replica to sync",
        )
        yield replica
    finally:
        replica.stop()


async def test_a_wait_never_goes_on_a_connection_that_did_not_run_the_script(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Requests whose script ran on a connection that broke while a WAIT was in flight
    there: their WAIT must not go on the next connection, which made none of their writes
    (a WAIT on a connection that wrote nothing returns at once with every replica). Each
    of them fails or is a shortfall. The replica is frozen (SIGSTOP) so that the WAIT in
    flight waits; the connection is dropped as a broken one would be."""
    metrics = Metrics()
    settings = RedisSettings.from_dsn(
        private_redis.url, key_prefix="broken:", wait=(1, 2000), timeout=5.0
    )
    store = RedisStore(settings, SEALER, metrics=metrics)
    try:
        async with synced_replica(private_redis, tmp_path) as replica:
            await store.put(new_id(), b"load the script", 60, None)
            assert metrics.value("identity_redis_wait_short_total", operation="prepare") == 0
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                puts = asyncio.gather(
                    *(store.put(new_id(), b"record", 60, None) for _ in range(4)),
                    return_exceptions=True,
                )
                await asyncio.sleep(0.3)  # the scripts ran; a WAIT waits for the frozen replica
                store.commands.disconnect()
                outcomes = await puts
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            assert all(o is None or isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert outcomes.count(None)
            short = metrics.value("identity_redis_wait_short_total", operation="prepare")
            assert short == outcomes.count(None)
            await store.put(new_id(), b"record", 60, None)  # a new connection: acknowledged
            assert metrics.value("identity_redis_wait_short_total", operation="prepare") == short
    finally:
        await store.close()


async def test_a_cancelled_request_does_not_cancel_the_wait_others_share(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Three scripts sent at once on one connection: the first has its WAIT right behind it,
    the second sends the next WAIT once its reply is in, and the third shares that one. The
    second request cancelled (its client went away) must not cancel the WAIT the third
    waits on: with a healthy replica the third counts it, not a shortfall."""
    client = resp_module.RespClient(private_redis.url, timeout=5.0)
    waits = Waits(1, 2000)
    script = resp_module.Script("return redis.call('INCR', KEYS[1])")
    try:
        async with synced_replica(private_redis, tmp_path):
            assert (await waits.after(client, script, ["shared-wait"], []))[1] == 1
            first, second, third = (
                asyncio.ensure_future(waits.after(client, script, ["shared-wait"], []))
                for _ in range(3)
            )
            (line,) = waits._lines.values()
            while line.shared is None:  # noqa: ASYNC110 (the third now shares the second's WAIT)
                await asyncio.sleep(0)
            second.cancel()
            assert (await first)[1] == 1
            assert (await third)[1] == 1
            with pytest.raises(asyncio.CancelledError):
                await second
    finally:
        await client.close()


# -- an AMP hit in one call: hit_and_write -------------------------------------------------


async def queued_events(store: HandoffStore, queue: MemoryQueue | None) -> int:
    """How many outbox entries the store holds (the memory store: ``queue``'s events)."""
    if queue is not None:
        return len(queue.events)
    assert isinstance(store, RedisStore)
    streams = [outbox_key("contract:", shard) for shard in range(KEY_SHARDS)]
    lengths = [await store.commands.call(stream, "XLEN", stream) for stream in streams]
    return sum(int(length) for length in lengths)


@pytest.fixture
def outbox_queue(store: HandoffStore) -> MemoryQueue | None:
    """The memory store's events, subscribed before the test writes any (Redis: None)."""
    return store.outbox.subscribe("default") if isinstance(store, MemoryStore) else None


def hit_event() -> Emitted:
    message_id = str(uuid.uuid4())
    return Emitted(message_id.encode(), [{"type": "page", "messageId": message_id}], "shop")


async def test_hit_and_write_writes_the_event_and_the_record_only_under_every_limit(
    store: HandoffStore, outbox_queue: MemoryQueue | None
) -> None:
    address, client = Counted(new_id(), 60, 1), Counted(new_id(), 60, 5)
    before = await queued_events(store, outbox_queue)
    first, second = Kept(new_id(), b"first link", 60), Kept(new_id(), b"second link", 60)

    under = await store.hit_and_write([address, client], emit=hit_event(), keep=first)
    assert [count for count, _ in under.counts] == [1, 1]
    assert all(50 < left <= 60 for _, left in under.counts)
    assert (under.record, under.kept, under.keep_error) == (None, True, None)
    assert await store.peek(first.key_id) == b"first link"
    assert await queued_events(store, outbox_queue) == before + 1

    # The address's second request is over its limit of 1: counted, and nothing written.
    over = await store.hit_and_write([address, client], emit=hit_event(), keep=second)
    assert [count for count, _ in over.counts] == [2, 2]
    assert (over.record, over.kept) == (None, False)
    assert await store.peek(second.key_id) is None
    assert await queued_events(store, outbox_queue) == before + 1


async def test_hit_and_write_reads_the_record_before_it_writes(
    store: HandoffStore, outbox_queue: MemoryQueue | None
) -> None:
    link = new_id()
    counter = Counted(new_id(), 60, 1)
    assert (await store.hit_and_write([counter], peek=link)).record is None
    await store.keep(link, b"kept", 60)
    over = await store.hit_and_write([counter], peek=link)  # over the limit: still read
    assert (over.counts[0][0], over.record) == (2, b"kept")
    replaced = await store.hit_and_write(
        [Counted(new_id(), 60, 1)], peek=link, keep=Kept(link, b"new", 60)
    )
    assert (replaced.record, replaced.kept) == (b"kept", True)
    assert await store.peek(link) == b"new"


async def test_hit_and_write_unless_peeked_writes_the_event_only_without_a_record(
    store: HandoffStore, outbox_queue: MemoryQueue | None
) -> None:
    link, counter = new_id(), Counted(new_id(), 60, 2)
    before = await queued_events(store, outbox_queue)
    none_kept = await store.hit_and_write(
        [counter], peek=link, emit=hit_event(), unless_peeked=True
    )
    assert none_kept.record is None
    assert await queued_events(store, outbox_queue) == before + 1

    await store.keep(link, b"kept", 60)
    found = await store.hit_and_write([counter], peek=link, emit=hit_event(), unless_peeked=True)
    assert found.record == b"kept"
    assert await queued_events(store, outbox_queue) == before + 1  # the caller's to emit

    over = await store.hit_and_write([counter], peek=new_id(), emit=hit_event(), unless_peeked=True)
    assert (over.counts[0][0], over.record) == (3, None)
    assert await queued_events(store, outbox_queue) == before + 1  # over the limit of 2


async def test_hit_and_write_with_nothing_to_write_counts(store: HandoffStore) -> None:
    counter = Counted(new_id(), 60, 10)
    for expected in (1, 2, 3):
        outcome = await store.hit_and_write([counter])
        assert [count for count, _ in outcome.counts] == [expected]
    assert [count for count, _ in await store.hit([(counter.counter_id, 60)])] == [4]


async def test_hit_and_write_keeps_under_the_kept_id_and_reads_the_peeked_one(
    store: HandoffStore,
) -> None:
    """``peek`` and ``keep`` name their own records: the record kept goes under its own id
    even when another is read (the Redis script used to write it under the one read)."""
    peeked, kept = new_id(), new_id()
    await store.keep(peeked, b"peeked", 60)
    outcome = await store.hit_and_write(
        [Counted(new_id(), 60, 5)], peek=peeked, keep=Kept(kept, b"kept", 60)
    )
    assert (outcome.record, outcome.kept) == (b"peeked", True)
    assert await store.peek(peeked) == b"peeked"
    assert await store.peek(kept) == b"kept"
