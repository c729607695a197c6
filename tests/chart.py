"""Renders helm/identity-service with Helm's own engine (helm-python-sdk: Helm's Go SDK as a
shared library, offline, no helm binary) for the chart tests.

``render`` answers the rendered objects parsed; ``ci_values`` reads one of the chart's
``ci/*-values.yaml`` files, the configurations the tests (and chart-testing) install.
``api_versions`` are the API groups and versions the cluster is said to serve, as with
``helm template --api-versions`` (``.Capabilities.APIVersions``).
"""

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import yaml
from helm_python import _native

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "identity-service"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
RELEASE = "identity-service"
NAMESPACE = "identity"
FULLNAME = "identity-service"  # the release name contains the chart name

Manifest = dict[str, Any]


@cache
def chart() -> helm_python.Chart:
    """The chart, loaded once per test process (charts are immutable)."""
    return helm_python.Chart.load(CHART_DIR)


def ci_values(name: str) -> dict[str, Any]:
    """The values of ``ci/<name>-values.yaml``."""
    values: dict[str, Any] = yaml.safe_load((CHART_DIR / "ci" / f"{name}-values.yaml").read_text())
    return values


def render_files(
    values: dict[str, Any],
    *,
    api_versions: Sequence[str] = (),
    of: helm_python.Chart | None = None,
    upgrade: bool = False,
) -> dict[str, str]:
    """Each template's rendered text, by template path (NOTES.txt included): of this chart
    or of ``of`` (a changed copy), as an install or an upgrade."""
    # Chart.render passes no API versions on, but the library's helm_render takes Helm's own
    # `api_versions` option (an unknown option is an error there, so a rename would show).
    options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": not upgrade}
    options |= {"is_upgrade": upgrade, "api_versions": list(api_versions)}
    handle = (of or chart())._raw()
    text = _native.call_string("helm_render", handle, json.dumps(values), json.dumps(options))
    files: dict[str, str] = json.loads(text)
    return files


def render(
    values: dict[str, Any],
    *,
    api_versions: Sequence[str] = (),
    of: helm_python.Chart | None = None,
    upgrade: bool = False,
) -> list[Manifest]:
    """The Kubernetes objects the chart makes with ``values`` (see ``render_files``)."""
    return manifests(render_files(values, api_versions=api_versions, of=of, upgrade=upgrade))


def manifests(files: dict[str, str]) -> list[Manifest]:
    """The Kubernetes objects of rendered ``files`` (by template path), in path order."""
    return [
        doc
        for path, text in sorted(files.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(objects: list[Manifest], kind: str, name: str = FULLNAME) -> Manifest:
    """The one object of ``kind`` named ``name``."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def pod_spec(workload: Manifest) -> dict[str, Any]:
    """The pod spec of a Deployment, a StatefulSet or a Pod."""
    spec: dict[str, Any] = workload["spec"]
    return spec if workload["kind"] == "Pod" else spec["template"]["spec"]
