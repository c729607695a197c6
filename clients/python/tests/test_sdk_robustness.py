"""Answers the service never gives, from a real misbehaving server on loopback: every one
is a typed error (never a raw exception of httpx, json or a KeyError), the same from both
clients, and the middlewares answer their 303 to the clean URL."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from identity_client import (
    APIError,
    AsyncIdentityClient,
    ConfigurationError,
    Identity,
    IdentityClient,
    IdentityConnectionError,
    IdentityError,
    InvalidRequest,
    PreparedHandoff,
    ServiceUnavailable,
)
from identity_client._base import retry_after
from identity_client.middleware import (
    IdentityASGIMiddleware,
    IdentityWSGIMiddleware,
    identity_middleware,
)
from misbehaving import Answer, Misbehaving, Seen, elapsed

WRITE_KEY = "robustness-write-key-0123456789"
TOKEN = "robustness-token-0123456789abcdef0123456789"
VISITOR = "visitor-robustness-42"
USER = "user-robustness-42"
MODES = ["sync", "async"]
OPERATIONS = ["prepare", "exchange"]


def call(mode: str, operation: str, url: str, **settings: Any) -> Identity | PreparedHandoff:
    """``operation`` with the sync or the async client (bounded: 20 s at most)."""
    settings = {"max_retries": 0, **settings}
    if mode == "sync":
        with IdentityClient(url, WRITE_KEY, **settings) as client:
            if operation == "prepare":
                return client.prepare(VISITOR, USER, destination="http://b.localhost/")
            return client.exchange(TOKEN)

    async def run() -> Identity | PreparedHandoff:
        async with AsyncIdentityClient(url, WRITE_KEY, **settings) as client:
            if operation == "prepare":
                return await client.prepare(VISITOR, USER, destination="http://b.localhost/")
            return await client.exchange(TOKEN)

    return asyncio.run(asyncio.wait_for(run(), 20))


def success(operation: str, body: bytes, **headers: str) -> Answer:
    """The status the operation succeeds with (201, 200), with ``body``."""
    status = 201 if operation == "prepare" else 200
    return Answer(status, body, {"Content-Type": "application/json", **headers})


PREPARED = {
    "token": "t" * 43,
    "redirectUrl": "http://b.localhost/?handoff_token=x",
    "expiresAt": "2030-01-01T00:00:00Z",
    "expiresIn": 60,
}
EXCHANGED = {"anonymousId": "a-1", "preparedAt": "2030-01-01T00:00:00Z", "source": "handoff"}


def changed(operation: str, **fields: Any) -> bytes:
    """A valid answer of ``operation`` with ``fields`` replaced (None: null)."""
    data = dict(PREPARED if operation == "prepare" else EXCHANGED)
    data.update(fields)
    return json.dumps(data).encode()


MALFORMED: dict[str, dict[str, bytes]] = {
    "prepare": {
        "empty object": b"{}",
        "null": b"null",
        "an array": b"[]",
        "not JSON": b"<html>ok</html>",
        "nested too deep": b"[" * 100_000,
        "null fields": changed("prepare", token=None, redirectUrl=None, expiresAt=None),
        "expiresAt null": changed("prepare", expiresAt=None),
        "expiresAt not a date": changed("prepare", expiresAt="tomorrow"),
        "expiresAt without a zone": changed("prepare", expiresAt="2030-01-01T00:00:00"),
        "expiresIn a string": changed("prepare", expiresIn="60"),
        "expiresIn a bool": changed("prepare", expiresIn=True),
        "token a number": changed("prepare", token=7),
    },
    "exchange": {
        "empty object": b"{}",
        "null": b"null",
        "not JSON": b"<html>ok</html>",
        "nested too deep": b"[" * 100_000,
        "anonymousId null": changed("exchange", anonymousId=None),
        "anonymousId empty": changed("exchange", anonymousId=""),
        "anonymousId a number": changed("exchange", anonymousId=42),
        "preparedAt not a date": changed("exchange", preparedAt="yesterday"),
        "preparedAt a number": changed("exchange", preparedAt=1),
        "traits a list": changed("exchange", traits=[1]),
        "userId a number": changed("exchange", userId=1),
    },
}
CASES = [(op, name) for op, cases in MALFORMED.items() for name in cases]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("operation", "case"), CASES)
def test_a_malformed_answer_is_an_api_error(
    server: Misbehaving, mode: str, operation: str, case: str
) -> None:
    server.respond = lambda seen: success(operation, MALFORMED[operation][case])
    with pytest.raises(APIError) as caught:
        call(mode, operation, server.url)
    assert type(caught.value) is APIError
    assert caught.value.status == (201 if operation == "prepare" else 200)
    assert caught.value.title == "Malformed answer"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_valid_answer_from_the_same_server_is_read(
    server: Misbehaving, mode: str, operation: str
) -> None:
    """The control: the server and the checks accept what the service does send."""
    server.respond = lambda seen: success(operation, changed(operation))
    result = call(mode, operation, server.url)
    if operation == "prepare":
        assert isinstance(result, PreparedHandoff) and result.expires_in == 60
    else:
        assert isinstance(result, Identity) and result.anonymous_id == "a-1"


@pytest.mark.parametrize("mode", MODES)
def test_an_identity_with_a_user_id_alone_is_read(server: Misbehaving, mode: str) -> None:
    """What the service answers for a handoff prepared with a userId alone."""
    server.respond = lambda seen: success(
        "exchange", changed("exchange", anonymousId=None, userId="u-1")
    )
    identity = call(mode, "exchange", server.url)
    assert isinstance(identity, Identity)
    assert (identity.anonymous_id, identity.user_id) == (None, "u-1")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_undecodable_answer_is_an_api_error(
    server: Misbehaving, mode: str, operation: str
) -> None:
    """Content-Encoding: gzip on a body that is not: httpx's DecodingError, which is not
    one of its transport errors, must not escape."""
    server.respond = lambda seen: success(operation, b"not gzip", **{"Content-Encoding": "gzip"})
    with pytest.raises(APIError) as caught:
        call(mode, operation, server.url)
    assert type(caught.value) is APIError
    # And a body that is gzip is read.
    body = gzip.compress(changed(operation))
    server.respond = lambda seen: success(operation, body, **{"Content-Encoding": "gzip"})
    assert call(mode, operation, server.url)


@pytest.mark.parametrize("mode", MODES)
def test_a_problem_nested_too_deep_is_still_its_status_error(
    server: Misbehaving, mode: str
) -> None:
    server.respond = lambda seen: Answer(503, b"[" * 100_000, {"Content-Type": "text/plain"})
    with pytest.raises(ServiceUnavailable):
        call(mode, "exchange", server.url)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "ftp://identity.internal",
        "identity.internal:8000",
        "http://",
        # User info: httpx sent it as the Basic credentials instead of the write key (every
        # call Unauthorized, the password sent to the service), and repr() showed it.
        "http://user:secret-pw@identity.internal",
        "http://user@identity.internal",
        "http://:secret-pw@identity.internal/base",
        # A query or a fragment: the call's path was appended to it, so every call went to
        # another path ("/?x=1/v1/handoffs", "/").
        "http://identity.internal/?x=1",
        "http://identity.internal?",
        "http://identity.internal/base#part",
        "http://identity.internal#",
    ],
)
@pytest.mark.parametrize("client_class", [IdentityClient, AsyncIdentityClient])
def test_an_invalid_base_url_is_refused_when_the_client_is_made(
    url: str, client_class: type[IdentityClient | AsyncIdentityClient]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        client_class(url, WRITE_KEY)
    assert url not in str(caught.value) or url == "http://"
    assert "secret-pw" not in str(caught.value)


@pytest.mark.parametrize(
    "write_key",
    ["secret:key-0123456789", "secret-clé-0123456789", "secret\r\nX-Key: 1", "secret\x00"],
)
@pytest.mark.parametrize("client_class", [IdentityClient, AsyncIdentityClient])
def test_a_write_key_the_service_cannot_read_is_refused_when_the_client_is_made(
    write_key: str, client_class: type[IdentityClient | AsyncIdentityClient]
) -> None:
    """Sent as HTTP Basic's user name, a ':' ends it there (the service read "secret"), and
    the service reads only printable ASCII keys: every call was Unauthorized."""
    with pytest.raises(ConfigurationError, match="write key") as caught:
        client_class("http://127.0.0.1:1", write_key)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
def test_a_base_url_with_a_path_prefix_is_called_under_it(server: Misbehaving, mode: str) -> None:
    seen: list[Seen] = []

    def respond(request: Seen) -> Answer:
        seen.append(request)
        return success("prepare", json.dumps(PREPARED).encode())

    server.respond = respond
    call(mode, "prepare", f"{server.url}/identity/")
    assert [request.path for request in seen] == ["/identity/v1/handoffs"]


# Retry-After: delay-seconds or an HTTP-date (RFC 9110 10.2.3), the wait capped


def http_date(moment: float, form: str = "imf") -> str:
    """``moment`` (a POSIX time) as an HTTP-date in one of RFC 9110 5.6.7's three forms."""
    stamp = datetime.fromtimestamp(moment, UTC)
    if form == "rfc850":
        return stamp.strftime("%A, %d-%b-%y %H:%M:%S GMT")
    if form == "asctime":
        return stamp.strftime("%a %b ") + f"{stamp.day:2d}" + stamp.strftime(" %H:%M:%S %Y")
    return stamp.strftime("%a, %d %b %Y %H:%M:%S GMT")


