"""Real Redis topologies on loopback for tests: a 3-master Cluster, and a master with a
replica watched by three sentinels (its replication link optionally through a proxy that
delays it, so that the replica lags as across machines). Every process is a
``redis-server`` of the test's own."""

import asyncio
import contextlib
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from identity_service.urls import host_port
from tests.redis_server import RedisServer, free_port, free_port_pair


def redis_cli(*args: str, timeout: float = 60) -> str:
    """Run redis-cli; its output, or an error naming what it said."""
    result = subprocess.run(
        ["redis-cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"redis-cli {args[:3]} failed: {result.stdout[-500:]}{result.stderr}")
    return result.stdout


# What redis-cli says when a node drops its connection: sentinels that reconfigure a node
# (a demoted master, say) kill its normal clients, a read in flight among them.
_DROPPED = "Server closed the connection"


def info_field(port: int, section: str, name: str, attempts: int = 5) -> str:
    """A field of ``INFO section``; a connection the node dropped is tried again."""
    for attempt in range(attempts):
        try:
            info = redis_cli("-p", str(port), "INFO", section)
            break
        except RuntimeError as exc:
            if _DROPPED not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.1)
    for line in info.splitlines():
        key, _, value = line.strip().partition(":")
        if key == name:
            return value
    return ""


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """Three masters, slots dealt by ``redis-cli --cluster create``; no replicas unless
    :meth:`add_replica` gives a master one."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", **options: str) -> None:
        """``host``: the address the nodes know each other by (``::1``: IPv6, the nodes
        listening on 127.0.0.1 too, where the helpers reach them, unless a ``bind`` of
        ``host`` alone keeps them off 127.0.0.1: only :meth:`start` and :meth:`stop` then);
        ``options``: more redis-server settings for every node."""
        self.host = host
        if host != "127.0.0.1":
            options.setdefault("bind", f"127.0.0.1 {host}")
        if options.get("bind") == host:
            # The bus's connections from ``host`` too: a node takes the address a MEET came
            # from (else 127.0.0.1, where no node listens) for the sender's.
            options.setdefault("bind_source_addr", host)
        self._directory = directory
        self._options = options
        self.nodes = [self._new_node(f"node{number}") for number in range(3)]
        self.replicas: list[RedisServer] = []

    def _new_node(self, name: str) -> RedisServer:
        node_dir = self._directory / name
        node_dir.mkdir()
        return RedisServer(
            node_dir,
            free_port_pair(10000),
            cluster_enabled="yes",
            cluster_config_file=str(node_dir / "nodes.conf"),
            cluster_node_timeout="2000",
            **self._options,
        )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(host_port(self.host, n.port) for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        # redis-cli takes an IPv6 node unbracketed: its port follows the last colon.
        addresses = [f"{self.host}:{node.port}" for node in self.nodes]
        redis_cli("--cluster", "create", *addresses, "--cluster-yes")
        wait_until(
            lambda: all(
                redis_cli("-h", node.host, "-p", str(node.port), "CLUSTER", "INFO").startswith(
                    "cluster_state:ok"
                )
                for node in self.nodes
            ),
            30,
            "the cluster to be ok",
        )

    def add_replica(self, master: RedisServer) -> RedisServer:
        """Start a node, make it a replica of ``master`` (a master of the started Cluster),
        and wait until ``master`` counts it as an online replica (a WAIT there can count it)."""
        replica = self._new_node(f"replica{len(self.replicas)}")
        self.replicas.append(replica)
        replica.start()
        redis_cli(
            "--cluster", "add-node", f"{self.host}:{replica.port}", f"{self.host}:{master.port}",
            "--cluster-slave", "--cluster-master-id", self.node_id(master),
        )  # fmt: skip
        wait_until(
            lambda: (
                info_field(replica.port, "replication", "master_link_status") == "up"
                and "state=online" in info_field(master.port, "replication", "slave0")
            ),
            30,
            "the replica to sync",
        )
        return replica

    def node_id(self, node: RedisServer) -> str:
        return redis_cli("-p", str(node.port), "CLUSTER", "MYID").strip()

    def reshard(self, source: RedisServer, target: RedisServer, slots: int) -> None:
        """Move ``slots`` slots (and their keys) from ``source`` to ``target``."""
        redis_cli(
            "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
            "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "10",
            timeout=120,
        )  # fmt: skip

    def begin_migration(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """Mark ``slot`` as moving from ``source`` to ``target`` (keys then move one by one)."""
        redis_cli("-p", str(target.port), "CLUSTER", "SETSLOT", str(slot), "IMPORTING",
                  self.node_id(source))  # fmt: skip
        redis_cli("-p", str(source.port), "CLUSTER", "SETSLOT", str(slot), "MIGRATING",
                  self.node_id(target))  # fmt: skip

    def migrate(self, source: RedisServer, target: RedisServer, *keys: str) -> None:
        """Move ``keys`` (of a slot being migrated) from ``source`` to ``target``."""
        reply = redis_cli("-p", str(source.port), "MIGRATE", "127.0.0.1", str(target.port),
                          "", "0", "5000", "KEYS", *keys)  # fmt: skip
        if reply.strip() != "OK":
            raise RuntimeError(f"MIGRATE answered {reply.strip()!r}")

    def end_migration(self, slot: int, target: RedisServer) -> None:
        """Give ``slot`` to ``target`` on every node: the migration is over."""
        for node in self.nodes:
            redis_cli("-p", str(node.port), "CLUSTER", "SETSLOT", str(slot), "NODE",
                      self.node_id(target))  # fmt: skip

    def stop(self) -> None:
        for node in [*self.nodes, *self.replicas]:
            node.stop()


class DelayingProxy:
    """A loopback TCP proxy for a replica's replication link, in a thread of its own (the
    tests' helpers block their event loop): what the master sends reaches the replica
    ``delay`` seconds later, what the replica sends (its acknowledgements) passes at once.
    When the master's side closes (it died), what the proxy holds is dropped, as a network
    loses what is in flight, and the replica's side is cut."""

    def __init__(self, master_port: int, delay: float) -> None:
        self._master_port = master_port
        self._delay = delay
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self) -> int:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Cuts the links too (Python 3.12 closes them on close(); 3.11 needs this).
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

    async def _link(
        self, replica_in: asyncio.StreamReader, replica_out: asyncio.StreamWriter
    ) -> None:
        try:
            master_in, master_out = await asyncio.open_connection("127.0.0.1", self._master_port)
        except OSError:
            replica_out.transport.abort()
            return
        held: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()

        async def deliver() -> None:
            while True:
                while not held:
                    arrived.clear()
                    await arrived.wait()
                due, data = held.popleft()
                await asyncio.sleep(max(0.0, due - self._loop.time()))
                replica_out.write(data)

        async def from_master() -> None:
            with contextlib.suppress(OSError):
                while data := await master_in.read(65536):
                    held.append((self._loop.time() + self._delay, data))
                    arrived.set()

        async def from_replica() -> None:
            with contextlib.suppress(OSError):
                while data := await replica_in.read(65536):
                    master_out.write(data)

        delivering = asyncio.ensure_future(deliver())
        replying = asyncio.ensure_future(from_replica())
        try:
            await asyncio.wait(
                [asyncio.ensure_future(from_master()), replying],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            delivering.cancel()  # drops what is held
            replying.cancel()
            replica_out.transport.abort()
            master_out.transport.abort()


class Sentinels:
    """A master, its replica, and three sentinels that watch the master as ``service``.
    With ``replicas=2``, a second replica ``c`` too (``a`` is the master at first).

    With ``replication_delay``, each replica replicates through a :class:`DelayingProxy`.
    Sentinels make a replica whose master address is not the master's (the proxy's is
    not) replicate from the master's ``failover-timeout`` after they see it: then that
    timeout is longer than a replica lives before the tests kill its master. It does not
    slow a failover down, only the retry of an election that no sentinel won (twice the
    timeout)."""

    service = "idsvc"

    def __init__(self, directory: Path, replication_delay: float = 0.0, replicas: int = 1) -> None:
        self.directory = directory
        for name in "abc"[: replicas + 1]:
            (directory / name).mkdir()
        self.a = RedisServer(directory / "a")
        self.b = RedisServer(directory / "b")
        self.c = RedisServer(directory / "c") if replicas == 2 else None
        self.replicas = replicas
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self.replication_delay = replication_delay
        self._proxies: list[DelayingProxy] = []
        self._failover_timeout = 20000 if replication_delay else 2000

    @property
    def url(self) -> str:
        sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{sentinels}/{self.service}"

    def start(self) -> None:
        self.a.start()
        self.replicate(self.b, self.a)
        if self.c is not None:
            self.replicate(self.c, self.a)
        for number, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel{number}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.a.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} {self._failover_timeout}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self._sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(config), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_until(
            lambda: all(self.master_port(port) == self.a.port for port in self.sentinel_ports),
            20,
            "sentinels",
        )
        # Every sentinel has seen the others and the replica (needed to fail over).
        wait_until(
            lambda: all(
                info_field(port, "sentinel", "master0").count(",") >= 4
                and "sentinels=3" in info_field(port, "sentinel", "master0")
                and f"slaves={self.replicas}" in info_field(port, "sentinel", "master0")
                for port in self.sentinel_ports
            ),
            30,
            "sentinels to know each other and the replica",
        )

    def replicate(self, replica: RedisServer, master: RedisServer) -> None:
        """Start ``replica`` (again) as a replica of ``master`` and wait for its sync."""
        port = master.port
        if self.replication_delay:
            proxy = DelayingProxy(master.port, self.replication_delay)
            proxy.start()
            self._proxies.append(proxy)
            port = proxy.port
        replica.extra_options(replicaof=f"127.0.0.1 {port}")
        replica.start()
        wait_until(
            lambda: info_field(replica.port, "replication", "master_link_status") == "up",
            20,
            "the replica to sync",
        )

    def wait_for_replica(self, replica: RedisServer) -> None:
        """Until every sentinel sees ``replica`` up (a failover can then promote it)."""
        wait_until(
            lambda: all(self._sees(port, replica.port) for port in self.sentinel_ports),
            30,
            "the sentinels to see the replica up",
        )

    def _sees(self, sentinel_port: int, replica_port: int) -> bool:
        fields = redis_cli(
            "-p", str(sentinel_port), "SENTINEL", "REPLICAS", self.service, timeout=5
        ).split()
        # A flat list of name, value pairs, one run of them per replica.
        runs: list[dict[str, str]] = []
        for name, value in zip(fields[::2], fields[1::2], strict=False):
            if name == "name":
                runs.append({})
            if runs:
                runs[-1][name] = value
        return any(
            run.get("port") == str(replica_port) and run.get("flags") == "slave" for run in runs
        )

    def replicates_through_proxy(self, replica: RedisServer) -> bool:
        """Whether ``replica`` still replicates through its proxy (the sentinels did not
        point it at the master itself)."""
        port = info_field(replica.port, "replication", "master_port")
        return any(str(proxy.port) == port for proxy in self._proxies)

    def master_port(self, sentinel_port: int | None = None) -> int:
        port = sentinel_port or self.sentinel_ports[0]
        try:
            reply = redis_cli(
                "-p", str(port), "SENTINEL", "get-master-addr-by-name", self.service, timeout=5
            )
        except (RuntimeError, subprocess.TimeoutExpired):
            return 0
        lines = reply.split()
        return int(lines[1]) if len(lines) == 2 else 0

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.a, self.b] if self.c is None else [self.a, self.b, self.c]

    def master(self) -> RedisServer:
        port = self.master_port()
        if port == self.a.port:
            return self.a
        return self.c if self.c is not None and port == self.c.port else self.b

    def stop(self) -> None:
        for process in self._sentinels:
            process.terminate()
            process.wait(timeout=10)
        for node in self.nodes:
            node.stop()
        for proxy in self._proxies:
            proxy.stop()
