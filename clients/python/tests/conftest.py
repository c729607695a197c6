"""Fixtures: the real service (``identity-service serve``) on loopback, in three setups."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from misbehaving import Misbehaving, misbehaving

from tests.redis_server import free_port  # the repository root is on pythonpath

DEV_WRITE_KEY = "sdk-dev-write-key-0123456789"
SHOP_WRITE_KEY = "sdk-shop-write-key-0123456789"
OTHER_WRITE_KEY = "sdk-other-write-key-0123456789"
SECRET = "sdk-test-server-secret-0123456789abcdef"
SERVE = Path(sys.executable).parent / "identity-service"


@dataclass
class Service:
    url: str
    process: subprocess.Popen[bytes]
    log: Path  # its stdout and stderr: the events (the stdout destination) are JSON lines

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and "type" in event:
                    found.append(event)
        return found

    def wait_for_event(self, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event the service delivered that ``matches``, waiting up to 10 s (the
        outbox delivers in batches)."""
        deadline = time.monotonic() + 10
        while True:
            found = [event for event in self.events() if matches(event)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError("no such event delivered")
            time.sleep(0.05)


def start_service(log_dir: Path, name: str, **env: str) -> Iterator[Service]:
    port = free_port()
    clean = {key: value for key, value in os.environ.items() if not key.startswith("IDENTITY_")}
    log = (log_dir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [str(SERVE), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**clean, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} service exited: {(log_dir / f'{name}.log').read_text()}"
                )
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} service did not answer /healthz")
            time.sleep(0.05)
        yield Service(url, process, log_dir / f"{name}.log")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The development setup: memory store, the dev source (any *.localhost destination)."""
    yield from start_service(
        tmp_path_factory.mktemp("dev"), "dev", IDENTITY_DEV_WRITE_KEY=DEV_WRITE_KEY
    )


@pytest.fixture(scope="session")
def configured_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two configured sources, each allowed one https origin of its own."""

    def source(key: str, origin: str) -> dict[str, object]:
        return {
            "write_key_hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(),
            "origins": [origin],
        }

    sources = {
        "shop": source(SHOP_WRITE_KEY, "https://checkout.example.com"),
        "other": source(OTHER_WRITE_KEY, "https://other.example.com"),
    }
    yield from start_service(
        tmp_path_factory.mktemp("configured"),
        "configured",
        IDENTITY_SOURCES=json.dumps(sources),
        IDENTITY_SECRET=SECRET,
    )


@pytest.fixture(scope="session")
def down_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The Redis store at an address where nothing listens: every /v1 call answers 503."""
    yield from start_service(
        tmp_path_factory.mktemp("down"),
        "down",
        IDENTITY_DEV_WRITE_KEY=DEV_WRITE_KEY,
        IDENTITY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        IDENTITY_REDIS_TIMEOUT="0.5",
        IDENTITY_SECRET=SECRET,
    )


@pytest.fixture
def server() -> Iterator[Misbehaving]:
    """A loopback HTTP server that answers each request as the test tells it to
    (misbehaving.py): slow, cut short, malformed, redirecting."""
    with misbehaving() as started:
        yield started