def after(value: str) -> float | None:
    return retry_after(httpx.Response(503, headers={b"Retry-After": value.encode()}))


@pytest.mark.parametrize("form", ["imf", "rfc850", "asctime"])
def test_retry_after_reads_each_form_of_http_date(form: str) -> None:
    """A date was taken for absent (the Node SDK waited for it); each of the three forms
    is read, in UTC (asctime's has no zone: it was read in local time by the standard
    library), as the whole seconds until then, 0 once past."""
    now = time.time()
    assert after(http_date(now + 30, form)) in (30.0, 31.0)
    assert after(http_date(now - 3600, form)) == 0.0


def test_retry_after_is_delay_seconds_or_an_http_date_and_nothing_else() -> None:
    assert after("2") == 2.0
    assert after(" 120 ") == 120.0  # surrounding whitespace is not the value's
    assert after("0") == 0.0
    # Neither delay-seconds (1*DIGIT) nor an HTTP-date: absent, as in the Node SDK.
    for value in (
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "soon",
        "",
        "-3",
        "1.5",
        "1e3",
        "+5",
        "0x10",
        "2\u00b3",
        "٣",
        "9" * 400,
        "2030-01-01T00:00:00Z",
        "Sun, 31 Feb 2030 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:49:37 GMT",
        "Sat, 29 Feb 2031 08:49:37 GMT",
    ):
        assert after(value) is None, value
    # A date in a form the standard library also reads (a numeric zone, no weekday) is
    # still a date: the time it names.
    assert after("Sun, 06 Nov 1994 08:49:37 +0000") == 0.0


