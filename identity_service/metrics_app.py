"""``identity-service forward``'s own HTTP port: ``/metrics`` and ``/healthz``.

The forwarder serves no requests of its own, so Prometheus scrapes it on a port of its
own (``IDENTITY_FORWARDER_METRICS_PORT``, 9464 by default; ``0`` or ``off``: none), through
the same HTTP front, middleware and handlers as ``serve``. Its gauges come from Redis when
scraped (scrape.py), on a connection of the scrapes' own.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from identity_service import app_keys, handlers
from identity_service.app import without_server_header
from identity_service.front import FrontRunner
from identity_service.metrics import Metrics
from identity_service.middleware import handle_request
from identity_service.scrape import Probe, backlog_destinations
from identity_service.server import BindError
from identity_service.settings import Settings


def create_metrics_app(settings: Settings, metrics: Metrics, probe: Probe) -> web.Application:
    app = web.Application(middlewares=[handle_request])
    app[app_keys.SETTINGS] = settings
    app[app_keys.METRICS] = metrics
    app[app_keys.PROBE] = probe
    app.on_response_prepare.append(without_server_header)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/metrics", handlers.metrics)
    metrics.set_routes(resource.canonical for resource in app.router.resources())
    return app


@asynccontextmanager
async def serving_metrics(settings: Settings, metrics: Metrics) -> AsyncIterator[int | None]:
    """Serve the forwarder's metrics port while in the block; yield the port (None: off).
    BindError if it cannot be listened on."""
    port = settings.forwarder_metrics_port
    if port is None or settings.redis is None:
        yield None
        return
    probe = Probe.of_redis(settings.redis, backlog_destinations(settings.outbox))
    runner = FrontRunner(create_metrics_app(settings, metrics, probe), access_log=None)
    await runner.setup()
    try:
        host = settings.forwarder_metrics_host
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise BindError(host, port, exc) from exc
        yield port
    finally:
        await runner.cleanup()
        await probe.close()
