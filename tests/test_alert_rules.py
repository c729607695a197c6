"""The chart's alerts and dashboard against the service's metrics: every metric name they
read, and every label value they filter on, is one a running service exposes (a real
``identity-service serve --workers 2`` on a real redis-server, tests/exposed_metrics.py),
and Prometheus's own promtool checks the rules and runs their unit tests
(tests/prometheus/alerts-test.yaml).

promtool comes with Debian's ``prometheus`` package (.ci/run installs it); elsewhere the
promtool tests skip when it is missing.
"""

import asyncio
import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import promql_parser
import pytest
import yaml

from tests.chart import CHART_DIR, FULLNAME, chart, ci_values, find, render
from tests.exposed_metrics import (
    EXTERNAL_METRIC_NAMES,
    TARGET_LABELS,
    Series,
    scrape_after_flows,
)
from tests.tools import missing_tool

UNIT_TESTS = Path(__file__).resolve().parent / "prometheus" / "alerts-test.yaml"
DASHBOARD = CHART_DIR / "dashboards" / "identity-service.json"


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's groups, as a Prometheus rule file holds them."""
    rule = find(render(ci_values("everything")), "PrometheusRule", FULLNAME)
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> list[Series]:
    """The series of a running two-worker service after real flows (one run per module)."""
    return asyncio.run(scrape_after_flows(tmp_path_factory.mktemp("exposed")))


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_tool("promtool is missing", ".ci/run installs Debian's prometheus package")
    return path


# The nodes that wrap one expression.
WRAPPERS = (
    promql_parser.AggregateExpr,
    promql_parser.ParenExpr,
    promql_parser.UnaryExpr,
    promql_parser.SubqueryExpr,
)


def metric_names(expression: str) -> set[str]:
    """The metric names an expression reads, from PromQL's own syntax tree."""
    return {s.name for s in selectors(expression) if s.name}


def selectors(expression: str) -> list[Any]:
    """The expression's vector selectors (name and label matchers)."""
    return list(_selectors(promql_parser.parse(expression)))


def _selectors(node: Any) -> Iterator[Any]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield from _selectors(node.vector_selector)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selectors(node.lhs)
        yield from _selectors(node.rhs)
    elif isinstance(node, promql_parser.Call):
        for argument in node.args:
            yield from _selectors(argument)
    elif isinstance(node, WRAPPERS):
        yield from _selectors(node.expr)


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_name_walker_finds_every_selector() -> None:
    names = metric_names(
        'sum(rate(a_total{x="1"}[5m])) / on() group_left b offset 5m'
        " + histogram_quantile(0.9, sum by (le) (rate(c_bucket[1m])))"
        " - max_over_time(d[10m:1m]) * -e"
    )
    assert names == {"a_total", "b", "c_bucket", "d", "e"}


# A regular expression that only lists values (``handoff|generated``): each must exist.
LITERAL_ALTERNATIVES = re.compile(r"[\w/-]+(\|[\w/-]+)*")


def unexposed(expression: str, exposed: list[Series]) -> list[str]:
    """What ``expression`` reads that ``exposed`` lacks: metric names, and label values
    its matchers ask for (``=``: that value; ``=~``: a match, every one of a plain list;
    ``!=``, ``!~``: the label). Target labels and other exporters' metrics are not ours."""
    missing = []
    for selector in selectors(expression):
        if selector.name in EXTERNAL_METRIC_NAMES:
            continue
        labels = [found for name, found in exposed if name == selector.name]
        if not labels:
            missing.append(selector.name)
            continue
        for matcher in selector.matchers.matchers:
            if matcher.name in TARGET_LABELS:
                continue
            values = {found[matcher.name] for found in labels if matcher.name in found}
            op = str(matcher.op).rpartition(".")[2]
            if op == "Equal":
                wanted = [matcher.value]
            elif op == "Re" and LITERAL_ALTERNATIVES.fullmatch(matcher.value):
                wanted = matcher.value.split("|")
            elif op == "Re":
                values = {v for v in values if re.fullmatch(matcher.value, v)}
                wanted = [next(iter(values))] if values else [f"~{matcher.value}"]
            else:
                wanted = [next(iter(values))] if values else ["(any)"]
            missing += [f"{selector.name}{{{matcher.name}={v}}}" for v in wanted if v not in values]
    return missing