def test_an_rfc850_year_is_read_as_rfc_9110_says() -> None:
    """Two digits: the year in this century, unless that is more than 50 years ahead."""
    year = datetime.now(UTC).year
    ahead = (year + 40) % 100
    behind = (year + 60) % 100  # this century's would be 60 years ahead: the last century's
    assert (after(f"Friday, 01-Jan-{ahead:02d} 00:00:00 GMT") or 0) > 30 * 365 * 86400
    assert after(f"Friday, 01-Jan-{behind:02d} 00:00:00 GMT") == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("form", ["seconds", "imf", "rfc850", "asctime"])
def test_retry_after_of_a_real_answer_in_each_form(
    server: Misbehaving, mode: str, status: int, form: str
) -> None:
    value = "7" if form == "seconds" else http_date(time.time() + 7, form)
    server.respond = lambda seen: Answer(
        status, b"{}", {"Retry-After": value, "Content-Type": "application/json"}
    )
    with pytest.raises(IdentityError) as caught:
        call(mode, "prepare", server.url)
    assert caught.value.status == status
    assert getattr(caught.value, "retry_after", None) in (6.0, 7.0, 8.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["seconds", "imf"])
def test_a_retry_after_is_waited_before_the_retried_prepare(
    server: Misbehaving, mode: str, form: str
) -> None:
    """The HTTP-date form was ignored: the prepare was retried after its own backoff."""
    seen: list[float] = []

    def respond(request: Seen) -> Answer:
        seen.append(time.monotonic())
        if len(seen) > 1:
            return success("prepare", json.dumps(PREPARED).encode())
        value = "2" if form == "seconds" else http_date(time.time() + 2)
        return Answer(503, b"{}", {"Retry-After": value, "Content-Type": "application/json"})

    server.respond = respond
    call(mode, "prepare", server.url, max_retries=1, backoff_base=0.01, backoff_max=10)
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.9  # a date is whole seconds: 2 s ahead is 1 to 2 s away


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["seconds", "imf"])
def test_the_wait_after_a_retry_after_is_capped_at_backoff_max(
    server: Misbehaving, mode: str, form: str
) -> None:
    """Each wait was backoff_max plus up to backoff_base of jitter: 20 retries of a
    Retry-After an hour long took about 20 x (0.05 + 0.25) s; now each is at most 0.05 s."""
    seen: list[float] = []

    def respond(request: Seen) -> Answer:
        seen.append(time.monotonic())
        value = "3600" if form == "seconds" else http_date(time.time() + 3600)
        return Answer(503, b"{}", {"Retry-After": value, "Content-Type": "application/json"})

    server.respond = respond
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        call(mode, "prepare", server.url, max_retries=20, backoff_base=0.5, backoff_max=0.05)
    assert len(seen) == 21
    assert elapsed(started) < 2.5, elapsed(started)


