"""The Dockerfile's rules, read with a Dockerfile parser (there is no Docker engine here):
pinned bases, a non-root numeric user, no build tools in the final stage, a health check,
``identity-service`` as the entry point, and a .dockerignore that lets in what it copies.
"""

import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from identity_service.healthcheck import health_url
from tests.chart import ci_values, find, pod_spec, render
from tests.redis_server import RedisServer, free_port
from tests.test_cli import COMMAND, Service, clean_env, redis_env

ROOT = Path(__file__).resolve().parent.parent
PINNED = re.compile(r"^[\w./-]+:(?P<tag>[\w.-]+)@sha256:[0-9a-f]{64}$")
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "clang", "cargo", "rustc", "-dev ")

# The pod listens on every address of its own network namespace.
SERVE_ARGS = ["serve", "--host", "0.0.0.0", "--port", "8080"]  # noqa: S104
# GET /healthz where the running command listens (identity_service/healthcheck.py).
HEALTHCHECK = ["python", "-m", "identity_service.healthcheck"]

Instruction = dict[str, Any]


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    """The Dockerfile's stages, each the list of its instructions (FROM first), no comments."""
    parsed = DockerfileParser(path=str(ROOT / "Dockerfile"))
    found: list[list[Instruction]] = []
    for instruction in parsed.structure:
        if instruction["instruction"] == "FROM":
            found.append([])
        if instruction["instruction"] != "COMMENT" and found:
            found[-1].append(instruction)
    return found


