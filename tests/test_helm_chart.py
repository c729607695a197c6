"""The Helm chart (helm/identity-service), rendered by Helm's own engine for every
configuration of ``ci/``: lint, the Kubernetes schemas (the Prometheus Operator's CRD
schemas for the ServiceMonitor and PrometheusRule), the security and operability
policies, the values schema, and the settings the pods get read by the service's own
settings reader.
"""

import asyncio
import base64
import copy
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from redis import Redis as SyncRedis
from redis import exceptions as redis_exceptions
from redis.asyncio import Redis

from identity_service.constants import DEFAULT_TRUSTED_PROXIES
from identity_service.settings import (
    SENTINEL_PARAMETERS,
    SETTING_NAMES,
    ConfigError,
    load_settings,
    redis_url_parameters,
)
from tests.chart import (
    CHART_DIR,
    CI_VALUES,
    FULLNAME,
    Manifest,
    chart,
    ci_values,
    find,
    manifests,
    pod_spec,
    render,
    render_files,
)
from tests.collector import WRITE_KEY as COLLECTOR_WRITE_KEY
from tests.collector import Answer, running_collector
from tests.conftest import CHECKOUT_URL, WRITE_KEYS
from tests.redis_server import RedisServer, free_port
from tests.test_cli import Service, post, redis_env, redis_env_for
from tests.test_settings import DNS_HOSTS, LONGEST_HOST, NOT_DNS_HOSTS, PARAMETER_VALUES

KUBERNETES_VERSION = "1.30.0"
# The pod listens on every address of its own network namespace.
SERVE_ARGS = ["serve", "--host", "0.0.0.0", "--port", "8080"]  # noqa: S104
TMP_MOUNT = "/tmp"  # noqa: S108 - the pod's emptyDir
CONFIGURATIONS = [path.name.removesuffix("-values.yaml") for path in CI_VALUES]
WORKLOADS = ("Deployment", "StatefulSet", "Pod")
# Objects of the Prometheus Operator's CRDs, which kubernetes-validate does not know.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
CRD_SCHEMAS = Path(__file__).resolve().parent / "prometheus" / "crds"


@pytest.fixture(params=CONFIGURATIONS)
def configuration(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def containers(objects: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    """Every workload with each of its containers."""
    return [
        (workload, container)
        for workload in objects
        if workload["kind"] in WORKLOADS
        for container in pod_spec(workload)["containers"]
    ]


def test_the_ci_configurations_cover_the_issue_list() -> None:
    assert set(CONFIGURATIONS) >= {
        "external-redis",
        "internal-redis",
        "forwarder",
        "existing-secret",
        "everything",
    }


def test_lint_reports_no_error_nor_warning(configuration: str) -> None:
    report = helm_python.lint(CHART_DIR, ci_values(configuration))
    assert report["errors"] == []
    # Severity 1 is information (e.g. "icon is recommended"), 2 a warning, 3 an error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_object_is_valid_for_kubernetes(configuration: str) -> None:
    objects = render(ci_values(configuration))
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            errors = crd_errors(obj)
            assert errors == [], f"{obj['kind']}/{obj['metadata']['name']}: {errors}"
            continue
        # strict: unknown fields are errors, as with kubectl's server-side validation.
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # its str() prints the schema
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator of the Prometheus Operator CRD's openAPIV3Schema (tests/prometheus/crds,
    whose README says where they come from), strict as ``kubectl --validate=strict``: an
    object's fields outside its ``properties`` are errors (the API server would drop them)."""
    schema = json.loads((CRD_SCHEMAS / f"{kind.lower()}.json").read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict:
        strict["additionalProperties"] = False
    return strict


def crd_errors(obj: Manifest) -> list[str]:
    return [
        f"{error.message} at {list(error.absolute_path)}"
        for error in crd_validator(obj["kind"]).iter_errors(obj)
    ]


@pytest.mark.parametrize(
    ("kind", "typo"),
    [
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(scrapeTimout="5s")),
        ("ServiceMonitor", lambda o: o["spec"].update(namespaceSelectors={"any": True})),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval=30)),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(expression="1")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0].pop("name")),
        ("PrometheusRule", lambda o: o.update(apiVersion="monitoring.coreos.com/v1beta1")),
    ],
)
def test_a_typo_in_a_service_monitor_or_prometheus_rule_fails_its_schema(
    kind: str, typo: Callable[[Manifest], object]
) -> None:
    obj = copy.deepcopy(find(render(ci_values("everything")), kind))
    assert crd_errors(obj) == []
    typo(obj)
    assert crd_errors(obj) != []


def scrape_targets(objects: list[Manifest]) -> dict[str, tuple[str, int | str]]:
    """What the ServiceMonitor scrapes, as the Prometheus Operator reads it: by Service, the
    job of its series (its ``jobLabel`` label, else its name) and the port scraped (of the
    Service's ports those an endpoint names; its pods' container port, resolved)."""
    monitor = find(objects, "ServiceMonitor")
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    named = {e["port"] for e in monitor["spec"]["endpoints"]}
    selected = monitor["spec"]["selector"]
    targets = {}
    for service in (o for o in objects if o["kind"] == "Service"):
        if not _selects(selected, service["metadata"]["labels"]):
            continue
        labels = service["metadata"]["labels"]
        job = labels.get(monitor["spec"].get("jobLabel", ""), service["metadata"]["name"])
        for port in service["spec"]["ports"]:
            if port["name"] not in named:
                continue
            workloads = [
                o
                for o in objects
                if o["kind"] == "Deployment"
                and _selects(
                    {"matchLabels": service["spec"]["selector"]},
                    o["spec"]["template"]["metadata"]["labels"],
                )
            ]
            (workload,) = workloads
            (container,) = pod_spec(workload)["containers"]
            (container_port,) = [
                p["containerPort"] for p in container["ports"] if p["name"] == port["targetPort"]
            ]
            targets[service["metadata"]["name"]] = (job, container_port)
    return targets


