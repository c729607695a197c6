"""Every bad request gets a precise problem+json answer, on both stores, and changes nothing."""

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from identity_service.problems import (
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_PREFIX,
    HttpError,
    Problem,
)
from tests.conftest import (
    CHECKOUT_URL,
    WRITE_KEYS,
    AppClient,
    auth,
    exchange,
    prepare,
    stored_count,
)

PREPARE = "/v1/handoffs"
EXCHANGE = "/v1/handoffs/exchange"
GOOD_PREPARE = {"anonymousId": "anon-1", "destination": CHECKOUT_URL}
JSON = {"Content-Type": "application/json"}


def body(**fields: Any) -> bytes:
    return orjson.dumps({**GOOD_PREPARE, **fields})


def nested(field: str, depth: int, base: dict[str, Any] = GOOD_PREPARE) -> bytes:
    """``base`` with ``field`` holding ``depth`` nested objects (orjson writes only ~250)."""
    value = b'{"a":' * depth + b"1" + b"}" * depth
    return orjson.dumps(base)[:-1] + b',"' + field.encode() + b'":' + value + b"}"


def without(field: str) -> bytes:
    return orjson.dumps({k: v for k, v in GOOD_PREPARE.items() if k != field})


# (case id, path, raw body, extra headers, status, problem slug, field named in errors)
BAD_BODIES: list[tuple[str, str, bytes, dict[str, str], int, str, str | None]] = [
    ("malformed json", PREPARE, b'{"anonymousId": ', JSON, 400, "malformed-json", None),
    ("empty body", PREPARE, b"", JSON, 400, "malformed-json", None),
    ("json array", PREPARE, b"[1, 2]", JSON, 400, "malformed-json", None),
    ("json string", EXCHANGE, b'"token"', JSON, 400, "malformed-json", None),
    ("text/plain", PREPARE, body(), {"Content-Type": "text/plain"}, 415, "unsupported-media-type", None),
    ("form encoded", EXCHANGE, b"token=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported-media-type", None),
    ("no content type", PREPARE, body(), {}, 415, "unsupported-media-type", None),
    ("no ids", PREPARE, orjson.dumps({"destination": CHECKOUT_URL}), JSON, 400, "validation-failed", "anonymousId"),
    ("empty anonymousId", PREPARE, body(anonymousId=""), JSON, 400, "validation-failed", "anonymousId"),
    ("anonymousId over 255", PREPARE, body(anonymousId="a" * 256), JSON, 400, "validation-failed", "anonymousId"),
    ("anonymousId number", PREPARE, body(anonymousId=12345), JSON, 400, "validation-failed", "anonymousId"),
    ("userId over 255", PREPARE, body(userId="u" * 256), JSON, 400, "validation-failed", "userId"),
    ("userId object", PREPARE, body(userId={"id": 1}), JSON, 400, "validation-failed", "userId"),
    ("traits list", PREPARE, body(traits=["a"]), JSON, 400, "validation-failed", "traits"),
    ("context string", PREPARE, body(context="page"), JSON, 400, "validation-failed", "context"),
    ("consent not bool", PREPARE, body(consent={"analytics": "yes"}), JSON, 400, "validation-failed", "consent.analytics"),
    ("consent not object", PREPARE, body(consent=True), JSON, 400, "validation-failed", "consent"),
    ("no destination", PREPARE, without("destination"), JSON, 400, "validation-failed", "destination"),
    ("destination http", PREPARE, body(destination="http://checkout.example-pay.com/"), JSON, 400, "validation-failed", "destination"),
    ("destination relative", PREPARE, body(destination="/cart"), JSON, 400, "validation-failed", "destination"),
    ("destination javascript", PREPARE, body(destination="javascript:alert(1)"), JSON, 400, "validation-failed", "destination"),
    ("destination userinfo", PREPARE, body(destination="https://u:p@checkout.example-pay.com/"), JSON, 400, "validation-failed", "destination"),
    ("destination bad port", PREPARE, body(destination="https://checkout.example-pay.com:99999/"), JSON, 400, "validation-failed", "destination"),
    ("destination too long", PREPARE, body(destination=CHECKOUT_URL + "x" * 2048), JSON, 400, "validation-failed", "destination"),
    ("destination not allowed", PREPARE, body(destination="https://evil.example.net/"), JSON, 403, "destination-not-allowed", None),
    ("destination other port", PREPARE, body(destination="https://checkout.example-pay.com:8443/"), JSON, 403, "destination-not-allowed", None),
    ("ttl zero", PREPARE, body(ttl=0), JSON, 400, "validation-failed", "ttl"),
    ("ttl above max", PREPARE, body(ttl=601), JSON, 400, "validation-failed", "ttl"),
    ("ttl string", PREPARE, body(ttl="60"), JSON, 400, "validation-failed", "ttl"),
    ("ttl float", PREPARE, body(ttl=1.5), JSON, 400, "validation-failed", "ttl"),
    ("ttl boolean", PREPARE, body(ttl=True), JSON, 400, "validation-failed", "ttl"),
    ("unknown field", PREPARE, body(anonymousID="typo"), JSON, 400, "validation-failed", "anonymousID"),
    ("no token", EXCHANGE, b"{}", JSON, 400, "validation-failed", "token"),
    ("token number", EXCHANGE, b'{"token": 7}', JSON, 400, "validation-failed", "token"),
    ("token empty", EXCHANGE, b'{"token": ""}', JSON, 400, "validation-failed", "token"),
    ("token too long", EXCHANGE, orjson.dumps({"token": "t" * 129}), JSON, 400, "validation-failed", "token"),
    ("event number", EXCHANGE, b'{"token": "x", "event": 5}', JSON, 400, "validation-failed", "event"),
    ("event empty", EXCHANGE, b'{"token": "x", "event": ""}', JSON, 400, "validation-failed", "event"),
    ("event too long", EXCHANGE, orjson.dumps({"token": "x", "event": "e" * 201}), JSON, 400, "validation-failed", "event"),
    ("properties list", EXCHANGE, b'{"token": "x", "properties": [1]}', JSON, 400, "validation-failed", "properties"),
    ("fallback string", EXCHANGE, b'{"token": "x", "fallback": "yes"}', JSON, 400, "validation-failed", "fallback"),
    ("traits nested 300 deep", PREPARE, nested("traits", 300), JSON, 400, "malformed-json", None),
    ("context nested 32 deep", PREPARE, nested("context", 32), JSON, 400, "malformed-json", None),
    ("properties nested 300 deep", EXCHANGE, nested("properties", 300, {"token": "x"}), JSON, 400, "malformed-json", None),
    ("unknown token", EXCHANGE, b'{"token": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}', JSON, 404, "token-not-found", None),
    ("garbage token", EXCHANGE, b'{"token": "not a token at all"}', JSON, 404, "token-not-found", None),
]  # fmt: skip


