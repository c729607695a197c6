"""``python -m examples.checkout [--base-port N]``: run the demo until Ctrl-C (or SIGTERM).

The shop, the two Python checkouts, the service, the collector and (with Node 20+ and
examples/checkout/node installed) the Node checkout listen on N+1 … N+6 (N is 8100 by
default); the URLs are printed, and every event the collector receives is printed too.
"""

import argparse
import asyncio
import signal
import sys

from examples.checkout.demo import DemoError, Ports, running_demo
from identity_service.log_config import configure_logging


def say(line: str) -> None:
    print(line, flush=True)


async def main(base_port: int) -> None:
    configure_logging("warning")  # the service's request lines would drown the events
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_demo(Ports.from_base(base_port), echo=say) as demo:
        say("The checkout demo is running (browse the shop in Chrome/Chromium or Firefox):")
        for line in demo.lines():
            say(f"  {line}")
        say("Ctrl-C stops all.")
        await stop.wait()
    say("stopped")


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.checkout", description=__doc__)
    parser.add_argument("--base-port", type=int, default=8100, help="ports N+1 to N+6 (8100)")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.base_port))
    except DemoError as error:
        sys.exit(f"demo: {error}")
    except OSError as error:
        sys.exit(f"demo: {error} (another --base-port?)")


if __name__ == "__main__":
    run()
