"""What the AMP endpoints share, built once when the application starts."""

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from identity_service.amp.config import AmpSettings
from identity_service.crypto import TokenSealer
from identity_service.metrics import Metrics
from identity_service.settings import Settings
from identity_service.stores import HandoffStore


@dataclass(frozen=True, slots=True)
class AmpContext:
    """The AMP endpoints' dependencies.

    ``action_sealer`` and ``link_sealer`` are token sealers under secrets derived from the
    server secret for their own purpose, so an action token never opens as a handoff and a
    handoff token never as an action, and link keys differ from every other key.
    """

    settings: Settings
    amp: AmpSettings
    store: HandoffStore
    metrics: Metrics
    action_sealer: TokenSealer
    link_sealer: TokenSealer
    http: aiohttp.ClientSession  # for the actions' webhooks


# Where the application keeps its AmpContext. Here, not in routes.py, so the handlers
# (collect.py, actions.py) can read it without importing routes.py, which imports them.
AMP = web.AppKey("amp", AmpContext)