@pytest.mark.parametrize("client_class", [IdentityClient, AsyncIdentityClient])
def test_no_retry_delay_is_over_backoff_max(
    client_class: type[IdentityClient | AsyncIdentityClient],
) -> None:
    """The longer of Retry-After and the jittered backoff, capped, as the Node SDK waits."""
    client = client_class("http://127.0.0.1:1", WRITE_KEY, backoff_base=1.0, backoff_max=2.0)
    for attempt in range(4):
        for retry_after_seconds in (None, 0.0, 1.5, 5.0, 3600.0):
            delays = [client._retry_delay(attempt, retry_after_seconds) for _ in range(200)]
            assert max(delays) <= 2.0
            if retry_after_seconds is not None:
                assert min(delays) >= min(retry_after_seconds, 2.0)


@pytest.mark.parametrize("mode", MODES)
def test_a_prepare_is_retried_past_a_thousand_retries(server: Misbehaving, mode: str) -> None:
    """From retry 1024 on, backoff_base * 2**attempt raised a raw OverflowError (int too
    large to convert to float) instead of waiting and retrying."""
    seen: list[Seen] = []

    def respond(request: Seen) -> Answer:
        seen.append(request)
        return Answer(503, b"{}", {"Content-Type": "application/json"})

    server.respond = respond
    with pytest.raises(ServiceUnavailable):
        call(mode, "prepare", server.url, max_retries=1030, backoff_base=0.001, backoff_max=0)
    assert len(seen) == 1031


