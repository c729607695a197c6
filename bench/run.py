"""Flow benchmark: prepare then exchange, driven by wrk over loopback, next to Redis alone.

Starts a private redis-server and the service (Redis store, one process), warms up, runs
wrk with flow.lua, then measures what redis-benchmark does with the same commands (SET EX
and GETDEL) on the same server. Prints a table and writes bench/results/latest.json.

    .venv/bin/python bench/run.py [--seconds 20] [--connections 32] [--threads 1]
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
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from identity_service.sources import hash_write_key
from tests.collector import WRITE_KEY as COLLECTOR_WRITE_KEY
from tests.redis_server import RedisServer, free_port

WRITE_KEY = "bench-write-key-0f3c9a"
SOURCES = {
    "bench": {
        "write_key_hash": hash_write_key(WRITE_KEY),
        "origins": ["https://checkout.example-pay.com"],
    }
}


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the service exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the service did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, seconds: int, connections: int, threads: int) -> dict[str, Any]:
    result = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / "flow.lua"),
            f"http://127.0.0.1:{port}",
        ],
        env={**os.environ, "BENCH_WRITE_KEY": WRITE_KEY},
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    match = re.search(r"^BENCH (.*)$", result.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{result.stdout}\n{result.stderr}")
    stats: dict[str, Any] = json.loads(match.group(1))
    return stats


def redis_alone(port: int, requests: int, connections: int) -> dict[str, float]:
    rates = {}
    for name, command in (
        ("set_ex", ["SET", "bench:{0}:k__rand_int__", "x" * 200, "EX", "300"]),
        ("getdel", ["GETDEL", "bench:{0}:k__rand_int__"]),
    ):
        out = subprocess.run(
            [
                "redis-benchmark",
                "-p",
                str(port),
                "-n",
                str(requests),
                "-c",
                str(connections),
                "-r",
                "1000000",
                "-q",
                *command,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        found = re.findall(r"([\d.]+) requests per second", out)
        rates[name] = float(found[-1])
    return rates


def collector_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as answer:
        stats: dict[str, int] = json.loads(answer.read())
        return stats


def settled_count(port: int) -> int:
    """The collector's count once it has stopped growing for a second."""
    last = -1
    while True:
        count = collector_stats(port)["unique"]
        if count == last:
            return count
        last = count
        time.sleep(1.0)


def run_variant(
    outbox: bool, redis: RedisServer, collector_port: int, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")},
        "IDENTITY_REDIS_URL": redis.url,
        "IDENTITY_SECRET": "bench-secret-" + "0" * 32,
        "IDENTITY_SOURCES": json.dumps(SOURCES),
        "IDENTITY_OUTBOX": "on" if outbox else "off",
        "IDENTITY_DESTINATION_URL": f"http://127.0.0.1:{collector_port}",
        "IDENTITY_DESTINATION_WRITE_KEY": COLLECTOR_WRITE_KEY,
    }
    service = subprocess.Popen(
        [str(Path(sys.executable).parent / "identity-service"), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, service)
        run_wrk(port, args.warmup, args.connections, args.threads)
        received_before = settled_count(collector_port)  # the warm-up's events, drained
        cpu_before = cpu_seconds(service.pid)
        stats = run_wrk(port, args.seconds, args.connections, args.threads)
        cpu_used = cpu_seconds(service.pid) - cpu_before
        # A flow's events: started at prepare; completed and identify (it has a userId).
        expected = stats["prepared"] + 2 * stats["exchanged"] if outbox else 0
        finished = time.monotonic()
        deadline = finished + 120
        received = 0
        while time.monotonic() < deadline:
            received = collector_stats(collector_port)["unique"] - received_before
            if received >= expected:
                break
            time.sleep(0.2)
        drain_seconds = time.monotonic() - finished
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    seconds = stats["duration_us"] / 1e6
    return {
        "variant": f"redis store, outbox {'on' if outbox else 'off'}, 1 process",
        "flows_per_s": round(stats["exchanged"] / seconds, 1),
        "requests_per_s": round(stats["requests"] / seconds, 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p90_ms": stats["p90_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "errors": stats["errors"] + stats["socket_errors"],
        "events_expected": expected,
        "events_received": received,  # may exceed expected by wrk's unanswered requests
        "outbox_drain_s": round(drain_seconds, 1),
        "service_cpu_ms_per_flow": round(cpu_used * 1000 / max(stats["exchanged"], 1), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for tool in ("wrk", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (apt-get install wrk redis-server)")

    collector_port = free_port()
    collector = subprocess.Popen(
        [sys.executable, "-m", "tests.collector", str(collector_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        try:
            wait_for_port(collector_port, collector)
            rows = [run_variant(outbox, redis, collector_port, args) for outbox in (False, True)]
            ceiling = redis_alone(redis.port, 200_000, args.connections)
        finally:
            redis.stop()
            collector.terminate()
            collector.wait(timeout=10)

    # A flow is one prepare and one exchange: Redis alone does a flow per SET EX + GETDEL.
    redis_flows = 1 / (1 / ceiling["set_ex"] + 1 / ceiling["getdel"])
    for row in rows:
        row["share_of_redis_ceiling"] = round(row["flows_per_s"] / redis_flows, 4)
    report = {
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.seconds}s",
        "redis_alone": {**ceiling, "flows_per_s": round(redis_flows, 1)},
        "variants": rows,
    }
    print(
        f"wrk {report['wrk']}; Redis alone: SET EX {ceiling['set_ex']:.0f}/s, "
        f"GETDEL {ceiling['getdel']:.0f}/s, {redis_flows:.0f} flows/s"
    )
    columns = [k for k in rows[0] if k != "variant"]
    print(f"{'variant':<36}" + "".join(f"{c:>24}" for c in columns))
    for row in rows:
        print(f"{row['variant']:<36}" + "".join(f"{row[c]!s:>24}" for c in columns))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
