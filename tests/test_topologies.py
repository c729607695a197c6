"""The service on real Redis topologies (`make topology`): a 3-master Cluster resharded under
a stream of handoffs, and a master behind three sentinels killed under one, with and
without ``IDENTITY_REDIS_WAIT``. The failover figures are printed (run with ``-s``) and
docs/redis-topologies.md quotes them; the assertions are what must hold on every run."""

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from identity_service import app_keys
from identity_service.app import create_app
from identity_service.constants import (
    KEY_SHARDS,
    handoff_key,
    link_key,
    outbox_key,
    shard_tags,
    tag_slot,
)
from identity_service.crypto import OutboxSealer
from identity_service.feeds import RedisFeed
from identity_service.metrics import Metrics
from identity_service.problems import StoreUnavailable
from identity_service.settings import RedisSettings
from identity_service.stores import PrepareEvents
from identity_service.stores.redis import RedisStore, check_reachable, connect, follow_master
from identity_service.stores.resp import Arg, Reply, RespClient
from identity_service.stores.topology import WATCH_SECONDS, ClusterClient, SentinelClient
from tests.collector import WRITE_KEY, Collector, running_collector
from tests.conftest import CHECKOUT_URL, AppClient, auth, exchange, make_settings, prepare
from tests.redis_server import RedisServer, free_port, free_port_pair
from tests.redis_topologies import Cluster, Sentinels, info_field, redis_cli, wait_until
from tests.secrets_audit import AUDIT
from tests.test_cli import events_file, outbox_command, redis_env_for, refusal_at_start
from tests.test_resp import write_tls_files

pytestmark = pytest.mark.topology

ClientMaker = Callable[..., Awaitable[AppClient]]
STARTED, COMPLETED = "Cross-Domain Handoff Started", "Cross-Domain Handoff Completed"
WORKERS = 8
# Entries the forwarder had read when the master died stay pending on the new master until
# reclaimed: soon, here, so that only what the failover really lost counts as lost (and
# sends short enough for that: the settings want the reclaim to wait longer than a send).
RECLAIM_IDLE = "2"
DELIVERY_TIMEOUT = "0.9"


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as running:
        yield running


def slot_owners(port: int) -> dict[int, int]:
    """Each slot's master port, from CLUSTER SLOTS as redis-cli prints it."""
    lines = redis_cli("-p", str(port), "CLUSTER", "SLOTS").split()
    owners: dict[int, int] = {}
    # Each range: start, end, then (host, port, id) for the master and each replica.
    index = 0
    while index < len(lines):
        start, end, master_port = int(lines[index]), int(lines[index + 1]), int(lines[index + 3])
        owners.update(dict.fromkeys(range(start, end + 1), master_port))
        index += 5
    return owners


def test_one_node_urls_on_a_cluster_node_or_a_sentinel_are_refused_at_start(
    redis_cluster: Cluster, redis_sentinel: Sentinels
) -> None:
    node = f"redis://127.0.0.1:{redis_cluster.nodes[0].port}/0"
    line = refusal_at_start(node, "is a Redis Cluster node")
    assert "redis+cluster://" in line
    # The outbox commands refuse alike (they said "MovedError: ... XINFO GROUPS").
    for command in (["status"], ["replay-dead"], ["retire", "gone"]):
        assert refusal_at_start(node, "is a Redis Cluster node", "outbox", *command) == line
    sentinel = f"redis://127.0.0.1:{redis_sentinel.sentinel_ports[0]}/0"
    assert "redis+sentinel://" in refusal_at_start(sentinel, "is a sentinel")


def test_the_shards_spread_evenly_over_the_masters(redis_cluster: Cluster) -> None:
    owners = slot_owners(redis_cluster.nodes[0].port)
    per_master = Counter(owners[tag_slot(tag)] for tag in shard_tags(KEY_SHARDS))
    assert sorted(per_master.values()) == [5, 5, 6]
    per_master = Counter(owners[tag_slot(tag)] for tag in shard_tags(48))
    assert sorted(per_master.values()) == [16, 16, 16]


@dataclass
class Stream:
    """Handoffs (prepare, then exchange) sent by WORKERS loops until ``stop`` is set."""

    client: AppClient
    # Seconds from a handoff's prepare to its exchange (None: prepares only), so that the
    # tokens redeemed just before a failover were prepared long before it.
    exchange_after: float | None = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    flows: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    # (when answered, anonymous id, token) of every prepare answered 201 and every
    # exchange answered 200.
    acknowledged: list[tuple[float, str, str]] = field(default_factory=list)
    redeemed: list[tuple[float, str, str]] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    # When each prepare that began after the first 503 succeeded (those in flight at the
    # failure do not say the service recovered).
    recovered_at: list[float] = field(default_factory=list)
    recovered: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def prepared(self) -> set[str]:
        return {visitor for _, visitor, _ in self.acknowledged}

    @property
    def exchanged(self) -> set[str]:
        return {visitor for _, visitor, _ in self.redeemed}

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(number) for number in range(WORKERS)))

    async def _worker(self, number: int) -> None:
        # (when its prepare began, anonymous id, token) of this worker's unexchanged
        # handoffs, oldest first.
        waiting: deque[tuple[float, str, str]] = deque()
        while not self.stop.is_set():
            began = time.monotonic()
            # One prepare a turn, after the exchange of the oldest handoff if it is due: the
            # two go on side by side.
            lag = self.exchange_after
            if lag is not None and waiting and waiting[0][0] <= began - lag:
                await self._exchange(*waiting.popleft())
            self.flows += 1
            visitor = f"visitor-{number}-{self.flows}"
            AUDIT.identity(visitor, "anonymousId")
            body = {"anonymousId": visitor, "destination": CHECKOUT_URL}
            status, answer = await self._post("/v1/handoffs", body, "shop", "prepare")
            if status == 201:
                token = answer["token"]
                AUDIT.token(token)
                self.acknowledged.append((time.monotonic(), visitor, token))
                waiting.append((began, visitor, token))
                if self.failed_at and began > self.failed_at[0]:
                    self.recovered_at.append(time.monotonic())
                    self.recovered.set()

    async def _exchange(self, began: float, visitor: str, token: str) -> None:
        status = 503
        while status == 503 and not self.stop.is_set():
            # A client retries an exchange answered 503 (the SDKs do): the script did not
            # run, or its reply was lost.
            status, _ = await self._post(
                "/v1/handoffs/exchange", {"token": token}, "checkout", "exchange"
            )
        if status == 200:
            self.redeemed.append((time.monotonic(), visitor, token))

    async def _post(
        self, path: str, body: dict[str, Any], source: str, what: str
    ) -> tuple[int, dict[str, Any]]:
        response = await self.client.post(path, json=body, headers=auth(source))
        answer: dict[str, Any] = await response.json(content_type=None)
        self.statuses[f"{what} {response.status}"] += 1
        if response.status == 503:
            assert response.headers["Retry-After"] == "1"
            self.failed_at.append(time.monotonic())
            await asyncio.sleep(0.05)  # a client waits before trying again
        return response.status, answer


