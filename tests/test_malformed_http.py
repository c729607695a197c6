"""Malformed, oversized, slow and hostile HTTP on a raw socket.

Each request carries the shop's real write key and a marker in its header values. Whatever
is wrong with it, the answer is an RFC 9457 problem with the right status that repeats
nothing of the request, the connection then closes (what follows a request that cannot be
framed cannot be trusted), and the log gets one request line with no header value and no
traceback.
"""

import asyncio
import dataclasses
import gzip
import io
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import pytest

from identity_service import app_keys
from identity_service import front as front_module
from identity_service.app import create_app
from identity_service.constants import MAX_HEAD_BYTES
from identity_service.front import FrontServer
from identity_service.metrics import Metrics
from identity_service.problems import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from tests.conftest import WRITE_KEYS, AppClient, FrontTestServer, log_lines, make_settings

KEY = WRITE_KEYS["shop"].encode()
MARK = b"marker-3f9c0d1e"
START = b"POST /v1/handoffs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
AUTH = b"Authorization: Bearer " + KEY + b"\r\n"
BODY = b'{"anonymousId": "' + MARK + b'", "destination": "https://checkout.example-pay.com/"}'
LENGTH = b"Content-Length: %d\r\n" % len(BODY)

FrontMaker = Callable[..., Awaitable[AppClient]]


@pytest.fixture
def make_front(aiohttp_client: Callable[..., Awaitable[AppClient]]) -> FrontMaker:
    """A served app (memory store, no events) with settings replaced by the keywords."""

    async def build(**changes: Any) -> AppClient:
        settings = dataclasses.replace(make_settings(None, outbox="off"), **changes)
        return await aiohttp_client(FrontTestServer(create_app(settings)))

    return build


@pytest.fixture
async def front(make_front: FrontMaker) -> AppClient:
    return await make_front()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (*parts, b""))


