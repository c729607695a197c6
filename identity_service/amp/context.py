"""What the AMP endpoints share, built once when the application starts."""

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from identity_service.amp.config import AmpSettings
from identity_service.crypto import TokenSealer
from identity_service.metrics import Inc, Metrics
from identity_service.settings import Settings
from identity_service.stores import HandoffStore

# identity_identities_total's id_source of each collect attribution: all AMP's own, so that
# the share of generated ids among exchanges (id_source "generated") counts exchanges alone.
ID_SOURCES = {
    "cookie": "amp_cookie",
    "amp_link": "amp_link",
    "amp_client_id": "amp_client_id",
    "generated": "amp_generated",
}
HIT_CONTEXTS = ("origin", "cache_with_cookie", "cache_without_cookie")


@dataclass(frozen=True, slots=True)
class HitCounters:
    """The counters a collect hit moves, bound once: collect answers every AMP pageview."""

    by_context: dict[str, Inc]  # identity_amp_hits_total, by the hit's context
    by_attribution: dict[str, Inc]  # identity_identities_total, by the attribution's source
    consent_skipped: Inc
    link_attributions: Inc

    @classmethod
    def of(cls, metrics: Metrics) -> "HitCounters":
        return cls(
            {c: metrics.counter("identity_amp_hits_total", context=c) for c in HIT_CONTEXTS},
            {
                source: metrics.counter("identity_identities_total", id_source=id_source)
                for source, id_source in ID_SOURCES.items()
            },
            metrics.counter("identity_events_skipped_total", reason="consent"),
            metrics.counter("identity_amp_link_attributions_total"),
        )


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
    hit_counters: HitCounters = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hit_counters", HitCounters.of(self.metrics))


# Where the application keeps its AmpContext. Here, not in routes.py, so the handlers
# (collect.py, actions.py) can read it without importing routes.py, which imports them.
AMP = web.AppKey("amp", AmpContext)