def lost_events(
    stream: Stream, collector: Collector, answered: Callable[[float], bool] = lambda _: True
) -> int:
    """Events of requests answered at a time ``answered`` selects that the collector never
    received."""
    delivered = {(e["anonymousId"], e["event"]) for e in collector.events}
    expected = {(v, STARTED) for at, v, _ in stream.acknowledged if answered(at)} | {
        (v, COMPLETED) for at, v, _ in stream.redeemed if answered(at)
    }
    return len(expected - delivered)


async def wait_for_events(stream: Stream, collector: Collector, seconds: float) -> int:
    """The events still missing once nothing is, or once the collector received nothing
    new for four seconds (the forwarder caught up and reclaimed what it had read when the
    master died: RECLAIM_IDLE), or after ``seconds``."""
    received, quiet = len(collector.events), 0
    for _ in range(int(seconds * 10)):
        if not lost_events(stream, collector) or quiet >= 40:
            break
        await asyncio.sleep(0.1)
        quiet = 0 if len(collector.events) != received else quiet + 1
        received = len(collector.events)
    return lost_events(stream, collector)


async def test_resharding_under_a_stream_of_handoffs_loses_no_handoff_and_no_event(
    aiohttp_client: ClientMaker, tmp_path: Path, collector: Collector, json_log: io.BytesIO
) -> None:
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        settings = make_settings(
            cluster.url,
            destination_url=collector.url,
            destination_write_key=WRITE_KEY,
            batch_max_wait="0.05",
        )
        client = await aiohttp_client(create_app(settings))
        stream = Stream(client)
        running = asyncio.create_task(stream.run())
        await asyncio.sleep(0.5)
        source, target = cluster.nodes[0], cluster.nodes[2]
        # The first 2048 slots of the first master: shards 0 and 1, with their outboxes.
        await asyncio.to_thread(cluster.reshard, source, target, 2048)
        await asyncio.sleep(0.5)
        stream.stop.set()
        await running
        owners = slot_owners(target.port)
        assert owners[tag_slot(shard_tags(KEY_SHARDS)[0])] == target.port
        store = client.app[app_keys.STORE]
        assert isinstance(store, RedisStore) and isinstance(store.commands, ClusterClient)
        redirects = dict(store.commands.redirects)
        assert redirects.get("MOVED") or redirects.get("ASK")  # requests followed the slots
        lost = await wait_for_events(stream, collector, 20)
        print(
            f"\nresharding 2048 slots under {WORKERS} streams of handoffs: {stream.flows} flows, "
            f"answers {dict(stream.statuses)}, redirections followed {redirects}, "
            f"events lost {lost}"
        )
        assert stream.prepared and stream.prepared - stream.exchanged <= _unfinished(stream)
        assert stream.statuses["exchange 404"] == 0  # no handoff lost
        assert lost == 0
    finally:
        cluster.stop()


def _unfinished(stream: Stream) -> set[str]:
    """Handoffs prepared when the stream stopped, before their exchange (at most one a
    worker)."""
    unfinished = stream.prepared - stream.exchanged
    assert len(unfinished) <= WORKERS
    return unfinished


# The replica's replication link delays what the master sends by this much (a proxy), so
# that the replica lags as across machines and a failover can undo something.
REPLICATION_DELAY = 0.08
# IDENTITY_REDIS_WAIT with WAIT on: a timeout well above the replica's lag.
WAIT_ON = "1,300"
# How long before the kill a request answered without WAIT may have a write the replica
# never received: the proxy's delay, with room to spare.
UNREPLICATED_SECONDS = 1.0


@dataclass
class Failover:
    wait: str
    flows: int
    failed: int
    seconds_to_success: float
    # Tokens redeemed in the second before the kill that a second exchange after the
    # failover redeemed again: of exchanges answered before the kill, and of those in
    # flight at the kill answered 200 after it (their script's reply had come; with WAIT,
    # their WAIT had not: a shortfall).
    double_redemptions: int
    double_redemptions_in_flight: int
    # Exchanges answered 200 within REPLICATION_DELAY before the kill: those at risk.
    redeemed_in_lag: int
    lost: int
    lost_guaranteed: int
    delivered_after: int
    wait_short_before: int
    wait_short: int
    statuses: dict[str, int]


def wait_short(client: AppClient) -> int:
    metrics = client.app[app_keys.METRICS]
    return int(
        sum(
            metrics.value("identity_redis_wait_short_total", operation=operation)
            for operation in ("prepare", "exchange")
        )
    )


async def exchange_again(client: AppClient, token: str) -> int:
    """An exchange's status, retried while it answers 503 (at most a few seconds)."""
    for _ in range(50):
        response = await client.post(
            "/v1/handoffs/exchange", json={"token": token}, headers=auth("checkout")
        )
        if response.status != 503:
            return response.status
        await asyncio.sleep(0.1)
    return 503