def assert_problem(
    status: int, content_type: str, problem: dict[str, Any], expected: int, slug: str
) -> None:
    assert status == expected, problem
    assert content_type == PROBLEM_CONTENT_TYPE
    assert problem["type"] == PROBLEM_TYPE_PREFIX + slug
    assert problem["status"] == expected
    assert problem["title"] and problem["detail"]
    assert "Traceback" not in orjson.dumps(problem).decode()


@pytest.mark.parametrize(
    ("path", "raw", "headers", "expected", "slug", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_BODIES],
)
async def test_bad_body_gets_a_precise_problem(
    client: AppClient,
    path: str,
    raw: bytes,
    headers: dict[str, str],
    expected: int,
    slug: str,
    field: str | None,
) -> None:
    source = "shop" if path == PREPARE else "checkout"
    response = await client.post(path, data=raw, headers={**headers, **auth(source)})
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, expected, slug)
    if field is not None:
        assert field in [error["field"] for error in problem["errors"]]


async def test_all_validation_errors_are_reported_together(client: AppClient) -> None:
    raw = orjson.dumps({"anonymousId": 1, "destination": "ftp://x", "ttl": -1, "extra": 1})
    response = await client.post(PREPARE, data=raw, headers={**JSON, **auth("shop")})
    problem = await response.json(content_type=None)
    fields = {error["field"] for error in problem["errors"]}
    assert fields == {"anonymousId", "destination", "ttl", "extra"}


