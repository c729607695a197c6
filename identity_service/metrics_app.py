"""The metrics port: ``/metrics`` and ``/healthz`` on a port of their own.

``identity-service forward`` serves no requests of its own, so Prometheus scrapes it on a
port of its own (``IDENTITY_FORWARDER_METRICS_PORT``, 9464 by default; ``0`` or ``off``:
none). ``identity-service serve`` does too when ``IDENTITY_METRICS_PORT`` is set, so that
its public port, which may face the internet, no longer tells anyone its counts and its
destinations' outbox: its app starts the listener in its ``cleanup_ctx`` (app.py), on the
app's own metrics and probe. Either way the port is served through the same HTTP front,
middleware and handlers as the API (its own connections, within the same limits); the
gauges come from the store when scraped (scrape.py).
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from identity_service import app_keys, handlers
from identity_service.front import FrontRunner, listen
from identity_service.metrics import Metrics
from identity_service.middleware import handle_request, without_server_header
from identity_service.scrape import Probe, backlog_destinations
from identity_service.settings import Settings

PORT_NAME = "metrics port"  # how a BindError names the port


def create_metrics_app(settings: Settings, metrics: Metrics, probe: Probe) -> web.Application:
    app = web.Application(middlewares=[handle_request])
    app[app_keys.SETTINGS] = settings
    app[app_keys.METRICS] = metrics
    app[app_keys.PROBE] = probe
    app.on_response_prepare.append(without_server_header)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/metrics", handlers.metrics)
    metrics.add_routes(resource.canonical for resource in app.router.resources())
    return app


@asynccontextmanager
async def listening(
    settings: Settings, metrics: Metrics, probe: Probe, host: str, port: int
) -> AsyncIterator[None]:
    """``metrics`` (with ``probe``'s gauges) served on ``host``:``port`` while in the block;
    BindError if it cannot be listened on."""
    runner = FrontRunner(
        create_metrics_app(settings, metrics, probe),
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
    )
    await runner.setup()
    try:
        await listen(runner, host, port, what=PORT_NAME)
        yield
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving_metrics(settings: Settings, metrics: Metrics) -> AsyncIterator[int | None]:
    """Serve the forwarder's metrics port while in the block; yield the port (None: off).
    BindError if it cannot be listened on."""
    port = settings.forwarder_metrics_port
    if port is None or settings.redis is None:
        yield None
        return
    probe = Probe.of_redis(settings.redis, backlog_destinations(settings.outbox))
    try:
        async with listening(settings, metrics, probe, settings.forwarder_metrics_host, port):
            yield port
    finally:
        await probe.close()


async def metrics_port(app: web.Application) -> AsyncIterator[None]:
    """``serve``'s metrics port, as a cleanup_ctx of its app (after the store's, whose probe
    it reads): its metrics served on ``IDENTITY_METRICS_PORT`` until the app stops."""
    settings = app[app_keys.SETTINGS]
    assert settings.metrics_port is not None
    async with listening(
        settings,
        app[app_keys.METRICS],
        app[app_keys.PROBE],
        settings.metrics_host,
        settings.metrics_port,
    ):
        yield