async def kill_the_master_under_handoffs(
    aiohttp_client: ClientMaker,
    sentinels: Sentinels,
    collector: Collector,
    wait: str,
    restore: bool,
) -> Failover:
    settings = make_settings(
        sentinels.url,
        destination_url=collector.url,
        destination_write_key=WRITE_KEY,
        batch_max_wait="0.05",
        reclaim_idle=RECLAIM_IDLE,
        delivery_timeout=DELIVERY_TIMEOUT,
        redis_wait=wait,
    )
    client = await aiohttp_client(create_app(settings))
    # Each token is exchanged half a second after its prepare: one redeemed just before
    # the kill was on the replica already, its consumption maybe not.
    stream = Stream(client, exchange_after=0.5)
    running = asyncio.create_task(stream.run())
    await asyncio.sleep(1.0)
    master = sentinels.master()
    replica = sentinels.b if master is sentinels.a else sentinels.a
    assert sentinels.replicates_through_proxy(replica), "the sentinels re-pointed the replica"
    # Those checks blocked the loop while the proxy delivered what it held: the stream
    # resumes first, so that the replica lags when the master dies.
    await asyncio.sleep(0.5)
    short_before = wait_short(client)
    killed_at = time.monotonic()
    master.kill()
    # Bounded: the sentinels notice in about a second, then elect and promote.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stream.recovered.wait(), 45)
    await asyncio.sleep(1.0)
    stream.stop.set()
    await running
    assert stream.recovered_at, (
        f"no prepare begun after the failover succeeded (WAIT {wait or 'off'}): "
        f"{stream.statuses}; the service did not recover"
    )
    recovered_at = stream.recovered_at[0]
    failed = sum(count for answer, count in stream.statuses.items() if answer.endswith(" 503"))
    lost = await wait_for_events(stream, collector, 15)
    # The events the design keeps: those of requests answered on the new master, and those
    # of requests answered before the kill whose write the replica had (with WAIT: every
    # one answered before the kill; without: those older than the replica's lag).
    replicated_before = killed_at - (0.0 if wait else UNREPLICATED_SECONDS)
    lost_guaranteed = lost_events(
        stream, collector, lambda at: at < replicated_before or at > recovered_at
    )
    delivered = {(e["anonymousId"], e["event"]) for e in collector.events}
    delivered_after = sum(
        (visitor, STARTED) in delivered
        for at, visitor, _ in stream.acknowledged
        if at > recovered_at
    )
    # Redeem again what was redeemed in the last second before the kill (and what its
    # in-flight requests answered after it): a 200 now means the exchange was lost with
    # the old master, a token used twice.
    recent = [(at, token) for at, _, token in stream.redeemed if at >= killed_at - 1.0]
    again = await asyncio.gather(*(exchange_again(client, token) for _, token in recent))
    doubles = Counter(
        at < killed_at for (at, _), status in zip(recent, again, strict=True) if status == 200
    )
    if restore:
        # The killed node comes back as a replica of the new master, for the next scenario.
        sentinels.replicate(master, sentinels.master())
        sentinels.wait_for_replica(master)
    return Failover(
        wait=wait or "off",
        flows=stream.flows,
        failed=failed,
        seconds_to_success=round(recovered_at - killed_at, 2),
        double_redemptions=doubles[True],
        double_redemptions_in_flight=doubles[False],
        redeemed_in_lag=sum(killed_at - REPLICATION_DELAY <= at < killed_at for at, _ in recent),
        lost=lost,
        lost_guaranteed=lost_guaranteed,
        delivered_after=delivered_after,
        wait_short_before=short_before,
        wait_short=wait_short(client),
        statuses=dict(stream.statuses),
    )


@pytest.mark.timeout(240)
async def test_sentinel_failover_under_handoffs_with_and_without_wait(
    aiohttp_client: ClientMaker, tmp_path: Path, collector: Collector, json_log: io.BytesIO
) -> None:
    """The master is killed under a stream of handoffs while its replica lags it by
    REPLICATION_DELAY (a proxy on the replication link, whose held bytes die with the
    master), first without WAIT, then with a WAIT whose timeout exceeds the lag.

    Asserted, as the design promises: the service recovers without a restart and the
    forwarder delivers what is written after the failover; no event is lost of a request
    answered on the new master, or before the kill once the replica had its write (every
    one with WAIT; without, those older than the lag); with WAIT, no token redeemed before
    the kill is redeemed again. Without WAIT some are (the lag is real: what WAIT saves).
    Printed, not asserted: the events lost in the lag, and the tokens redeemed again of
    exchanges in flight at the kill whose WAIT the kill cut short (answered 200, as any
    shortfall)."""
    sentinels = Sentinels(tmp_path, replication_delay=REPLICATION_DELAY)
    began = time.monotonic()
    sentinels.start()
    try:
        reports = []
        for wait in ["", WAIT_ON]:
            reports.append(
                await kill_the_master_under_handoffs(
                    aiohttp_client, sentinels, collector, wait, restore=not wait
                )
            )
    finally:
        sentinels.stop()
    print(
        f"\nsentinel set-up and two failovers, replica {REPLICATION_DELAY * 1000:.0f} ms "
        f"behind: {time.monotonic() - began:.0f} s"
    )
    for report in reports:
        print(
            f"sentinel failover, IDENTITY_REDIS_WAIT={report.wait}: {report.flows} flows, "
            f"{report.failed} answers 503, success again {report.seconds_to_success} s after "
            f"the kill, {report.redeemed_in_lag} tokens redeemed in the replica's lag before "
            f"it, {report.double_redemptions} double redemptions of tokens redeemed "
            f"before the kill (+{report.double_redemptions_in_flight} in flight at the kill), "
            f"{report.lost} events lost ({report.lost_guaranteed} of those the design "
            f"keeps), {report.delivered_after} delivered after the failover, "
            f"{report.wait_short_before} WAITs short before the kill and "
            f"{report.wait_short} in all; answers {report.statuses}"
        )
    _, on = reports
    for report in reports:
        assert report.seconds_to_success < 45
        assert report.lost_guaranteed == 0
        assert report.delivered_after > 0
    # Without WAIT, doubles depend on what the kill catches in the replica's lag (64-72 in
    # most runs, 0 in one CI run): measured and printed above, not asserted.
    assert on.wait_short_before == 0
    assert on.double_redemptions == 0


# How long after every sentinel names the new master a write may still reach the old one:
# the client asks the sentinels every WATCH_SECONDS, then a request in flight finishes.
SWITCH_SEEN_SECONDS = WATCH_SECONDS + 1.0


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait for ``condition`` (which may block: it runs in a thread) for ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def node_port(client: Any) -> int:
    """The port of the node ``client``'s next command reaches."""
    return int((await client.info("server"))["tcp_port"])


