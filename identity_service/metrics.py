"""Counters of what happens to handoffs, exposed in the Prometheus text format at /metrics.

Counting is a dict increment on the hot path; formatting happens only when scraped.
"""

from collections import Counter
from dataclasses import dataclass, field

_HELP = {
    "identity_handoffs_prepared_total": "Handoffs prepared, by source.",
    "identity_handoffs_exchanged_total": "Handoffs exchanged for an identity, by source.",
    "identity_handoff_misses_total": (
        "Exchanges that restored no identity, by source and reason "
        "(not_found: unknown, expired or used token; audience: origin not allowed)."
    ),
    "identity_handoff_fallbacks_total": "Misses answered with a generated anonymousId.",
    "identity_store_errors_total": "Store operations that failed (answered 503).",
    "identity_events_skipped_total": "Events not emitted, by reason (consent: analytics denied).",
    "identity_events_delivered_total": "Events a destination accepted (2xx), by destination.",
    "identity_events_dead_lettered_total": "Events moved to the dead letters, by destination.",
    "identity_delivery_retries_total": "Batch deliveries that failed and were retried.",
    "identity_connections_refused_total": "Connections refused over IDENTITY_MAX_CONNECTIONS.",
    "identity_amp_hits_total": (
        "AMP collect hits, by context (origin, cache_with_cookie, cache_without_cookie)."
    ),
    "identity_amp_hops_total": "AMP origin hops for actions, by action and stage.",
    "identity_amp_links_recorded_total": "AMP cache clientIds linked to a visitor.",
    "identity_amp_link_failures_total": (
        "AMP links not recorded because the store failed (the request stood)."
    ),
    "identity_amp_link_attributions_total": "AMP hits attributed to a visitor through a link.",
    "identity_amp_refusals_total": "AMP requests refused, by reason.",
}


@dataclass(slots=True)
class Metrics:
    counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = field(default_factory=Counter)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self.counts[name, tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> int:
        return self.counts[name, tuple(sorted(labels.items()))]

    def render(self) -> str:
        lines: list[str] = []
        for name, help_text in _HELP.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            for (metric, labels), count in sorted(self.counts.items()):
                if metric == name:
                    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{label_text}}} {count}" if labels else f"{name} {count}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
