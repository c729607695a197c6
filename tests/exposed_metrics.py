"""The metric names the service exposes, which the chart's alerts and dashboard may use.

One function, :func:`exposed_metric_names`, answers it for every test: the sample names
of the service's own exposition (``Metrics.render``, what ``/metrics`` and the forwarder's
port answer), read with prometheus_client's parser, with the scrape-time gauges present.
tests/test_metrics.py scrapes running services for their values.
"""

from functools import cache

from prometheus_client.parser import text_string_to_metric_families

from identity_service.metrics import Backlog, Metrics, Scraped

# Metrics the alerts read from other exporters: kube-state-metrics.
EXTERNAL_METRIC_NAMES = frozenset({"kube_pod_status_ready"})

# The sample names of a family, by its type (a counter's family name has no ``_total``).
_SERIES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


@cache
def exposed_metric_names() -> frozenset[str]:
    """Every sample name the service's ``/metrics`` (and the forwarder's) may show."""
    metrics = Metrics()
    metrics.scraped = Scraped(store_up=True, outbox={"default": Backlog()})
    families = text_string_to_metric_families(metrics.render().decode())
    return frozenset(family.name + series for family in families for series in _SERIES[family.type])