async def test_after_a_manual_failover_every_write_goes_to_the_new_master_once_seen(
    aiohttp_client: ClientMaker,
    redis_sentinel: Sentinels,
    collector: Collector,
    json_log: io.BytesIO,
) -> None:
    """``SENTINEL FAILOVER`` promotes the replica while the master stays up: the old master
    takes writes until the sentinels make it a replica (about ten seconds later) and drops
    them when it resyncs. Every prepare acknowledged more than SWITCH_SEEN_SECONDS after
    all the sentinels name the new master must be on the new master: its token exchanges
    once the old master is a replica."""
    sentinels = redis_sentinel
    old = sentinels.master()
    settings = make_settings(
        sentinels.url, destination_url=collector.url, destination_write_key=WRITE_KEY
    )
    client = await aiohttp_client(create_app(settings))
    stream = Stream(client, exchange_after=None)
    # The forwarder's redis-py client, made to follow the lean client's watch (outbox.py).
    assert settings.redis is not None
    admin, watcher = connect(settings.redis), SentinelClient(settings.redis, timeout=1.0)
    follow_master(watcher, admin)
    running = asyncio.create_task(stream.run())
    try:
        await watcher.execute("PING")  # connected: the watch runs
        assert await node_port(admin) == old.port
        await asyncio.sleep(0.5)
        port = str(sentinels.sentinel_ports[0])
        await asyncio.to_thread(redis_cli, "-p", port, "SENTINEL", "FAILOVER", sentinels.service)
        await until(
            lambda: all(
                sentinels.master_port(p) not in (0, old.port) for p in sentinels.sentinel_ports
            ),
            30,
            "every sentinel to name the new master",
        )
        switched_at = time.monotonic()
        # redis-py reconnects only when told to: its connection leaves the old master
        # while that is still a master (the sentinels demote it about ten seconds later).
        admin_moved = False
        while not admin_moved and time.monotonic() < switched_at + SWITCH_SEEN_SECONDS:
            admin_moved = await node_port(admin) != old.port
            await asyncio.sleep(0.1)
        old_role_then = info_field(old.port, "replication", "role")
        await until(
            lambda: info_field(old.port, "replication", "role") == "slave", 30,
            "the sentinels to make the old master a replica",
        )  # fmt: skip
    finally:
        stream.stop.set()
        await running
        await watcher.close()
        await admin.aclose()
    assert admin_moved and old_role_then == "master"
    await until(
        lambda: info_field(old.port, "replication", "master_link_status") == "up",
        30,
        "the old master to resync",
    )
    late = [(at, token) for at, _, token in stream.acknowledged if at > switched_at]
    answers: list[int] = []
    for chunk in range(0, len(late), 100):
        answers += await asyncio.gather(
            *(exchange_again(client, token) for _, token in late[chunk : chunk + 100])
        )
    lost = [
        at - switched_at for (at, _), status in zip(late, answers, strict=True) if status != 200
    ]
    print(
        f"\nmanual failover under {WORKERS} streams of prepares: {len(late)} acknowledged "
        f"after every sentinel named the new master, {len(lost)} of them lost, the last "
        f"acknowledged {max(lost, default=0):.2f} s after the switch; answers {dict(stream.statuses)}"
    )
    assert late
    assert max(lost, default=0) < SWITCH_SEEN_SECONDS
    await asyncio.to_thread(sentinels.wait_for_replica, old)


