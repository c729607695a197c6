"""Instructions per flow: the worker's user-space work under callgrind, repeatable anywhere.

Wall-clock figures on a shared machine drift by 15 % or more from minute to minute, more
than most single changes to the hot path move them. Callgrind counts the instructions a
process executes instead, which are the same from run to run for the same code and
inputs. This runs one variant of the service (``redis-on-1`` or ``collect``) under
``valgrind --tool=callgrind`` with instrumentation off, warms it up, switches counting on
(``callgrind_control -i on``), drives a fixed number of requests with wrk's flow.lua or
collect.lua at a fixed number of connections, waits until the collector holds every event
(so the forwarder's delivery is counted too), and divides the instructions by the flows.

    .venv/bin/python bench/instructions.py                       # redis-on-1, 3,000 flows
    .venv/bin/python bench/instructions.py --variant collect --requests 4000

It counts instructions, not time: a system call counts as the few instructions that make
it, and a change that saves instructions but adds system calls looks better here than it
is. Use it to compare two versions of the Python side; ``run.py`` for throughput.
Needs valgrind (Debian's ``valgrind``) and wrk.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import (
    AMP,
    BENCH,
    WRITE_KEY,
    Collector,
    Redis,
    service_settings,
    wait_for_port,
)

from tests.redis_server import free_port

SCRIPTS = {"redis-on-1": "flow.lua", "collect": "collect.lua"}
# Under callgrind the worker runs ~50x slower; wrk must wait for its answers, and its start
# takes a minute or more on a loaded machine.
WRK_TIMEOUT = "60s"
START_SECONDS = 300.0
DELIVERY_TIMEOUT_SECONDS = 300.0


def start_worker(
    variant: str, redis: Redis, collector: Collector, out: Path, extra_env: dict[str, str]
) -> tuple[Any, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")}
    env.update(service_settings(collector))
    env.update(
        {
            "IDENTITY_REDIS_URL": redis.url,
            "IDENTITY_OUTBOX": "on",
            "IDENTITY_WORKERS": "1",
            "PYTHONHASHSEED": "0",
        }
    )
    if variant == "collect":
        env["IDENTITY_AMP"] = json.dumps(AMP)
    env.update(extra_env)
    entry = Path(sys.executable).parent / "identity-service"
    command = [
        *("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"),
        *(sys.executable, str(entry), "serve", "--port", str(port)),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, process, START_SECONDS)
    return process, port


def drive(port: int, script: str, requests: int, connections: int) -> dict[str, Any]:
    """wrk until ``requests`` were answered: the script says so, and is then interrupted."""
    env = {**os.environ, "BENCH_WRITE_KEY": WRITE_KEY, "BENCH_MAX_REQUESTS": str(requests)}
    command = [
        *("wrk", "-t1", f"-c{connections}", "-d900s", "--timeout", WRK_TIMEOUT),
        *("-s", str(BENCH / script), f"http://127.0.0.1:{port}"),
    ]
    wrk = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert wrk.stdout is not None
    output = []
    try:
        for line in wrk.stdout:
            output.append(line)
            if line.startswith("BENCH_DONE"):
                wrk.send_signal(signal.SIGINT)  # wrk reports what it did, then exits
        wrk.wait(timeout=60)
    finally:
        wrk.kill()
    match = re.search(r"^BENCH (.*)$", "".join(output), re.MULTILINE)
    if match is None:
        raise RuntimeError("wrk gave no result:\n" + "".join(output))
    stats: dict[str, Any] = json.loads(match.group(1))
    return stats


def expected_events(variant: str, stats: dict[str, Any]) -> int:
    """A flow's three events (started, completed, identify); a hit's one."""
    if variant == "collect":
        return int(stats["hits"])
    return int(stats["prepared"]) + 2 * int(stats["exchanged"])


def delivered(collector: Collector, expected: int) -> int:
    """Wait until the collector holds ``expected`` events: the forwarder's work is counted.

    Under callgrind a batch can take seconds; the collector settling for a second is not
    enough (the events of wrk's last, unanswered requests are not expected, nor waited for).
    """
    deadline = time.monotonic() + DELIVERY_TIMEOUT_SECONDS
    while (count := collector.stats()["unique"]) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} of {expected} events delivered")
        time.sleep(0.5)
    return collector.settled()


def instrument(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)


def total_instructions(out: Path) -> int:
    # "summary:" counts from the start, which was not instrumented; "totals:" the parts.
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(SCRIPTS), default="redis-on-1")
    parser.add_argument("--requests", type=int, default=6000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=600, help="requests before counting")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--keep", type=Path, help="copy callgrind's output here (for callgrind_annotate)"
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an IDENTITY_* setting for the worker (repeatable), as run.py takes it",
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.service_env)
    # A SIGTERM (a timeout) unwinds through the finally below: no worker or Redis is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    script = SCRIPTS[args.variant]
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        with contextlib.ExitStack() as started:
            redis = Redis(Path(directory))
            started.callback(redis.stop)
            collector = Collector()
            started.callback(collector.stop)
            worker, port = start_worker(args.variant, redis, collector, out, extra_env)
            started.callback(worker.wait, timeout=120)
            started.callback(worker.terminate)
            drive(port, script, args.warmup, args.connections)
            collector.settled()
            collector.reset()
            instrument(worker.pid, "on")
            stats = drive(port, script, args.requests, args.connections)
            events = delivered(collector, expected_events(args.variant, stats))
            instrument(worker.pid, "off")
        instructions = total_instructions(out)
        if args.keep is not None:
            shutil.copyfile(out, args.keep)
    flows = stats["hits"] if args.variant == "collect" else stats["exchanged"]
    report = {
        "variant": args.variant,
        "requests": stats["requests"],
        "flows": flows,
        "events": events,
        "errors": stats["errors"],
        "instructions": instructions,
        "instructions_per_flow": round(instructions / flows),
        "instructions_per_request": round(instructions / stats["requests"]),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