async def test_problems_repeat_no_markup_and_stay_small(client: AppClient) -> None:
    # Found in review: the media type, unknown field names and consent categories came
    # back whole, the answer up to 20 times the size of the body.
    markup = "<img src=x onerror=alert(1)>"
    typed = await client.post(
        PREPARE, data=body(), headers={"Content-Type": f"text/{markup}", **auth("shop")}
    )
    assert typed.status == 415 and markup not in await typed.text()
    odd_names = {f"{markup}{n}": 1 for n in range(300)}
    categories = {f"{markup}{n}": "yes" for n in range(60)}
    for raw in (
        body(**odd_names),
        body(consent=categories),
        body(consent={**categories} | {f"c{n}": True for n in range(900)}),
    ):
        response = await client.post(PREPARE, data=raw, headers={**JSON, **auth("shop")})
        text = await response.text()
        assert response.status == 400 and markup not in text
        assert len(text) < 4096
    misspelt = await client.post(
        PREPARE, data=body(anonymousID="a"), headers={**JSON, **auth("shop")}
    )
    problem = await misspelt.json(content_type=None)
    assert [error["field"] for error in problem["errors"]] == ["anonymousID"]  # still named


async def test_nesting_up_to_the_limit_is_accepted(client: AppClient) -> None:
    response = await client.post(
        PREPARE, data=nested("context", 31), headers={**JSON, **auth("shop")}
    )
    assert response.status == 201, await response.text()


@pytest.mark.parametrize("path", [PREPARE, EXCHANGE])
async def test_body_over_the_limit_is_refused(client: AppClient, path: str) -> None:
    raw = orjson.dumps({**GOOD_PREPARE, "traits": {"blob": "x" * 16 * 1024}})
    response = await client.post(path, data=raw, headers={**JSON, **auth("shop")})
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, 413, "payload-too-large")


async def test_chunked_body_over_the_limit_is_refused(client: AppClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"anonymousId": "a", "traits": {"blob": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}}'

    response = await client.post(PREPARE, data=chunks(), headers={**JSON, **auth("shop")})
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, 413, "payload-too-large")


BAD_CREDENTIALS = [
    pytest.param({}, id="no authorization"),
    pytest.param({"Authorization": "Basic d3Jvbmcta2V5Og=="}, id="wrong basic key"),
    pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong bearer key"),
    pytest.param({"Authorization": "Basic !!!not-base64"}, id="malformed basic"),
    pytest.param({"Authorization": "Bearer "}, id="empty bearer"),
    pytest.param({"Authorization": f"Digest {WRITE_KEYS['shop']}"}, id="other scheme"),
]


@pytest.mark.parametrize("headers", BAD_CREDENTIALS)
@pytest.mark.parametrize("path", [PREPARE, EXCHANGE])
async def test_missing_or_wrong_credentials_get_401(
    client: AppClient, path: str, headers: dict[str, str]
) -> None:
    response = await client.post(path, data=body(), headers={**JSON, **headers})
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Basic realm=")