class HungServer:
    """A host that hangs: it accepts connections and never answers; counts them."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]
        self.accepted = 0

    @classmethod
    async def start(cls) -> "HungServer":
        hung: HungServer | None = None

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert hung is not None
            hung.accepted += 1
            await reader.read()
            writer.close()

        hung = cls(await asyncio.start_server(silent, "127.0.0.1", 0))
        return hung

    def close(self) -> None:
        self.server.close()


async def test_a_hung_seed_is_asked_for_the_slot_map_only_after_the_nodes_that_answer(
    redis_cluster: Cluster,
) -> None:
    """A seed whose host hangs (it accepts connections and never answers) costs a refresh
    the whole timeout: once it has failed, the client asks the nodes that answer first, so
    the MOVED and lost connections that refresh the map do not wait on it again."""
    hung = await HungServer.start()
    port = hung.port
    seeds = redis_cluster.url.removeprefix("redis+cluster://")
    client = ClusterClient(
        RedisSettings.from_dsn(f"redis+cluster://127.0.0.1:{port},{seeds}"), timeout=0.5
    )
    try:
        await client.refresh()  # the hung seed first (nothing is known yet), then the next
        assert hung.accepted == 1
        for _ in range(3):
            await client.refresh()
            assert await client.execute("PING") == b"PONG"
        assert hung.accepted == 1
    finally:
        await client.close()
        hung.close()


async def test_a_node_that_left_the_cluster_is_passed_over_for_the_slot_map(
    aiohttp_client: ClientMaker, tmp_path: Path
) -> None:
    """A seed removed from the Cluster (``--cluster del-node`` resets it; it keeps running)
    answers CLUSTER SLOTS with no slot. The client asked it first, took its empty map, and
    failed every command until restarted ("no Cluster node serves the slot"; PING raised
    IndexError: /readyz answered 500). It now asks the next node, and a client that knows
    only that node answers 503."""
    (tmp_path / "cluster").mkdir()
    (tmp_path / "leaving").mkdir()
    cluster = Cluster(tmp_path / "cluster")
    leaving = RedisServer(
        tmp_path / "leaving",
        free_port_pair(10000),
        cluster_enabled="yes",
        cluster_config_file=str(tmp_path / "leaving" / "nodes.conf"),
        cluster_node_timeout="2000",
    )
    cluster.start()
    leaving.start()
    seed = f"127.0.0.1:{cluster.nodes[0].port}"
    only_leaving = f"redis+cluster://127.0.0.1:{leaving.port}"
    settings = RedisSettings.from_dsn(
        f"{only_leaving},{cluster.url.removeprefix('redis+cluster://')}"
    )
    client = ClusterClient(settings, timeout=1.0)
    try:
        redis_cli("--cluster", "add-node", f"127.0.0.1:{leaving.port}", seed)
        wait_until(
            lambda: redis_cli("-p", str(leaving.port), "CLUSTER", "INFO").startswith(
                "cluster_state:ok"
            ),
            20,
            "the new node to know the cluster",
        )
        async with asyncio.timeout(60):
            assert await client.call("{a}k", "SET", "{a}k", "1") == b"OK"
            redis_cli("--cluster", "del-node", seed, cluster.node_id(leaving))
            assert redis_cli("-p", str(leaving.port), "CLUSTER", "SLOTS").strip() == ""
            for node in cluster.nodes:  # a lost connection reloads the map
                redis_cli("-p", str(node.port), "CLIENT", "KILL", "TYPE", "normal")
            with contextlib.suppress(OSError):
                await client.call("{a}k", "SET", "{a}k", "2")
            assert await client.call("{a}k", "SET", "{a}k", "3") == b"OK"
            assert await client.execute("PING") == b"PONG"
            await check_reachable(settings)
            # Knowing only the node that left: unavailable (503), not an error (500).
            alone = ClusterClient(RedisSettings.from_dsn(only_leaving), timeout=1.0)
            with pytest.raises(ConnectionError):
                await alone.execute("PING")
            with pytest.raises(ConnectionError):
                await alone.call("{a}k", "GET", "{a}k")
            await alone.close()
            with pytest.raises(StoreUnavailable):
                await check_reachable(RedisSettings.from_dsn(only_leaving))
            app = await aiohttp_client(create_app(make_settings(only_leaving)))
            response = await app.get("/readyz")
            assert response.status == 503 and response.headers["Retry-After"]
    finally:
        await client.close()
        cluster.stop()
        leaving.stop()


async def test_a_shard_whose_node_is_down_drops_nothing_the_other_shards_read(
    tmp_path: Path,
) -> None:
    """On a Cluster the feed reads each shard apart. One node down made the whole read
    raise, and the entries the other nodes had handed over (pending for this consumer
    from then on) went to nobody until reclaimed (60 s by default). They are returned, and
    the failure is raised by the next read."""
    cluster = Cluster(tmp_path)
    cluster.start()
    settings = RedisSettings.from_dsn(cluster.url)
    admin, commands = connect(settings), ClusterClient(settings, timeout=1.0)
    sealer = OutboxSealer(b"s" * 32)
    feed = RedisFeed(admin, commands, "each:", "dest", sealer, 60.0, ["dest"])
    dying = cluster.nodes[2]
    owners = slot_owners(cluster.nodes[0].port)
    streams = [outbox_key("each:", shard) for shard in range(KEY_SHARDS)]
    (stream, *_) = [s for s in streams if owners[key_slot(s.encode())] != dying.port]
    try:
        async with asyncio.timeout(60):
            assert await feed.read(100, 0.1) == []  # the groups made, every node read
            await admin.xadd(stream, {"j": sealer.seal(b'{"type":"track"}')})
            dying.kill()
            (entry,) = await feed.read(100, 0.1)
            assert (entry.stream, entry.events) == (stream, [b'{"type":"track"}'])
            with pytest.raises(ConnectionError):
                await feed.read(100, 0.1)  # the failure, raised now
            with pytest.raises(ConnectionError):
                await feed.read(100, 0.1)  # still down, nothing read elsewhere
            await feed.ack([entry])
            assert (await admin.xpending(stream, "dest"))["pending"] == 0
    finally:
        await commands.close()
        await admin.aclose()
        cluster.stop()


def start_sentinel(config: Path, port: int) -> subprocess.Popen[bytes]:
    """A sentinel of ``config``, once it accepts connections on ``port``."""
    process = subprocess.Popen(
        ["redis-server", str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    wait_until(listening, 10, "the sentinel to listen")
    return process


@contextlib.asynccontextmanager
async def sentinel_of(
    master: RedisServer, config: Path, port: int, url: str
) -> AsyncIterator[tuple[RedisSettings, SentinelClient, Any]]:
    """A sentinel of ``config`` on ``port`` watching the running ``master``, and both clients
    of ``url`` (the request path's and redis-py's); all stopped on the way out."""
    try:
        sentinel = start_sentinel(config, port)
    except BaseException:
        master.stop()
        raise
    settings = RedisSettings.from_dsn(url)
    lean, admin = SentinelClient(settings, 1.0), connect(settings)
    try:
        yield settings, lean, admin
    finally:
        await lean.close()
        await admin.aclose()
        sentinel.terminate()
        sentinel.wait(timeout=10)
        master.stop()


async def test_tls_sentinels_are_verified_with_the_urls_ca_by_both_clients(
    tmp_path: Path,
) -> None:
    """``rediss+sentinel://…?ssl_ca_certs=…``: the request path's client and redis-py's (the
    forwarder's and the admin commands') both reach the sentinels over TLS, verified
    against the URL's CA, and learn the master from them."""
    write_tls_files(tmp_path)
    (tmp_path / "master").mkdir()
    master = RedisServer(tmp_path / "master")
    master.start()
    tls_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port 0\ntls-port {tls_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"tls-cert-file {tmp_path / 'server.pem'}\ntls-key-file {tmp_path / 'server.key'}\n"
        f"tls-ca-cert-file {tmp_path / 'ca.pem'}\ntls-auth-clients no\n"
        f"sentinel monitor tlsmaster 127.0.0.1 {master.port} 1\n"
    )
    url = f"rediss+sentinel://127.0.0.1:{tls_port}/tlsmaster?ssl_ca_certs={tmp_path / 'ca.pem'}"
    async with sentinel_of(master, config, tls_port, url) as (settings, lean, admin):
        # The sentinel, asked over TLS, is one (not refused); the master here takes no TLS.
        with pytest.raises(StoreUnavailable):
            await check_reachable(settings)
        assert await lean._endpoint() == ("127.0.0.1", master.port)
        assert isinstance(admin, Redis)
        pool: Any = admin.connection_pool
        assert await pool.get_master_address() == ("127.0.0.1", master.port)