CASES = {
    # Defect 4: a write key before a control character was echoed and logged.
    "control-character-after-the-key": (
        START + b"Authorization: Bearer " + KEY + b"\x0b\r\n" + LENGTH + b"\r\n" + BODY,
        400,
    ),
    "control-character-in-a-value": (START + AUTH + b"X-Mark: " + MARK + b"\x01\r\n\r\n", 400),
    "nul-in-a-value": (START + AUTH + b"X-Mark: " + MARK + b"\x00\r\n" + LENGTH + b"\r\n", 400),
    "bare-cr-in-a-value": (START + AUTH + b"X-Mark: a\r" + MARK + b"\r\n\r\n", 400),
    "content-length-overflows": (
        START + AUTH + b"Content-Length: 99999999999999999999999\r\n\r\n" + BODY,
        400,
    ),
    "content-length-negative": (START + AUTH + b"Content-Length: -1\r\n\r\n" + BODY, 400),
    "content-length-not-a-number": (START + AUTH + b"Content-Length: 1e3\r\n\r\n" + BODY, 400),
    "content-length-twice": (START + AUTH + LENGTH + b"Content-Length: 3\r\n\r\n" + BODY, 400),
    "content-length-twice-alike": (START + AUTH + LENGTH + LENGTH + b"\r\n" + BODY, 400),
    "chunked-and-content-length": (
        START + AUTH + LENGTH + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY),
        400,
    ),
    "transfer-coding-other-than-chunked": (
        START + AUTH + b"Transfer-Encoding: gzip\r\n\r\n" + BODY,
        400,
    ),
    "bad-chunk-size": (START + AUTH + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY, 400),
    "http-1.1-without-host": (
        b"POST /v1/handoffs HTTP/1.1\r\n" + AUTH + LENGTH + b"\r\n" + BODY,
        400,
    ),
    "host-twice": (START + b"Host: " + MARK + b"\r\n" + AUTH + LENGTH + b"\r\n" + BODY, 400),
    "authorization-twice": (START + AUTH + AUTH + LENGTH + b"\r\n" + BODY, 400),
    "obs-fold": (START + AUTH + b"X-Mark: a\r\n " + MARK + b"\r\n" + LENGTH + b"\r\n" + BODY, 400),
    "space-before-the-colon": (START + AUTH + b"X-Mark : " + MARK + b"\r\n\r\n", 400),
    "header-name-not-a-token": (START + AUTH + b"X(Mark): " + MARK + b"\r\n\r\n", 400),
    "lf-only-line-endings": (
        b"POST /v1/handoffs HTTP/1.1\nHost: test\nAuthorization: Bearer " + KEY + b"\n\n",
        400,
    ),
    "invalid-method": (b"P@ST /v1/handoffs HTTP/1.1\r\nHost: test\r\n" + AUTH + b"\r\n", 400),
    "space-in-the-target": (
        b"GET /a " + MARK + b" HTTP/1.1\r\nHost: test\r\n" + AUTH + b"\r\n",
        400,
    ),
    # Found in review: /v1/handoffs#x was served by the app (404), /v1/handoffs?x#y by
    # the front.
    "fragment-in-the-target": (
        START.replace(b" HTTP", b"#" + MARK + b" HTTP") + AUTH + LENGTH + b"\r\n" + BODY,
        400,
    ),
    "fragment-after-the-query": (
        START.replace(b" HTTP", b"?a=1#" + MARK + b" HTTP") + AUTH + LENGTH + b"\r\n" + BODY,
        400,
    ),
    "http-2.0": (b"GET / HTTP/2.0\r\nHost: test\r\n" + AUTH + b"\r\n", 400),
    "http-0.9": (b"GET /" + MARK + b"\r\n\r\n", 400),
    "not-http-at-all": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARK, 400),
    "head-over-8190-bytes": (START + AUTH + b"X-Mark: " + MARK * 600 + b"\r\n\r\n", 431),
    "head-over-8190-bytes-in-many-fields": (
        START + AUTH + b"".join(b"X-Mark-%d: %s\r\n" % (n, MARK * 4) for n in range(140)) + b"\r\n",
        431,
    ),
    "body-over-the-limit": (START + AUTH + b"Content-Length: 20000\r\n\r\n" + MARK * 100, 413),
    "chunked-body-over-the-limit": (
        START + AUTH + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(*[MARK * 100] * 20),
        413,
    ),
    "unknown-expectation": (START + AUTH + LENGTH + b"Expect: " + MARK + b"\r\n\r\n", 417),
    # Found in review: a second Expect field hid the first (the last one was read alone).
    "unknown-expectation-before-100-continue": (
        START + AUTH + LENGTH + b"Expect: " + MARK + b"\r\nExpect: 100-continue\r\n\r\n" + BODY,
        417,
    ),
    # Found in review: each of these was served before its fix.
    "transfer-coding-before-chunked": (
        START + AUTH + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(BODY),
        501,
    ),
    "transfer-coding-before-chunked-in-a-field-of-its-own": (
        START
        + AUTH
        + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(BODY),
        501,
    ),
    "unknown-transfer-coding-before-chunked": (
        START + AUTH + b"Transfer-Encoding: " + MARK + b", chunked\r\n\r\n" + chunked(BODY),
        501,
    ),
    "upgrade-with-a-body": (
        START + AUTH + LENGTH + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + BODY,
        400,
    ),
    "body-not-in-its-content-coding": (
        START + AUTH + b"Content-Encoding: gzip\r\n" + LENGTH + b"\r\n" + BODY,
        400,
    ),
    "body-not-in-its-content-coding-to-the-app": (
        b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Encoding: gzip\r\n"
        + LENGTH
        + AUTH
        + b"\r\n"
        + BODY,
        400,
    ),
    "unknown-content-coding-to-the-app": (
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Encoding: br\r\n"
        + LENGTH
        + AUTH
        + b"\r\n"
        + BODY,
        415,
    ),
}
SLUGS = {
    400: "malformed-request",
    408: "request-timeout",
    413: "payload-too-large",
    415: "unsupported-content-encoding",
    417: "expectation-failed",
    431: "request-header-fields-too-large",
    501: "transfer-coding-not-implemented",
}


async def exchange_raw(client: AppClient, data: bytes, half_close: bool = False) -> bytes:
    """Send ``data`` on a new connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def problem_of(answer: bytes, status: int) -> dict[str, object]:
    """The one problem answer in ``answer``, checked for its status, type and framing."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in header_lines)}
    assert int(status_line.split(" ")[1]) == status, answer
    assert headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert headers["connection"] == "close"
    assert "server" not in headers and headers["x-request-id"]
    assert int(headers["content-length"]) == len(body)
    problem: dict[str, object] = orjson.loads(body)
    assert problem["type"] == PROBLEM_TYPE_PREFIX + SLUGS[status]
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert "instance" not in problem
    return problem


