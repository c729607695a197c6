"""The metric names the service exposes, which the chart's alerts and dashboard may use.

One function, :func:`exposed_metric_names`, answers it for every test. Today it is the list
agreed with the metrics work (issue 13); once the service exposes them all, it is to read
them from a running service's ``/metrics`` instead (the sample names of its exposition),
and nothing else in the tests changes.
"""

# Counters are written without their ``_total`` suffix's twins; histograms with their series.
_COUNTERS = (
    "identity_handoffs_prepared_total",
    "identity_handoffs_exchanged_total",
    "identity_handoff_misses_total",
    "identity_handoff_fallbacks_total",
    "identity_store_errors_total",
    "identity_events_skipped_total",
    "identity_events_delivered_total",
    "identity_events_dead_lettered_total",
    "identity_delivery_retries_total",
    "identity_connections_refused_total",
    "identity_amp_hits_total",
    "identity_amp_hops_total",
    "identity_amp_links_recorded_total",
    "identity_amp_link_failures_total",
    "identity_amp_link_attributions_total",
    "identity_amp_refusals_total",
    "identity_http_requests_total",
    "identity_identities_total",
    "identity_delivery_attempts_total",
    "identity_delivery_failures_total",
)
_GAUGES = (
    "identity_store_up",
    "identity_outbox_pending",
    "identity_outbox_oldest_pending_age_seconds",
    "identity_outbox_dead_letters",
    "identity_build_info",
)
_HISTOGRAMS = ("identity_http_request_duration_seconds",)
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")

# Metrics the alerts read from other exporters: kube-state-metrics.
EXTERNAL_METRIC_NAMES = frozenset({"kube_pod_status_ready"})


def exposed_metric_names() -> frozenset[str]:
    """Every sample name the service's ``/metrics`` (and the forwarder's) may show."""
    histograms = {name + series for name in _HISTOGRAMS for series in _HISTOGRAM_SERIES}
    return frozenset(_COUNTERS) | frozenset(_GAUGES) | frozenset(histograms)