async def test_ipv6_seeds_and_sentinels_serve_handoffs(
    aiohttp_client: ClientMaker, tmp_path: Path
) -> None:
    """``redis+cluster://[::1]:…`` and ``redis+sentinel://[::1]:…/<name>``: the node URL
    built from the first seed brackets its host (else every client failed to read it, and
    ``serve`` exited with a traceback), and the nodes the Cluster and the sentinels name
    by IPv6 addresses are reached."""
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster", host="::1")
    cluster.start()
    try:
        assert cluster.url.startswith("redis+cluster://[::1]:")
        client = await aiohttp_client(create_app(make_settings(cluster.url)))
        for number in range(12):  # handoffs over every master
            token = (await prepare(client, anonymousId=f"v6-visitor-{number}"))["token"]
            answered, body = await exchange(client, token)
            assert (answered, body["anonymousId"]) == (200, f"v6-visitor-{number}")
        store = client.app[app_keys.STORE]
        assert isinstance(store, RedisStore) and isinstance(store.commands, ClusterClient)
        assert {host for host, _ in store.commands._nodes} == {"::1"}
        env = redis_env_for(cluster.url, **events_file(tmp_path))
        status = await asyncio.to_thread(outbox_command, env, "status")
        assert status.returncode == 0, status.stderr
    finally:
        cluster.stop()
    (tmp_path / "master").mkdir()
    master = RedisServer(tmp_path / "master", bind="127.0.0.1 ::1")
    master.start()
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1 ::1\ndir {tmp_path}\n"
        f"sentinel monitor v6master ::1 {master.port} 1\n"
    )
    url = f"redis+sentinel://[::1]:{port}/v6master"
    async with sentinel_of(master, config, port, url) as (settings, lean, admin):
        await check_reachable(settings)  # a sentinel: not refused
        assert await lean.execute("PING") == b"PONG"
        assert lean.master == ("::1", master.port)
        assert await admin.ping()


async def asking(node: RedisServer, *command: Arg) -> Reply:
    """``command`` on ``node`` after ``ASKING``: a key of a slot it is importing."""
    client = RespClient(node.url, 5.0)
    try:
        return await client.execute_asking(*command)
    finally:
        await client.close()


async def test_a_slot_migrated_by_hand_is_followed_and_never_half_written(
    aiohttp_client: ClientMaker, tmp_path: Path
) -> None:
    """One slot moved key by key (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE): while the
    exchange's two keys lie on two nodes, Redis answers TRYAGAIN, the exchange answers 503
    with Retry-After and writes nothing; once both moved, the source answers ASK, which the
    client follows (reads and the exchange answer right); once the slot is given to its new
    node, MOVED."""
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        settings = make_settings(cluster.url, forwarder="off")  # nothing else reads the slot
        assert settings.redis is not None
        prefix = settings.redis.key_prefix
        client = await aiohttp_client(create_app(settings))
        store = client.app[app_keys.STORE]
        assert isinstance(store, RedisStore) and isinstance(store.commands, ClusterClient)
        redirects = store.commands.redirects
        token = (await prepare(client, anonymousId="visitor-in-a-moving-slot"))["token"]
        ((handoff, source),) = [
            (key, node)
            for node in cluster.nodes
            for key in redis_cli("-p", str(node.port), "KEYS", f"{prefix}*:handoff:*").split()
        ]
        tag = handoff.partition("{")[2].partition("}")[0]
        shard = shard_tags(KEY_SHARDS).index(tag)
        outbox = outbox_key(prefix, shard)
        key_id = shard.to_bytes(4, "little") + bytes(28)  # a link in the handoff's slot
        link = link_key(prefix, key_id)
        assert tag_slot(tag) == key_slot(link.encode()) == key_slot(outbox.encode())
        await store.keep(key_id, b"kept-record", 60)
        entries = int(redis_cli("-p", str(source.port), "XLEN", outbox))
        assert entries == 1  # the handoff's started event
        target = next(node for node in cluster.nodes if node is not source)
        cluster.begin_migration(tag_slot(tag), source, target)

        cluster.migrate(source, target, handoff)
        response = await client.post(
            "/v1/handoffs/exchange", json={"token": token}, headers=auth("checkout")
        )
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert response.content_type == "application/problem+json"
        assert redirects["TRYAGAIN"] >= 1
        assert await asking(target, "EXISTS", handoff) == 1  # the handoff whole, unredeemed
        assert int(redis_cli("-p", str(source.port), "XLEN", outbox)) == entries

        cluster.migrate(source, target, outbox, link)
        asks = redirects["ASK"]
        assert await store.peek(key_id) == b"kept-record"
        assert redirects["ASK"] == asks + 1
        status, body = await exchange(client, token)
        assert (status, body["anonymousId"]) == (200, "visitor-in-a-moving-slot")
        # Followed again (twice: the target did not know the script, EVAL went after it).
        assert redirects["ASK"] > asks + 1
        assert await asking(target, "EXISTS", handoff) == 0
        assert await asking(target, "XLEN", outbox) == entries + 1  # the completion

        cluster.end_migration(tag_slot(tag), target)
        moved = redirects["MOVED"]
        assert (await exchange(client, token))[0] == 404  # redeemed once
        assert redirects["MOVED"] == moved + 1
        assert await store.peek(key_id) == b"kept-record"  # the refreshed map: no redirect
        assert redirects["MOVED"] == moved + 1
    finally:
        cluster.stop()


# -- IDENTITY_REDIS_WAIT counts the replicas of the node that ran the script ----------------

# The WAIT's timeout in the tests below: a replica on loopback acknowledges well within it.
WAIT_MS = 500


def wait_shortfalls(metrics: Metrics, operation: str) -> int:
    return int(metrics.value("identity_redis_wait_short_total", operation=operation))


def id_in_shard(shard: int) -> bytes:
    """A lookup id of ``shard`` (its first four bytes, little-endian: constants.shard_of)."""
    return shard.to_bytes(4, "little") + os.urandom(28)