@pytest.mark.parametrize("base", [1e-310, 0.001, 1.0, 2147483.647])
@pytest.mark.parametrize("maximum", [0.0, 0.5, 2147483.647])
def test_the_backoff_reaches_backoff_max_and_stays_there(base: float, maximum: float) -> None:
    """Capped at backoff_max for any attempt, never an OverflowError (the exponent is capped
    where the backoff passes backoff_max, however small backoff_base is)."""
    client = IdentityClient("http://127.0.0.1:1", WRITE_KEY, backoff_base=base, backoff_max=maximum)
    for attempt in range(61):
        assert client._backoff(attempt) == min(maximum, base * 2.0**attempt)
    assert 0 <= client._backoff(1023) <= client._backoff(1024) <= maximum
    for attempt in (1100, 2000, 10**9):
        assert client._backoff(attempt) == maximum
    assert max(client._retry_delay(10**9, None) for _ in range(200)) >= maximum / 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_retry_after_is_ignored(server: Misbehaving, mode: str, value: str) -> None:
    """Sync, float('nan') crashed time.sleep; async, asyncio.sleep(nan) never returned."""
    seen: list[Seen] = []

    def respond(request: Seen) -> Answer:
        seen.append(request)
        return Answer(503, b"{}", {"Retry-After": value, "Content-Type": "application/json"})

    server.respond = respond
    with pytest.raises(ServiceUnavailable) as caught:
        call(mode, "prepare", server.url, max_retries=1, backoff_base=0.01, backoff_max=0.05)
    assert caught.value.retry_after is None
    assert len(seen) == 2  # retried once, after the backoff


# A timeout bounds the whole attempt


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_answer_trickling_in_times_out(server: Misbehaving, mode: str, operation: str) -> None:
    """Headers, then one byte every 0.1 s: httpx's read timeout (per read) never trips;
    the attempt's does. Without it the call ends after the 6 s of the drip."""
    body = b" " * 60
    server.respond = lambda seen: Answer(200, body, {"Content-Type": "application/json"}, 0.1)
    started = time.monotonic()
    with pytest.raises(IdentityConnectionError) as caught:
        call(mode, operation, server.url, timeout=0.5)
    assert elapsed(started) < 4
    assert "timed out" in str(caught.value)


def test_headers_trickling_in_time_the_async_client_out(server: Misbehaving) -> None:
    head_and_body = b" " * 60
    server.respond = lambda seen: Answer(
        200, head_and_body, {"X-Padding": "p" * 60}, drip=0.1, drip_headers=True
    )
    started = time.monotonic()
    with pytest.raises(IdentityConnectionError) as caught:
        call("async", "exchange", server.url, timeout=0.5)
    assert elapsed(started) < 4
    assert "timed out" in str(caught.value)


def test_a_trickling_answer_is_retried_as_a_connection_error(server: Misbehaving) -> None:
    seen: list[Seen] = []

    def respond(request: Seen) -> Answer:
        seen.append(request)
        if len(seen) == 1:
            return Answer(201, b" " * 60, {}, drip=0.1)
        return success("prepare", changed("prepare"))

    server.respond = respond
    prepared = call("sync", "prepare", server.url, timeout=0.5, max_retries=1, backoff_base=0.01)
    assert isinstance(prepared, PreparedHandoff)
    assert len(seen) == 2


# No secret in an error's text


def echo(seen: Seen) -> Answer:
    """A gateway's 400 echoing the request: its Authorization header (and the key in it)
    and its body (the token, the visitor's ids)."""
    authorization = seen.headers.get("Authorization", "")
    key = base64.b64decode(authorization.removeprefix("Basic ")).decode()
    text = f"rejected {authorization} (key {key}, Bearer {key.rstrip(':')}) for {seen.body!r}"
    problem = {
        "type": f"urn:gateway:{key}",
        "title": f"Bad credentials {key}",
        "detail": text,
        "errors": [{"field": key, "message": text}],
    }
    return Answer(400, json.dumps(problem).encode(), {"Content-Type": "application/problem+json"})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_echoed_write_key_or_token_is_scrubbed(
    server: Misbehaving, mode: str, operation: str
) -> None:
    server.respond = echo
    with pytest.raises(IdentityError) as caught:
        call(mode, operation, server.url)
    error = caught.value
    assert error.status == 400
    credentials = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    texts = [str(error), repr(error), str(error.type), str(error.title), str(error.detail)]
    if isinstance(error, InvalidRequest):
        texts += [repr(item) for item in error.errors]
    for text in texts:
        for secret in (WRITE_KEY, credentials, TOKEN, VISITOR, USER):
            assert secret not in text, (secret, text)
    assert "***" in str(error)