def assert_nothing_leaked(answer: bytes, log: io.BytesIO, status: int) -> None:
    """Neither the answer nor the log holds the key or the marker; one line, no traceback."""
    for secret in (KEY, MARK, KEY.lower(), MARK.upper()):
        assert secret not in answer
        assert secret not in log.getvalue()
    lines = log_lines(log)
    assert [line["status"] for line in lines if line["event"] == "request"] == [status]
    assert not [line for line in lines if "exception" in line or line["level"] == "error"]


@pytest.mark.parametrize(("data", "status"), CASES.values(), ids=CASES.keys())
async def test_a_malformed_request_gets_a_problem_and_nothing_leaks(
    front: AppClient, json_log: io.BytesIO, data: bytes, status: int
) -> None:
    answer = await exchange_raw(front, data)
    problem_of(answer, status)  # exchange_raw read to the end: the server closed
    assert_nothing_leaked(answer, json_log, status)


async def test_a_request_cut_short_by_the_client_gets_a_problem(
    front: AppClient, json_log: io.BytesIO
) -> None:
    for partial in (START + AUTH + b"X-Mark: " + MARK, START + AUTH + LENGTH + b"\r\n" + BODY[:9]):
        answer = await exchange_raw(front, partial, half_close=True)
        problem_of(answer, 400)
    for secret in (KEY, MARK):
        assert secret not in json_log.getvalue()


async def test_a_malformed_request_after_good_ones_is_answered_in_its_turn(
    front: AppClient, json_log: io.BytesIO
) -> None:
    good = START + AUTH + LENGTH + b"\r\n" + BODY
    bad, status = CASES["space-before-the-colon"]
    answer = await exchange_raw(front, good + good + bad + good)
    first, second, third = answer.split(b"HTTP/1.1 ")[1:]  # the last good one is not read
    assert first.startswith(b"201 ") and second.startswith(b"201 ")
    problem_of(b"HTTP/1.1 " + third, status)
    assert [line["status"] for line in log_lines(json_log)] == [201, 201, 400]