def test_the_service_monitor_scrapes_the_metrics_ports_not_the_public_service() -> None:
    """By default the web pods serve /metrics on a port of their own (IDENTITY_METRICS_PORT),
    which a headless Service of its own offers the ServiceMonitor; the public Service offers
    the API's port alone, and is not scraped. The series keep the public Service's name as
    their job, which the alerts and the dashboard select."""
    objects = render(ci_values("everything"))
    monitor = find(objects, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert scrape_targets(objects) == {
        f"{FULLNAME}-metrics": (FULLNAME, 9464),
        f"{FULLNAME}-forwarder": (f"{FULLNAME}-forwarder", 9464),
    }
    public = find(objects, "Service")
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]
    metrics = find(objects, "Service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["clusterIP"] == "None"
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["IDENTITY_METRICS_PORT"] == "9464"


def test_without_a_metrics_port_the_web_pods_are_scraped_on_their_api_port() -> None:
    """``metricsPort: null``: /metrics on the API's port, as before, scraped there."""
    values = {**ci_values("everything"), "metricsPort": None}
    objects = render(values)
    assert scrape_targets(objects) == {
        FULLNAME: (FULLNAME, 8080),
        f"{FULLNAME}-forwarder": (f"{FULLNAME}-forwarder", 9464),
    }
    assert not [o for o in objects if o["metadata"]["name"] == f"{FULLNAME}-metrics"]
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    assert "IDENTITY_METRICS_PORT" not in {v["name"] for v in container["env"]}
    assert [p["name"] for p in container["ports"]] == ["http"]
    chart().validate_schema(chart().merge_values(values))


def test_pods_run_locked_down(configuration: str) -> None:
    objects = render(ci_values(configuration))
    for workload, container in containers(objects):
        where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
        pod = pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"] == {"drop": ["ALL"]}, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), where
        assert "memory" in resources["limits"], where
        image = container["image"]
        assert not image.endswith(":latest") and re.search(r":[\w.-]+(@sha256:\w+)?$", image), image


def test_every_pod_gets_the_image_pull_secrets(configuration: str) -> None:
    """A private registry's credentials reach every pod that pulls an image: the `helm
    test` pod runs the service's image, and the in-chart Redis's may be mirrored there."""
    values = ci_values(configuration) | {"imagePullSecrets": [{"name": "registry"}]}
    workloads = [o for o in render(values) if o["kind"] in WORKLOADS]
    assert {w["kind"] for w in workloads} >= {"Deployment", "Pod"}
    for workload in workloads:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert pod_spec(workload).get("imagePullSecrets") == [{"name": "registry"}], where


@pytest.mark.parametrize("kind", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_a_service_reached_from_outside_keeps_the_clients_addresses(kind: str) -> None:
    """Through a NodePort or a load balancer with Kubernetes's default policy (Cluster),
    kube-proxy replaces each client's address with a node's, a private one: the service
    then trusts the X-Forwarded-For any client sends (amp/limits.py, docs/amp.md) and
    counts AMP's per-address limits under whatever address it claims."""
    values = ci_values("external-redis") | {"service": {"type": kind}}
    service = find(render(values), "Service")
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    if kind == "ClusterIP":  # not reached from outside; Kubernetes refuses the field here
        assert "externalTrafficPolicy" not in service["spec"]
    else:
        assert service["spec"]["externalTrafficPolicy"] == "Local"


def test_service_accounts_mount_no_token(configuration: str) -> None:
    for account in (o for o in render(ci_values(configuration)) if o["kind"] == "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_web_pods_probe_health_and_readiness_and_drain_before_sigterm(configuration: str) -> None:
    values = ci_values(configuration)
    web = find(render(values), "Deployment")
    pod = pod_spec(web)
    (container,) = pod["containers"]
    assert container["args"] == SERVE_ARGS
    probes = {
        kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")
    }
    assert probes["startup"]["path"] == probes["liveness"]["path"] == "/healthz"
    assert probes["readiness"]["path"] == "/readyz"
    assert {p["port"] for p in probes.values()} == {"http"}
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # The pause and the service's own shutdown fit in the grace period.
    assert pod["terminationGracePeriodSeconds"] >= 5 + 10
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert all(
        c["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "web" for c in spread
    )
    assert {m["mountPath"] for m in container["volumeMounts"]} == {TMP_MOUNT}


def test_a_spread_constraint_without_a_selector_spreads_each_deployments_pods() -> None:
    """A constraint without a labelSelector counts no pod, so the scheduler would spread
    nothing: it gets the selector of the pods it is in. One with a selector is kept."""
    values = ci_values("forwarder")
    zones = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone"}
    nodes = {
        "maxSkew": 2,
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": {"tier": "identity"}},
    }
    values["topologySpreadConstraints"] = [
        zones | {"whenUnsatisfiable": "DoNotSchedule"},
        nodes | {"whenUnsatisfiable": "ScheduleAnyway"},
    ]
    objects = render(values)
    for component, name in (("web", FULLNAME), ("forwarder", f"{FULLNAME}-forwarder")):
        spread = pod_spec(find(objects, "Deployment", name))["topologySpreadConstraints"]
        selector = {
            "app.kubernetes.io/name": "identity-service",
            "app.kubernetes.io/instance": "identity-service",
            "app.kubernetes.io/component": component,
        }
        assert spread[0]["labelSelector"] == {"matchLabels": selector}
        assert spread[0]["whenUnsatisfiable"] == "DoNotSchedule"
        assert spread[1]["labelSelector"] == {"matchLabels": {"tier": "identity"}}


@pytest.mark.parametrize("timeout", [0, 0.2, 0.5, 10, 12.5, 600, None])
@pytest.mark.parametrize(("separate", "outbox"), [(False, "on"), (True, "on"), (False, "off")])
def test_the_grace_period_is_the_shutdown_the_pods_get(
    timeout: float | None, separate: bool, outbox: str
) -> None:
    """After SIGTERM, `serve` waits up to the shutdown timeout for the requests in flight,
    then, when it runs the forwarders, up to as long again for their last batches;
    `forward` waits once. The grace period is the preStop pause, those waits (rounded up to
    a second) and 5 s more: neither cut short nor padded, 0 included ("wait for nothing",
    not "unset")."""
    values = merge(
        ci_values("forwarder"),
        {
            "forwarder": {"enabled": separate},
            "config": {"shutdownTimeout": timeout, "outbox": outbox},
        },
    )
    objects = render(values)
    workloads = [o for o in objects if o["kind"] == "Deployment"]
    assert len(workloads) == (2 if separate else 1)
    for workload in workloads:
        pod = pod_spec(workload)
        (container,) = pod["containers"]
        settings = load_settings(environment(objects, container))
        forward = container["args"] == ["forward"]
        in_serve = settings.outbox.enabled and settings.outbox.forwarder_in_serve
        waits = 2 if in_serve and not forward else 1
        pause = 0 if forward else values.get("lifecycle", {}).get("preStopSeconds", 5)
        expected = pause + math.ceil(waits * settings.shutdown_timeout) + 5
        assert pod["terminationGracePeriodSeconds"] == expected, workload["metadata"]["name"]


async def test_serve_waits_for_its_requests_then_as_long_for_its_forwarders(
    tmp_path: Path,
) -> None:
    """The waits the grace period above counts, against a real `serve` on a real Redis: a
    request whose body is still arriving, and a batch its destination holds, each take the
    whole shutdown timeout, one after the other."""
    timeout = 2.0
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        async with running_collector() as collector:
            collector.plan = [Answer(hold=60)]
            env = redis_env(
                redis,
                IDENTITY_DESTINATION_URL=collector.url,
                IDENTITY_DESTINATION_WRITE_KEY=COLLECTOR_WRITE_KEY,
                IDENTITY_BATCH_MAX_WAIT="0.01",
                IDENTITY_SHUTDOWN_TIMEOUT=str(timeout),
            )
            service = Service(tmp_path, env)
            try:
                body = {"anonymousId": "anon-chart-9f1e", "destination": CHECKOUT_URL}
                status, _ = await post(f"{service.url}/v1/handoffs", body, WRITE_KEYS["shop"])
                assert status == 201, service.stderr
                deadline = time.monotonic() + 10
                while not collector.requests:  # the batch is held from now on
                    assert time.monotonic() < deadline, service.stderr
                    await asyncio.sleep(0.02)
                with socket.create_connection(("127.0.0.1", service.port)) as client:
                    client.sendall(
                        b"POST /v1/handoffs HTTP/1.1\r\nHost: identity\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{"
                    )
                    await asyncio.sleep(0.2)
                    started = time.monotonic()
                    service.terminate()
                    assert await asyncio.to_thread(service.process.wait, 20) == 0
                    stopped = time.monotonic() - started
            finally:
                service.stop()
    finally:
        redis.stop()
    assert 2 * timeout <= stopped < 2.75 * timeout, service.stderr


def test_the_image_is_the_chart_app_version_unless_a_digest_is_given() -> None:
    values = ci_values("external-redis")
    app_version = chart().metadata["appVersion"]
    (container,) = pod_spec(find(render(values), "Deployment"))["containers"]
    assert container["image"] == f"ghcr.io/identity-service/identity-service:{app_version}"
    digest = "sha256:" + "ab" * 32
    values["image"] = {**chart().values["image"], "digest": digest}
    (container,) = pod_spec(find(render(values), "Deployment"))["containers"]
    assert container["image"] == f"ghcr.io/identity-service/identity-service@{digest}"


def environment(objects: list[Manifest], container: dict[str, Any]) -> dict[str, str]:
    """What the kubelet would give ``container``: its envFrom, then env with $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(find(objects, "Secret", source["secretRef"]["name"])["stringData"])
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = find(objects, "Secret", ref["name"])["stringData"][ref["key"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
    return env


@pytest.mark.parametrize("name", ["external-redis", "internal-redis", "forwarder", "everything"])
def test_the_service_accepts_the_settings_the_pods_get(name: str) -> None:
    values = ci_values(name)
    objects = render(values)
    for workload, container in containers(objects):
        if container["name"] not in ("identity-service", "forwarder"):
            continue
        env = environment(objects, container)
        # Raises ConfigError with every problem (a metrics port that is the API's, too).
        is_web = workload["metadata"]["name"] == FULLNAME
        settings = load_settings(env, port=8080 if is_web else None)
        assert settings.secret == values["secret"].encode()
        assert {s.name for s in settings.sources} == set(values["sources"])
        assert settings.redis is not None
        password = values["redis"].get("auth", {}).get("password")
        if password:
            assert f":{password}@" in settings.redis.url
        if values["redis"].get("internal", {}).get("enabled"):
            assert settings.redis.url.endswith(f"@{FULLNAME}-redis:6379/0")
        separate = values.get("forwarder", {}).get("enabled", False)
        assert settings.outbox.forwarder_in_serve is not (separate and is_web)
        if not is_web:
            assert container["args"] == ["forward"]
            assert env["IDENTITY_FORWARDER_METRICS_PORT"] == "9464"
        else:
            assert settings.metrics_port == 9464
        destinations = values.get("destinations", {})
        http = {d.name: d.write_key for d in settings.outbox.destinations if d.kind == "http"}
        assert http == {n: d["writeKey"] for n, d in destinations.items()}


def test_config_values_are_the_service_settings_and_numbers_stay_numbers() -> None:
    values = ci_values("external-redis")
    names = {key: re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower() for key in chart().values["config"]}
    assert set(names.values()) <= SETTING_NAMES
    values["config"] = {"maxConnections": 1_000_000, "redisTimeout": 2.5, "logLevel": None}
    objects = render(values)
    data = find(objects, "ConfigMap")["data"]
    assert data["IDENTITY_MAX_CONNECTIONS"] == "1000000"  # not Go's 1e+06
    assert data["IDENTITY_REDIS_TIMEOUT"] == "2.5"
    assert "IDENTITY_LOG_LEVEL" not in data  # null: the service's default
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    settings = load_settings(environment(objects, container))
    assert settings.max_connections == 1_000_000
    assert settings.log_level == "info"


@pytest.mark.parametrize(
    ("value", "written", "networks"),
    [
        (None, None, [str(ipaddress.ip_network(n)) for n in DEFAULT_TRUSTED_PROXIES]),
        (["10.244.0.0/16", "fd00::/8"], "10.244.0.0/16,fd00::/8", ["10.244.0.0/16", "fd00::/8"]),
        (["10.244.0.0/16"], "10.244.0.0/16", ["10.244.0.0/16"]),
        ("10.244.0.0/16, 192.0.2.7", "10.244.0.0/16, 192.0.2.7", ["10.244.0.0/16", "192.0.2.7/32"]),
        ("off", "off", []),
    ],
)
def test_the_trusted_proxies_reach_the_service_as_listed(
    value: Any, written: str | None, networks: list[str]
) -> None:
    """``config.trustedProxies``, a list or the service's own comma-separated text, is
    ``IDENTITY_TRUSTED_PROXIES`` as the service reads it; null leaves its default."""
    values = merge(ci_values("external-redis"), {"config": {"trustedProxies": value}})
    chart().validate_schema(chart().merge_values(values))
    objects = render(values)
    assert find(objects, "ConfigMap")["data"].get("IDENTITY_TRUSTED_PROXIES") == written
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    settings = load_settings(environment(objects, container))
    assert [str(network) for network in settings.trusted_proxies.networks] == networks


@pytest.mark.parametrize(
    "value",
    [
        "10.0.0.0/8", "::1", " fd00::/8 ,10.0.0.0/8", "OFF", " off ", "2001:db8::/32",
        "10.0.0.0/255.0.0.0", "fe80::1%eth0", "::ffff:10.0.0.4", "192.0.2.7/32",
        # The service refuses these, the schema cannot tell: the pod says why at start.
        "10.0.0.1/8", "10.0.0.0/33", "::ffff:10.0.0.0/104", "1.2.3",
        # Both refuse these.
        "off, 10.0.0.0/8", "10.0.0.0/8,", "[::1]", "proxy.example.com", "none",
    ],
)  # fmt: skip
def test_the_schema_takes_every_trusted_proxy_the_service_takes(value: str) -> None:
    """As text or as a list; what the service refuses, the schema may take (it cannot read
    a network's host bits)."""
    if not starts_with({"IDENTITY_TRUSTED_PROXIES": value}):
        return
    base = chart().merge_values(ci_values("external-redis"))
    for form in (value, value.split(",")):
        assert schema_accepts(merge(base, {"config": {"trustedProxies": form}})), form


def test_the_notes_ask_for_the_trusted_proxies_with_amp() -> None:
    """With AMP and the default trusted proxies, any pod could claim any client address."""
    values = ci_values("external-redis")
    notes = render_files(values)["identity-service/templates/NOTES.txt"]
    assert ("config.trustedProxies" in notes) is bool(values.get("amp"))
    amp = {"amp": {"public_url": "https://www.example.com/identity"}}
    notes = render_files(values | amp)["identity-service/templates/NOTES.txt"]
    assert "config.trustedProxies to your ingress controller pods' network" in notes
    config = merge(values, {"config": {"trustedProxies": ["10.244.0.0/16"]}})
    notes = render_files(config | amp)["identity-service/templates/NOTES.txt"]
    assert "trustedProxies" not in notes


def secret_values(values: dict[str, Any]) -> list[str]:
    """Every secret the values hold."""
    found = [values.get("secret", ""), values.get("redis", {}).get("auth", {}).get("password", "")]
    found += [s["writeKeyHash"] for s in values.get("sources", {}).values()]
    found += [d["writeKey"] for d in values.get("destinations", {}).values()]
    return [value for value in found if value]


def test_no_secret_reaches_a_config_map_or_a_pod_spec(configuration: str) -> None:
    values = ci_values(configuration)
    objects = render(values)
    exposed = [o for o in objects if o["kind"] != "Secret"]
    for value in secret_values(values):
        for obj in exposed:
            assert value not in yaml.safe_dump(obj), f"a secret in {obj['kind']}"
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        assert not {
            "IDENTITY_SECRET",
            "IDENTITY_SOURCES",
            "IDENTITY_DESTINATIONS",
            "IDENTITY_AMP",
        } & set(config_map.get("data", {}))


def test_an_existing_secret_replaces_the_charts() -> None:
    objects = render(ci_values("existing-secret"))
    assert [o for o in objects if o["kind"] == "Secret"] == []
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    assert {"secretRef": {"name": "identity-service-secrets"}} in container["envFrom"]
    env = {var["name"]: var for var in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-credentials",
        "key": "password",
    }
    assert env["IDENTITY_REDIS_URL"]["value"] == (
        "rediss://identity:$(REDIS_PASSWORD)@redis.data.svc.cluster.local:6380/0?ssl_cert_reqs=required"
    )
    annotations = find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/config" in annotations and "checksum/secret" not in annotations


@pytest.mark.parametrize("password", ["p@ss:w/rd %#?&", "100%-sure", "plain-Pa55_word.~"])
async def test_a_percent_encoded_redis_password_is_accepted_and_reaches_redis_decoded(
    password: str, tmp_path: Path
) -> None:
    """values.yaml says: percent-encode the password's other characters. The schema takes
    the encoded form, the pod's URL carries it as given, and the service decodes it."""
    encoded = urllib.parse.quote(password, safe="")
    values = merge(ci_values("external-redis"), {"redis": {"auth": {"password": encoded}}})
    chart().validate_schema(chart().merge_values(values))
    objects = render(values)
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    url = environment(objects, container)["IDENTITY_REDIS_URL"]
    assert url == f"redis://:{encoded}@redis.data.svc.cluster.local:6379/0"

    redis = RedisServer(tmp_path)
    redis.start()
    async with Redis.from_url(redis.url) as admin:  # started open: its start pings it
        await admin.config_set("requirepass", password)
    local = url.replace("redis.data.svc.cluster.local:6379", f"127.0.0.1:{redis.port}")
    service = Service(tmp_path, redis_env_for(local))
    try:
        body = {"anonymousId": "anon-chart-5c2d", "destination": CHECKOUT_URL}
        status, _ = await post(f"{service.url}/v1/handoffs", body, WRITE_KEYS["shop"])
        assert status == 201, service.stderr
    finally:
        assert await asyncio.to_thread(service.stop) == 0, service.stderr
        redis.stop()
    assert encoded not in service.stderr and password not in service.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://sentinel-0.redis:26379,sentinel-1.redis:26379/idsvc/0",
        "rediss+cluster://redis-0.redis:6379,redis-1.redis:6379",
    ],
)
def test_sentinel_and_cluster_urls_get_the_password_too(url: str) -> None:
    values = ci_values("existing-secret")
    values["redis"]["url"] = url
    values["config"] = {**values.get("config", {}), "redisShards": 48, "redisWait": "1,50"}
    objects = render(values)
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    env = {var["name"]: var for var in container["env"]}
    scheme, _, rest = url.partition("://")
    assert env["IDENTITY_REDIS_URL"]["value"] == f"{scheme}://identity:$(REDIS_PASSWORD)@{rest}"
    data = find(objects, "ConfigMap")["data"]
    assert (data["IDENTITY_REDIS_SHARDS"], data["IDENTITY_REDIS_WAIT"]) == ("48", "1,50")


def checksums(values: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = find(render(values), "Deployment")["spec"]["template"][
        "metadata"
    ]["annotations"]
    return annotations


def test_a_change_of_settings_or_secrets_rolls_the_pods() -> None:
    values = ci_values("forwarder")
    before = checksums(values)
    config_changed = copy.deepcopy(values)
    config_changed["config"] = {"logLevel": "debug"}
    after_config = checksums(config_changed)
    assert after_config["checksum/config"] != before["checksum/config"]
    assert after_config["checksum/secret"] == before["checksum/secret"]
    secret_changed = {**values, "secret": "another-server-secret-0123456789abcdefgh"}
    after_secret = checksums(secret_changed)
    assert after_secret["checksum/secret"] != before["checksum/secret"]
    assert after_secret["checksum/config"] == before["checksum/config"]
    forwarder = find(render(secret_changed), "Deployment", f"{FULLNAME}-forwarder")
    assert forwarder["spec"]["template"]["metadata"]["annotations"] == after_secret


def test_every_optional_object_is_made_when_asked() -> None:
    objects = render(ci_values("everything"))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds >= {
        ("Deployment", FULLNAME),
        ("Deployment", f"{FULLNAME}-forwarder"),
        ("Service", FULLNAME),
        ("Service", f"{FULLNAME}-forwarder"),
        ("Service", f"{FULLNAME}-metrics"),
        ("Service", f"{FULLNAME}-redis"),
        ("StatefulSet", f"{FULLNAME}-redis"),
        ("ServiceAccount", FULLNAME),
        ("ConfigMap", FULLNAME),
        ("ConfigMap", f"{FULLNAME}-dashboard"),
        ("Secret", FULLNAME),
        ("Secret", f"{FULLNAME}-redis-auth"),
        ("HorizontalPodAutoscaler", FULLNAME),
        ("PodDisruptionBudget", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("NetworkPolicy", f"{FULLNAME}-redis"),
        ("ServiceMonitor", FULLNAME),
        ("PrometheusRule", FULLNAME),
        ("Pod", f"{FULLNAME}-test-readyz"),
    }
    # The autoscaler owns the replica count.
    assert "replicas" not in find(objects, "Deployment")["spec"]
    dashboard = find(objects, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_unready_web_pods_do_not_hold_node_drains() -> None:
    """When Redis is away every web pod is unready: with Kubernetes's default policy the
    budget then allows no eviction, and every node drain waits for Redis. An unready pod
    serves nothing, so the budget lets it be evicted."""
    pdb = find(render(ci_values("external-redis")), "PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    values = ci_values("external-redis")
    values["podDisruptionBudget"] = {"unhealthyPodEvictionPolicy": "IfHealthyBudget"}
    pdb = find(render(values), "PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "IfHealthyBudget"


def test_the_in_chart_redis_keeps_an_append_only_file_on_its_volume() -> None:
    objects = render(ci_values("internal-redis"))
    redis = find(objects, "StatefulSet", f"{FULLNAME}-redis")
    (container,) = pod_spec(redis)["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert container["image"].startswith("docker.io/library/redis:7.4.6@sha256:")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert claim["metadata"]["name"] == "data"


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """``text`` with the kubelet's $(VAR) references to ``env`` expanded (others left)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


@pytest.mark.parametrize(
    "password", ["p@ss:w/rd %#?&", "100%-sure", "plain-Pa55_word.~", '"quoted" \\ é', None]
)
def test_the_in_chart_redis_takes_the_password_the_service_sends(
    password: str | None, tmp_path: Path
) -> None:
    """The password is percent-encoded in the values and the Secret, as the URL carries it;
    the service decodes it, so the in-chart Redis must require it decoded. Runs the rendered
    Redis container's command (its paths moved into tmp_path) with a real redis-server, and
    connects with the web pod's URL and with the probes' commands; without the password
    Redis answers nothing. None: no password given, the one the chart makes."""
    values = ci_values("internal-redis")
    if password is not None:
        encoded = urllib.parse.quote(password, safe="")
        values = merge(values, {"redis": {"auth": {"password": encoded}}})
    chart().validate_schema(chart().merge_values(values))
    objects = render(values)
    if password is None:
        encoded = redis_password(objects)
    (redis,) = pod_spec(find(objects, "StatefulSet", f"{FULLNAME}-redis"))["containers"]
    env = environment(objects, redis)
    assert env["REDIS_PASSWORD"] == encoded
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()

    def local(part: str) -> str:
        part = kubelet_expand(part, env).replace(f"{TMP_MOUNT}/", f"{tmp_path}/")
        return str(data) if part == "/data" else part

    command = [local(part) for part in redis["command"] + redis["args"]]
    command += ["--port", str(port), "--bind", "127.0.0.1", "--logfile", str(tmp_path / "log")]
    server = subprocess.Popen(command, env={"PATH": os.environ["PATH"], **env})
    try:
        deadline = time.monotonic() + 10
        url = environment(objects, pod_spec(find(objects, "Deployment"))["containers"][0])[
            "IDENTITY_REDIS_URL"
        ].replace(f"{FULLNAME}-redis:6379", f"127.0.0.1:{port}")
        settings = load_settings({"IDENTITY_SECRET": "s" * 32, "IDENTITY_REDIS_URL": url})
        assert settings.redis is not None
        client = SyncRedis.from_url(settings.redis.url)
        while True:
            try:
                assert client.ping() is True  # AuthenticationError if they disagree
                break
            except redis_exceptions.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "no redis-server"
                time.sleep(0.05)
        client.close()
        anonymous = SyncRedis(host="127.0.0.1", port=port)
        with pytest.raises(redis_exceptions.AuthenticationError):
            anonymous.get("idsvc:any")
        anonymous.close()
        probes = {}
        for kind in ("livenessProbe", "readinessProbe"):
            probe = [local(part) for part in redis[kind]["exec"]["command"]]
            probe[-1] = probe[-1].replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {port}")
            probes[kind] = probe
            ready = subprocess.run(probe, env={"PATH": os.environ["PATH"], **env}, check=False)
            assert ready.returncode == 0, kind
        # The probes do judge the password: with another one they fail.
        (tmp_path / "redis-auth.conf").write_text('requirepass "not-it"\n')
        for kind, probe in probes.items():
            ready = subprocess.run(probe, env={"PATH": os.environ["PATH"], **env}, check=False)
            assert ready.returncode != 0, kind
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("password", ["100%", "p%4", "a b", "p\nq"])
def test_the_in_chart_redis_refuses_a_password_that_is_not_percent_encoded(
    password: str, tmp_path: Path
) -> None:
    """The schema refuses such a password in the values; one in an existingSecret is
    refused by the container's start, before Redis would read it otherwise than the
    service."""
    objects = render(ci_values("internal-redis"))
    (redis,) = pod_spec(find(objects, "StatefulSet", f"{FULLNAME}-redis"))["containers"]
    command = [part.replace(f"{TMP_MOUNT}/", f"{tmp_path}/") for part in redis["command"]]
    started = subprocess.run(
        [*command, "--version"],
        env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
        capture_output=True,
        text=True,
        check=False,
    )
    assert started.returncode == 1
    assert "percent-encoded" in started.stderr
    assert not (tmp_path / "redis-auth.conf").exists()


# -- The in-chart Redis's password: given, in a Secret of yours, or made by the chart ------

REDIS_AUTH = f"{FULLNAME}-redis-auth"
GENERATED_PASSWORD = re.compile(r"^[A-Za-z0-9]{32}$")
DERIVED_PASSWORD = re.compile(r"^[0-9a-f]{32}$")


def redis_password(objects: list[Manifest]) -> str:
    """The password in the chart's Redis password Secret."""
    password: str = find(objects, "Secret", REDIS_AUTH)["stringData"]["redis-password"]
    return password


def pod_annotations(objects: list[Manifest]) -> dict[str, dict[str, str]]:
    """Each workload's pod template annotations (its checksums), by kind and name."""
    return {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["metadata"]["annotations"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def no_manifest_but_the_secret_holds(password: str, files: dict[str, str]) -> None:
    """``password`` is in clear in the Redis password Secret only (NOTES.txt included)."""
    holding = sorted(path for path, text in files.items() if password in text)
    assert holding == ["identity-service/templates/secret.yaml"]
    (secret,) = [o for o in manifests(files) if password in yaml.safe_dump(o)]
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", REDIS_AUTH)


def test_the_in_chart_redis_requires_a_password_the_chart_makes_by_default() -> None:
    """Without redis.auth.password or existingSecret, the chart makes a password (as
    bitnami's redis chart does): Redis requires it (requirepass, read from the Secret
    through the environment), both its probes authenticate, the web and forwarder pods send
    it, and no manifest but the Secret holds it."""
    values = merge(ci_values("internal-redis"), {"forwarder": {"enabled": True}})
    assert not values["redis"].get("auth")
    files = render_files(values)
    objects = manifests(files)
    password = redis_password(objects)
    assert DERIVED_PASSWORD.match(password), password
    (redis,) = pod_spec(find(objects, "StatefulSet", f"{FULLNAME}-redis"))["containers"]
    env = {var["name"]: var for var in redis["env"]}
    reference = {"name": REDIS_AUTH, "key": "redis-password"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == reference
    assert redis["command"][:2] == ["sh", "-c"]
    assert "requirepass" in redis["command"][2] and "$REDIS_PASSWORD" in redis["command"][2]
    for kind in ("livenessProbe", "readinessProbe"):
        (*_, script) = redis[kind]["exec"]["command"]
        assert "AUTH" in script and f"{TMP_MOUNT}/redis-auth.conf" in script, kind
    for name in (FULLNAME, f"{FULLNAME}-forwarder"):
        (container,) = pod_spec(find(objects, "Deployment", name))["containers"]
        env = {var["name"]: var for var in container["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == reference
        url = environment(objects, container)["IDENTITY_REDIS_URL"]
        assert url == f"redis://:{password}@{FULLNAME}-redis:6379/0"
    no_manifest_but_the_secret_holds(password, files)
    notes = files["identity-service/templates/NOTES.txt"]
    assert f"in the Secret {REDIS_AUTH} (key redis-password)" in notes
    assert "made from the server secret" in notes and "random" not in notes


def test_renders_without_a_cluster_agree_on_the_password_made_from_the_server_secret() -> None:
    """`helm template`, Argo CD: lookup finds nothing, so a random password would be new on
    every render, and with it the Secret and the checksums that restart Redis and roll every
    pod on each sync. With the server secret in the values the password is derived from it:
    two renders of the default (CI) values are the same, checksums and all."""
    for name in ("internal-redis", "everything"):
        values = merge(ci_values(name), {"forwarder": {"enabled": True}})
        if name == "everything":  # its Redis password given: taken out
            del values["redis"]["auth"]["password"]
        first, second = render_files(values), render_files(values)
        assert first == second, name
        objects = manifests(first)
        assert DERIVED_PASSWORD.match(redis_password(objects)), name
        annotations = pod_annotations(objects)
        assert {"checksum/secret", "checksum/redis-auth"} <= {
            key for each in annotations.values() for key in each
        }
        assert annotations == pod_annotations(render(copy.deepcopy(values))), name


def test_the_derived_redis_password_follows_the_server_secret_one_way() -> None:
    """Another server secret (or release) gives another Redis password, and the password is
    not the server secret, nor holds it, nor any 8 characters of it (a one-way hash)."""
    values = ci_values("internal-redis")
    files = render_files(values)
    password = redis_password(manifests(files))
    server_secret = values["secret"]
    assert redis_password(render(values)) == password  # a function of the values
    assert password != server_secret and server_secret not in password
    assert not any(server_secret[i : i + 8] in password for i in range(len(server_secret) - 7))
    assert password not in server_secret
    no_manifest_but_the_secret_holds(password, files)
    other = merge(values, {"secret": "another-server-secret-0123456789abcdefgh"})
    assert redis_password(render(other)) not in (password, other["secret"])
    renamed = merge(values, {"fullnameOverride": "identity"})
    found = [o for o in render(renamed) if o["kind"] == "Secret"]
    derived = {o["metadata"]["name"]: o["stringData"] for o in found}
    assert derived["identity-redis-auth"]["redis-password"] != password


def test_with_the_server_secret_in_an_existing_secret_the_password_is_random() -> None:
    """The chart cannot read the server secret from the user's Secret: its own Redis
    password is then random (kept by lookup only), and NOTES.txt says what a render without
    a cluster needs."""
    values = merge(ci_values("internal-redis"), {"existingSecret": "identity-secrets"})
    files = render_files(values)
    password = redis_password(manifests(files))
    assert GENERATED_PASSWORD.match(password) and not DERIVED_PASSWORD.match(password)
    assert redis_password(render(values)) != password
    no_manifest_but_the_secret_holds(password, files)
    notes = files["identity-service/templates/NOTES.txt"]
    assert "random" in notes and "set redis.auth.password or redis.auth.existingSecret" in notes


def test_the_redis_password_precedence(tmp_path: Path) -> None:
    """redis.auth.existingSecret, then redis.auth.password, then the chart's Secret read back
    (lookup), then the one derived from the server secret."""
    values = ci_values("internal-redis")
    derived = redis_password(render(values))
    empty = chart_in_a_cluster(tmp_path / "empty", {})
    assert redis_password(render(values, of=empty, upgrade=True)) == derived
    held = chart_in_a_cluster(
        tmp_path, {f"identity/{REDIS_AUTH}": {"redis-password": b64("held0password")}}
    )
    assert redis_password(render(values, of=held, upgrade=True)) == "held0password"
    given = merge(values, {"redis": {"auth": {"password": "given0password"}}})
    assert redis_password(render(given, of=held, upgrade=True)) == "given0password"
    theirs = merge(given, {"redis": {"auth": {"existingSecret": "redis-credentials"}}})
    for objects in (render(theirs), render(theirs, of=held, upgrade=True)):
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [FULLNAME]
        assert not any(p in yaml.safe_dump(objects) for p in (derived, "given0password"))


def test_the_checksums_are_of_the_password_the_secret_holds() -> None:
    """The password is made once per render: the checksums that roll the pods and the
    in-chart Redis hash the one in the Secret, so they are those of the same password
    given in the values, and the first upgrade, which reads it back, rolls nothing."""
    values = merge(ci_values("internal-redis"), {"forwarder": {"enabled": True}})
    objects = render(values)
    given = merge(values, {"redis": {"auth": {"password": redis_password(objects)}}})
    assert pod_annotations(render(given)) == pod_annotations(objects)


def test_an_existing_secret_gives_the_in_chart_redis_its_password() -> None:
    values = merge(
        ci_values("internal-redis"),
        {"redis": {"auth": {"existingSecret": "redis-credentials"}}},
    )
    values["redis"]["auth"]["existingSecretPasswordKey"] = "password"
    objects = render(values)
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [FULLNAME]
    reference = {"name": "redis-credentials", "key": "password"}
    for workload in ("StatefulSet", "Deployment"):
        (container,) = pod_spec(next(o for o in objects if o["kind"] == workload))["containers"]
        env = {var["name"]: var for var in container["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == reference, workload
    # Nothing random: renders agree.
    assert pod_annotations(render(values)) == pod_annotations(objects)


def test_an_external_redis_without_a_password_is_left_as_it_was() -> None:
    objects = render(ci_values("external-redis"))
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [FULLNAME]
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    assert [var["name"] for var in container["env"]][:1] == ["IDENTITY_REDIS_URL"]
    assert environment(objects, container)["IDENTITY_REDIS_URL"] == (
        "redis://redis.data.svc.cluster.local:6379/0"
    )


def chart_in_a_cluster(tmp_path: Path, secrets: dict[str, dict[str, str]]) -> helm_python.Chart:
    """A copy of the chart whose one ``lookup`` answers as an API server holding
    ``secrets`` (``<namespace>/<name>``: their data, base64 as the API gives it) would.
    Offline renders' lookup answers nothing, and the SDK's server-side dry run needs a
    cluster: this replaces the call itself, its arguments kept, and nothing else."""
    copied = tmp_path / "identity-service"
    shutil.copytree(CHART_DIR, copied)
    templates = copied / "templates"
    calls = {
        path.name: len(re.findall(r"\blookup\s+\"", path.read_text()))
        for path in templates.rglob("*")
        if path.is_file()
    }
    assert {name: n for name, n in calls.items() if n} == {"_helpers.tpl": 1}
    helpers = templates / "_helpers.tpl"
    call = re.compile(r'lookup "v1" "Secret" (\S+) (\(include "[\w.-]+" \.\))')
    text, replaced = call.subn(
        r'(include "test.lookup" (list \1 \2) | fromJson)', helpers.read_text()
    )
    assert replaced == 1
    helpers.write_text(text)
    objects = {
        key: {"apiVersion": "v1", "kind": "Secret", "data": data} for key, data in secrets.items()
    }
    (templates / "_test_lookup.tpl").write_text(
        '{{- define "test.lookup" -}}\n'
        f"{{{{- $secrets := {json.dumps(json.dumps(objects))} | fromJson }}}}\n"
        '{{- get $secrets (join "/" .) | default dict | toJson }}\n'
        "{{- end }}\n"
    )
    return helm_python.Chart.load(copied)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_an_upgrade_keeps_the_password_the_cluster_holds(tmp_path: Path) -> None:
    """`helm upgrade` reads the Secret back (lookup, as bitnami's
    common.secrets.passwords.manage does) and keeps its password: the render is the one
    with that password given, so nothing rolls. Only the release's own Secret counts."""
    values = merge(ci_values("internal-redis"), {"forwarder": {"enabled": True}})
    old = "kept0password0from0the0cluster01"
    held = chart_in_a_cluster(tmp_path, {f"identity/{REDIS_AUTH}": {"redis-password": b64(old)}})
    upgraded = render(values, of=held, upgrade=True)
    assert redis_password(upgraded) == old
    given = render(merge(values, {"redis": {"auth": {"password": old}}}))
    assert pod_annotations(upgraded) == pod_annotations(given)
    # A password given in the values wins (a rotation): Redis and the pods roll.
    rotated = render(merge(values, {"redis": {"auth": {"password": "n3w"}}}), of=held)
    assert redis_password(rotated) == "n3w"
    before, after = pod_annotations(upgraded), pod_annotations(rotated)
    assert all(before[workload] != after[workload] for workload in before)


@pytest.mark.parametrize(
    "secrets",
    [
        {},  # deleted: `helm upgrade` then makes a new one (a rotation)
        {f"other/{REDIS_AUTH}": {"redis-password": b64("not-this-release-s")}},
        {"identity/identity-service-redis": {"redis-password": b64("not-this-secret-s")}},
        {f"identity/{REDIS_AUTH}": {"password": b64("not-this-key-at-all")}},
    ],
)
def test_an_upgrade_without_the_secret_makes_a_new_password(
    secrets: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """Nothing of this release's to read back: the password derived from the server secret
    (a rotation only if the server secret changed), or a random one with the server secret
    in an existingSecret."""
    held = chart_in_a_cluster(tmp_path, secrets)
    values = ci_values("internal-redis")
    upgraded = render(values, of=held, upgrade=True)
    assert redis_password(upgraded) == redis_password(render(values))
    assert DERIVED_PASSWORD.match(redis_password(upgraded))
    theirs = merge(values, {"existingSecret": "identity-secrets"})
    upgraded = render(theirs, of=held, upgrade=True)
    assert GENERATED_PASSWORD.match(redis_password(upgraded))
    assert not DERIVED_PASSWORD.match(redis_password(upgraded))


# -- OpenShift: the pods' user and group IDs left to the platform -------------------------

OPENSHIFT = ["security.openshift.io/v1"]
FIXED_IDS = {"runAsUser", "runAsGroup", "fsGroup", "seLinuxOptions"}


@pytest.mark.parametrize(
    ("mode", "api_versions", "adapted"),
    [
        (None, [], False),  # the default, auto, off OpenShift
        (None, OPENSHIFT, True),
        ("auto", [], False),
        ("auto", OPENSHIFT, True),
        ("force", [], True),
        ("force", OPENSHIFT, True),
        ("disabled", [], False),
        ("disabled", OPENSHIFT, False),
    ],
)
def test_on_openshift_the_pods_leave_their_ids_to_the_platform(
    mode: str | None, api_versions: list[str], adapted: bool
) -> None:
    """OpenShift's restricted-v2 SCC gives each pod a UID of the namespace's range (GID 0,
    an fsGroup of its own) and refuses pods that ask for other IDs. Adapted (auto on a
    cluster serving security.openshift.io/v1, or force), no pod or container asks for any;
    everything else that locks the pods down stays."""
    values = ci_values("everything")
    if mode is not None:
        values["global"] = {"compatibility": {"openshift": {"adaptSecurityContext": mode}}}
    chart().validate_schema(chart().merge_values(values))
    objects = render(values, api_versions=api_versions)
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    assert {w["kind"] for w in workloads} == set(WORKLOADS)
    expected_ids = {f"{FULLNAME}-redis": 999}
    for workload in workloads:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)
        pod = pod_spec(workload)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        if adapted:
            assert not FIXED_IDS & security.keys(), where
        else:
            uid = expected_ids.get(workload["metadata"]["name"], 10001)
            assert (security["runAsUser"], security["runAsGroup"]) == (uid, uid), where
            assert security.get("fsGroup", uid) == uid, where
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert not FIXED_IDS & context.keys(), where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
    if adapted:
        assert not re.search(r"runAsUser|runAsGroup|fsGroup", yaml.safe_dump_all(objects))


@pytest.mark.parametrize(
    "globals_",
    [
        {"imageRegistry": "registry.example.com"},  # a parent chart's or a sibling's
        {"compatibility": {"omitEmptySeLinuxOptions": True}},  # bitnami's other one
        {"compatibility": {"openshift": {"adaptSecurityContext": "disabled"}}},
    ],
)
def test_the_schema_lets_other_charts_globals_through(globals_: dict[str, Any]) -> None:
    """Globals are shared with a parent chart and its other subcharts: keys this chart
    does not read are theirs, not typos."""
    values = merge(ci_values("external-redis"), {"global": globals_})
    chart().validate_schema(chart().merge_values(values))


@pytest.mark.parametrize(("low", "high", "renders"), [(5, 4, False), (4, 4, True), (1, 2, True)])
def test_an_autoscaler_minimum_above_its_maximum_stops_the_render(
    low: int, high: int, renders: bool
) -> None:
    values = ci_values("everything")
    values["autoscaling"] = {"enabled": True, "minReplicas": low, "maxReplicas": high}
    if renders:
        hpa = find(render(values), "HorizontalPodAutoscaler")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (low, high)
    else:
        with pytest.raises(helm_python.HelmError, match=r"minReplicas \(5\) is above"):
            render(values)


@pytest.mark.parametrize("cpu", [None, 0])
def test_an_autoscaler_without_a_cpu_request_stops_the_render(cpu: int | None) -> None:
    """The autoscaler's target is a share of the CPU request: without a request it never
    scales, and says so only in its status. ``null`` removes the chart's default request
    (``--set resources.requests.cpu=null``)."""
    values = ci_values("everything")
    values["resources"] = {"requests": {"cpu": cpu, "memory": "128Mi"}}
    with pytest.raises(helm_python.HelmError, match=r"autoscaling.enabled needs resources"):
        render(values)
    values["autoscaling"]["enabled"] = False  # without an autoscaler, no request is needed
    assert not [o for o in render(values) if o["kind"] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize(
    ("interval", "timeout", "renders"),
    [
        ("10s", "30s", False),
        ("90s", "2m", False),
        ("1s", "1001ms", False),
        ("30s", "30s", True),
        ("1m", "59s", True),
        ("1s", "500ms", True),
    ],
)
def test_a_scrape_timeout_longer_than_the_interval_stops_the_render(
    interval: str, timeout: str, renders: bool
) -> None:
    """Prometheus refuses a scrape config whose scrape_timeout exceeds its interval."""
    values = ci_values("everything")
    values["metrics"]["serviceMonitor"] |= {"interval": interval, "scrapeTimeout": timeout}
    if renders:
        endpoints = find(render(values), "ServiceMonitor")["spec"]["endpoints"]
        assert {(e["interval"], e["scrapeTimeout"]) for e in endpoints} == {(interval, timeout)}
    else:
        with pytest.raises(helm_python.HelmError, match=r"scrapeTimeout .* is longer than"):
            render(values)


DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("release", "override"),
    [
        ("r" * 53, ""),  # Helm's longest release name, plus "-identity-service"
        ("shop", "o" * 63),
        ("shop", "o" * 45 + "-" + "o" * 6 + "-" + "o" * 10),  # cuts that would end in "-"
        ("shop", "o" * 47),
    ],
)
def test_long_names_leave_room_for_each_objects_suffix(release: str, override: str) -> None:
    """Services' names are DNS labels (63 characters at most); a StatefulSet's at most 52,
    for its pods' controller-revision-hash label (the name, "-" and 10 characters)."""
    values = ci_values("everything")
    values["fullnameOverride"] = override
    files = chart().render(values, name=release, namespace="identity", is_install=True)
    objects = manifests(files)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    services = {name for kind, name in names if kind == "Service"}
    assert len(services) == 4
    assert all(DNS_LABEL.match(name) and len(name) <= 63 for name in services), services
    (statefulset,) = [name for kind, name in names if kind == "StatefulSet"]
    assert len(statefulset) <= 52 and statefulset in services
    forwarder = find(objects, "Deployment", next(s for s in services if s.endswith("-forwarder")))
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    # The pods reach the Redis by its Service's name; the alerts select both jobs.
    (web,) = [o for o in objects if o["kind"] == "Deployment" and o is not forwarder]
    (container,) = pod_spec(web)["containers"]
    url = next(v["value"] for v in container["env"] if v["name"] == "IDENTITY_REDIS_URL")
    assert url.endswith(f"@{statefulset}:6379/0")
    rules = yaml.safe_dump(find(objects, "PrometheusRule", web["metadata"]["name"]))
    assert f'|{forwarder["metadata"]["name"]}"' in rules


@pytest.mark.parametrize(
    ("key", "override", "takes"),
    [
        ("nameOverride", "idsvc", True),
        ("nameOverride", "id-svc-2", True),
        ("nameOverride", "Identity", False),  # object names are lower case
        ("nameOverride", "id_svc", False),
        ("nameOverride", "id.svc", False),  # a Service's name is a DNS label: no dot
        ("fullnameOverride", "idsvc", True),
        ("fullnameOverride", "identity-eu-1", True),
        ("fullnameOverride", "Identity", False),
        ("fullnameOverride", "identity_eu", False),
        ("fullnameOverride", "identity.eu", False),
        ("fullnameOverride", "1identity", False),  # a Service's name starts with a letter
    ],
)
def test_the_schema_takes_only_name_overrides_kubernetes_takes(
    key: str, override: str, takes: bool
) -> None:
    """Object names are made of the overrides: Kubernetes refuses a name with an upper-case
    letter, an underscore or a dot (a Service's is a DNS label), or a Service's name that
    starts with a digit. The schema refuses those overrides at install, before any object
    is sent."""
    values = {**ci_values("everything"), key: override}
    if not takes:
        with pytest.raises(helm_python.HelmValuesError):
            chart().validate_schema(chart().merge_values(values))
        return
    chart().validate_schema(chart().merge_values(values))
    objects = render(values)
    for obj in objects:
        name = obj["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, (obj["kind"], name)


def test_the_helm_test_pod_calls_readyz_through_the_service() -> None:
    objects = render(ci_values("external-redis"))
    pod = find(objects, "Pod", f"{FULLNAME}-test-readyz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert f"http://{FULLNAME}:80/readyz" in container["args"][0]


def test_restricted_egress_still_reaches_dns_and_redis() -> None:
    objects = render(ci_values("everything"))
    policy = find(objects, "NetworkPolicy")
    ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])]
    assert {53, 6379, 443} <= set(ports)
    redis_policy = find(objects, "NetworkPolicy", f"{FULLNAME}-redis")
    (ingress,) = redis_policy["spec"]["ingress"]
    assert (
        ingress["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"]
        == "identity-service"
    )


def test_the_notes_say_how_to_check_the_install() -> None:
    notes = render_files(ci_values("external-redis"))["identity-service/templates/NOTES.txt"]
    assert "helm test identity-service --namespace identity" in notes
    assert "docs/operations.md" in notes


def test_the_default_values_lint_clean_and_refuse_to_render_with_what_to_set() -> None:
    """`helm install` with no value: lint finds nothing wrong with the chart, and the render
    stops on one of the messages docs/operations.md promises (no Redis, secret or source)."""
    report = helm_python.lint(CHART_DIR, {})
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    with pytest.raises(helm_python.HelmError) as refused:
        render({})
    assert re.search(
        r"set (secret \(the server secret|sources \(at least one|redis\.url \(an external)",
        str(refused.value),
    ), refused.value


@pytest.mark.parametrize(
    ("missing", "message"),
    [("redis", "set redis.url"), ("secret", "set secret"), ("sources", "set sources")],
)
def test_a_missing_essential_value_stops_the_render_with_what_to_set(
    missing: str, message: str
) -> None:
    values = ci_values("external-redis")
    del values[missing]
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


@pytest.mark.parametrize(
    "change",
    [
        {"replicas": 2},  # unknown key (replicaCount is the one)
        {"config": {"logLevl": "debug"}},  # unknown nested key
        {"redis": {"internal": {"enabled": True, "size": "1Gi"}}},
        {"replicaCount": "two"},  # wrong type
        {"config": {"workers": 1.5}},
        {"config": {"logLevel": "loud"}},
        {"image": {"tag": "latest"}},
        {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Always"}},
        {"service": {"externalTrafficPolicy": "Global"}},
        {"metricsPort": 8080},  # the API's port
        {"metricsPort": 80},
        {"metricsPort": "9464"},
        {"secret": "too-short"},
        {"sources": {"shop": {"writeKeyHash": "md5:abc", "origins": ["https://a.example"]}}},
        {"redis": {"url": "redis://user:password@redis:6379/0"}},  # credentials go in auth
        {"redis": {"url": "redis://:password@redis:6379/0"}},
        # A password parameter would be in the pod spec too (redis-py reads them all).
        {"redis": {"url": "redis://redis:6379/0?password=hunter2"}},
        {"redis": {"url": "rediss://redis:6380/0?ssl_cert_reqs=required&password=hunter2"}},
        {"redis": {"url": "redis://redis:6379/0?PassWord=hunter2"}},
        {"redis": {"url": "redis://redis:6379/0?pass%77ord=hunter2"}},  # parse_qs unquotes
        {"redis": {"url": "redis+sentinel://s-0.redis:26379/idsvc?sentinel_password=hunter2"}},
        {"redis": {"url": "redis+cluster://r-0.redis:7000?password=hunter2"}},
        {"redis": {"auth": {"password": "p@ss"}}},  # not percent-encoded
        {"redis": {"auth": {"password": "100%"}}},  # a % that starts no octet
        {"redis": {"auth": {"password": "p%4"}}},
        {"redis": {"auth": {"password": "p%zz"}}},
        {"config": {"trustedProxies": []}},  # off trusts none
        {"config": {"trustedProxies": ["ingress.example.com"]}},
        {"config": {"trustedProxies": ["10.0.0.0/8", ""]}},
        {"config": {"trustedProxies": "10.0.0.0/8; 10.1.0.0/16"}},
        {"config": {"trustedProxies": "none"}},
        {"config": {"trustedProxies": 10}},
        {"config": {"trustedProxies": ["10.0.0.1"] * 257}},
        # The key the chart keeps the password it works out under, per render.
        {"redis": {"auth": {"_resolvedPassword": "chosen-by-the-user"}}},
        {"global": {"compatibility": {"openshift": {"adaptSecurityContext": "yes"}}}},
        {"global": {"compatibility": {"openshift": {"adaptSecurityContext": "Force"}}}},
        {"global": {"compatibility": {"openshift": {"adaptSecurityContext": True}}}},
        {"global": {"compatibility": {"openshift": {"adaptSecurityContxt": "force"}}}},
    ],
)
def test_the_schema_refuses_invalid_values(change: dict[str, Any]) -> None:
    values = chart().merge_values(ci_values("external-redis"))
    merged = chart().merge_values({**values, **merge(values, change)})
    with pytest.raises(helm_python.HelmValuesError):
        chart().validate_schema(merged)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://redis.data:6380/0?ssl_cert_reqs=required",
        "redis://redis.data:6379/0?socket_timeout=2&client_name=idsvc",
        "redis+sentinel://s-0.redis:26379,s-1.redis:26379/idsvc/0?sentinel_username=watcher",
        "redis+cluster://r-0.redis:7000,r-1.redis:7001?ssl_cert_reqs=required",
        "redis://password-store.data:6379/0",  # a host may be named so
    ],
)
def test_the_schema_takes_redis_urls_without_a_password(url: str) -> None:
    values = chart().merge_values(merge(ci_values("external-redis"), {"redis": {"url": url}}))
    chart().validate_schema(values)


@pytest.mark.parametrize(
    ("topology", "base"),
    [
        ("single", "{scheme}://redis.data:6379/0"),
        ("sentinel", "{scheme}+sentinel://s-0.redis:26379,s-1.redis:26379/idsvc/0"),
        ("cluster", "{scheme}+cluster://r-0.redis:7000,r-1.redis:7001"),
    ],
)
def test_the_schema_takes_the_redis_url_parameters_the_service_takes(
    topology: str, base: str
) -> None:
    """The schema names the parameters a Redis URL takes (docs/redis-topologies.md): a
    redis.url that the service would refuse at start is refused at install, and none it
    takes is, but for the password parameters (the URL is in the pod spec)."""
    values = chart().merge_values(ci_values("external-redis"))
    wrong = []
    names = redis_url_parameters() | set(SENTINEL_PARAMETERS) | {"foo", "DB", "ssl_ca_path"}
    for name in sorted(names - {"password", "sentinel_password"}):
        scheme = "rediss" if name.startswith("ssl_") else "redis"
        value = (PARAMETER_VALUES.get(name) or "/tls/file.pem").partition("&")[0]
        for query in (f"{name}={value}", f"client_name=c&{name}={value}&protocol=2"):
            url = base.format(scheme=scheme) + "?" + query
            service_takes = starts_with({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": "s" * 32})
            schema_takes = schema_accepts(merge(values, {"redis": {"url": url}}))
            if schema_takes != service_takes:
                wrong.append(f"{url}: the schema {'takes' if schema_takes else 'refuses'} it")
    assert wrong == []


def test_the_schema_takes_the_redis_hosts_the_service_takes() -> None:
    """A host name longer than DNS allows (253 characters, 63 a label) in any node of any
    Redis URL form stopped every pod at start: refused at install, as the service does."""
    values = chart().merge_values(ci_values("external-redis"))
    wrong = []
    for host in HOST_PROBES:
        for url in (
            f"redis://{host}:6379/0", f"rediss://{host}", f"redis://{host}/2?protocol=3",
            f"redis+cluster://{host}:7000", f"rediss+cluster://r-0.redis:7000,{host}:7001",
            f"redis+sentinel://{host}:26379/idsvc/0", f"redis+sentinel://s-0:1,{host}:2/idsvc",
        ):  # fmt: skip
            service_takes = starts_with({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": "s" * 32})
            schema_takes = schema_accepts(merge(values, {"redis": {"url": url}}))
            if schema_takes != service_takes:
                wrong.append(f"{url}: the schema {'takes' if schema_takes else 'refuses'} it")
    assert wrong == []


@pytest.mark.parametrize(
    ("redis", "message"),
    [
        # The URL would have been built without the user name: refused instead.
        (
            {"url": "redis://redis.data:6379/0", "auth": {"username": "identity"}},
            "needs a password",
        ),
        (
            {"internal": {"enabled": True}, "auth": {"username": "identity", "password": "pw"}},
            "only the default user",
        ),
    ],
)
def test_a_redis_user_name_the_url_would_not_carry_stops_the_render(
    redis: dict[str, Any], message: str
) -> None:
    values = merge(ci_values("external-redis"), {"redis": redis})
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


@pytest.mark.parametrize("username", ["app:rw", "team/app", "a#b", "a?b", "50%off", "a$$b", "a b"])
def test_the_schema_refuses_a_redis_user_name_the_url_would_not_carry_as_given(
    username: str,
) -> None:
    """The user name goes into IDENTITY_REDIS_URL's user info as given, like the password:
    a ':' there splits it (the service would log in as "app" with "rw:<password>"), a '/',
    '?' or '#' ends it (the service refuses to start), a '%' starts an octet, a '$' is the
    kubelet's ("$$" becomes "$")."""
    values = merge(
        ci_values("external-redis"), {"redis": {"auth": {"username": username, "password": "pw"}}}
    )
    with pytest.raises(helm_python.HelmValuesError):
        chart().validate_schema(chart().merge_values(values))


@pytest.mark.parametrize(
    "username",
    [
        "identity",
        "ops.team_1~x-y",
        "app%3Arw",
        "a%40b%2Fc",
        # RFC 3986's sub-delims, which user info carries as they are (all but "$", which the
        # kubelet reads: "$$" becomes "$", "$(NAME)" a variable)
        "app+rw",
        "svc=identity;team",
        "o'neil(ops)*",
        "a!b&c,d",
    ],
)
def test_a_redis_user_name_reaches_the_service_as_written_percent_decoded(username: str) -> None:
    values = merge(
        ci_values("external-redis"), {"redis": {"auth": {"username": username, "password": "pw"}}}
    )
    chart().validate_schema(chart().merge_values(values))
    objects = render(values)
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    settings = load_settings(environment(objects, container))
    assert settings.redis is not None
    # As redis-py's parse_url reads the user info: split, then each part unquoted.
    parts = urllib.parse.urlsplit(settings.redis.node_url)
    credentials = urllib.parse.unquote(parts.username or ""), parts.password
    assert credentials == (urllib.parse.unquote(username), "pw")


def test_the_in_chart_redis_takes_its_default_user_by_name() -> None:
    values = merge(ci_values("internal-redis"), {"redis": {"auth": {"username": "default"}}})
    (container,) = pod_spec(find(render(values), "Deployment"))["containers"]
    url = next(v["value"] for v in container["env"] if v["name"] == "IDENTITY_REDIS_URL")
    assert url == f"redis://default:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"


# -- config.* against the service's own ranges ---------------------------------------------

# Values around the service's bounds (settings.py), besides each schema bound and its
# neighbours: whichever side is wrong, one of them lands between the two.
INTEGER_PROBES = (-1, 0, 1, 63, 64, 65, 255, 256, 999, 1000, 1001, 1023, 1024, 1025, 2500,
                  2501, 3600, 3601, 9999, 10_000, 10_001, 86_400, 86_401, 100_000,
                  1_048_576, 1_048_577, 1_000_000, 1_000_001)  # fmt: skip
NUMBER_PROBES = (-0.001, 0, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 59.5, 60, 60.5, 100,
                 300, 300.5, 600, 600.5, 3600, 3600.5, 86_400, 86_400.5)  # fmt: skip


def ranged_config() -> dict[str, dict[str, Any]]:
    """The schema's config.* keys with a minimum and a maximum."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    keys: dict[str, dict[str, Any]] = schema["properties"]["config"]["properties"]
    return {key: spec for key, spec in keys.items() if "minimum" in spec}


def starts_with(environ: dict[str, str]) -> bool:
    """Whether the service's settings take ``environ`` (it would start)."""
    try:
        load_settings(environ)
    except ConfigError:
        return False
    return True


def schema_accepts(values: dict[str, Any]) -> bool:
    """Whether the chart's schema takes ``values`` (merged with the chart's defaults)."""
    try:
        chart().validate_schema(values)
    except helm_python.HelmValuesError:
        return False
    return True


# Compared at start with one another (more than a batch's filling and sending before a
# reclaim): the schema takes each alone, the render refuses what the service refuses.
RENDER_CHECKED = ("reclaimIdle", "deliveryTimeout", "batchMaxWait")


def chart_takes(values: dict[str, Any]) -> bool:
    """Whether the chart takes ``values``: its schema, then its render."""
    if not schema_accepts(values):
        return False
    try:
        render(values)
    except helm_python.HelmError:
        return False
    return True


def setting_variable(key: str) -> str:
    return "IDENTITY_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()


def service_takes(key: str, value: float) -> bool:
    # The TTLs apart, so that neither is judged against the other's default.
    environ = {
        "IDENTITY_SECRET": "s" * 32,
        "IDENTITY_REDIS_URL": "redis://127.0.0.1:6379/0",
        "IDENTITY_DEFAULT_TTL": "1",
        "IDENTITY_MAX_TTL": "86400",
        setting_variable(key): repr(value),  # Go writes a float as repr does
    }
    return starts_with(environ)


@pytest.mark.parametrize("key", sorted(ranged_config()))
def test_the_schema_takes_each_config_number_the_service_takes(key: str) -> None:
    spec = ranged_config()[key]
    low, high = spec["minimum"], spec["maximum"]
    if "integer" in spec["type"]:
        probes = {*INTEGER_PROBES, low - 1, low, high, high + 1}
    else:
        probes = {*NUMBER_PROBES, math.nextafter(low, -math.inf), low, high}
        probes.add(math.nextafter(high, math.inf))
    base = chart().merge_values(ci_values("external-redis"))
    wrong = []
    takes = chart_takes if key in RENDER_CHECKED else schema_accepts
    for value in sorted(probes):
        chart_takes_it = takes(merge(base, {"config": {key: value}}))
        if chart_takes_it != service_takes(key, value):
            wrong.append(f"{value}: the chart {'takes' if chart_takes_it else 'refuses'} it")
    assert wrong == [], f"config.{key} vs {setting_variable(key)}"


@pytest.mark.parametrize("bound", ["minimum", "maximum"])
def test_the_service_starts_with_every_config_number_at_the_schemas_bound(bound: str) -> None:
    """Each number as the ConfigMap writes it (Go's formatting), read by the service."""
    config = {key: spec[bound] for key, spec in ranged_config().items()}
    if bound == "minimum":
        # The reclaim must wait out the shortest batch's filling and sending and a second
        # (RENDER_CHECKED): the least number of seconds above those at their minimum.
        config["reclaimIdle"] = 2
    values = merge(ci_values("external-redis"), {"config": config})
    chart().validate_schema(chart().merge_values(values))
    objects = render(values)
    (container,) = pod_spec(find(objects, "Deployment"))["containers"]
    load_settings(environment(objects, container))  # raises ConfigError on any refusal


@pytest.mark.parametrize(
    ("ttls", "renders"),
    [
        ({"defaultTtl": 601, "maxTtl": 600}, False),
        ({"defaultTtl": 600, "maxTtl": 600}, True),
        ({"defaultTtl": 700, "maxTtl": None}, False),  # the service's default max, 600
        ({"defaultTtl": None, "maxTtl": 299}, False),  # the service's default, 300
        ({"defaultTtl": None, "maxTtl": None}, True),
    ],
)
def test_a_default_ttl_above_the_max_ttl_stops_the_render_as_the_service_refuses_it(
    ttls: dict[str, int | None], renders: bool
) -> None:
    values = merge(ci_values("external-redis"), {"config": ttls})
    environ = {"IDENTITY_SECRET": "s" * 32}
    environ |= {setting_variable(k): str(v) for k, v in ttls.items() if v is not None}
    try:
        load_settings(environ)
        service_takes_them = True
    except ConfigError:
        service_takes_them = False
    assert service_takes_them is renders
    if renders:
        render(values)
    else:
        with pytest.raises(helm_python.HelmError, match=r"config\.defaultTtl .* is above"):
            render(values)


@pytest.mark.parametrize(
    "config",
    [
        {"reclaimIdle": 5}, {"reclaimIdle": 11.5}, {"reclaimIdle": 11.6},
        {"deliveryTimeout": 59}, {"deliveryTimeout": 58.4}, {"batchMaxWait": 49},
        {"reclaimIdle": 2, "deliveryTimeout": 0.5, "batchMaxWait": 0},
        {"reclaimIdle": 2, "deliveryTimeout": 1, "batchMaxWait": 0},
        {"reclaimIdle": 11.1, "batchMaxWait": 0}, {"reclaimIdle": 11, "batchMaxWait": 0},
        {"reclaimIdle": None, "deliveryTimeout": None, "batchMaxWait": None},
        # Found in review: without the outbox nothing is reclaimed, and the service takes it.
        {"reclaimIdle": 5, "outbox": "off"},
    ],
)  # fmt: skip
def test_a_reclaim_sooner_than_a_batch_is_sent_stops_the_render_as_the_service_refuses_it(
    config: dict[str, float | str | None],
) -> None:
    """Another forwarder reclaiming a batch's entries before it is filled and sent (and a
    keep-alive second) sends it a second time: the service refuses such settings at
    start, and the render, since the schema cannot compare values, refuses them too."""
    values = merge(ci_values("external-redis"), {"config": config})
    environ = {"IDENTITY_SECRET": "s" * 32, "IDENTITY_REDIS_URL": "redis://127.0.0.1:6379/0"}
    environ |= {setting_variable(k): str(v) for k, v in config.items() if v is not None}
    problem = ""
    try:
        load_settings(environ)
    except ConfigError as exc:
        problem = str(exc)
    chart().validate_schema(chart().merge_values(values))
    if not problem:
        render(values)
    else:
        assert "IDENTITY_RECLAIM_IDLE" in problem
        with pytest.raises(helm_python.HelmError, match=r"config\.reclaimIdle .* must be more"):
            render(values)


@pytest.mark.parametrize(
    ("wait", "timeout"),
    [
        *((wait, None) for wait in ("0,5", "99,99999", "17,50", "1,0", "1,10001", "1,50")),
        *((wait, None) for wait in ("16,10000", "1,1", "off", "1,500", "1,501")),
        ("16,10000", 20), ("16,10000", 19.9), ("1,600", 1.2), ("1,600", 1.19),
    ],
)  # fmt: skip
def test_the_chart_takes_the_redis_waits_the_service_takes(
    wait: str, timeout: float | None
) -> None:
    """The schema checks the form; the render refuses a WAIT longer than half the Redis
    timeout, which the schema cannot compare and the service refuses."""
    config: dict[str, Any] = {"redisWait": wait, "redisTimeout": timeout}
    values = merge(ci_values("external-redis"), {"config": config})
    try:
        chart().validate_schema(chart().merge_values(values))
        render(values)
        chart_takes = True
    except helm_python.HelmError:
        chart_takes = False
    environ = {"IDENTITY_SECRET": "s" * 32, "IDENTITY_REDIS_WAIT": wait}
    if timeout is not None:
        environ["IDENTITY_REDIS_TIMEOUT"] = str(timeout)
    problem = ""
    try:
        load_settings(environ)
    except ConfigError as exc:
        problem = str(exc)
    assert chart_takes == (problem == ""), problem
    assert not problem or "REDIS_WAIT" in problem


@pytest.mark.parametrize("with_destinations", [False, True])
def test_outbox_actions_renders_and_refuses_destinations_as_the_service_does(
    with_destinations: bool,
) -> None:
    """``actions`` is one of the schema's values, written to IDENTITY_OUTBOX; with
    ``destinations`` as well, which would never receive an event, the service refuses to
    start, and the render stops."""
    change: dict[str, Any] = {"config": {"outbox": "actions"}}
    environ = {"IDENTITY_SECRET": "s" * 32, "IDENTITY_OUTBOX": "actions"}
    if with_destinations:
        destination = {"url": "https://api.segment.io", "write_key": "wk"}
        change["destinations"] = {"segment": {"url": destination["url"], "writeKey": "wk"}}
        environ["IDENTITY_DESTINATIONS"] = json.dumps({"segment": destination})
    values = merge(ci_values("external-redis"), change)
    chart().validate_schema(chart().merge_values(values))
    if not with_destinations:
        load_settings(environ)
        assert find(render(values), "ConfigMap")["data"]["IDENTITY_OUTBOX"] == "actions"
        return
    with pytest.raises(ConfigError, match="IDENTITY_OUTBOX=actions emits no events"):
        load_settings(environ)
    with pytest.raises(helm_python.HelmError, match=r"config\.outbox actions emits no events"):
        render(values)


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``change`` laid over ``base``, nested mappings merged."""
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_the_schema_accepts_every_ci_configuration(configuration: str) -> None:
    chart().validate_schema(chart().merge_values(ci_values(configuration)))


# -- NetworkPolicy semantics --------------------------------------------------------------

Labels = dict[str, str]


def _selects(selector: dict[str, Any], labels: Labels) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) matches."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


def _peer_matches(
    peer: dict[str, Any], namespace: Labels, pod: Labels, same_namespace: bool
) -> bool:
    if "ipBlock" in peer:
        return False  # the peers here are pods
    if "namespaceSelector" in peer and not _selects(peer["namespaceSelector"], namespace):
        return False
    if "namespaceSelector" not in peer and not same_namespace:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], pod)


def admits(
    policies: list[Manifest],
    target: Labels,
    port: int,
    peer_namespace: Labels,
    peer_pod: Labels,
    same_namespace: bool = False,
) -> bool:
    """Whether a pod labelled ``peer_pod`` in a namespace labelled ``peer_namespace`` may
    open a TCP connection to ``port`` of the release's pod labelled ``target``, as the
    NetworkPolicy API defines it (rules of every policy selecting the pod, or'ed)."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target)]
    if not any("Ingress" in p["spec"]["policyTypes"] for p in selecting):
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(
                _peer_matches(p, peer_namespace, peer_pod, same_namespace) for p in peers
            ):
                return True
    return False


def egress_ports(policy: Manifest) -> set[int]:
    """The TCP ports the policy's egress rules open to any address."""
    return {
        p["port"]
        for rule in policy["spec"]["egress"]
        if "to" not in rule
        for p in rule.get("ports", [])
        if p.get("protocol", "TCP") == "TCP"
    }


WEB = {"app.kubernetes.io/name": "identity-service", "app.kubernetes.io/component": "web"}
FORWARDER = {**WEB, "app.kubernetes.io/component": "forwarder"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
INGRESS = {"kubernetes.io/metadata.name": "ingress-nginx"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize("metrics_port", [9464, 9100])
def test_prometheus_in_metrics_from_scrapes_the_web_and_forwarder_pods(metrics_port: int) -> None:
    values = {**ci_values("everything"), "metricsPort": metrics_port}
    policies = [o for o in render(values) if o["kind"] == "NetworkPolicy"]
    web = {**WEB, "app.kubernetes.io/instance": "identity-service"}
    forwarder = {**FORWARDER, "app.kubernetes.io/instance": "identity-service"}
    # Each on its metrics port, and the web pods no longer on their API port.
    assert admits(policies, web, metrics_port, MONITORING, PROMETHEUS)
    assert admits(policies, forwarder, 9464, MONITORING, PROMETHEUS)
    assert not admits(policies, web, 8080, MONITORING, PROMETHEUS)
    # The ingress controller reaches the web port, not the metrics ports; nobody else does.
    assert admits(policies, web, 8080, INGRESS, {"app": "ingress-nginx"})
    assert not admits(policies, web, 8080, {"kubernetes.io/metadata.name": "shop"}, {})
    assert not admits(policies, web, metrics_port, INGRESS, {"app": "ingress-nginx"})
    assert not admits(policies, forwarder, 9464, INGRESS, {"app": "ingress-nginx"})


def test_without_a_metrics_port_prometheus_scrapes_the_web_pods_api_port() -> None:
    values = {**ci_values("everything"), "metricsPort": None}
    policies = [o for o in render(values) if o["kind"] == "NetworkPolicy"]
    web = {**WEB, "app.kubernetes.io/instance": "identity-service"}
    forwarder = {**FORWARDER, "app.kubernetes.io/instance": "identity-service"}
    # The web pods answer /metrics on their one port, 8080; the forwarder on its own.
    assert admits(policies, web, 8080, MONITORING, PROMETHEUS)
    assert admits(policies, forwarder, 9464, MONITORING, PROMETHEUS)
    assert not admits(policies, web, 8080, {"kubernetes.io/metadata.name": "shop"}, {})


def test_restricted_egress_reaches_the_port_of_the_external_redis_url() -> None:
    values = ci_values("existing-secret")  # rediss://…:6380
    values["networkPolicy"] = {"allowExternalEgress": False}
    policy = find(render(values), "NetworkPolicy")
    assert 6380 in egress_ports(policy)
    values["redis"] = {"url": "redis://redis.data:6379/0"}
    assert 6379 in egress_ports(find(render(values), "NetworkPolicy"))
    values["redis"] = {"url": "redis://[fd00::1]/0"}  # no port: Redis's own
    assert 6379 in egress_ports(find(render(values), "NetworkPolicy"))
    values["redis"] = {"url": "redis://redis.data:6379/0", "port": 7000}  # said outright
    assert 7000 in egress_ports(find(render(values), "NetworkPolicy"))


@pytest.mark.parametrize(
    ("redis", "ports"),
    [
        # The sentinels answer on 26379; the master they name, on Redis's own port.
        ({"url": "redis+sentinel://s-0.redis:26379,s-1.redis:26379/idsvc/0"}, {26379, 6379}),
        (
            {"url": "rediss+sentinel://s-0.redis:26380/idsvc", "dataPorts": [6380, 6381]},
            {26380, 6380, 6381},
        ),
        # Every seed's port, and the nodes' ports the seeds do not name.
        ({"url": "redis+cluster://r-0.redis:7000,r-1.redis:7001"}, {7000, 7001}),
        ({"url": "redis+cluster://r-0.redis:7000", "dataPorts": [7001, 7002]}, {7000, 7001, 7002}),
    ],
)
def test_restricted_egress_reaches_the_data_nodes_behind_sentinel_and_cluster_urls(
    redis: dict[str, Any], ports: set[int]
) -> None:
    values = ci_values("existing-secret")
    values["networkPolicy"] = {"allowExternalEgress": False}
    values["redis"] = {**values["redis"], **redis}
    assert egress_ports(find(render(values), "NetworkPolicy")) == {53, *ports}


def test_a_change_of_the_charts_redis_password_rolls_the_pods_with_an_existing_secret() -> None:
    values = ci_values("existing-secret")
    values["redis"] = {"url": "redis://redis.data:6379/0", "auth": {"password": "first-one-0123"}}
    before = checksums(values)
    values["redis"]["auth"]["password"] = "second-one-0123"
    assert checksums(values)["checksum/secret"] != before["checksum/secret"]


def redis_pod_annotations(values: dict[str, Any]) -> dict[str, str]:
    template = find(render(values), "StatefulSet", f"{FULLNAME}-redis")["spec"]["template"]
    annotations: dict[str, str] = template["metadata"].get("annotations", {})
    return annotations


def test_a_change_of_the_redis_password_rolls_the_in_chart_redis_too() -> None:
    """The in-chart Redis reads its password (requirepass) once, at start: a new
    redis.auth.password rolls the web and forwarder pods (checksum/secret), so it must roll
    the Redis pod too, or the pods send a password Redis does not take. A change of the
    server secret or of config.* leaves Redis, and its data, alone."""
    values = ci_values("everything")
    before = redis_pod_annotations(values)
    changed = copy.deepcopy(values)
    changed["redis"]["auth"]["password"] = "another-redis-password-0123"
    assert checksums(changed)["checksum/secret"] != checksums(values)["checksum/secret"]
    assert redis_pod_annotations(changed) != before
    other = copy.deepcopy(values)
    other["secret"] = "another-server-secret-0123456789abcdefgh"
    other["config"]["logLevel"] = "debug"
    assert redis_pod_annotations(other) == before
    # A password from the user's Secret: another Secret or key rolls it as well.
    existing = copy.deepcopy(values)
    existing["redis"]["auth"] = {"existingSecret": "redis-credentials"}
    moved = copy.deepcopy(existing)
    moved["redis"]["auth"]["existingSecretPasswordKey"] = "password"
    assert redis_pod_annotations(moved) != redis_pod_annotations(existing)


# Host names around DNS's limits (253 characters, a final dot aside; 1 to 63 a label).
HOST_PROBES = (
    *NOT_DNS_HOSTS, *DNS_HOSTS, LONGEST_HOST + "x.", LONGEST_HOST[:-1] + ".", "a" * 63,
    "a" * 64, "a.example..", "10.0.0.1",
)  # fmt: skip


@pytest.mark.parametrize(
    ("url", "allow_insecure"),
    [
        ("https://api.segment.io", None),
        ("https://api.segment.io/v1", False),
        ("http://collector.monitoring:8080", None),  # the write key in clear text
        ("http://collector.monitoring:8080", False),
        ("http://collector.monitoring:8080", True),
        ("http://events.example.com/v1", None),
        ("http://localhost:9000", None),  # a sidecar: the pod's own loopback
        ("http://LOCALHOST:9000", None),
        ("http://127.0.0.1:9000/v1", False),
        ("http://127.8.9.10", None),
        ("http://[::1]:9000", None),
        ("http://localhost.example.com:9000", None),
        ("http://127.0.0.1.nip.io", None),
        # As ipaddress reads a loopback address: 127.0.0.0/8 without a leading zero or an
        # octet over 255 (the service refuses those at start), ::1 in any spelling.
        ("http://127.0.0.01:9000", None),
        ("http://127.00.0.1", None),
        ("http://127.256.0.1:9000", None),
        ("http://127.255.255.255", None),
        ("http://[0:0:0:0:0:0:0:1]:9000", None),
        ("http://[0::1]", None),
        ("http://[0000::0:0001]/v1", None),
        ("http://[0:0:0:0:0:0:0:0:1]", None),
        ("http://[::2]", None),
        # Base URLs the forwarder can post to (the service refuses the others at start).
        ("https://user:pass@api.segment.io", None),
        ("https://api.segment.io?x=1", None),
        ("https://api.segment.io/v1#f", None),
        ("https://api.segment.io:0", None),
        ("https://api.segment.io:65536/v1", None),
        ("https://api.segment.io:x", None),
        ("https://api.segment.io\\v1", None),
        ("https://api.segment.io:65535/v1", None),
        ("https://api.segment.io:0443/v1", None),
        ("https://api.segment.io:/v1", None),
        ("https://[2001:db8::1]:8443/v1", None),
        ("https://api.segment.io/v1\\batch", None),
        # DNS's limits on a host name, which the service holds to (urls.fits_dns).
        *((f"https://{host}", None) for host in HOST_PROBES),
        *((f"https://{host}:8443/v1", None) for host in HOST_PROBES),
        *((f"http://{host}/v1", True) for host in HOST_PROBES),
    ],
)
def test_the_schema_takes_the_destination_urls_the_service_takes(
    url: str, allow_insecure: bool | None
) -> None:
    """An http:// destination URL off loopback sends the write key in clear text: the
    service refuses to start without allowInsecure, so the schema refuses it too."""
    destination: dict[str, Any] = {"url": url, "writeKey": "a-write-key"}
    if allow_insecure is not None:
        destination["allowInsecure"] = allow_insecure
    values = {**ci_values("external-redis"), "destinations": {"segment": destination}}
    # IDENTITY_DESTINATIONS as the chart's Secret writes it (allow_insecure false by default).
    spec = {"url": url, "write_key": "a-write-key", "allow_insecure": bool(allow_insecure)}
    env = {"IDENTITY_SECRET": "s" * 32, "IDENTITY_DESTINATIONS": json.dumps({"segment": spec})}
    schema_takes = schema_accepts(chart().merge_values(values))
    assert schema_takes == starts_with(env)
    if schema_takes:  # and the Secret the chart writes is the one read above
        objects = render(values)
        (container,) = pod_spec(find(objects, "Deployment"))["containers"]
        load_settings(environment(objects, container))


# Origins the service takes, and ones it refuses at start (urls.parse_origin).
ORIGIN_PROBES = (
    "https://checkout.example-pay.com", "https://A.Example", "https://a.example:8443",
    "https://a.example:443", "https://a.example/", "https://xn--bcher-kva.example",
    "https://shop", "https://9shop.example", "https://a.example.co.uk:65535",
    "http://localhost:3000", "http://shop.localhost", "https://localhost",
    "http://checkout.example.com",  # http off localhost
    "http://127.0.0.1:3000", "https://10.0.0.1", "https://[::1]:8443", "https://1.2.3",
    "https://a.0x1f", "https://user@a.example", "https://a.example?x", "https://a.example#f",
    "https://a.example/checkout", "https://*.example.com", "https://a.example.",
    "https://a_b.example", "https://-a.example", "https://a-.example", "https://a..example",
    "https://a.example:0", "https://a.example:65536", "https://a.example:99999",
    "https://bücher.example", "https://a example", "https://",
    # DNS's limits, which the service holds to: 63 characters a label, 253 a name.
    f"https://{'a' * 63}.example", f"https://{'a' * 64}.example",
    f"https://{LONGEST_HOST}", f"https://{LONGEST_HOST}:8443/", f"https://{LONGEST_HOST}x",
    f"https://{LONGEST_HOST}x:443/", f"http://{LONGEST_HOST[:-10]}.localhost:3000",
    f"http://{LONGEST_HOST[:-9]}.localhost",
)  # fmt: skip


@pytest.mark.parametrize("origin", ORIGIN_PROBES)
def test_the_schema_takes_the_source_origins_the_service_takes(origin: str) -> None:
    """A source's origin the service refuses (http off localhost, an IP address, a path,
    user information, a wildcard, a port out of range...) stops every pod at start: the
    schema refuses it at install instead, and takes every origin the service takes. (Beyond
    a pattern's reach: a malformed xn-- label, and an upper-case scheme, which the schema
    never took.)"""
    source = {"writeKeyHash": "sha256:" + "ab" * 32, "origins": [origin]}
    values = {**ci_values("external-redis"), "sources": {"shop": source}}
    spec = {"shop": {"write_key_hash": source["writeKeyHash"], "origins": [origin]}}
    env = {"IDENTITY_SECRET": "s" * 32, "IDENTITY_SOURCES": json.dumps(spec)}
    schema_takes = schema_accepts(chart().merge_values(values))
    assert schema_takes == starts_with(env)


def test_a_destination_may_take_some_sources_only() -> None:
    values = ci_values("everything")
    values["destinations"]["segment"]["sources"] = ["shop"]
    objects = render(values)
    (container,) = pod_spec(find(objects, "Deployment", f"{FULLNAME}-forwarder"))["containers"]
    settings = load_settings(environment(objects, container))
    by_name = {d.name: d for d in settings.outbox.destinations}
    assert by_name["segment"].sources == frozenset({"shop"})
    assert settings.outbox.routes_by_source


def test_the_workers_count_in_one_directory_of_the_pods_tmp_volume() -> None:
    """With ``config.workers`` above 1 the workers count in files; a private directory a
    killed container left behind would stay in the memory-backed volume across restarts,
    so the pod names one that ``serve`` empties of an earlier run's files at start."""
    values = ci_values("everything")  # workers: 2
    objects = render(values)
    web = find(objects, "Deployment")
    (container,) = pod_spec(web)["containers"]
    directory = environment(objects, container)["PROMETHEUS_MULTIPROC_DIR"]
    (mount,) = container["volumeMounts"]
    assert directory.startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod_spec(web)["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume
