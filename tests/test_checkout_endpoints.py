"""The checkout demo's own JSON endpoints (examples/checkout): the shop's ``POST /handoff``
and the identity.js checkout's ``POST /identity/exchange`` answer bad input with an RFC 9457
``application/problem+json`` of the right status, never a 500 or an echo of the input.

The demo runs for real (``running_demo`` on free loopback ports, the service behind its
front); requests go to the sites over HTTP with aiohttp's client.
"""

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from examples.checkout.demo import Demo, Ports, node_checkout_missing, running_demo
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"
PREFIX = "urn:identity-service:problem:"
# Put in every bad body: no answer may carry it back.
MARKER = "<marker-5f1e>"


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with running_demo(Ports(*(free_port() for _ in range(6))), node=False) as running:
        yield running


def loopback(url: str) -> str:
    """A site's ``http://name.localhost:port`` as ``http://127.0.0.1:port``."""
    return "http://127.0.0.1:" + url.rsplit(":", 1)[1]


async def post(url: str, data: bytes, content_type: str, cookie: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": content_type, **({"Cookie": cookie} if cookie else {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers=headers) as answer,
    ):
        text = await answer.text()
        assert MARKER not in text
        if answer.content_type == PROBLEM:
            problem = await answer.json(content_type=PROBLEM)
            assert problem["status"] == answer.status
            assert {"type", "title", "detail"} <= problem.keys()
            return answer.status, problem
        return answer.status, await answer.json()


BAD_BODIES = [
    (
        b"token=" + MARKER.encode(),
        "application/x-www-form-urlencoded",
        415,
        "unsupported-media-type",
    ),
    (b'{"token": "' + MARKER.encode(), "application/json", 400, "malformed-json"),
    (b'["' + MARKER.encode() + b'"]', "application/json", 400, "validation-failed"),
    (
        b'{"token": 5, "destination": 5, "x": "' + MARKER.encode() + b'"}',
        "application/json",
        400,
        "validation-failed",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "slug"), BAD_BODIES)
@pytest.mark.parametrize("endpoint", ["handoff", "exchange"])
async def test_bad_input_gets_a_problem(
    demo: Demo, endpoint: str, body: bytes, content_type: str, status: int, slug: str
) -> None:
    url = (
        f"{loopback(demo.shop_url)}/handoff"
        if endpoint == "handoff"
        else f"{loopback(demo.pay_url)}/identity/exchange"
    )
    got, problem = await post(url, body, content_type, cookie="ajs_anonymous_id=visitor-1")
    assert (got, problem["type"]) == (status, PREFIX + slug)
    if slug == "validation-failed" and body.startswith(b"{"):
        field = "destination" if endpoint == "handoff" else "token"
        assert [error["field"] for error in problem["errors"]] == [field]


async def test_a_handoff_without_a_visitor_id_is_a_validation_problem(demo: Demo) -> None:
    body = b'{"destination": "' + demo.checkout_url.encode() + b'/cart"}'
    status, problem = await post(f"{loopback(demo.shop_url)}/handoff", body, "application/json")
    assert (status, problem["type"]) == (400, PREFIX + "validation-failed")
    assert [error["field"] for error in problem["errors"]] == ["anonymousId"]


async def test_a_destination_the_service_refuses_is_passed_on_as_its_problem(
    demo: Demo,
) -> None:
    body = b'{"destination": "http://elsewhere.localhost/' + MARKER.encode() + b'"}'
    status, problem = await post(
        f"{loopback(demo.shop_url)}/handoff", body, "application/json", "ajs_anonymous_id=v-2"
    )
    assert (status, problem["type"]) == (403, PREFIX + "destination-not-allowed")


async def test_the_endpoints_still_work(demo: Demo) -> None:
    body = b'{"destination": "' + demo.pay_url.encode() + b'/cart"}'
    status, prepared = await post(
        f"{loopback(demo.shop_url)}/handoff", body, "application/json", "ajs_anonymous_id=v-3"
    )
    assert status == 200
    token = prepared["redirectUrl"].split("handoff_token=")[1]
    exchange = f"{loopback(demo.pay_url)}/identity/exchange"
    status, landed = await post(
        exchange, b'{"token": "' + token.encode() + b'"}', "application/json"
    )
    assert (status, landed) == (200, {"anonymousId": "v-3", "source": "handoff"})


def _free_base_port() -> int:
    """A base port N whose N+1 ... N+6, the demo's, are free."""
    for _ in range(100):
        base = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base + 1, base + 7):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError("no six free loopback ports in a row")


@pytest.mark.parametrize("base", ["65530", "65535", "-1", "eighty"])
def test_a_base_port_without_six_ports_above_it_is_refused_in_one_line(base: str) -> None:
    """``--base-port 65530`` made the demo's settings name port 65536 and end in a
    traceback: a base whose N+1 ... N+6 are not all ports is refused as a usage error."""
    result = subprocess.run(
        [sys.executable, "-m", "examples.checkout", "--base-port", base],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "python -m examples.checkout: error: argument --base-port: a number from 0 to 65529 "
        f"(the demo listens on the 6 ports above it), not {base!r}"
    )


def test_the_demo_stops_when_its_node_checkouts_port_is_taken() -> None:
    """Express 5 calls app.listen's callback with the error when the port is taken: the
    Node checkout said "listening", and the demo listed it as running at an address where
    something else answered. It now stops in one line, as for its other ports."""
    if asyncio.run(node_checkout_missing()):
        pytest.skip("the Node checkout cannot run here (make demo installs it)")
    base = _free_base_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 6))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "examples.checkout", "--base-port", str(base)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=40,  # it ran until stopped
        )
    assert result.returncode == 1
    assert "The checkout demo is running" not in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"demo: the Node checkout did not start on port {base + 6} (its error above; "
        "another --base-port?)"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_the_demo_stops_on_sigterm_and_sighup(signum: signal.Signals) -> None:
    """The terminal running ``make demo`` closing (SIGHUP) stops it as Ctrl-C does: its
    parts stopped and their ports freed, not the demo's process ended at once."""
    base = _free_base_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.checkout", "--base-port", str(base)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("Ctrl-C stops all."):
                break
        else:
            pytest.fail(
                f"the demo did not start: {process.stderr.read() if process.stderr else ''}"
            )
        process.send_signal(signum)
        rest, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, rest.splitlines()[-1:]) == (0, ["stopped"]), errors
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", base + 1))  # the shop's port is free again