async def test_reused_token_gets_the_same_answer_as_an_unknown_one(client: AppClient) -> None:
    token = (await prepare(client))["token"]
    assert (await exchange(client, token))[0] == 200
    status, reused = await exchange(client, token)
    _, unknown = await exchange(client, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert status == 404
    assert {k: v for k, v in reused.items()} == {k: v for k, v in unknown.items()}


async def test_expired_token_gets_the_same_answer_as_an_unknown_one(client: AppClient) -> None:
    token = (await prepare(client, ttl=1))["token"]
    await asyncio.sleep(1.2)
    status, problem = await exchange(client, token)
    assert status == 404
    assert problem["type"] == PROBLEM_TYPE_PREFIX + "token-not-found"


@pytest.mark.parametrize(
    "raw",
    [body(destination="https://evil.example.net/"), body(ttl=0), body(anonymousId=""), b"{"],
    ids=["not allowed", "bad ttl", "empty id", "malformed"],
)
async def test_rejected_prepare_stores_nothing(client: AppClient, raw: bytes) -> None:
    response = await client.post(PREPARE, data=raw, headers={**JSON, **auth("shop")})
    assert response.status in (400, 403)
    assert await stored_count(client) == 0


async def test_failed_exchange_leaves_other_handoffs_alone(client: AppClient) -> None:
    await prepare(client)
    await exchange(client, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    await exchange(client, "x", fallback="no")
    assert await stored_count(client) == 1


async def test_unknown_route_gets_404_problem(client: AppClient) -> None:
    response = await client.get("/v1/nothing-here")
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", PREPARE), ("PUT", PREPARE), ("GET", EXCHANGE), ("DELETE", EXCHANGE), ("POST", "/healthz")],
)  # fmt: skip
async def test_wrong_method_gets_405_problem_with_allow(
    client: AppClient, method: str, path: str
) -> None:
    response = await client.request(method, path)
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, 405, "method-not-allowed")
    assert response.headers["Allow"]


# Found in review: the destination's origin, the request's text, came back in the detail.
async def test_a_refused_destination_is_not_repeated(client: AppClient) -> None:
    raw = body(destination="https://call-0800-now.evil.example.net/")
    response = await client.post(PREPARE, data=raw, headers={**JSON, **auth("shop")})
    problem = await response.json(content_type=None)
    assert_problem(response.status, response.content_type, problem, 403, "destination-not-allowed")
    assert "evil" not in await response.text()
    assert "'shop'" in problem["detail"]  # the source, which the key names, still is


# Found in review: a 404 repeated the path percent-decoded, markup and all, in its detail and
# its instance, and a 405 the method.
async def test_no_problem_repeats_the_path_or_the_method_as_sent(client: AppClient) -> None:
    for path in ("/nope/%3Cscript%3Ealert(1)%3C/script%3E", "/v1/handoffs/%3Cscript%3E"):
        response = await client.get(path)
        problem = await response.json(content_type=None)
        assert_problem(response.status, response.content_type, problem, 404, "not-found")
        assert "script" not in await response.text()
        assert "instance" not in problem  # no route of the service's: nothing to name
    for method, path in (("PROPFIND", PREPARE), ("PATCH", EXCHANGE), ("PUT", "/healthz")):
        response = await client.request(method, path)
        problem = await response.json(content_type=None)
        assert_problem(response.status, response.content_type, problem, 405, "method-not-allowed")
        assert method not in problem["detail"]
        assert problem["instance"] == path  # the route's own path
    # A route's path spelled otherwise is named as the route's, not as sent.
    response = await client.get("/v1/handoff%73")
    assert response.status == 405
    assert (await response.json(content_type=None))["instance"] == PREPARE


def problem_classes(base: type[Problem] = Problem) -> Iterator[type[Problem]]:
    """``base`` and every problem class under it."""
    yield base
    for subclass in base.__subclasses__():
        yield from problem_classes(subclass)


def test_docs_api_lists_every_problem_type_with_its_status() -> None:
    """docs/api.md's table of problem types (``type`` after the prefix, status) is the
    problems.py defines; HttpError's status is the aiohttp error's it stands for."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    table = docs.partition("\n## Problems\n")[2].partition("\n## ")[0]
    listed = set(re.findall(r"^\| `([a-z-]+)` \| ([^|]+?) \|", table, re.MULTILINE))
    defined = {
        (problem.slug, "the error's" if problem is HttpError else str(problem.status))
        for problem in problem_classes()
    }
    assert sorted(listed) == sorted(defined)
