"""The service on real Redis topologies (`make topology`): a 3-master Cluster resharded under
a stream of handoffs, and a master behind three sentinels killed under one, with and
without ``IDENTITY_REDIS_WAIT``. The failover figures are printed (run with ``-s``) and
docs/redis-topologies.md quotes them; the assertions are what must hold on every run."""

import asyncio
import contextlib
import io
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from identity_service import app_keys
from identity_service.app import create_app
from identity_service.constants import KEY_SHARDS, link_key, outbox_key, shard_tags, tag_slot
from identity_service.problems import StoreUnavailable
from identity_service.settings import RedisSettings
from identity_service.stores.redis import RedisStore, check_reachable, connect
from identity_service.stores.resp import Arg, Reply, RespClient
from identity_service.stores.topology import ClusterClient, SentinelClient
from tests.collector import WRITE_KEY, Collector, running_collector
from tests.conftest import CHECKOUT_URL, AppClient, auth, exchange, make_settings, prepare
from tests.redis_server import RedisServer, free_port
from tests.redis_topologies import Cluster, Sentinels, redis_cli, wait_until
from tests.secrets_audit import AUDIT
from tests.test_cli import outbox_command, redis_env_for, refusal_at_start
from tests.test_resp import write_tls_files

pytestmark = pytest.mark.topology

ClientMaker = Callable[..., Awaitable[AppClient]]
STARTED, COMPLETED = "Cross-Domain Handoff Started", "Cross-Domain Handoff Completed"
WORKERS = 8
# Entries the forwarder had read when the master died stay pending on the new master until
# reclaimed: soon, here, so that only what the failover really lost counts as lost.
RECLAIM_IDLE = "2"


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
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    flows: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    # (when, anonymous id) of every exchange answered 200, to redeem again later.
    redeemed: list[tuple[float, str, str]] = field(default_factory=list)
    prepared: set[str] = field(default_factory=set)
    exchanged: set[str] = field(default_factory=set)
    failed_at: list[float] = field(default_factory=list)
    # When each handoff that began after the first 503 succeeded (those in flight at the
    # failure do not say the service recovered).
    recovered_at: list[float] = field(default_factory=list)
    recovered: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(number) for number in range(WORKERS)))

    async def _worker(self, number: int) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            self.flows += 1
            visitor = f"visitor-{number}-{self.flows}"
            AUDIT.identity(visitor, "anonymousId")
            body = {"anonymousId": visitor, "destination": CHECKOUT_URL}
            status, answer = await self._post("/v1/handoffs", body, "shop", "prepare")
            if status != 201:
                continue
            self.prepared.add(visitor)
            token = answer["token"]
            AUDIT.token(token)
            status = 503
            while status == 503 and not self.stop.is_set():
                # A client retries an exchange answered 503 (the SDKs do): the script did
                # not run, or its reply was lost.
                status, _ = await self._post(
                    "/v1/handoffs/exchange", {"token": token}, "checkout", "exchange"
                )
            if status == 200:
                self.exchanged.add(visitor)
                self.redeemed.append((time.monotonic(), visitor, token))
                if self.failed_at and began > self.failed_at[0]:
                    self.recovered_at.append(time.monotonic())
                    self.recovered.set()

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


def lost_events(stream: Stream, collector: Collector) -> int:
    """Events of answered requests that the collector never received."""
    delivered = {(e["anonymousId"], e["event"]) for e in collector.events}
    expected = {(v, STARTED) for v in stream.prepared} | {(v, COMPLETED) for v in stream.exchanged}
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


@dataclass
class Failover:
    wait: str
    flows: int
    failed: int
    seconds_to_success: float
    double_redemptions: int
    lost: int
    wait_short: int
    statuses: dict[str, int]


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
        redis_wait=wait,
    )
    client = await aiohttp_client(create_app(settings))
    stream = Stream(client)
    running = asyncio.create_task(stream.run())
    await asyncio.sleep(1.0)
    master = sentinels.master()
    killed_at = time.monotonic()
    master.kill()
    # Bounded: the sentinels notice in about a second, then elect and promote.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stream.recovered.wait(), 30)
    await asyncio.sleep(1.0)
    stream.stop.set()
    await running
    assert stream.recovered_at, (
        f"no handoff begun after the failover succeeded (WAIT {wait or 'off'}): "
        f"{stream.statuses}; the service did not recover"
    )
    failed = sum(count for answer, count in stream.statuses.items() if answer.endswith(" 503"))
    lost = await wait_for_events(stream, collector, 15)
    # Redeem again what was redeemed in the last second before the kill: a 200 now means
    # the exchange was lost with the old master (a token used twice).
    again = await asyncio.gather(
        *(
            client.post("/v1/handoffs/exchange", json={"token": token}, headers=auth("checkout"))
            for at, _visitor, token in stream.redeemed
            if killed_at - 1.0 <= at <= killed_at
        )
    )
    doubles = sum(response.status == 200 for response in again)
    if restore:
        # The killed node comes back as a replica of the new master, for the next scenario.
        sentinels.replicate(master, sentinels.master())
        sentinels.wait_for_replica(master)
    return Failover(
        wait=wait or "off",
        flows=stream.flows,
        failed=failed,
        seconds_to_success=round(stream.recovered_at[0] - killed_at, 2),
        double_redemptions=doubles,
        lost=lost,
        wait_short=int(
            sum(
                client.app[app_keys.METRICS].value("identity_redis_wait_short_total", operation=op)
                for op in ("prepare", "exchange")
            )
        ),
        statuses=dict(stream.statuses),
    )


@pytest.mark.timeout(180)
async def test_sentinel_failover_under_handoffs_with_and_without_wait(
    aiohttp_client: ClientMaker, tmp_path: Path, collector: Collector, json_log: io.BytesIO
) -> None:
    sentinels = Sentinels(tmp_path)
    began = time.monotonic()
    sentinels.start()
    try:
        reports = []
        for wait in ["", "1,50"]:
            reports.append(
                await kill_the_master_under_handoffs(
                    aiohttp_client, sentinels, collector, wait, restore=not wait
                )
            )
    finally:
        sentinels.stop()
    print(f"\nsentinel set-up and two failovers: {time.monotonic() - began:.0f} s")
    for report in reports:
        print(
            f"sentinel failover, IDENTITY_REDIS_WAIT={report.wait}: {report.flows} flows, "
            f"{report.failed} answers 503, success again {report.seconds_to_success} s after "
            f"the kill, {report.double_redemptions} double redemptions, "
            f"{report.lost} events lost, {report.wait_short} WAITs short of a replica; "
            f"answers {report.statuses}"
        )
    for report in reports:
        assert report.seconds_to_success < 30


async def test_a_hung_seed_is_asked_for_the_slot_map_only_after_the_nodes_that_answer(
    redis_cluster: Cluster,
) -> None:
    """A seed whose host hangs (it accepts connections and never answers) costs a refresh
    the whole timeout: once it has failed, the client asks the nodes that answer first, so
    the MOVED and lost connections that refresh the map do not wait on it again."""
    accepted = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seeds = redis_cluster.url.removeprefix("redis+cluster://")
    client = ClusterClient(
        RedisSettings.from_dsn(f"redis+cluster://127.0.0.1:{port},{seeds}"), timeout=0.5
    )
    try:
        await client.refresh()  # the hung seed first (nothing is known yet), then the next
        assert accepted == 1
        for _ in range(3):
            await client.refresh()
            assert await client.execute("PING") == b"PONG"
        assert accepted == 1
    finally:
        await client.close()
        server.close()


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
    sentinel = start_sentinel(config, tls_port)
    url = f"rediss+sentinel://127.0.0.1:{tls_port}/tlsmaster?ssl_ca_certs={tmp_path / 'ca.pem'}"
    settings = RedisSettings.from_dsn(url)
    lean = SentinelClient(settings, 1.0)
    admin = connect(settings)
    try:
        # The sentinel, asked over TLS, is one (not refused); the master here takes no TLS.
        with pytest.raises(StoreUnavailable):
            await check_reachable(settings)
        assert await lean._endpoint() == ("127.0.0.1", master.port)
        assert isinstance(admin, Redis)
        pool: Any = admin.connection_pool
        assert await pool.get_master_address() == ("127.0.0.1", master.port)
    finally:
        await lean.close()
        await admin.aclose()
        sentinel.terminate()
        sentinel.wait(timeout=10)
        master.stop()


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
        status = await asyncio.to_thread(outbox_command, redis_env_for(cluster.url), "status")
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
    sentinel = start_sentinel(config, port)
    settings = RedisSettings.from_dsn(f"redis+sentinel://[::1]:{port}/v6master")
    lean = SentinelClient(settings, 1.0)
    admin = connect(settings)
    try:
        await check_reachable(settings)  # a sentinel: not refused
        assert await lean.execute("PING") == b"PONG"
        assert lean.master == ("::1", master.port)
        assert await admin.ping()
    finally:
        await lean.close()
        await admin.aclose()
        sentinel.terminate()
        sentinel.wait(timeout=10)
        master.stop()


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