@pytest.mark.parametrize("mode", MODES)
def test_the_body_is_sent_as_utf8(server: Misbehaving, mode: str) -> None:
    """Text is sent as UTF-8, not escaped (which would make a body near the service's size
    limit up to twice as large); only a string that is not UTF-8 is sent escaped."""
    seen: list[Seen] = []

    def respond(request: Seen) -> Answer:
        seen.append(request)
        return success("exchange", changed("exchange"))

    server.respond = respond

    async def run() -> None:
        async with AsyncIdentityClient(server.url, WRITE_KEY) as client:
            await client.exchange(TOKEN, context={"page": {"title": "café"}})

    if mode == "sync":
        with IdentityClient(server.url, WRITE_KEY) as client:
            client.exchange(TOKEN, context={"page": {"title": "café"}})
    else:
        asyncio.run(run())
    assert "café".encode() in seen[0].body
    assert seen[0].headers["Content-Type"] == "application/json"


def echo_in_a_broken_header(seen: Seen) -> Answer:
    """An answer that is not HTTP (a broken proxy): a header line quoting the request's
    Authorization header and body, which the HTTP parser's error quotes in turn."""
    authorization = seen.headers.get("Authorization", "")
    line = f"X-Echo {authorization} {seen.body.decode()}"
    return Answer(200, b"", {line: "x"})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_connection_error_quoting_the_request_is_scrubbed(
    server: Misbehaving, mode: str, operation: str
) -> None:
    """A connection error's text quotes what the HTTP parser refused; when that echoes the
    request, the token and the visitor's ids are scrubbed from it as the write key is (the
    Node SDK's errors hold none of them either: test/answers.test.mjs), so the middleware's
    WARNING line does not log them."""
    server.respond = echo_in_a_broken_header
    with pytest.raises(IdentityConnectionError) as caught:
        call(mode, operation, server.url)
    error = caught.value
    credentials = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    assert "X-Echo" in str(error)  # the parser's error is quoted, scrubbed
    # A traceback too (logger.exception): it does not chain the raw, unscrubbed error.
    logged = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), logged):
        for secret in (WRITE_KEY, credentials, TOKEN, VISITOR, USER):
            assert secret not in text, (secret, text)


def echo_the_bytes_in_a_broken_header(seen: Seen) -> Answer:
    """As echo_in_a_broken_header, the body's bytes as they came (UTF-8), as a proxy that
    copies the request would send them back."""
    return Answer(200, b"", {f"X-Echo {seen.body.decode('latin-1')}": "x"})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "user_id",
    [
        "jos\u00e9.garc\u00eda@example.com",
        'user "quoted" 42',
        "o'neil\\42",
        "\u30e6\u30fc\u30b6\u30fc-42",
    ],
)
def test_a_connection_error_quoting_ids_that_are_not_plain_ascii_is_scrubbed(
    server: Misbehaving, mode: str, user_id: str
) -> None:
    """The parser's error quotes the refused line as a bytes repr: a non-ASCII character as
    its UTF-8 bytes' escapes, a quote or backslash as the JSON body escaped it. An id that
    holds one is scrubbed in that form too."""
    server.respond = echo_the_bytes_in_a_broken_header
    visitor = f"v\u00edsitor-{user_id}"

    async def run() -> None:
        async with AsyncIdentityClient(server.url, WRITE_KEY, max_retries=0) as client:
            await client.prepare(visitor, user_id, destination="http://b.localhost/")

    def prepare() -> None:
        if mode == "async":
            asyncio.run(run())
            return
        with IdentityClient(server.url, WRITE_KEY, max_retries=0) as client:
            client.prepare(visitor, user_id, destination="http://b.localhost/")

    with pytest.raises(IdentityConnectionError) as caught:
        prepare()
    error = caught.value
    logged = "".join(traceback.format_exception(error))
    assert "X-Echo" in str(error)
    for text in (str(error), repr(error), logged):
        for secret in (user_id, visitor):
            sent = json.dumps(secret, ensure_ascii=False)[1:-1].encode()
            quoted = repr(sent + b'"')[2:-2]  # as in bytearray(b'...{"userId":"..."}...')
            for form in (secret, sent.decode(), quoted):
                assert form not in text, (form, text)