def test_the_label_check_can_fail(exposed: list[Series]) -> None:
    assert unexposed('x_total{a="1"}', exposed) == ["x_total"]
    assert unexposed(
        'identity_identities_total{namespace="n",id_source=~"handoff|amp_nope"}', exposed
    ) == ["identity_identities_total{id_source=amp_nope}"]
    assert unexposed('identity_http_requests_total{status=~"6.."}', exposed) == [
        "identity_http_requests_total{status=~6..}"
    ]
    assert unexposed('identity_store_up{nope!="1"}', exposed) == ["identity_store_up{nope=(any)}"]


def test_alerts_read_only_exposed_series(
    rule_groups: list[dict[str, Any]], exposed: list[Series]
) -> None:
    for group in rule_groups:
        for rule in group["rules"]:
            assert metric_names(rule["expr"]), rule["alert"]
            assert unexposed(rule["expr"], exposed) == [], rule["alert"]


def test_the_request_shares_leave_out_exactly_the_probes_and_the_scrapes(
    rule_groups: list[dict[str, Any]], exposed: list[Series]
) -> None:
    """The error alerts judge the API's requests: the kubelet's probes and Prometheus's
    scrapes, which outnumber them on a quiet install, are left out by their route, the
    paths the chart probes and scrapes, each a route the service counts under."""
    objects = render(ci_values("everything"))
    probed = {
        container[f"{kind}Probe"]["httpGet"]["path"]
        for workload in objects
        if workload["kind"] == "Deployment"
        for container in workload["spec"]["template"]["spec"]["containers"]
        for kind in ("startup", "liveness", "readiness")
        if "httpGet" in container.get(f"{kind}Probe", {})
    }
    scraped = {e["path"] for e in find(objects, "ServiceMonitor", FULLNAME)["spec"]["endpoints"]}
    routes = {
        labels["route"]
        for name, labels in exposed
        if name == "identity_http_request_duration_seconds_count"
    }
    assert probed | scraped <= routes
    rules = {rule["alert"]: rule for group in rule_groups for rule in group["rules"]}
    for alert in ("IdentityServerErrors", "IdentityUnavailable"):
        requests = [
            s for s in selectors(rules[alert]["expr"]) if s.name == "identity_http_requests_total"
        ]
        assert len(requests) >= 2, alert  # the share's numerator and denominator
        for selector in requests:
            (left_out,) = [
                m.value
                for m in selector.matchers.matchers
                if m.name == "route" and str(m.op).endswith("NotRe")
            ]
            assert set(left_out.split("|")) == probed | scraped, alert


def test_the_dashboard_reads_only_exposed_series(exposed: list[Series]) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    for expression in expressions:
        assert unexposed(expression, exposed) == [], expression


def test_the_dashboard_shows_identity_handoffs_outbox_and_errors() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Identity kept or lost", "Handoffs", "Outbox", "Errors"]
    text = " ".join(dashboard_expressions())
    for needed in (
        'id_source="generated"',
        "histogram_quantile(0.99",
        "identity_outbox_oldest_pending_age_seconds",
        "identity_outbox_dead_letters",
        'status=~"[45].."',
    ):
        assert needed in text


def test_the_dashboard_counts_refused_connections_among_the_answers() -> None:
    """A connection refused over maxConnections is answered 503 on the socket and never
    reaches identity_http_requests_total: "Answers by status" shows it beside the 503s."""
    dashboard = json.loads(DASHBOARD.read_text())
    (answers,) = [p for p in dashboard["panels"] if p["title"] == "Answers by status"]
    read = set().union(*(metric_names(t["expr"]) for t in answers["targets"]))
    assert read == {"identity_http_requests_total", "identity_connections_refused_total"}


