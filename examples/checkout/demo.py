"""Start the demo's five parts in one event loop, on loopback ports.

- the identity service (``create_app`` behind the HTTP front, as ``identity-service serve``
  runs it; the memory store; events to the collector), on ``127.0.0.1``;
- the collector (collector.py), on ``127.0.0.1``;
- the shop (``http://shop.localhost``), the checkout with the middleware
  (``http://checkout.localhost``) and the checkout with identity.js only
  (``http://pay.localhost``). Browsers resolve ``*.localhost`` to loopback themselves.

Write keys and the server secret are made afresh at each start; none is in the repository.
"""

import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from identity_client import AsyncIdentityClient

from examples.checkout.checkout import CheckoutSettings, checkout_app
from examples.checkout.collector import Collector, collector_app
from examples.checkout.pages import Analytics
from examples.checkout.shop import ShopSettings, shop_app
from identity_service.app import create_app
from identity_service.browser_helper import helper_script
from identity_service.front import FrontRunner
from identity_service.settings import Settings, load_settings
from identity_service.sources import hash_write_key

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Ports:
    shop: int
    checkout: int
    pay: int
    service: int
    collector: int

    @classmethod
    def from_base(cls, base: int) -> "Ports":
        return cls(base + 1, base + 2, base + 3, base + 4, base + 5)


@dataclass(frozen=True)
class Demo:
    shop_url: str
    checkout_url: str  # domain B with the middleware
    pay_url: str  # domain B with identity.js only
    service_url: str
    collector_url: str
    collector: Collector
    service: web.Application

    def lines(self) -> list[str]:
        return [
            f"shop (domain A)               {self.shop_url}/",
            f"checkout (B, SDK middleware)  {self.checkout_url}/cart",
            f"checkout (B, identity.js)     {self.pay_url}/cart",
            f"identity service              {self.service_url}  (memory store)",
            f"collector (the events)        {self.collector_url}/",
        ]


def service_settings(
    ports: Ports, keys: dict[str, str], collector_key: str, extra: dict[str, str]
) -> Settings:
    checkout = f"http://checkout.localhost:{ports.checkout}"
    pay = f"http://pay.localhost:{ports.pay}"
    origins = {"shop": [checkout, pay], "checkout": [checkout], "pay": [pay]}
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
) -> AsyncIterator[Demo]:
    """The five parts, listening until the block ends. ``handoff_ttl`` is the shop's
    handoff lifetime (the service's default when None); ``service_env`` adds
    ``IDENTITY_*`` settings."""
    keys = {name: secrets.token_urlsafe(24) for name in ("shop", "checkout", "pay")}
    collector = Collector(secrets.token_urlsafe(24), secrets.token_urlsafe(24), echo)
    settings = service_settings(ports, keys, collector.service_key, service_env or {})
    service_url = f"http://{LOOPBACK}:{ports.service}"
    collector_url = f"http://{LOOPBACK}:{ports.collector}"
    analytics = Analytics(collector_url, collector.page_key)
    helper_url = f"{service_url}/v1/identity.js?v={helper_script().version}"
    checkout_url = f"http://checkout.localhost:{ports.checkout}"
    pay_url = f"http://pay.localhost:{ports.pay}"
    service = create_app(settings)
    async with AsyncExitStack() as stack:
        # The collector first: the service's forwarder delivers to it from the start.
        await _site(
            stack, web.AppRunner(collector_app(collector), access_log=None), ports.collector
        )
        await _site(stack, FrontRunner(service, access_log=None, shutdown_timeout=1), ports.service)
        clients = {
            name: await stack.enter_async_context(AsyncIdentityClient(service_url, keys[name]))
            for name in keys
        }
        shop = ShopSettings(
            analytics,
            helper_url,
            {"middleware": f"{checkout_url}/cart?item=mug-blue", "helper": f"{pay_url}/cart"},
            handoff_ttl,
        )
        apps = {
            ports.shop: shop_app(clients["shop"], shop),
            ports.checkout: checkout_app(
                clients["checkout"],
                CheckoutSettings("middleware", "checkout.localhost", analytics, helper_url),
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
        )
