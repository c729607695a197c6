"""Typed keys for what the application object holds."""

from aiohttp import web

from identity_service.handoff import HandoffService
from identity_service.handoff_api import HandoffApi
from identity_service.metrics import Metrics
from identity_service.scrape import Probe
from identity_service.settings import Settings
from identity_service.sources import SourceRegistry
from identity_service.stores import HandoffStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", HandoffStore)
SOURCES = web.AppKey("sources", SourceRegistry)
METRICS = web.AppKey("metrics", Metrics)
HANDOFFS = web.AppKey("handoffs", HandoffService)
API = web.AppKey("api", HandoffApi)
PROBE = web.AppKey("probe", Probe)
# /openapi.json's body: the document of these settings (openapi.py), built with the app.
OPENAPI = web.AppKey("openapi", bytes)
