"""Start the demo's five parts in one event loop, on loopback ports.

- the identity service (``create_app`` behind the HTTP front, as ``identity-service serve``
  runs it; the memory store; events to the collector), on ``127.0.0.1``;
- the collector (collector.py), on ``127.0.0.1``;
- the shop (``http://shop.localhost``), the checkout with the middleware
  (``http://checkout.localhost``) and the checkout with identity.js only
  (``http://pay.localhost``). Browsers resolve ``*.localhost`` to loopback themselves;
- when Node 20+ and the Node checkout's packages are there (``make demo`` installs them),
  the checkout in Node (``http://express.localhost``: node/checkout.mjs, Express 5 and the
  Node SDK's middleware), a child process.

Write keys and the server secret are made afresh at each start; none is in the repository.
"""

import asyncio
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from identity_client import AsyncIdentityClient

from examples.checkout.checkout import (
    SERVER_SOURCE,
    CheckoutSettings,
    SameSite,
    cart_html,
    checkout_app,
)
from examples.checkout.collector import Collector, collector_app
from examples.checkout.pages import Analytics
from examples.checkout.shop import ShopSettings, shop_app
from identity_service.app import create_app
from identity_service.browser_helper import helper_script
from identity_service.front import FrontRunner
from identity_service.settings import Settings, load_settings
from identity_service.sources import hash_write_key

LOOPBACK = "127.0.0.1"
NODE_CHECKOUT = Path(__file__).parent / "node"
NODE_STARTUP_SECONDS = 20.0


class DemoError(Exception):
    """A part of the demo that cannot start; the message says which and why."""


@dataclass(frozen=True)
class Ports:
    shop: int
    checkout: int
    pay: int
    service: int
    collector: int
    node: int

    @classmethod
    def from_base(cls, base: int) -> "Ports":
        return cls(base + 1, base + 2, base + 3, base + 4, base + 5, base + 6)


@dataclass(frozen=True)
class Demo:
    shop_url: str
    checkout_url: str  # domain B with the middleware
    pay_url: str  # domain B with identity.js only
    service_url: str
    collector_url: str
    collector: Collector
    service: web.Application
    node_url: str | None  # domain B in Node; None when it did not start
    node_missing: str | None  # why not

    def lines(self) -> list[str]:
        node = f"{self.node_url}/cart" if self.node_url else f"not started: {self.node_missing}"
        return [
            f"shop (domain A)               {self.shop_url}/",
            f"checkout (B, SDK middleware)  {self.checkout_url}/cart",
            f"checkout (B, identity.js)     {self.pay_url}/cart",
            f"checkout (B, Node, Express)   {node}",
            f"identity service              {self.service_url}  (memory store)",
            f"collector (the events)        {self.collector_url}/",
        ]


async def node_checkout_missing() -> str | None:
    """Why the Node checkout cannot run here (no Node 20+, its packages not installed), or
    None when it can."""
    if shutil.which("node") is None:
        return "node not found"
    asked = await asyncio.create_subprocess_exec(
        "node", "-p", "process.versions.node", stdout=asyncio.subprocess.PIPE
    )
    found = (await asked.communicate())[0].decode().strip()
    if int(found.split(".")[0] or 0) < 20:
        return f"Node {found or '?'} found, 20 or newer needed"
    installed = NODE_CHECKOUT / "node_modules"
    if (
        not (installed / "express").is_dir()
        or not (installed / "@identity-service" / "client" / "dist" / "esm" / "index.js").is_file()
    ):
        return "examples/checkout/node not installed (make demo installs it)"
    return None


async def _node_checkout(
    stack: AsyncExitStack,
    port: int,
    service_url: str,
    write_key: str,
    page: str,
    same_site: SameSite,
) -> None:
    """node/checkout.mjs on ``port`` until the stack closes; returns once it listens."""
    # IDENTITY_* of the demo's own environment are not the checkout's settings.
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDENTITY_")}
    env |= {
        "IDENTITY_URL": service_url,
        "IDENTITY_WRITE_KEY": write_key,
        "HOST": LOOPBACK,
        "PORT": str(port),
        "CHECKOUT_PAGE": page,
        "COOKIE_SAME_SITE": same_site,
    }
    process = await asyncio.create_subprocess_exec(
        "node", str(NODE_CHECKOUT / "checkout.mjs"), env=env, stdout=asyncio.subprocess.PIPE
    )

    async def stop() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()

    stack.push_async_callback(stop)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), NODE_STARTUP_SECONDS)
    except TimeoutError:
        line = b""
    if line.strip() != b"listening":
        raise DemoError(
            f"the Node checkout did not start on port {port} (its error above; another "
            "--base-port?)"
        )


