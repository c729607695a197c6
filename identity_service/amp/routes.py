"""The AMP endpoints' routes and the context they share, added when ``[amp]`` is configured."""

import hashlib
import hmac
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from identity_service import app_keys
from identity_service.amp import actions, collect, cors
from identity_service.amp.context import AMP, AmpContext
from identity_service.crypto import TokenSealer


def add_routes(app: web.Application) -> None:
    """Route ``/v1/amp/*`` and build their context once the store is open."""
    app.cleanup_ctx.append(_amp_context)
    # Preflights for the two endpoints a page calls with fetch; the complete URL is a
    # top-level navigation and has none. No HEAD: a HEAD of collect would record a hit, and
    # one of complete would apply an action, with no answer for anyone to read.
    app.router.add_route("OPTIONS", "/v1/amp/collect", cors.preflight)
    app.router.add_route("OPTIONS", "/v1/amp/actions/{name}", actions.handle_preflight)
    app.router.add_get("/v1/amp/collect", collect.handle_collect, allow_head=False)
    app.router.add_post("/v1/amp/collect", collect.handle_collect)
    app.router.add_post("/v1/amp/actions/{name}", actions.handle_submit)
    app.router.add_get("/v1/amp/actions/{name}/complete", actions.handle_complete, allow_head=False)


def derived_secret(server_secret: bytes, purpose: str) -> bytes:
    """A key of its own for one purpose, so no two kinds of token share lookup ids."""
    return hmac.digest(server_secret, b"identity-service amp " + purpose.encode(), hashlib.sha256)


async def _amp_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[app_keys.SETTINGS]
    assert settings.amp is not None  # routes are added only with [amp]
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.amp.webhook_timeout)
    ) as http:
        app[AMP] = AmpContext(
            settings=settings,
            amp=settings.amp,
            store=app[app_keys.STORE],
            metrics=app[app_keys.METRICS],
            action_sealer=TokenSealer(derived_secret(settings.secret, "action")),
            link_sealer=TokenSealer(derived_secret(settings.secret, "link")),
            http=http,
        )
        yield