async def test_wait_counts_the_replicas_of_the_master_a_redirection_ran_the_script_on(
    tmp_path: Path,
) -> None:
    """IDENTITY_REDIS_WAIT on a Cluster whose slots move under the client: the WAIT goes on
    the connection that ran the script, so it counts the replicas of the master that has
    the write, not those of the master the request was first sent to.

    Masters A and C have a replica, B has none. A slot A gives B (MOVED): the prepare run
    on B is a shortfall, where A's replica would have acknowledged it. A slot B gives C
    (MOVED): the prepare run on C is acknowledged by C's replica, where B would have said
    0. An exchange whose keys moved from A to B while the slot migrates (ASK): a shortfall.
    """
    metrics = Metrics()

    def shortfalls() -> tuple[int, int]:
        """The shortfalls of prepares and of exchanges so far."""
        return wait_shortfalls(metrics, "prepare"), wait_shortfalls(metrics, "exchange")

    cluster = Cluster(tmp_path)
    a, b, c = cluster.nodes
    settings = RedisSettings.from_dsn(
        cluster.url, key_prefix="waitnode:", wait=(1, WAIT_MS), timeout=5.0
    )
    store = RedisStore(settings, OutboxSealer(b"s" * 32), metrics=metrics)
    try:
        await asyncio.to_thread(cluster.start)
        shards: dict[int, list[int]] = {node.port: [] for node in cluster.nodes}
        owners = slot_owners(a.port)  # before the replicas, which this parsing does not read
        for shard, tag in enumerate(shard_tags(KEY_SHARDS)):
            shards[owners[tag_slot(tag)]].append(shard)
        # Three shards (slots) of A's and two of B's, one of C's.
        (a_base, a_moved, a_asked, *_), (b_base, b_moved, *_) = shards[a.port], shards[b.port]
        await asyncio.to_thread(cluster.add_replica, a)
        await asyncio.to_thread(cluster.add_replica, c)
        commands = store.commands
        assert isinstance(commands, ClusterClient)

        # Each master's own requests (the scripts loaded on each): A's and C's replicas
        # acknowledge, B has none.
        for shard, replicated in [(a_base, True), (b_base, False), (shards[c.port][0], True)]:
            before = shortfalls()
            lookup_id = id_in_shard(shard)
            await store.put(lookup_id, b"baseline", 60, None)
            assert await store.take(lookup_id, None) == b"baseline"
            short = 0 if replicated else 1
            assert shortfalls() == (before[0] + short, before[1] + short)
        assert not commands.redirects

        # MOVED from A (a replica) to B (none): a shortfall, not A's replica's word.
        slot = tag_slot(shard_tags(KEY_SHARDS)[a_moved])
        await asyncio.to_thread(cluster.begin_migration, slot, a, b)
        await asyncio.to_thread(cluster.end_migration, slot, b)
        lookup_id, before = id_in_shard(a_moved), shortfalls()
        await store.put(lookup_id, b"moved to B", 60, None)
        assert commands.redirects["MOVED"] == 1
        assert redis_cli("-p", str(b.port), "EXISTS", handoff_key("waitnode:", lookup_id)) == "1\n"
        assert shortfalls() == (before[0] + 1, before[1])

        # MOVED from B (none) to C (a replica): acknowledged by C's replica.
        await commands.refresh()  # the map the first MOVED made stale: B's slot on B
        slot = tag_slot(shard_tags(KEY_SHARDS)[b_moved])
        await asyncio.to_thread(cluster.begin_migration, slot, b, c)
        await asyncio.to_thread(cluster.end_migration, slot, c)
        lookup_id, before = id_in_shard(b_moved), shortfalls()
        await store.put(lookup_id, b"moved to C", 60, None)
        assert commands.redirects["MOVED"] == 2
        assert redis_cli("-p", str(c.port), "EXISTS", handoff_key("waitnode:", lookup_id)) == "1\n"
        assert shortfalls() == before

        # ASK: the handoff and its outbox moved from A to B, the slot still migrating.
        await commands.refresh()
        lookup_id, before = id_in_shard(a_asked), shortfalls()
        started = PrepareEvents([{"type": "track", "messageId": "m-asked"}], None)
        await store.put(lookup_id, b"asked of B", 60, started)  # on A: acknowledged
        assert shortfalls() == before
        slot = tag_slot(shard_tags(KEY_SHARDS)[a_asked])
        handoff, outbox = handoff_key("waitnode:", lookup_id), outbox_key("waitnode:", a_asked)
        await asyncio.to_thread(cluster.begin_migration, slot, a, b)
        await asyncio.to_thread(cluster.migrate, a, b, handoff, outbox)
        assert await store.take(lookup_id, None) == b"asked of B"
        assert commands.redirects["ASK"] >= 1
        assert await asking(b, "EXISTS", handoff) == 0  # redeemed on B
        assert shortfalls() == (before[0], before[1] + 1)
    finally:
        await store.close()
        cluster.stop()


