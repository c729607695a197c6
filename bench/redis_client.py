"""CPU per Redis call: redis-py's asyncio client (as installed) against stores/resp.py.

    .venv/bin/python bench/redis_client.py [--calls 20000] [--concurrency 32]

Starts a private redis-server and makes the same EVALSHA call (a SET with EX, the shape
of the prepare script) from ``concurrency`` tasks on uvloop, with each client; prints the
process CPU time and wall time per call. This is why the request path does not use
redis-py: measure again before changing the pin.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import uvloop
from redis.asyncio import BlockingConnectionPool, Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from identity_service.stores.resp import RespClient, Script
from tests.redis_server import RedisServer

SOURCE = "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1"


async def measure(
    call: Callable[[int], Awaitable[object]], calls: int, tasks: int, report: bool = True
) -> float:
    async def worker(start: int) -> None:
        for n in range(start, calls, tasks):
            await call(n)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(tasks)))
    cpu_us = (time.process_time() - cpu) * 1e6 / calls
    wall_us = (time.perf_counter() - wall) * 1e6 / calls
    if report:
        print(f"   {cpu_us:7.1f} µs CPU/call, {wall_us:7.1f} µs wall/call", flush=True)
    return cpu_us


async def main(args: argparse.Namespace) -> None:
    value = b"x" * 300
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            pool = BlockingConnectionPool.from_url(server.url, max_connections=64)
            client = Redis.from_pool(pool)
            script = client.register_script(SOURCE)
            print(f"redis-py {redis.__version__} (hiredis parser), BlockingConnectionPool:")
            await measure(lambda n: script(keys=[f"k{n}"], args=[value, 300]), 200, 8, report=False)
            await measure(
                lambda n: script(keys=[f"k{n}"], args=[value, 300]), args.calls, args.concurrency
            )
            await client.aclose()
            resp = RespClient(server.url, timeout=5)
            lean = Script(SOURCE)
            print("stores/resp.py RespClient (one pipelined connection):")
            await measure(
                lambda n: resp.run_script(lean, [f"k{n}"], [value, 300]), 200, 8, report=False
            )
            await measure(
                lambda n: resp.run_script(lean, [f"k{n}"], [value, 300]),
                args.calls,
                args.concurrency,
            )
            await resp.close()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    uvloop.run(main(parser.parse_args()))