def test_every_alert_names_the_release_namespace(rule_groups: list[dict[str, Any]]) -> None:
    """Alerts that sum over pods keep no namespace label of their series: two installs would
    raise one same alert, and Alertmanager could not route it by namespace."""
    for rule in (r for g in rule_groups for r in g["rules"]):
        assert rule["labels"]["namespace"] == "identity", rule["alert"]


def test_every_alert_has_a_runbook_section(rule_groups: list[dict[str, Any]]) -> None:
    operations = (CHART_DIR.parent.parent / "docs" / "operations.md").read_text()
    for group in rule_groups:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook_url"].rpartition("#")[2]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}\n" in operations, rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")


def pods_not_ready_matcher(values: dict[str, Any], name: str) -> str:
    """The pod name regular expression of IdentityPodsNotReady rendered with ``values``."""
    rule = find(render(values), "PrometheusRule", name)
    (expr,) = [
        r["expr"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if r["alert"] == "IdentityPodsNotReady"
    ]
    (matcher,) = {
        m.value
        for s in selectors(expr)
        for m in s.matchers.matchers
        if m.name == "pod" and m.op == promql_parser.MatchOp.Re
    }
    return str(matcher)


def deployment_pod(deployment: str, pod_hash: str, suffix: str = "x2k4q") -> str:
    """A Deployment's pod name as Kubernetes makes it: its ReplicaSet's name and "-" as
    the generateName, cut to 58 characters, then 5 random characters."""
    return f"{deployment}-{pod_hash}-"[:58] + suffix


@pytest.mark.parametrize(
    "override", ["", "o" * 40, "o" * 46, "o" * 47, "o" * 52, "o" * 57, "o" * 63]
)
def test_pods_not_ready_reads_the_release_pods_whatever_the_name_length(override: str) -> None:
    """Prometheus anchors the matcher at both ends: every pod of the release matches it,
    a Deployment's long name cut before the suffix included."""
    values = ci_values("everything") | {"fullnameOverride": override}
    objects = render(values)
    pods = re.compile(pods_not_ready_matcher(values, override or FULLNAME))
    workloads = [o["metadata"]["name"] for o in objects if o["kind"] in ("Deployment",)]
    assert len(workloads) == 2
    for deployment in workloads:
        for pod_hash in ("7d9f8c6b5", "5c6b7d9f84"):
            pod = deployment_pod(deployment, pod_hash)
            assert pods.fullmatch(pod), (pods.pattern, pod)
    (redis,) = [o["metadata"]["name"] for o in objects if o["kind"] == "StatefulSet"]
    assert pods.fullmatch(f"{redis}-0"), pods.pattern


def test_pods_not_ready_leaves_out_a_release_whose_name_begins_with_this_ones() -> None:
    pods = re.compile(pods_not_ready_matcher(ci_values("everything"), FULLNAME))
    assert pods.fullmatch(deployment_pod(FULLNAME, "7d9f8c6b5"))
    for other in (f"{FULLNAME}-canary", f"{FULLNAME}-canary-forwarder"):
        assert not pods.fullmatch(deployment_pod(other, "7d9f8c6b5")), other
    assert not pods.fullmatch(f"{FULLNAME}-canary-redis-0")


def write_rules(rule_groups: list[dict[str, Any]], directory: Path) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups}, sort_keys=False))
    return path


def test_promtool_checks_the_rules(
    rule_groups: list[dict[str, Any]], promtool: str, tmp_path: Path
) -> None:
    rules = write_rules(rule_groups, tmp_path)
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    count = sum(len(group["rules"]) for group in rule_groups)
    assert f"SUCCESS: {count} rules found" in checked.stdout