def values(stage: list[Instruction], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_every_base_is_pinned_by_version_and_digest(stages: list[list[Instruction]]) -> None:
    assert len(stages) >= 2, "multi-stage: a builder and the runtime"
    names: set[str] = set()
    for stage in stages:
        image, _, alias = stage[0]["value"].partition(" AS ")
        if image not in names:  # FROM an earlier stage needs no pin
            match = PINNED.match(image)
            assert match, f"{image} is not pinned by tag and digest"
            assert match["tag"] != "latest"
            assert re.match(r"^\d+\.\d+", match["tag"]), f"{image}: the tag names no version"
        names.add(alias.strip())


def test_the_final_stage_runs_as_a_fixed_non_root_uid(stages: list[list[Instruction]]) -> None:
    (user,) = values(stages[-1], "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000, "a numeric UID, so runAsNonRoot can check it"
    assert gid.isdigit() and int(gid) > 0
    # The chart runs the image as that same user.
    web = find(render(ci_values("external-redis")), "Deployment")
    assert pod_spec(web)["securityContext"]["runAsUser"] == int(uid)


def test_the_final_stage_has_no_build_tools(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    for command in values(final, "RUN"):
        assert "apt-get install" not in command and "pip install" not in command, command
        assert not any(tool in command for tool in BUILD_TOOLS), command
    # What it runs comes from the builder stage, built there.
    assert any(v.startswith("--from=builder ") for v in values(final, "COPY"))
    assert any("build-essential" in v for v in values(stages[0], "RUN"))


def test_the_image_keeps_no_installer(stages: list[list[Instruction]]) -> None:
    """Python 3.11's venv puts pip and setuptools 65.5 (CVE-2024-6345, which image scanners
    report) into the service's environment, and the base has its own: the service runs
    without them, so the builder takes them out of the environment it hands over and the
    final stage out of the base."""
    builder = " ".join(" ".join(values(stages[0], "RUN")).split())
    venv = "/opt/identity-service/bin/python -m pip uninstall --yes --quiet pip setuptools"
    assert builder.index(venv) > builder.index("/opt/identity-service/bin/pip install")
    final = " ".join(" ".join(values(stages[-1], "RUN")).split())
    assert "/usr/local/bin/python -m pip uninstall --yes --quiet pip setuptools wheel" in final


def test_the_final_stage_writes_no_bytecode(stages: list[list[Instruction]]) -> None:
    env = " ".join(values(stages[-1], "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "TMPDIR=/tmp" in env


def test_entry_point_command_and_health_check(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    assert [json.loads(v) for v in values(final, "ENTRYPOINT")] == [["identity-service"]]
    assert [json.loads(v) for v in values(final, "CMD")] == [SERVE_ARGS]
    (health,) = values(final, "HEALTHCHECK")
    assert json.loads(health.split(" CMD ", 1)[1]) == HEALTHCHECK


def image_command(stages: list[list[Instruction]], *args: str) -> list[str]:
    """The first process of a container of the image run with ``args`` (none: its CMD), as
    /proc shows it: the console script runs under the virtual environment's Python."""
    (entrypoint,) = [json.loads(v) for v in values(stages[-1], "ENTRYPOINT")]
    (command,) = [json.loads(v) for v in values(stages[-1], "CMD")]
    script = f"/opt/identity-service/bin/{entrypoint[0]}"
    return ["/opt/identity-service/bin/python", script, *(list(args) or command)]


@pytest.mark.parametrize(
    ("args", "environ", "url"),
    [
        ((), {}, "http://127.0.0.1:8080/healthz"),  # the image's CMD
        (("serve", "--port", "9000"), {}, "http://127.0.0.1:9000/healthz"),
        (("serve", "--host", "::", "--port=9000"), {}, "http://[::1]:9000/healthz"),
        (("serve", "--host", "10.0.0.7"), {}, "http://10.0.0.7:8080/healthz"),
        (("forward",), {}, "http://127.0.0.1:9464/healthz"),
        (
            ("forward",),
            {"IDENTITY_FORWARDER_METRICS_PORT": "9100"},
            "http://127.0.0.1:9100/healthz",
        ),
        (("forward",), {"IDENTITY_FORWARDER_METRICS_PORT": "off"}, None),
        (("outbox", "status"), {}, None),
    ],
)
def test_the_health_check_follows_the_command_the_container_runs(
    stages: list[list[Instruction]], args: tuple[str, ...], environ: dict[str, str], url: str | None
) -> None:
    environ = {"IDENTITY_SECRET": "s" * 32, "IDENTITY_REDIS_URL": "redis://redis:6379/0", **environ}
    cmdline = image_command(stages, *args)
    assert health_url(cmdline, environ) == url
    # The same under `docker run --init`: docker-init is the first process.
    assert health_url(["/sbin/docker-init", "--", *cmdline[1:]], environ) == url


def test_the_health_check_of_a_forward_container_gets_its_healthz(tmp_path: Path) -> None:
    """A real ``identity-service forward``, whose /healthz is on its metrics port and not
    on 8080: the image's HEALTHCHECK command, pointed at that process, finds it healthy,
    and unhealthy when told another port."""
    redis = RedisServer(tmp_path)
    redis.start()
    port = free_port()
    env = redis_env(redis, IDENTITY_FORWARDER_METRICS_PORT=str(port))
    forward = subprocess.Popen([COMMAND, "forward"], env=env, stdout=subprocess.DEVNULL)
    check = [sys.executable, *HEALTHCHECK[1:], str(forward.pid)]
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(check, env=env, capture_output=True, check=False).returncode:
            assert forward.poll() is None and time.monotonic() < deadline, "never healthy"
            time.sleep(0.1)
        elsewhere = {**env, "IDENTITY_FORWARDER_METRICS_PORT": str(free_port())}
        unhealthy = subprocess.run(check, env=elsewhere, capture_output=True, text=True)
        assert unhealthy.returncode == 1
        assert "/healthz" in unhealthy.stderr
    finally:
        forward.terminate()
        forward.wait(timeout=15)
        redis.stop()


def test_the_health_check_asks_the_service_and_not_a_proxy(tmp_path: Path) -> None:
    """A container given an HTTP proxy for its way out (``http_proxy``, ``HTTP_PROXY``):
    the health check sent its GET of the container's own loopback address to the proxy,
    which cannot reach it, and a healthy service was reported unhealthy."""
    service = Service(tmp_path, clean_env())
    check = [sys.executable, *HEALTHCHECK[1:], str(service.process.pid)]
    proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        for name in ("http_proxy", "HTTP_PROXY"):
            result = subprocess.run(
                check, env=clean_env(**{name: proxy}), capture_output=True, text=True
            )
            assert (result.returncode, result.stderr) == (0, ""), name
    finally:
        assert service.stop() == 0


def test_the_image_version_is_the_charts(stages: list[list[Instruction]]) -> None:
    (arg,) = [v for v in values(stages[-1], "ARG") if v.startswith("VERSION=")]
    chart = yaml.safe_load((ROOT / "helm/identity-service/Chart.yaml").read_text())
    assert arg == f"VERSION={chart['appVersion']}"


def test_the_build_context_holds_what_the_builder_copies(stages: list[list[Instruction]]) -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for stage in stages:
        for copy in values(stage, "COPY"):
            if copy.startswith("--from="):
                continue
            sources = shlex.split(copy)[:-1]
            for source in sources:
                assert source in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists()


def test_the_builder_installs_the_locked_dependencies_checked_by_hash(
    stages: list[list[Instruction]],
) -> None:
    runs = " ".join(values(stages[0], "RUN"))
    assert "--require-hashes -r requirements/image.txt" in runs
    assert "--no-build-isolation --no-deps ." in runs, (
        "the service's own wheel must not pull unlocked versions"
    )
    assert "pip install --no-index" in runs


def test_the_wheels_are_built_with_the_pinned_build_requirements(
    stages: list[list[Instruction]],
) -> None:
    """pyproject.toml's [build-system] requires (the service's and the Python SDK's) are
    pinned, and the Dockerfile builds the service's wheel with requirements/build.txt,
    the same pins checked by hash, not in an isolated environment: ``setuptools>=68``
    let every build fetch whatever setuptools PyPI had that day."""
    build_lock = (ROOT / "requirements" / "build.txt").read_text()
    locked = set(re.findall(r"^([\w.-]+==[\w.]+) \\\n\s+--hash=sha256:", build_lock, re.M))
    for pyproject in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
        assert requires and all(
            len(Requirement(r).specifier) == 1
            and next(iter(Requirement(r).specifier)).operator == "=="
            for r in requires
        ), f"{pyproject}: {requires}"
        assert set(requires) <= locked, f"{pyproject}: {requires} vs requirements/build.txt"
    runs = " ".join(values(stages[0], "RUN"))
    assert "pip install --require-hashes --only-binary :all: -r requirements/build.txt" in runs
    assert "pip wheel --wheel-dir /wheels --no-build-isolation --no-deps ." in runs


def test_the_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    """requirements/image.txt covers pyproject.toml's dependencies at versions they allow,
    each with hashes: it is refreshed when the dependencies change (see the Dockerfile)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock_text = (ROOT / "requirements" / "image.txt").read_text()
    pinned = {
        canonicalize_name(m["name"]): Version(m["version"])
        for m in re.finditer(r"^(?P<name>[\w.-]+)==(?P<version>[\w.]+)", lock_text, re.M)
    }
    entries = re.split(r"\n(?=[\w.-]+==)", lock_text)
    assert all("--hash=sha256:" in entry for entry in entries[1:]), "every pin has hashes"
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pinned, f"{dependency.name} is not in requirements/image.txt"
        assert pinned[name] in dependency.specifier, f"{name} {pinned[name]} vs {dependency}"
