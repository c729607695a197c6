"""The chart's alerts and dashboard against the service's metrics: every metric name they
read is one the service exposes (tests/exposed_metrics.py), and Prometheus's own promtool
checks the rules and runs their unit tests (tests/prometheus/alerts-test.yaml).

promtool comes with Debian's ``prometheus`` package (.ci/run installs it); elsewhere the
promtool tests skip when it is missing.
"""

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.chart import CHART_DIR, FULLNAME, ci_values, find, render
from tests.exposed_metrics import EXTERNAL_METRIC_NAMES, exposed_metric_names
from tests.tools import missing_tool

UNIT_TESTS = Path(__file__).resolve().parent / "prometheus" / "alerts-test.yaml"
DASHBOARD = CHART_DIR / "dashboards" / "identity-service.json"


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's groups, as a Prometheus rule file holds them."""
    rule = find(render(ci_values("everything")), "PrometheusRule", FULLNAME)
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


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
    return set(_selectors(promql_parser.parse(expression)))


def _selectors(node: Any) -> Iterator[str]:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
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


def test_alerts_read_only_exposed_metrics(rule_groups: list[dict[str, Any]]) -> None:
    known = exposed_metric_names() | EXTERNAL_METRIC_NAMES
    for group in rule_groups:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            assert names <= known, f"{rule['alert']} reads {sorted(names - known)}"


def test_the_dashboard_reads_only_exposed_metrics() -> None:
    known = exposed_metric_names()
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    for expression in expressions:
        assert metric_names(expression) <= known, expression


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


def test_every_alert_has_a_runbook_section(rule_groups: list[dict[str, Any]]) -> None:
    operations = (CHART_DIR.parent.parent / "docs" / "operations.md").read_text()
    for group in rule_groups:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook_url"].rpartition("#")[2]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}\n" in operations, rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")


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
