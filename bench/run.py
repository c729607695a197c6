"""Flow benchmark: prepare then exchange, driven by wrk over loopback, next to Redis alone.

In one run: a private redis-server (AOF everysec, as in production) and a local
Segment-compatible collector, then each variant of the service started, warmed up and
driven by wrk with flow.lua for a fixed time, then redis-benchmark with the same
commands (SET EX, GETDEL) on the same server as the ceiling. Prints a table and writes
bench/results/latest.json and latest.png. With ``--soak N``, runs the main variant until
N handoffs were exchanged and reports the worker's memory along the way instead.

    make bench                                   # all variants, 20 s each
    .venv/bin/python bench/run.py --variants redis-on-1,fastify,express --seconds 10
    .venv/bin/python bench/run.py --soak 1000000
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from cpu_cap import CpuCap, CpuCapUnavailable, check_cpus

from identity_service.sources import hash_write_key
from tests.redis_server import free_port
from tests.redis_topologies import Cluster

WRITE_KEY = "bench-write-key-0f3c9a"
COLLECTOR_WRITE_KEY = "bench-collector-key-5e21"
ORIGIN = "https://checkout.example-pay.com"
SOURCES = {"bench": {"write_key_hash": hash_write_key(WRITE_KEY), "origins": [ORIGIN]}}
# The collect variant's [amp]: limits high enough for the whole run from one address.
AMP = {
    "public_url": "https://www.example.com/identity",
    "publisher_origins": ["https://www.example.com"],
    "source": "bench",
    "limit_per_ip": {"requests": 1_000_000, "window_seconds": 60},
    "limit_per_client": {"requests": 1_000_000, "window_seconds": 60},
}
# The Node.js peers: bench/<name>/server.js, the same API without the service's guarantees.
NODE_PEERS = ("fastify", "express")
PYTHON_PEER = "python-peer"


@dataclass(frozen=True)
class Variant:
    label: str
    # redis, cluster, memory, a Node.js peer's directory (NODE_PEERS), or "python-peer"
    store: str = "redis"
    outbox: bool = True
    workers: int = 1
    collect: bool = False  # AMP collect hits (collect.lua) instead of handoff flows
    wait: str = ""  # IDENTITY_REDIS_WAIT; the run then starts a replica of the Redis
    # The forwarder in a process of its own (`identity-service forward`, the serving
    # workers with IDENTITY_FORWARDER=off), as the chart's forwarder.enabled deploys it.
    forwarder_apart: bool = False

    @property
    def script(self) -> str:
        return "collect.lua" if self.collect else "flow.lua"

    @property
    def node(self) -> bool:
        return self.store in NODE_PEERS

    @property
    def peer(self) -> bool:
        """Not identity-service: a Node.js peer or python_peer.py."""
        return self.node or self.store == PYTHON_PEER


VARIANTS = {
    "redis-on-1": Variant("redis, outbox on, 1 worker"),
    "redis-on-2": Variant("redis, outbox on, 2 workers", workers=2),
    "redis-off-1": Variant("redis, outbox off, 1 worker", outbox=False),
    "redis-apart-1": Variant(
        "redis, outbox on, 1 worker + a forward process", forwarder_apart=True
    ),
    "redis-cluster-1": Variant("redis cluster (3 masters), outbox on, 1 worker", store="cluster"),
    "redis-wait-1": Variant(
        "redis + a replica, IDENTITY_REDIS_WAIT=1,50, outbox on, 1 worker", wait="1,50"
    ),
    "memory-on-1": Variant("memory store, outbox on, 1 worker", store="memory"),
    "fastify": Variant("Fastify 5 + ioredis (auto-pipelining) + analytics-node", store="fastify"),
    "express": Variant("Express 5 + ioredis + analytics-node", store="express"),
    "python-peer": Variant(
        "the Node peers' handoff in Python (uvloop, httptools, the service's RESP client)",
        store=PYTHON_PEER,
    ),
    "collect": Variant("AMP collect hits (flows = hits), redis, outbox on, 1 worker", collect=True),
}


class Redis:
    """A private redis-server with the AOF on, as the service is run in production."""

    def __init__(self, directory: Path, replica_of: int | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        replicating = ("--replicaof", "127.0.0.1", str(replica_of)) if replica_of else ()
        self.process = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)),
                *("--save", "", "--appendonly", "yes", "--appendfsync", "everysec"),
                *replicating,
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    @property
    def pids(self) -> list[int]:
        return [self.process.pid]

    def reset_command_counts(self) -> None:
        redis_command(self.port, "CONFIG", "RESETSTAT")

    def command_counts(self) -> dict[str, int]:
        return command_counts(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def redis_command(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout


def command_counts(port: int) -> dict[str, int]:
    """Calls per command since the last reset (commands a script runs count too)."""
    found = re.findall(
        r"^cmdstat_([\w|]+):calls=(\d+)", redis_command(port, "INFO", "commandstats"), re.M
    )
    return {name: int(calls) for name, calls in found if name != "config|resetstat"}


class ClusterRedis:
    """A Redis Cluster of three masters, each with the AOF on, for the cluster variant."""

    def __init__(self, directory: Path) -> None:
        self.cluster = Cluster(directory, appendonly="yes", appendfsync="everysec")
        self.cluster.start()
        self.url = self.cluster.url

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.cluster.nodes]

    def reset_command_counts(self) -> None:
        for node in self.cluster.nodes:
            redis_command(node.port, "CONFIG", "RESETSTAT")

    def command_counts(self) -> dict[str, int]:
        """Calls per command on all the masters together."""
        total: dict[str, int] = {}
        for node in self.cluster.nodes:
            for name, calls in command_counts(node.port).items():
                total[name] = total.get(name, 0) + calls
        return total

    def stop(self) -> None:
        self.cluster.stop()


Backend = Redis | ClusterRedis


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 15) -> None:
    """Wait until ``process`` listens on ``port``; if it does not within ``seconds``, kill
    it (nothing started is left behind) and raise."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"nothing listens on {port} after {seconds:g} s")


def process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(child) for child in children)]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def machine_busy_seconds() -> float:
    """CPU time the machine's cores spent working, from /proc/stat.

    Idle and I/O wait are not work, nor is steal (the hypervisor running someone else).
    """
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class CpuBudget:
    """Where the machine's CPU went during the load: each process, and all of it (wrk's
    own time comes with its figures).

    On a machine whose cores wrk, Redis and the collector share with the service, this is
    what says whether a second worker has any CPU left to use.
    """

    def __init__(
        self,
        service_pids: list[int],
        redis: Backend,
        collector: "Collector",
        forwarder_pid: int | None = None,
    ) -> None:
        self._pids = {"service": service_pids, "redis": redis.pids}
        self._pids["collector"] = [collector.process.pid]
        if forwarder_pid is not None:
            # A forward process apart: in "service" too, and on its own (the workers'
            # share is the difference).
            self._pids["forwarder"] = [forwarder_pid]
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        seconds = {name: cpu_seconds(pids) for name, pids in self._pids.items()}
        seconds["machine"] = machine_busy_seconds()
        return seconds

    def used(self) -> dict[str, float]:
        """Seconds of CPU since the budget started, by process, with the machine's total."""
        now = self._read()
        return {name: now[name] - self._start[name] for name in now}


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def run_wrk(
    port: int, seconds: float, connections: int, threads: int, script: str = "flow.lua"
) -> dict[str, Any]:
    """wrk's figures from ``script``, with the CPU time wrk itself used (``cpu_seconds``)."""
    command = [
        *("wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"),
        *("-s", str(BENCH / script), f"http://127.0.0.1:{port}"),
    ]
    wrk = subprocess.Popen(
        command,
        env={**os.environ, "BENCH_WRITE_KEY": WRITE_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert wrk.stdout is not None
    deadline = threading.Timer(seconds + 60, wrk.kill)
    deadline.start()
    try:
        output = wrk.stdout.read()
        # Reaped here rather than by Popen, for wrk's own resource usage.
        _, status, usage = os.wait4(wrk.pid, 0)
    finally:
        deadline.cancel()
        wrk.stdout.close()
    wrk.returncode = os.waitstatus_to_exitcode(status)
    match = re.search(r"^BENCH (.*)$", output, re.MULTILINE)
    if wrk.returncode != 0 or match is None:
        raise RuntimeError(f"wrk exited with {wrk.returncode} and no result:\n{output}")
    stats: dict[str, Any] = json.loads(match.group(1))
    stats["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return stats


def redis_alone(port: int, requests: int, connections: int) -> dict[str, float]:
    rates = {}
    for name, command in (
        ("set_ex", ["SET", "bench:{0}:k__rand_int__", "x" * 200, "EX", "300"]),
        ("getdel", ["GETDEL", "bench:{0}:k__rand_int__"]),
    ):
        out = subprocess.run(
            [
                *("redis-benchmark", "-p", str(port), "-n", str(requests)),
                *("-c", str(connections), "-r", "1000000", "-q", *command),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        rates[name] = float(re.findall(r"([\d.]+) requests per second", out)[-1])
    return rates


class Collector:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "collector.py"), str(self.port), COLLECTOR_WRITE_KEY],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as answer:
            stats: dict[str, int] = json.loads(answer.read())
            return stats

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/reset", method="POST")
        urllib.request.urlopen(request, timeout=5).close()

    def settled(self) -> int:
        """The unique count once it has stopped growing for a second."""
        last = -1
        while (count := self.stats()["unique"]) != last:
            last = count
            time.sleep(1.0)
        return count

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def service_settings(collector: "Collector") -> dict[str, str]:
    """The settings every run of the service shares: secret, sources, the collector."""
    return {
        "IDENTITY_SECRET": "bench-secret-" + "0" * 32,
        "IDENTITY_SOURCES": json.dumps(SOURCES),
        "IDENTITY_DESTINATION_URL": collector.url,
        "IDENTITY_DESTINATION_WRITE_KEY": COLLECTOR_WRITE_KEY,
    }


WITHOUT = ("seal", "log", "outbox")


def without_env(without: frozenset[str]) -> dict[str, str]:
    """The service's environment with the guarantees ``without`` names switched off, to
    measure what they cost (``--without``; bench/without/sitecustomize.py does it)."""
    if not without:
        return {}
    env = {"BENCH_WITHOUT": ",".join(sorted(without))}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(BENCH / "without"), os.environ.get("PYTHONPATH")])
    )
    if "outbox" in without:
        env["IDENTITY_OUTBOX"] = "off"
    return env


def start_service(
    variant: Variant,
    redis: Backend,
    collector: Collector,
    extra_env: dict[str, str],
    without: frozenset[str] = frozenset(),
) -> tuple[Any, int]:
    port = free_port()
    if variant.peer:
        env = {
            **os.environ,
            "PORT": str(port),
            "REDIS_URL": redis.url,
            "WRITE_KEY": WRITE_KEY,
            "ORIGIN": ORIGIN,
            "SEGMENT_HOST": collector.url,
            "SEGMENT_WRITE_KEY": COLLECTOR_WRITE_KEY,
        }
        if variant.node:
            command = ["node", str(BENCH / variant.store / "server.js")]
        else:
            command = [sys.executable, str(BENCH / "python_peer.py")]
    else:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")},
            **service_settings(collector),
            "IDENTITY_OUTBOX": "on" if variant.outbox else "off",
            "IDENTITY_WORKERS": str(variant.workers),
            **extra_env,
        }
        if variant.wait:
            env["IDENTITY_REDIS_WAIT"] = variant.wait
        if variant.store in ("redis", "cluster"):
            env["IDENTITY_REDIS_URL"] = redis.url
        if variant.collect:
            env["IDENTITY_AMP"] = json.dumps(AMP)
        if variant.forwarder_apart:
            env["IDENTITY_FORWARDER"] = "off"
        env.update(without_env(without))
        command = [str(Path(sys.executable).parent / "identity-service"), "serve"]
        command += ["--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_for_port(port, process)
    return process, port


def start_forwarder(variant: Variant, service_env: dict[str, str]) -> Any:
    """``identity-service forward`` for a variant whose forwarder runs apart, else None.
    Its environment is the service's (read from /proc), with a metrics port of its own."""
    if not variant.forwarder_apart:
        return None
    metrics_port = free_port()
    env = {**service_env, "IDENTITY_FORWARDER_METRICS_PORT": str(metrics_port)}
    env.pop("IDENTITY_FORWARDER", None)
    command = [str(Path(sys.executable).parent / "identity-service"), "forward"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    wait_for_port(metrics_port, process)
    return process


def process_env(pid: int) -> dict[str, str]:
    """A process's environment as it was started."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def stop_service(process: Any) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def start_profiler(pid: int, name: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """py-spy on one worker for the measured slice; summarise with profile_top.py."""
    py_spy = Path(sys.executable).parent / "py-spy"
    output = args.out / f"profile-{name}.txt"
    command = [str(py_spy), "record", "-p", str(pid), "-d", str(int(args.seconds))]
    command += ["-r", "250", "-f", "raw", "-o", str(output), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_variant(
    name: str, redis: Backend, collector: Collector, args: argparse.Namespace
) -> dict[str, Any]:
    variant = VARIANTS[name]
    print(f"-- {variant.label}", file=sys.stderr, flush=True)
    collector.reset()
    cap = CpuCap(args.worker_cpu) if args.worker_cpu else None
    without = args.without if not variant.peer else frozenset()
    service, port = start_service(variant, redis, collector, args.service_env, without)
    forwarder = None
    try:
        forwarder = start_forwarder(variant, process_env(service.pid))
        served_by = process_tree(service.pid)
        workers = served_by[1:] or served_by
        # The forward process counts as the service's: its CPU is the flows' delivery.
        pids = served_by + ([forwarder.pid] if forwarder is not None else [])
        if cap is not None:
            for worker in workers:
                cap.limit(worker)
        run_wrk(port, args.warmup, args.connections, args.threads, variant.script)
        received_before = collector.settled()  # the warm-up's events, delivered
        delivered_before = collector.stats()
        cpu_before = cpu_seconds(pids)
        profiler = (
            start_profiler(workers[0], name, args) if args.profile and not variant.peer else None
        )
        budget = CpuBudget(pids, redis, collector, forwarder.pid if forwarder is not None else None)
        redis.reset_command_counts()
        stats = run_wrk(port, args.seconds, args.connections, args.threads, variant.script)
        if variant.collect:
            # A collect "flow" is one hit, which emits one event.
            stats["prepared"], stats["exchanged"] = 0, stats["hits"]
        cpu_by_process = {**budget.used(), "wrk": stats["cpu_seconds"]}
        commands = redis.command_counts()
        if profiler is not None:
            profiler.wait(timeout=60)
        cpu_used = cpu_seconds(pids) - cpu_before
        rss = max(rss_mb(pid) for pid in workers)
        # A flow's events: started at prepare; completed and identify (it has a userId).
        emitting = variant.outbox and "outbox" not in without
        expected = stats["prepared"] + 2 * stats["exchanged"] if emitting else 0
        if variant.collect and emitting:
            expected = stats["hits"]
        finished = time.monotonic()
        received, delivered = 0, delivered_before
        while time.monotonic() < finished + 120:
            delivered = collector.stats()
            received = delivered["unique"] - received_before
            if received >= expected:
                break
            time.sleep(0.2)
        batches = delivered["batches"] - delivered_before["batches"]
        drain_seconds = time.monotonic() - finished
        # Delivery that fell behind during the load is part of what the flows cost.
        cpu_with_delivery = cpu_seconds(pids) - cpu_before
    finally:
        try:
            stop_service(service)
        finally:
            if forwarder is not None:
                stop_service(forwarder)
            if cap is not None:
                cap.close()
    seconds = stats["duration_us"] / 1e6
    flows = max(stats["exchanged"], 1)
    cores = os.cpu_count() or 1
    machine_ms_per_flow = cpu_by_process["machine"] * 1000 / flows
    return {
        "variant": name,
        "label": variant.label
        + (f", {args.worker_cpu:g} CPU each" if cap else "")
        + (f", without {' and '.join(sorted(without))}" if without else ""),
        "flows_per_s": round(stats["exchanged"] / seconds, 1),
        "requests_per_s": round(stats["requests"] / seconds, 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p90_ms": stats["p90_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "errors": stats["errors"] + stats["socket_errors"],
        "events_expected": expected,
        "events_received": received,  # may exceed expected by wrk's unanswered requests
        "outbox_drain_s": round(drain_seconds, 1),
        # How full the batches the collector got were: a batch's cost is mostly per call.
        "events_per_batch": round((delivered["events"] - delivered_before["events"]) / batches, 1)
        if batches
        else 0,
        "cpu_ms_per_flow": round(cpu_used * 1000 / max(stats["exchanged"], 1), 3),
        "cpu_ms_per_flow_delivered": round(
            cpu_with_delivery * 1000 / max(stats["exchanged"], 1), 3
        ),
        "worker_rss_mb": round(rss, 1),
        "redis_calls_per_flow": {
            name: round(calls / flows, 3)
            for name, calls in sorted(commands.items(), key=lambda item: -item[1])
        },
        "cpu_ms_per_flow_by_process": {
            name: round(used * 1000 / flows, 3) for name, used in cpu_by_process.items()
        },
        "machine_busy_pct": round(100 * cpu_by_process["machine"] / (cores * seconds), 1),
        # What every core busy at this run's CPU per flow (all processes) would give; with
        # capped workers the cap, not the machine, is the limit.
        "all_cores_flows_per_s": round(cores * 1000 / machine_ms_per_flow),
        "headroom_x": None
        if cap
        else round(cores * 1000 / machine_ms_per_flow / (flows / seconds), 2),
    }


def soak(redis: Redis, collector: Collector, args: argparse.Namespace) -> dict[str, Any]:
    """Run the main variant until ``args.soak`` handoffs were exchanged; sample the RSS."""
    service, port = start_service(VARIANTS["redis-on-1"], redis, collector, args.service_env)
    samples: list[dict[str, float]] = []
    exchanged = 0
    deadline = time.monotonic() + args.soak_max_minutes * 60
    try:
        while exchanged < args.soak and time.monotonic() < deadline:
            stats = run_wrk(port, args.seconds, args.connections, args.threads)
            exchanged += stats["exchanged"]
            sample = {"handoffs": exchanged, "rss_mb": round(rss_mb(service.pid), 1)}
            samples.append(sample)
            print(f"   {sample}", file=sys.stderr, flush=True)
    finally:
        stop_service(service)
    half = next((s for s in samples if s["handoffs"] >= args.soak / 2), samples[-1])
    return {
        "soak_handoffs": exchanged,
        "rss_mb_at_half": half["rss_mb"],
        "rss_mb_at_end": samples[-1]["rss_mb"],
        "rss_growth_second_half_mb": round(samples[-1]["rss_mb"] - half["rss_mb"], 1),
        "samples": samples,
    }


# Issue 15's comparisons: (numerator, denominator, figure) when both variants ran.
RATIOS = (
    ("redis-on-1", "fastify", "flows_per_s"),
    ("redis-on-1", "express", "flows_per_s"),
    ("collect", "redis-on-1", "requests_per_s"),
    ("redis-apart-1", "fastify", "flows_per_s"),
    ("redis-apart-1", "redis-on-1", "flows_per_s"),
    ("python-peer", "fastify", "flows_per_s"),
    ("redis-on-1", "python-peer", "flows_per_s"),
)


def ratios(by_name: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The service against the Node peers and the Python peer (flows/s), collect against
    the handoff flow (requests/s), and the forwarder apart against in the worker (flows/s),
    for the variants of this run."""
    return {
        f"{top} / {bottom} ({figure})": round(by_name[top][figure] / by_name[bottom][figure], 2)
        for top, bottom, figure in RATIOS
        if top in by_name and bottom in by_name
    }


def print_table(report: dict[str, Any]) -> None:
    ceiling = report["redis_alone"]
    print(
        f"wrk {report['wrk']}; Redis alone: SET EX {ceiling['set_ex']:.0f}/s, "
        f"GETDEL {ceiling['getdel']:.0f}/s = {ceiling['flows_per_s']:.0f} flows/s"
    )
    columns = [
        *("flows_per_s", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "errors"),
        *("events_received", "events_expected", "events_per_batch", "outbox_drain_s"),
        *("cpu_ms_per_flow", "cpu_ms_per_flow_delivered"),
        *("machine_busy_pct", "headroom_x", "worker_rss_mb", "share_of_redis"),
    ]
    print(f"| variant | {' | '.join(columns)} |")
    print(f"|---|{'---|' * len(columns)}")
    for row in report["variants"]:
        print(f"| {row['label']} | {' | '.join(str(row[c]) for c in columns)} |")
    if report["two_workers_over_one"] is not None:
        print(f"\n2 workers / 1 worker (flows/s): {report['two_workers_over_one']}x")
    for name, ratio in report["ratios"].items():
        print(f"{name}: {ratio}x")
    processes = ["service", "forwarder", "redis", "wrk", "collector", "machine"]
    print(
        "\nCPU ms per flow during the load, by process (machine: every process and the "
        "kernel; forwarder: a forward process apart, its part of the service's)"
    )
    print(f"| variant | {' | '.join(processes)} |")
    print(f"|---|{'---|' * len(processes)}")
    for row in report["variants"]:
        spent = row["cpu_ms_per_flow_by_process"]
        print(f"| {row['label']} | {' | '.join(str(spent.get(p, '-')) for p in processes)} |")
    print("\nRedis calls per flow during the load (a script's own commands count too)")
    for row in report["variants"]:
        calls = ", ".join(f"{name} {n}" for name, n in row["redis_calls_per_flow"].items())
        print(f"- {row['label']}: {calls or 'none'}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    labels = [row["label"] for row in rows]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2))
    throughput.barh(labels, [row["flows_per_s"] for row in rows], color="#4c72b0")
    fastify = next((row["flows_per_s"] for row in rows if row["variant"] == "fastify"), None)
    if fastify is not None:  # issue 15's target: the main row at 1.25x the Fastify peer
        throughput.axvline(
            1.25 * fastify, color="#c44e52", linestyle="--", label="target 1.25x Fastify"
        )
        throughput.legend(loc="lower right")
    throughput.set_xlabel("flows/s (prepare + exchange; collect: hits)")
    throughput.invert_yaxis()
    latency.barh(labels, [row["p99_ms"] for row in rows], color="#dd8452")
    latency.axvline(5, color="#c44e52", linestyle="--", label="target 5 ms")
    latency.set_xlabel("p99 latency (ms)")
    latency.set_yticklabels([])
    latency.legend(loc="lower right")
    latency.invert_yaxis()
    figure.suptitle(f"identity-service flow benchmark (wrk {report['wrk']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--without",
        default="",
        help="measure without these guarantees, for what they cost: "
        f"a comma-separated list of {', '.join(WITHOUT)} (bench/without/sitecustomize.py)",
    )
    parser.add_argument("--soak", type=int, help="exchange this many handoffs; report memory")
    parser.add_argument("--soak-max-minutes", type=float, default=20)
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each variant to results/profile-*.txt"
    )
    parser.add_argument(
        "--worker-cpu",
        type=float,
        metavar="CPUS",
        help="cap each worker at this share of a core (a cgroup each; needs root)",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an IDENTITY_* setting for the service's variants (repeatable)",
    )
    args = parser.parse_args()
    args.service_env = dict(item.split("=", 1) for item in args.service_env)
    args.without = frozenset(name for name in args.without.split(",") if name)
    if not args.without <= set(WITHOUT):
        parser.error(f"--without takes {', '.join(WITHOUT)}")
    if args.worker_cpu is not None:
        if args.soak:
            sys.exit("--worker-cpu applies to the variants, not to --soak")
        try:
            check_cpus(args.worker_cpu)
        except CpuCapUnavailable as exc:
            sys.exit(f"--worker-cpu: {exc}")
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants: {', '.join(unknown)}")
    for tool in ("wrk", "redis-server", "redis-cli", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (apt-get install wrk redis-server redis-tools)")
    for peer in NODE_PEERS:
        if peer in names and not (BENCH / peer / "node_modules").is_dir():
            print(f"-- {peer} skipped: run `npm ci --prefix bench/{peer}` first", file=sys.stderr)
            names.remove(peer)

    args.out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        redis, collector = Redis(Path(tmp)), Collector()
        cluster = replica = None
        if any(VARIANTS[name].wait for name in names):
            (Path(tmp) / "replica").mkdir()
            replica = Redis(Path(tmp) / "replica", replica_of=redis.port)
        if any(VARIANTS[name].store == "cluster" for name in names):
            (Path(tmp) / "cluster").mkdir()
            cluster = ClusterRedis(Path(tmp) / "cluster")
        try:
            if args.soak:
                result = soak(redis, collector, args)
                (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
                print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
                return 0
            try:
                rows = [
                    run_variant(
                        name,
                        cluster if cluster and VARIANTS[name].store == "cluster" else redis,
                        collector,
                        args,
                    )
                    for name in names
                ]
            except CpuCapUnavailable as exc:
                sys.exit(f"--worker-cpu: {exc}")
            ceiling = redis_alone(redis.port, 200_000, args.connections)
        finally:
            collector.stop()
            redis.stop()
            if cluster is not None:
                cluster.stop()
            if replica is not None:
                replica.stop()

    # A flow is one prepare and one exchange: Redis alone does a flow per SET EX + GETDEL.
    redis_flows = 1 / (1 / ceiling["set_ex"] + 1 / ceiling["getdel"])
    for row in rows:
        row["share_of_redis"] = round(row["flows_per_s"] / redis_flows, 3)
    by_name = {row["variant"]: row for row in rows}
    if "redis-on-1" in by_name and "redis-on-2" in by_name:
        two, one = by_name["redis-on-2"]["flows_per_s"], by_name["redis-on-1"]["flows_per_s"]
        scaling: float | None = round(two / one, 2)
    else:
        scaling = None
    report = {
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.seconds:g}s",
        "worker_cpu": args.worker_cpu,
        "two_workers_over_one": scaling,
        "ratios": ratios(by_name),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "redis_alone": {**ceiling, "flows_per_s": round(redis_flows, 1)},
        "variants": rows,
    }
    print_table(report)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "latest.png")
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