def test_a_short_token_is_scrubbed_where_it_stands_alone(server: Misbehaving) -> None:
    """A short token (the middleware's "-" for an empty one) is scrubbed as a word, so it
    does not mangle every hyphen of the text."""
    server.respond = echo
    with IdentityClient(server.url, WRITE_KEY) as client, pytest.raises(APIError) as caught:
        client.exchange("-")
    assert '"***"' in caught.value.detail  # the body's "token": "-"
    assert "urn:gateway:" in str(caught.value.type)


# The middlewares take their fallback path


def wsgi_echo(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"page"]


async def asgi_echo(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"page"})


ANSWERS = {
    "empty object": Answer(200, b"{}"),
    "anonymousId null": Answer(200, b'{"anonymousId": null}'),
    "undecodable": Answer(200, b"nope", {"Content-Encoding": "gzip"}),
    "trickling": Answer(200, b" " * 60, {}, drip=0.1),
    # Not an error: a handoff prepared with a userId alone has no anonymousId for the cookie.
    "userId alone": Answer(200, b'{"anonymousId": null, "userId": "u-1"}'),
}


def check_clean_redirect(status: int, headers: httpx.Headers, started: float) -> None:
    """The 303 to the clean URL, without a cookie, and before the 6 s of a trickle."""
    assert elapsed(started) < 4
    assert status == 303
    assert headers["location"] == "/cart?a=1"
    assert "set-cookie" not in headers


@pytest.mark.parametrize("answer", ANSWERS)
def test_the_wsgi_middleware_falls_back(server: Misbehaving, answer: str) -> None:
    server.respond = lambda seen: ANSWERS[answer]
    started = time.monotonic()
    with IdentityClient(server.url, WRITE_KEY, timeout=0.5) as client:
        app = IdentityWSGIMiddleware(wsgi_echo, client)
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://b") as browser:
            landed = browser.get(f"/cart?handoff_token={TOKEN}&a=1")
    check_clean_redirect(landed.status_code, landed.headers, started)


@pytest.mark.parametrize("answer", ANSWERS)
async def test_the_asgi_middleware_falls_back(server: Misbehaving, answer: str) -> None:
    server.respond = lambda seen: ANSWERS[answer]
    started = time.monotonic()
    async with AsyncIdentityClient(server.url, WRITE_KEY, timeout=0.5) as client:
        app = IdentityASGIMiddleware(asgi_echo, client)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as browser:
            landed = await browser.get(f"/cart?handoff_token={TOKEN}&a=1")
    check_clean_redirect(landed.status_code, landed.headers, started)


@pytest.mark.parametrize("answer", ANSWERS)
async def test_the_aiohttp_middleware_falls_back(
    server: Misbehaving, answer: str, aiohttp_client: Any
) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="page")

    server.respond = lambda seen: ANSWERS[answer]
    started = time.monotonic()
    async with AsyncIdentityClient(server.url, WRITE_KEY, timeout=0.5) as client:
        app = web.Application(middlewares=[identity_middleware(client)])
        app.router.add_get("/cart", page)
        browser: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        landed = await browser.get(f"/cart?handoff_token={TOKEN}&a=1", allow_redirects=False)
        check_clean_redirect(landed.status, httpx.Headers(dict(landed.headers)), started)