async def test_an_http_10_request_with_a_transfer_coding_is_answered_then_closed(
    front: AppClient,
) -> None:
    """RFC 9112, 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing, and the
    connection closes after it (an HTTP/1.0 intermediary does not frame it by its chunks).
    Found in review: with Connection: keep-alive the connection was kept, and what followed
    the chunks was served as the next request."""
    http10 = START.replace(b"HTTP/1.1", b"HTTP/1.0") + AUTH + b"Connection: keep-alive\r\n"
    next_request = START + AUTH + LENGTH + b"\r\n" + BODY
    answer = await exchange_raw(
        front, http10 + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY) + next_request
    )
    assert answer.startswith(b"HTTP/1.1 201 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b"\r\nConnection: close\r\n" in answer


async def test_an_upgrade_request_is_answered_over_http_then_closed(front: AppClient) -> None:
    answer = await exchange_raw(
        front,
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"\r\n" + MARK,
    )
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
    assert MARK not in answer


PROBE = (
    b"GET /healthz HTTP/1.1\r\nHost: 10.1.2.3:8000\r\nUser-Agent: kube-probe/1.30\r\n"
    b"Accept: */*\r\nConnection: close\r\n\r\n"
)


async def full_front(make_front: FrontMaker) -> tuple[AppClient, FrontServer, asyncio.StreamWriter]:
    """A front at its limit of one connection, and that connection (the test closes it)."""
    client = await make_front(max_connections=1)
    server = cast(FrontServer, client.server.runner.server)  # type: ignore[union-attr]
    _, held = await asyncio.open_connection("127.0.0.1", client.server.port)
    for _ in range(100):  # until the front has taken it
        if server.front_connections:
            break
        await asyncio.sleep(0.01)
    assert len(server.front_connections) == 1
    return client, server, held


def refused(client: AppClient) -> float:
    metrics: Metrics = client.app[app_keys.METRICS]
    return metrics.value("identity_connections_refused_total")


def turned_away(answer: bytes) -> None:
    """``answer`` is the 503 of a connection over the limit (no request id: none was read)."""
    status, headers, body = head_of(answer)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert orjson.loads(body)["type"] == PROBLEM_TYPE_PREFIX + "service-unavailable"


def head_of(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


async def test_connections_beyond_the_limit_get_the_503_though_they_sent_a_request(
    make_front: FrontMaker,
) -> None:
    # Found in review: the turned-away connection closed with the request unread, and the
    # kernel reset it, the 503 with it, for about a third of such clients.
    client = await make_front(max_connections=1)
    held = await asyncio.open_connection("127.0.0.1", client.server.port)
    request = START + AUTH + b"Content-Length: 16000\r\n\r\n" + b"x" * 16000

    def turned_away() -> bytes:
        with socket.create_connection(("127.0.0.1", client.server.port), timeout=10) as sock:
            sock.sendall(request)
            time.sleep(0.3)  # the server has closed by now, or lingers
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    answers = await asyncio.gather(*(asyncio.to_thread(turned_away) for _ in range(10)))
    for answer in answers:
        head = answer.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
    held[1].close()


async def test_turned_away_connections_linger_only_so_many_at_once(
    make_front: FrontMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections held over the limit (waiting for a probe's head, or lingering after the
    answer) are bounded: beyond the bound, the 503 and the close come at once, as before."""
    monkeypatch.setattr(front_module, "MAX_LINGERING_TURNAWAYS", 2)
    client, server, full = await full_front(make_front)
    held = [await asyncio.open_connection("127.0.0.1", client.server.port) for _ in range(2)]
    for _ in range(100):  # until the server has taken both
        if server.lingering_turnaways == 2:
            break
        await asyncio.sleep(0.01)
    flood = [await asyncio.open_connection("127.0.0.1", client.server.port) for _ in range(3)]
    for reader, _ in flood:
        turned_away(await asyncio.wait_for(reader.read(), 0.5))  # answered and closed
    # Beyond the bound even a probe is not read: today's 503, at once.
    answer = await asyncio.wait_for(exchange_raw(client, PROBE), 0.5)
    turned_away(answer)
    assert server.lingering_turnaways == 2 and refused(client) == 4
    for reader, _ in held:  # still read for a probe's head: not answered yet
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.05)
    for reader, _ in held:
        turned_away(await read_to_end(reader))  # after the bound
    for _, writer in held + flood:
        writer.close()
    for _ in range(100):  # until the server has seen the clients close
        if not server.lingering_turnaways:
            break
        await asyncio.sleep(0.02)
    assert server.lingering_turnaways == 0 and refused(client) == 6
    full.close()


async def test_over_the_limit_a_liveness_probe_is_answered_and_nothing_else(
    make_front: FrontMaker,
) -> None:
    """Found in review: at max_connections the kubelet's GET /healthz got the 503 too, and a
    busy pod was restarted, its load moving to the next pod (a cascade)."""
    client = await make_front()
    _, usual, usual_body = head_of(await exchange_raw(client, PROBE))
    client, _, full = await full_front(make_front)
    metrics: Metrics = client.app[app_keys.METRICS]
    probes = metrics.value(
        "identity_http_requests_total", route="/healthz", method="GET", status="200"
    )
    status, headers, body = head_of(await exchange_raw(client, PROBE))
    # /healthz's own answer, whoever gives it.
    assert status == 200 and body == usual_body == b'{"status":"ok"}'
    assert headers.keys() == usual.keys() and headers["connection"] == "close"
    assert {n: headers[n] for n in headers if n not in ("date", "x-request-id")} == {
        n: usual[n] for n in usual if n not in ("date", "x-request-id")
    }
    head = PROBE.replace(b"GET", b"HEAD", 1).replace(b"Accept", b"X-Request-ID: probe-1\r\nAccept")
    status, headers, body = head_of(await exchange_raw(client, head))
    assert status == 200 and body == b"" and headers["content-length"] == str(len(usual_body))
    assert headers["x-request-id"] == "probe-1"
    for target in (b"/healthz?x=1", b"http://10.1.2.3:8000/healthz"):
        answer = await exchange_raw(client, PROBE.replace(b"/healthz", target, 1))
        assert answer.startswith(b"HTTP/1.1 200 "), target
    # A probe is no refusal: it is counted as every /healthz.
    assert refused(client) == 0
    assert (
        metrics.value("identity_http_requests_total", route="/healthz", method="GET", status="200")
        == probes + 3
    )
    # Everything else gets the 503, /readyz included: the pod can take no more.
    others = [
        PROBE.replace(b"/healthz", b"/readyz", 1),
        START + AUTH + LENGTH + b"\r\n" + BODY,
        PROBE.replace(b"GET", b"POST", 1),
        PROBE.replace(b"/healthz", b"/healthzz", 1),
        PROBE.replace(b"/healthz", b"/healthz#x", 1),
        PROBE.replace(b"HTTP/1.1", b"HTTP/2.0", 1),
        PROBE.replace(b"Host", b"Bad Header", 1),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ]
    for request in others:
        answer = await exchange_raw(client, request)
        turned_away(answer)
        assert MARK not in answer
    assert refused(client) == len(others)
    full.close()


async def test_over_the_limit_a_probe_in_pieces_is_read_within_the_bounds(
    make_front: FrontMaker,
) -> None:
    client, _, full = await full_front(make_front)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(PROBE[:20])
    await asyncio.sleep(0.2)
    writer.write(PROBE[20:])
    assert (await read_to_end(reader)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    # A head longer than the bytes read for a probe: the 503 without waiting for its end.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(PROBE[:-2] + b"X-Pad: " + b"a" * front_module.TURNAWAY_HEAD_BYTES)
    turned_away(await asyncio.wait_for(reader.read(), 0.5))
    writer.close()
    assert refused(client) == 1
    full.close()


async def test_over_the_limit_a_connection_that_sends_nothing_gets_the_503_in_time(
    make_front: FrontMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front_module, "TURNAWAY_HEAD_SECONDS", 0.5)
    client, server, full = await full_front(make_front)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    started = loop.time()
    answer = await read_to_end(reader)  # the 503, then the close
    assert 0.4 < loop.time() - started < 2
    turned_away(answer)
    assert refused(client) == 1
    writer.close()
    for _ in range(100):  # until the server has seen the client close
        if not server.lingering_turnaways:
            break
        await asyncio.sleep(0.02)
    assert server.lingering_turnaways == 0
    full.close()


async def test_answers_name_no_server_software(front: AppClient) -> None:
    for path in ("/healthz", "/nowhere"):
        response = await front.get(path)
        assert "Server" not in response.headers
    prepared = await front.post(
        "/v1/handoffs", data=BODY, headers={"Authorization": "Bearer " + KEY.decode()}
    )
    assert "Server" not in prepared.headers


# Slow clients: heads and bodies must complete in time, and connections are bounded.


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)


async def test_a_head_that_does_not_complete_in_time_gets_408(
    make_front: FrontMaker, json_log: io.BytesIO
) -> None:
    client = await make_front(head_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(START + AUTH)  # and never the blank line that ends the head
    answer = await read_to_end(reader)
    writer.close()
    assert "head" in str(problem_of(answer, 408)["detail"])
    assert_nothing_leaked(answer, json_log, 408)


async def test_a_body_that_does_not_complete_in_time_gets_408(
    make_front: FrontMaker, json_log: io.BytesIO
) -> None:
    client = await make_front(body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(START + AUTH + LENGTH + b"\r\n" + BODY[:10])
    answer = await read_to_end(reader)
    writer.close()
    assert "body" in str(problem_of(answer, 408)["detail"])
    assert_nothing_leaked(answer, json_log, 408)


async def test_a_connection_that_sends_nothing_is_closed(make_front: FrontMaker) -> None:
    client = await make_front(head_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    assert await read_to_end(reader) == b""
    writer.close()


async def test_many_slow_heads_are_all_cut_off(make_front: FrontMaker) -> None:
    """A slow-loris crowd: each connection sends a header line now and then, never the end."""
    client = await make_front(head_timeout=0.5)

    async def trickle() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(START)
        try:
            for _ in range(100):  # far longer than the head may take, if nothing cut it off
                try:  # the first bytes of the server's answer, then the rest of it
                    first = await asyncio.wait_for(reader.read(1 << 16), 0.1)
                    return first + await read_to_end(reader)
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
            return b""
        finally:
            writer.close()

    answers = await asyncio.gather(*(trickle() for _ in range(200)))
    assert {answer[:13] for answer in answers} == {b"HTTP/1.1 408 "}
    open_connections = client.server.runner.server.front_connections  # type: ignore[union-attr]
    for _ in range(100):  # until the server has seen the clients close
        if not open_connections:
            break
        await asyncio.sleep(0.05)
    assert not open_connections


async def test_connections_beyond_the_limit_are_refused_at_once(make_front: FrontMaker) -> None:
    client = await make_front(max_connections=3)
    held = [await asyncio.open_connection("127.0.0.1", client.server.port) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    answer = await read_to_end(reader)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
    assert orjson.loads(body)["type"] == PROBLEM_TYPE_PREFIX + "service-unavailable"
    assert client.app[app_keys.METRICS].value("identity_connections_refused_total") == 1
    _, freed = held.pop()
    freed.close()
    await freed.wait_closed()
    for _ in range(50):  # until the server has seen the close
        if len(client.server.runner.server.front_connections) < 3:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    answer = await exchange_raw(client, START + AUTH + LENGTH + b"Connection: close\r\n\r\n" + BODY)
    assert answer.startswith(b"HTTP/1.1 201 ")
    for _, held_writer in held:
        held_writer.close()


# Found in review: each of these failed before its fix.


async def test_a_refused_target_is_answered_in_its_turn(front: AppClient) -> None:
    health = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    answer = await exchange_raw(front, b"OPTIONS * HTTP/1.1\r\nHost: test\r\n\r\n" + health)
    problem_of(answer, 400)  # and nothing after it: the 200 was never sent


async def test_a_target_with_a_fragment_is_refused_in_every_form(front: AppClient) -> None:
    """/healthz#x named no route (404) while /healthz?x#y was served, "#y" in its query, and
    an absolute form's fragment was dropped: now one answer, as for any target that is not
    valid HTTP/1.1 (browsers never send a fragment)."""

    def get(target: bytes) -> bytes:
        return b"GET " + target + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"

    for target in (
        b"/healthz#x",
        b"/healthz?x#y",
        b"/healthz#",
        b"http://test/healthz#x",
        b"/v1/amp/collect?ampId=a#" + MARK,
    ):
        answer = await exchange_raw(front, get(target))
        assert "fragment" in str(problem_of(answer, 400)["detail"])
        assert MARK not in answer
    # Percent-encoded, # is a character of the path like any other.
    assert (await exchange_raw(front, get(b"/healthz%23x"))).startswith(b"HTTP/1.1 404 ")


async def test_a_client_that_never_reads_is_dropped(
    make_front: FrontMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front_module, "IDLE_TIMEOUT_SECONDS", 0.5)
    client = await make_front()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.server.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    health = b"GET /openapi.json HTTP/1.1\r\nHost: test\r\n\r\n"
    sending = asyncio.ensure_future(loop.sock_sendall(sock, health * 20_000))
    connections = client.server.runner.server.front_connections  # type: ignore[union-attr]
    seen = False
    for _ in range(400):  # until the server stalls on the unread answers, then drops us
        await asyncio.sleep(0.05)
        seen = seen or bool(connections)
        if seen and not connections:
            break
    sending.cancel()
    sock.close()
    assert seen and not connections


async def test_queued_requests_hold_their_bodies_as_sent(make_front: FrontMaker) -> None:
    """Bodies are decoded when answered: a queue of small gzip bodies stays small."""
    client = await make_front()
    inflates = gzip.compress(b'{"anonymousId": "a", "pad": "' + b" " * 15_000 + b'"}')
    one = (
        START + AUTH + b"Content-Encoding: gzip\r\n" + b"Content-Length: %d\r\n\r\n" % len(inflates)
    ) + inflates
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.server.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    sending = asyncio.ensure_future(loop.sock_sendall(sock, one * 3000))
    connections = client.server.runner.server.front_connections  # type: ignore[union-attr]
    most = 0
    for _ in range(60):
        await asyncio.sleep(0.05)
        for connection in connections:
            queued = [r for r in connection._queue if isinstance(r, front_module.Request)]
            most = max(most, sum(len(r.body) for r in queued))
    sending.cancel()
    sock.close()
    assert 0 < most <= client.app[app_keys.SETTINGS].max_body_bytes + MAX_HEAD_BYTES + (1 << 18)


async def test_trailers_never_become_headers(front: AppClient) -> None:
    chunked_head = (
        b"POST /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    answer = await exchange_raw(
        front, chunked_head + b"2\r\n{}\r\n0\r\nX-Request-ID: from-the-trailer\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 405 ") and b"from-the-trailer" not in answer
    huge = b"X-Mark: " + MARK * 1000 + b"\r\n"
    answer = await exchange_raw(front, chunked_head + b"2\r\n{}\r\n0\r\n" + huge + b"\r\n")
    problem_of(answer, 431)


async def test_a_100_continue_owed_behind_a_queued_request_is_sent(front: AppClient) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", front.server.port)
    health = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    writer.write(health + START + AUTH + LENGTH + b"Expect: 100-continue\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200 ")
    length = int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    assert (
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(BODY)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 201 ")
    writer.close()


async def test_http_10_gets_no_100_continue(front: AppClient) -> None:
    request = (
        START.replace(b"HTTP/1.1", b"HTTP/1.0") + AUTH + LENGTH + b"Expect: 100-continue\r\n\r\n"
    )
    answer = await exchange_raw(front, request + BODY)
    assert answer.startswith(b"HTTP/1.1 201 ")


async def test_shutdown_does_not_wait_for_a_head_still_arriving(make_front: FrontMaker) -> None:
    client = await make_front(shutdown_timeout=60.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")
    await writer.drain()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(client.server.close(), 10)  # not the 60 s the shutdown allows
    assert await read_to_end(reader) == b""
    writer.close()


@pytest.mark.parametrize("refused", [b"Content-Encoding: br\r\n", b"Expect: nothing\r\n"])
async def test_a_refused_absolute_target_logs_its_path_not_its_userinfo(
    front: AppClient, json_log: io.BytesIO, refused: bytes
) -> None:
    """An absolute-form target's user information (RFC 9112 3.2.2: a client may send it, a
    credential) was logged as the request's path when the request was refused: the front's
    raw target went to the log line. Only its path is logged, as for a request served."""
    start = START.replace(b"/v1/handoffs", b"http://" + MARK + b":pw@test/v1/handoffs")
    answer = await exchange_raw(front, start + AUTH + refused + LENGTH + b"\r\n" + BODY)
    assert answer.split(b" ", 2)[1] in (b"415", b"417")
    assert MARK not in json_log.getvalue() and b"pw@" not in json_log.getvalue()
    (line,) = [line for line in log_lines(json_log) if line["event"] == "request"]
    assert line["path"] in ("/v1/handoffs", "-")  # "-": refused before its path was read


async def test_connections_kept_alive_between_requests_give_way_to_new_ones(
    make_front: FrontMaker,
) -> None:
    # Found in review: a connection kept alive after its answer held its place for the idle
    # time (75 s), so one request every 75 s a connection kept every new client out (503).
    client = await make_front(max_connections=3)
    health = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    kept = [await asyncio.open_connection("127.0.0.1", client.server.port) for _ in range(3)]
    for reader, writer in kept:
        writer.write(health)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readexactly(int(head.partition(b"Content-Length: ")[2].split(b"\r\n")[0]))
    answer = await exchange_raw(client, START + AUTH + LENGTH + b"Connection: close\r\n\r\n" + BODY)
    assert answer.startswith(b"HTTP/1.1 201 ")
    for _ in range(100):  # until the client has seen the close
        if any(reader.at_eof() for reader, _ in kept):
            break
        await asyncio.sleep(0.02)
    # One kept-alive connection was closed for it, cleanly (no answer cut, no reset).
    assert [reader.at_eof() for reader, _ in kept].count(True) == 1
    assert client.app[app_keys.METRICS].value("identity_connections_refused_total") == 0
    for _, writer in kept:
        writer.close()


async def test_connections_with_a_request_under_way_are_not_closed_for_new_ones(
    make_front: FrontMaker,
) -> None:
    client = await make_front(max_connections=2)
    health = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(health)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # a next request begun
    silent = await asyncio.open_connection("127.0.0.1", client.server.port)  # none yet
    await asyncio.sleep(0.1)
    turned_away, _ = await asyncio.open_connection("127.0.0.1", client.server.port)
    assert (await read_to_end(turned_away)).startswith(b"HTTP/1.1 503 ")
    writer.write(b"Host: test\r\n\r\n")
    await reader.readuntil(b"HTTP/1.1 200 ")  # the begun request is answered
    writer.close()
    silent[1].close()