def service_settings(
    ports: Ports, keys: dict[str, str], collector_key: str, extra: dict[str, str]
) -> Settings:
    checkout = f"http://checkout.localhost:{ports.checkout}"
    pay = f"http://pay.localhost:{ports.pay}"
    node = f"http://express.localhost:{ports.node}"
    origins = {
        "shop": [checkout, pay, node],
        "checkout": [checkout],
        "pay": [pay],
        "node": [node],
    }
    sources = {
        name: {"write_key_hash": hash_write_key(keys[name]), "origins": origins[name]}
        for name in origins
    }
    env = {
        "IDENTITY_SOURCES": json.dumps(sources),
        "IDENTITY_SECRET": secrets.token_urlsafe(32),
        "IDENTITY_DESTINATION_URL": f"http://{LOOPBACK}:{ports.collector}",
        "IDENTITY_DESTINATION_WRITE_KEY": collector_key,
        "IDENTITY_BATCH_MAX_WAIT": "0.2",
        **extra,
    }
    return load_settings(env)


async def _site(stack: AsyncExitStack, runner: web.AppRunner, port: int) -> None:
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, LOOPBACK, port).start()


@asynccontextmanager
async def running_demo(
    ports: Ports,
    *,
    echo: Callable[[str], None] | None = None,
    handoff_ttl: int | None = None,
    service_env: dict[str, str] | None = None,
    node: bool | None = None,
    same_site: SameSite = "Lax",
) -> AsyncIterator[Demo]:
    """The five parts (six with Node), listening until the block ends. ``handoff_ttl`` is
    the shop's handoff lifetime (the service's default when None); ``service_env`` adds
    ``IDENTITY_*`` settings; ``node``: start the Node checkout (True: or fail), or not
    (False), or when it can run here (None); ``same_site``: the SameSite of the visitor
    cookie the Python and Node middlewares set."""
    node_missing = await node_checkout_missing() if node is not False else "not asked for"
    if node and node_missing:
        raise DemoError(f"the Node checkout cannot start: {node_missing}")
    keys = {name: secrets.token_urlsafe(24) for name in ("shop", "checkout", "pay", "node")}
    collector = Collector(secrets.token_urlsafe(24), secrets.token_urlsafe(24), echo)
    settings = service_settings(ports, keys, collector.service_key, service_env or {})
    service_url = f"http://{LOOPBACK}:{ports.service}"
    collector_url = f"http://{LOOPBACK}:{ports.collector}"
    analytics = Analytics(collector_url, collector.page_key)
    helper_url = f"{service_url}/v1/identity.js?v={helper_script().version}"
    checkout_url = f"http://checkout.localhost:{ports.checkout}"
    pay_url = f"http://pay.localhost:{ports.pay}"
    node_url = None if node_missing else f"http://express.localhost:{ports.node}"
    service = create_app(settings)
    async with AsyncExitStack() as stack:
        # The collector first: the service's forwarder delivers to it from the start.
        await _site(
            stack, web.AppRunner(collector_app(collector), access_log=None), ports.collector
        )
        await _site(stack, FrontRunner(service, access_log=None, shutdown_timeout=1), ports.service)
        clients = {
            name: await stack.enter_async_context(AsyncIdentityClient(service_url, keys[name]))
            for name in ("shop", "checkout", "pay")
        }
        checkouts = {
            "middleware": f"{checkout_url}/cart?item=mug-blue",
            "helper": f"{pay_url}/cart",
        }
        if node_url:
            page = cart_html(
                CheckoutSettings("node", "express.localhost", analytics, helper_url), SERVER_SOURCE
            )
            await _node_checkout(stack, ports.node, service_url, keys["node"], page, same_site)
            checkouts["node"] = f"{node_url}/cart?item=mug-blue"
        shop = ShopSettings(analytics, helper_url, checkouts, handoff_ttl)
        apps = {
            ports.shop: shop_app(clients["shop"], shop),
            ports.checkout: checkout_app(
                clients["checkout"],
                CheckoutSettings(
                    "middleware", "checkout.localhost", analytics, helper_url, same_site
                ),
            ),
            ports.pay: checkout_app(
                clients["pay"], CheckoutSettings("helper", "pay.localhost", analytics, helper_url)
            ),
        }
        for port, app in apps.items():
            await _site(stack, web.AppRunner(app, access_log=None, shutdown_timeout=1), port)
        yield Demo(
            f"http://shop.localhost:{ports.shop}",
            checkout_url,
            pay_url,
            service_url,
            collector_url,
            collector,
            service,
            node_url,
            node_missing,
        )