def run_unit_tests(
    promtool: str, rule_groups: list[dict[str, Any]], directory: Path
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` of tests/prometheus/alerts-test.yaml against ``rule_groups``."""
    write_rules(rule_groups, directory)
    shutil.copy(UNIT_TESTS, directory / UNIT_TESTS.name)
    return subprocess.run(
        [promtool, "test", "rules", UNIT_TESTS.name],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )


def test_promtool_unit_tests_of_the_alerts_pass(
    rule_groups: list[dict[str, Any]], promtool: str, tmp_path: Path
) -> None:
    tested = run_unit_tests(promtool, rule_groups, tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_unit_tests_can_fail(
    rule_groups: list[dict[str, Any]], promtool: str, tmp_path: Path
) -> None:
    """The same unit tests against rules whose generated-id threshold is 20 %: they fail."""
    changed = copy.deepcopy(rule_groups)
    for group in changed:
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace(") > 0.1\n", ") > 0.2\n")
    assert changed != rule_groups
    tested = run_unit_tests(promtool, changed, tmp_path)
    assert tested.returncode != 0
    assert "IdentityGeneratedIdsHigh" in tested.stdout + tested.stderr


# The alerts on a share, by the value that sets their threshold.
SHARE_ALERTS = {
    "generatedShare": "IdentityGeneratedIdsHigh",
    "missShare": "IdentityHandoffMissesHigh",
    "serverErrorShare": "IdentityServerErrors",
    "unavailableShare": "IdentityUnavailable",
}
RELEASE_SERIES = 'namespace="identity",job="identity-service",pod="a"'


def full_share_tests(rules: dict[str, str]) -> dict[str, Any]:
    """A promtool test file: each share alert's expression (``rules``, by alert) evaluated
    where its share has been 100 % for 40 minutes, expected true (its value, the share)."""

    def series(name: str, labels: str, values: str = "0+10x60") -> dict[str, str]:
        return {"series": f"{name}{{{RELEASE_SERIES},{labels}}}", "values": values}

    def holds(*alerts: str) -> list[dict[str, Any]]:
        return [
            {
                "expr": rules[alert],
                "eval_time": "40m",
                "exp_samples": [{"labels": "{}", "value": 1}],
            }
            for alert in alerts
        ]

    handoffs = 'route="/v1/handoffs",method="POST"'
    return {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("identity_identities_total", 'id_source="generated"'),
                    # Bound at start, they stay at 0.
                    series("identity_identities_total", 'id_source="handoff"', "0x60"),
                    series("identity_handoffs_exchanged_total", 'source="checkout"', "0x60"),
                    series("identity_handoff_misses_total", 'source="checkout",reason="not_found"'),
                    series("identity_http_requests_total", f'{handoffs},status="500"'),
                ],
                "promql_expr_test": holds(
                    "IdentityGeneratedIdsHigh", "IdentityHandoffMissesHigh", "IdentityServerErrors"
                ),
            },
            {
                "interval": "1m",
                "input_series": [
                    series("identity_http_requests_total", f'{handoffs},status="503"')
                ],
                "promql_expr_test": holds("IdentityUnavailable"),
            },
        ],
    }


@pytest.mark.parametrize("threshold", [0.5, 0.99, 1])
def test_every_share_threshold_the_schema_takes_can_fire(
    threshold: float, promtool: str, tmp_path: Path
) -> None:
    """A share is at most 1 and each alert fires above its threshold: a threshold the schema
    takes must leave a share above it, or the alert can never fire, not even when every
    answer is an error."""
    values = ci_values("everything")
    values["metrics"]["prometheusRule"] |= dict.fromkeys(SHARE_ALERTS, threshold)
    try:
        chart().validate_schema(chart().merge_values(values))
    except helm_python.HelmValuesError:
        assert threshold >= 1
        return
    rule = find(render(values), "PrometheusRule", FULLNAME)
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    tests = tmp_path / "full-share-test.yaml"
    tests.write_text(yaml.safe_dump(full_share_tests(exprs), sort_keys=False))
    tested = subprocess.run(
        [promtool, "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