@pytest.mark.timeout(120)
async def test_a_wait_never_counts_the_new_masters_replicas_for_the_old_masters_writes(
    tmp_path: Path,
) -> None:
    """Behind Sentinel, the client drops its connection when the sentinels name another
    master (topology.py); requests may have had their script's reply on it, from the old
    master, while a WAIT was in flight there. Their WAIT must not go to the new master,
    whose replicas never had their write (it is lost when the old master is demoted): each
    request whose script ran on the old master either fails or is a shortfall.

    ``SENTINEL FAILOVER`` of a master with two replicas: one is promoted, the other follows
    it, and the old master, still up, has no replica left until the sentinels demote it
    (a WAIT there waits its whole timeout). The client's watch is made slow so that the
    test drops the connection itself (what the watch does) while the WAIT waits."""
    sentinels = Sentinels(tmp_path, replicas=2)
    old = sentinels.a
    metrics = Metrics()
    settings = RedisSettings.from_dsn(
        sentinels.url, key_prefix="switched:", wait=(1, 2000), timeout=5.0
    )
    store = RedisStore(settings, OutboxSealer(b"s" * 32), metrics=metrics)
    commands = store.commands
    assert isinstance(commands, SentinelClient)
    commands._watch_seconds = 3600  # the test drops the connection, at the moment it picks
    try:
        await asyncio.to_thread(sentinels.start)
        await store.put(os.urandom(32), b"before", 60, None)
        assert wait_shortfalls(metrics, "prepare") == 0  # the replicas acknowledged it
        port = str(sentinels.sentinel_ports[0])
        await asyncio.to_thread(redis_cli, "-p", port, "SENTINEL", "FAILOVER", sentinels.service)

        def switched() -> bool:
            ports = {sentinels.master_port(p) for p in sentinels.sentinel_ports}
            if len(ports) != 1 or ports & {0, old.port}:
                return False
            new = sentinels.master()
            # The new master has the other replica; the old one, no replica left.
            return (
                "state=online" in info_field(new.port, "replication", "slave0")
                and info_field(old.port, "replication", "connected_slaves") == "0"
            )

        await until(switched, 30, "the new master to have the other replica")
        assert info_field(old.port, "replication", "role") == "master", "demoted too soon"
        puts = asyncio.gather(
            *(store.put(os.urandom(32), b"on the old master", 60, None) for _ in range(4)),
            return_exceptions=True,
        )
        await asyncio.sleep(0.3)  # the scripts ran; a WAIT waits on the old master
        commands.disconnect()
        outcomes = await puts
        assert all(o is None or isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        succeeded = outcomes.count(None)
        assert succeeded
        assert wait_shortfalls(metrics, "prepare") == succeeded
        # The next request goes to the new master, and its replica acknowledges it.
        await store.put(os.urandom(32), b"on the new master", 60, None)
        assert commands.master == ("127.0.0.1", sentinels.master().port)
        assert wait_shortfalls(metrics, "prepare") == succeeded
    finally:
        await store.close()
        await asyncio.to_thread(sentinels.stop)


async def test_a_redirection_without_a_host_is_followed_to_the_node_asked(
    tmp_path: Path,
) -> None:
    """With ``cluster-preferred-endpoint-type unknown-endpoint`` the nodes name no host, in
    CLUSTER SLOTS as in MOVED and ASK (``MOVED <slot> :<port>``): the host is the one the
    client reached the node on. The slot map read it so; a redirection was followed to the
    host "" (not a name: every redirected command failed)."""
    cluster = Cluster(tmp_path, cluster_preferred_endpoint_type="unknown-endpoint")
    cluster.start()
    settings = RedisSettings.from_dsn(cluster.url)
    client = ClusterClient(settings, timeout=3.0)
    try:
        key = "{moved-by-hand}:k"
        slot = key_slot(key.encode())
        await client.call(key, "SET", key, "before")
        (owner,) = [
            node
            for node in cluster.nodes
            if redis_cli("-p", str(node.port), "CLUSTER", "COUNTKEYSINSLOT", str(slot)).strip()
            == "1"
        ]
        target = next(node for node in cluster.nodes if node is not owner)
        target_id = redis_cli("-p", str(target.port), "CLUSTER", "MYID").strip()
        owner_id = redis_cli("-p", str(owner.port), "CLUSTER", "MYID").strip()
        redis_cli("-p", str(owner.port), "DEL", key)  # a slot given away must be empty
        # Redis's own resharding steps: importing on the target, migrating on the owner, then
        # the new owner told first, which bumps its config epoch. Given to the nodes in any
        # order without them, an older claim gossiped by a node not told yet could win on the
        # target, and owner and target then sent each other's MOVED back and forth.
        redis_cli("-p", str(target.port), "CLUSTER", "SETSLOT", str(slot), "IMPORTING", owner_id)
        redis_cli("-p", str(owner.port), "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        for node in sorted(cluster.nodes, key=lambda node: node is not target):
            redis_cli("-p", str(node.port), "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        assert await client.call(key, "SET", key, "after") == b"OK"  # MOVED :<target port>
        assert client.redirects["MOVED"] == 1
        assert redis_cli("-p", str(target.port), "GET", key).strip() == "after"
    finally:
        await client.close()
        cluster.stop()


@pytest.mark.parametrize("endpoint_type", ["unknown-endpoint", "hostname"])
async def test_the_forwarder_and_outbox_reach_nodes_announced_without_a_host(
    aiohttp_client: ClientMaker, tmp_path: Path, collector: Collector, endpoint_type: str
) -> None:
    """Nodes that announce no host (nil with ``cluster-preferred-endpoint-type
    unknown-endpoint``; ``?`` with ``hostname`` and no ``cluster-announce-hostname``) are
    on the host the client asked, here 127.0.0.2 and not 127.0.0.1. redis-py, which the
    forwarder and ``identity-service outbox`` use, took a nil host for localhost and ``?``
    for a name, and failed on a ``MOVED :<port>`` (its first keyed command gets one): its
    consumer groups were never created, no event was delivered, and ``outbox status``
    failed; the request path read ``?`` as a name (every request answered 503)."""
    cluster = Cluster(
        tmp_path, host="127.0.0.2", bind="127.0.0.2", cluster_preferred_endpoint_type=endpoint_type
    )
    cluster.start()
    admin = connect(RedisSettings.from_dsn(cluster.url, timeout=3.0))
    try:
        settings = make_settings(
            cluster.url,
            destination_url=collector.url,
            destination_write_key=WRITE_KEY,
            batch_max_wait="0.05",
        )
        client = await aiohttp_client(create_app(settings))
        for number in range(12):  # handoffs over every master
            token = (await prepare(client, anonymousId=f"hostless-{number}"))["token"]
            assert (await exchange(client, token))[0] == 200
        await collector.wait_for(24, seconds=20)
        env = redis_env_for(
            cluster.url,
            IDENTITY_DESTINATION_URL=collector.url,
            IDENTITY_DESTINATION_WRITE_KEY=WRITE_KEY,
        )
        status = await asyncio.to_thread(outbox_command, env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert [line["destination"] for line in json.loads(status.stdout)] == ["default"]
        assert await admin.set("{hostless}:k", "v")
        assert isinstance(admin, RedisCluster)
        assert {node.host for node in admin.get_nodes()} == {"127.0.0.2"}
    finally:
        await admin.aclose()
        cluster.stop()


async def test_a_hung_sentinel_named_first_is_passed_over_for_the_others(
    redis_sentinel: Sentinels,
) -> None:
    """A sentinel whose host hangs (it accepts connections and never answers), named first:
    the next sentinel is asked once it has cost its timeout, and asked first from then on.
    The hung one used to take the whole timeout of every connection, so no connection was
    ever made (a 503 for every request while the first sentinel hung)."""
    hung = await HungServer.start()
    port = hung.port
    sentinels = redis_sentinel.url.removeprefix("redis+sentinel://")
    client = SentinelClient(
        RedisSettings.from_dsn(f"redis+sentinel://127.0.0.1:{port},{sentinels}"), timeout=0.5
    )
    try:
        assert await client.execute("PING") == b"PONG"
        assert hung.accepted == 1
        client.disconnect()
        assert await client.execute("PING") == b"PONG"
        assert hung.accepted == 1
    finally:
        await client.close()
        hung.close()
