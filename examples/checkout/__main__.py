"""``python -m examples.checkout [--base-port N]``: run the demo until Ctrl-C (SIGTERM, SIGHUP).

The shop, the two Python checkouts, the service, the collector and (with Node 20+ and
examples/checkout/node installed) the Node checkout listen on N+1 … N+6 (N is 8100 by
default); the URLs are printed, and every event the collector receives is printed too.
"""

import argparse
import asyncio
import sys

from examples.checkout.demo import DemoError, Ports, running_demo
from identity_service.constants import MAX_PORT, MIN_PORT
from identity_service.log_config import configure_logging
from identity_service.server import STOP_SIGNALS

# The demo listens on N+1 ... N+6: each of them a port.
PORTS_ABOVE_BASE = 6
MIN_BASE_PORT = MIN_PORT - 1
MAX_BASE_PORT = MAX_PORT - PORTS_ABOVE_BASE


def say(line: str) -> None:
    print(line, flush=True)


async def main(base_port: int) -> None:
    configure_logging("warning")  # the service's request lines would drown the events
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:  # the service's: SIGHUP (the terminal closed) too
        loop.add_signal_handler(signum, stop.set)
    async with running_demo(Ports.from_base(base_port), echo=say) as demo:
        say("The checkout demo is running (browse the shop in Chrome/Chromium or Firefox):")
        for line in demo.lines():
            say(f"  {line}")
        say("Ctrl-C stops all.")
        await stop.wait()
    say("stopped")


def base_port(text: str) -> int:
    """``--base-port``: a whole number whose N+1 ... N+6 are ports (a traceback quoting the
    settings' refusal of port 65536 before)."""
    try:
        base = int(text)
    except ValueError:
        base = None
    if base is None or not MIN_BASE_PORT <= base <= MAX_BASE_PORT:
        raise argparse.ArgumentTypeError(
            f"a number from {MIN_BASE_PORT} to {MAX_BASE_PORT} (the demo listens on the "
            f"{PORTS_ABOVE_BASE} ports above it), not {text!r}"
        )
    return base


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.checkout", description=__doc__)
    parser.add_argument(
        "--base-port",
        type=base_port,
        default=8100,
        help=f"ports N+1 to N+6, N from {MIN_BASE_PORT} to {MAX_BASE_PORT} (8100)",
    )
    args = parser.parse_args()
    try:
        asyncio.run(main(args.base_port))
    except DemoError as error:
        sys.exit(f"demo: {error}")
    except OSError as error:
        sys.exit(f"demo: {error} (another --base-port?)")


if __name__ == "__main__":
    run()
