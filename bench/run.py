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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from identity_service.sources import hash_write_key
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for tool in ("wrk", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (apt-get install wrk redis-server)")

    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")},
            "IDENTITY_REDIS_URL": redis.url,
            "IDENTITY_SECRET": "bench-secret-" + "0" * 32,
            "IDENTITY_SOURCES": json.dumps(SOURCES),
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
            cpu_before = cpu_seconds(service.pid)
            stats = run_wrk(port, args.seconds, args.connections, args.threads)
            cpu_used = cpu_seconds(service.pid) - cpu_before
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)
        ceiling = redis_alone(redis.port, 200_000, args.connections)
        redis.stop()

    seconds = stats["duration_us"] / 1e6
    flows = stats["exchanged"] / seconds
    # A flow is one SET EX and one GETDEL: Redis alone does one flow per pair of commands.
    redis_flows = 1 / (1 / ceiling["set_ex"] + 1 / ceiling["getdel"])
    report = {
        "variant": f"redis store, 1 process, wrk -t{args.threads} -c{args.connections}",
        "flows_per_s": round(flows, 1),
        "requests_per_s": round(stats["requests"] / seconds, 1),
        "p50_ms": stats["p50_us"] / 1000,
        "p90_ms": stats["p90_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
        "errors": stats["errors"] + stats["socket_errors"],
        "service_cpu_ms_per_flow": round(cpu_used * 1000 / max(stats["exchanged"], 1), 3),
        "redis_alone_set_ex_per_s": ceiling["set_ex"],
        "redis_alone_getdel_per_s": ceiling["getdel"],
        "redis_alone_flows_per_s": round(redis_flows, 1),
        "share_of_redis_ceiling": round(flows / redis_flows, 4),
    }
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
