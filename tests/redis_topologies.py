"""Real Redis topologies on loopback for tests: a 3-master Cluster, and a master with a
replica watched by three sentinels. Every process is a ``redis-server`` of the test's own."""

import subprocess
import time
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


def info_field(port: int, section: str, name: str) -> str:
    for line in redis_cli("-p", str(port), "INFO", section).splitlines():
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
    """Three masters (no replicas), slots dealt by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", **options: str) -> None:
        """``host``: the address the nodes know each other by (``::1``: IPv6, the nodes
        listening on 127.0.0.1 too, where the helpers reach them); ``options``: more
        redis-server settings for every node."""
        self.host = host
        if host != "127.0.0.1":
            options.setdefault("bind", f"127.0.0.1 {host}")
        self.nodes = []
        for number in range(3):
            node_dir = directory / f"node{number}"
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    node_dir,
                    free_port_pair(10000),
                    cluster_enabled="yes",
                    cluster_config_file=str(node_dir / "nodes.conf"),
                    cluster_node_timeout="2000",
                    **options,
                )
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
                redis_cli("-p", str(node.port), "CLUSTER", "INFO").startswith("cluster_state:ok")
                for node in self.nodes
            ),
            30,
            "the cluster to be ok",
        )

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
        for node in self.nodes:
            node.stop()


class Sentinels:
    """A master, its replica, and three sentinels that watch the master as ``service``."""

    service = "idsvc"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "a").mkdir()
        (directory / "b").mkdir()
        self.a = RedisServer(directory / "a")
        self.b = RedisServer(directory / "b")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{sentinels}/{self.service}"

    def start(self) -> None:
        self.a.start()
        self.replicate(self.b, self.a)
        for number, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel{number}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.a.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 2000\n"
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
                and "slaves=1" in info_field(port, "sentinel", "master0")
                for port in self.sentinel_ports
            ),
            30,
            "sentinels to know each other and the replica",
        )

    def replicate(self, replica: RedisServer, master: RedisServer) -> None:
        """Start ``replica`` (again) as a replica of ``master`` and wait for its sync."""
        replica.extra_options(replicaof=f"127.0.0.1 {master.port}")
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

    def master(self) -> RedisServer:
        return self.a if self.master_port() == self.a.port else self.b

    def stop(self) -> None:
        for process in self._sentinels:
            process.terminate()
            process.wait(timeout=10)
        self.a.stop()
        self.b.stop()
