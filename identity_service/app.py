"""The application factory. Builds the app without I/O; the store opens in cleanup_ctx."""

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from identity_service import app_keys, handlers
from identity_service.browser_helper import identity_js, load_helper_script
from identity_service.crypto import OutboxSealer, TokenSealer
from identity_service.handoff import HandoffService
from identity_service.handoff_api import HandoffApi
from identity_service.metrics import Metrics, flushing
from identity_service.metrics_app import metrics_port
from identity_service.middleware import handle_request, without_server_header
from identity_service.openapi import openapi_document
from identity_service.outbox import running_forwarders
from identity_service.scrape import Probe, backlog_destinations
from identity_service.settings import Settings
from identity_service.sources import SourceRegistry
from identity_service.stores import HandoffStore
from identity_service.stores.memory import MemoryStore

logger = structlog.get_logger(__name__)


def create_app(settings: Settings, *, metrics_listener: bool = True) -> web.Application:
    """The service's app. With ``IDENTITY_METRICS_PORT``, /metrics is not among its routes,
    and ``metrics_listener`` says whether it serves that port while it runs (with several
    workers, worker 0's alone does)."""
    app = web.Application(middlewares=[handle_request], client_max_size=settings.max_body_bytes)
    app[app_keys.SETTINGS] = settings
    app[app_keys.SOURCES] = SourceRegistry(settings.sources)
    app[app_keys.METRICS] = Metrics()
    metrics_here = settings.metrics_port is None
    app[app_keys.OPENAPI] = openapi_document(settings.max_ttl, settings.amp, metrics_here)
    app.on_response_prepare.append(without_server_header)
    app.on_startup.append(load_helper_script)
    # First in, so last out: the counts of the forwarders' and the store's last moments too.
    app.cleanup_ctx.append(_flushed_metrics)
    app.cleanup_ctx.append(_handoff_store)
    if not metrics_here and metrics_listener:
        # After the store (its probe), before the forwarders: scraped until they are done.
        app.cleanup_ctx.append(metrics_port)
    if settings.outbox.enabled and settings.outbox.forwarder_in_serve:
        app.cleanup_ctx.append(_forwarders)
    app.router.add_post("/v1/handoffs", handlers.prepare_handoff)
    app.router.add_post("/v1/handoffs/exchange", handlers.exchange_handoff)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    if metrics_here:
        app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.router.add_get("/v1/identity.js", identity_js)
    if settings.amp is not None:
        # Imported here so a service without [amp] does not load the AMP endpoints.
        from identity_service.amp.routes import add_routes

        add_routes(app)
    app[app_keys.METRICS].add_routes(resource.canonical for resource in app.router.resources())
    return app


def open_store(settings: Settings, metrics: Metrics | None = None) -> HandoffStore:
    if settings.redis is None:
        return MemoryStore()
    from identity_service.stores.redis import RedisStore

    return RedisStore(
        settings.redis,
        OutboxSealer(settings.secret),
        settings.outbox.routes_by_source,
        metrics,
    )


async def _flushed_metrics(app: web.Application) -> AsyncIterator[None]:
    async with flushing(app[app_keys.METRICS]):
        yield


async def _handoff_store(app: web.Application) -> AsyncIterator[None]:
    settings = app[app_keys.SETTINGS]
    store = open_store(settings, app[app_keys.METRICS])
    app[app_keys.STORE] = store
    handoffs = HandoffService(store, TokenSealer(settings.secret), settings, app[app_keys.METRICS])
    app[app_keys.HANDOFFS] = handoffs
    app[app_keys.API] = HandoffApi(settings, app[app_keys.SOURCES], handoffs)
    if isinstance(store, MemoryStore):
        probe = Probe(store.ping, 1.0, memory=store.outbox)
    else:
        assert settings.redis is not None
        outbox = settings.outbox
        destinations = backlog_destinations(outbox) if outbox.enabled else []
        probe = Probe.of_redis(settings.redis, destinations, ping=store.ping)
    app[app_keys.PROBE] = probe
    logger.info("store_opened", store=type(store).__name__)
    yield
    await store.close()
    await probe.close()


async def _forwarders(app: web.Application) -> AsyncIterator[None]:
    store = app[app_keys.STORE]
    memory = store.outbox if isinstance(store, MemoryStore) else None
    async with running_forwarders(app[app_keys.SETTINGS], app[app_keys.METRICS], memory):
        yield
