"""The OpenAPI document is valid, covers every route, and real answers match it."""

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import pytest
from aiohttp import DummyCookieJar, FormData, web
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from identity_service import app_keys, front
from identity_service.app import create_app
from identity_service.browser_helper import helper_script
from identity_service.constants import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TOKEN_PARAM,
    MAX_HEAD_BYTES,
    MAX_URL_LENGTH,
)
from identity_service.openapi import DESTINATION_PATTERN, openapi_dict
from identity_service.problems import (
    ExpectationFailed,
    HeadTooLarge,
    MalformedRequest,
    PayloadTooLarge,
    Problem,
    RequestTimeout,
    ServiceUnavailable,
    TransferCodingNotImplemented,
    UnsupportedContentEncoding,
)
from identity_service.settings import Settings
from identity_service.urls import parse_destination
from tests.conftest import (
    CHECKOUT_URL,
    AppClient,
    FrontTestServer,
    auth,
    make_settings,
    prepare,
)
from tests.redis_server import RedisServer
from tests.test_front import open_socket, read_response
from tests.webhook_receiver import WEBHOOK_SECRET, WebhookReceiver

DOCUMENT = openapi_dict()


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


PUBLISHER = "https://www.example.com"
CACHE = "https://www-example-com.cdn.ampproject.org"
DONE_URL = f"{PUBLISHER}/cart"


def amp_settings(
    redis_url: str | None = None,
    webhook: str = "http://127.0.0.1:9/apply",
    env: dict[str, str] | None = None,
    **extra: Any,
) -> Settings:
    """Settings with ``[amp]``: the add-to-cart action applied at ``webhook``, limits low
    enough to reach (3 requests an address, 2 a clientId), ``extra`` in the table, ``env``
    in the other settings."""
    action = {"webhook": webhook, "secret": WEBHOOK_SECRET, "done_url": DONE_URL}
    amp = {
        "public_url": f"{PUBLISHER}/identity",
        "publisher_origins": [PUBLISHER],
        "source": "shop",
        "actions": {"add-to-cart": action},
        "limit_per_ip": {"requests": 3, "window_seconds": 60},
        "limit_per_client": {"requests": 2, "window_seconds": 60},
        "max_form_bytes": 1024,
        "webhook_timeout": 0.5,
        "webhook_attempts": 1,
        **extra,
    }
    return make_settings(redis_url, amp=json.dumps(amp), **(env or {}))


def served_document(app: web.Application) -> dict[str, Any]:
    """The document ``app`` serves, built once with it."""
    document: dict[str, Any] = orjson.loads(app[app_keys.OPENAPI])
    return document


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Every operation of ``document``: (path, method)."""
    return [
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"  # what a path's operations share
    ]


@pytest.mark.parametrize("metrics_port", [False, True], ids=["metrics-here", "metrics-port"])
@pytest.mark.parametrize("amp", [False, True], ids=["without-amp", "with-amp"])
def test_every_route_is_documented_and_every_documented_path_is_routed(
    amp: bool, metrics_port: bool
) -> None:
    """With [amp], the /v1/amp/* routes were served and absent from the document. With
    IDENTITY_METRICS_PORT, /metrics is neither routed nor documented on the API's port."""
    env = {"metrics_port": "9464"} if metrics_port else {}
    app = create_app(amp_settings(env=env) if amp else make_settings(**env))
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    document = served_document(app)
    validate(document)
    assert routed == set(operations(document))
    assert (document == DOCUMENT) is not (amp or metrics_port)
    assert ("/metrics" in document["paths"]) is not metrics_port


# Answer headers the document describes where they are sent.
DESCRIBED_HEADERS = (
    "accept-encoding", "accept-post", "etag", "retry-after", "www-authenticate",
    # AMP's: CORS, the origin hop, the visitor cookie, collect_redirect and done_url.
    "access-control-allow-origin", "access-control-allow-credentials",
    "access-control-expose-headers", "access-control-allow-methods",
    "access-control-allow-headers", "access-control-max-age", "amp-redirect-to",
    "set-cookie", "location", "vary",
)  # fmt: skip


def resolved(item: dict[str, Any], document: dict[str, Any] = DOCUMENT) -> dict[str, Any]:
    """``item``, or the part of ``document`` its ``$ref`` names."""
    while "$ref" in item:
        found: Any = document
        for key in item["$ref"].removeprefix("#/").split("/"):
            found = found[key]
        item = found
    return item


def check_against_document(
    path: str,
    method: str,
    status: int,
    content_type: str,
    body: Any,
    headers: Mapping[str, str],
    document: dict[str, Any] = DOCUMENT,
) -> None:
    """The answer's status, body and described headers (their values too) are documented
    (in ``document``)."""
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented"
    answer = resolved(responses[str(status)], document)
    documented = {
        name.lower(): resolved(h, document) for name, h in answer.get("headers", {}).items()
    }
    for name, value in headers.items():
        if name.lower() not in DESCRIBED_HEADERS:
            continue
        assert name.lower() in documented, f"{method} {path} {status} sent {name}, not documented"
        schema = documented[name.lower()]["schema"]
        Draft202012Validator({**schema, "components": document["components"]}).validate(
            int(value) if schema.get("type") == "integer" else value
        )
    if "content" not in answer:
        assert body == "", f"{method} {path} {status} answered a body, none is documented"
        return
    content = answer["content"]
    assert content_type in content, f"{method} {path} {status} answered {content_type}"
    schema = {**content[content_type]["schema"], "components": document["components"]}
    Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(body)


async def test_real_answers_match_the_document(
    aiohttp_client: Callable[..., Awaitable[AppClient]], private_redis: RedisServer
) -> None:
    client = await aiohttp_client(create_app(make_settings(private_redis.url)))
    seen: set[tuple[str, str, int]] = set()

    async def call(method: str, path: str, **kwargs: Any) -> None:
        response = await client.request(method.upper(), path, **kwargs)
        is_json = response.content_type.endswith("json")
        body = await response.json(content_type=None) if is_json else await response.text()
        check_against_document(
            path, method, response.status, response.content_type, body, response.headers
        )
        seen.add((path, method, response.status))

    token = (await prepare(client, userId="u-1", consent={"analytics": True}))["token"]
    other = (await prepare(client))["token"]
    good = {"anonymousId": "a", "destination": CHECKOUT_URL}
    prepare_path, exchange_path = "/v1/handoffs", "/v1/handoffs/exchange"
    await call("post", prepare_path, json=good, headers=auth("shop"))
    await call("post", prepare_path, json={**good, "ttl": 0}, headers=auth("shop"))
    await call("post", prepare_path, json=good)
    await call("post", prepare_path, json={**good, "destination": "https://x.test/"}, headers=auth("shop"))  # fmt: skip
    await call("post", prepare_path, data=b"x" * 20000, headers={**auth("shop"), "Content-Type": "application/json"})  # fmt: skip
    await call("post", prepare_path, data=b"{}", headers=auth("shop"))
    await call("post", exchange_path, json={"token": token}, headers=auth("checkout"))
    await call("post", exchange_path, json={"token": token}, headers=auth("checkout"))
    await call("post", exchange_path, json={"token": token, "fallback": True}, headers=auth("checkout"))  # fmt: skip
    await call("post", exchange_path, json={"token": other}, headers=auth("partner"))
    await call("post", exchange_path, json={}, headers=auth("checkout"))
    await call("post", exchange_path, json={"token": "t"})
    await call("post", exchange_path, data=b"{" * 20000, headers={**auth("checkout"), "Content-Type": "application/json"})  # fmt: skip
    await call("post", exchange_path, data=b"token=1", headers=auth("checkout"))
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/identity.js"):
        await call("get", path)
    await call("get", "/v1/identity.js", headers={"If-None-Match": f'"{helper_script().etag}"'})
    private_redis.stop()
    await call("get", "/readyz")
    await call("post", prepare_path, json=good, headers=auth("shop"))
    await call("post", exchange_path, json={"token": other}, headers=auth("checkout"))

    # The front's own refusals, shared ($ref), are provoked on every operation by
    # test_the_fronts_refusals_are_documented_for_every_operation.
    documented = {
        (path, method, int(status))
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        for status, answer in operation["responses"].items()
        if "$ref" not in answer
    }
    assert documented - seen == set(), "documented answers the test did not provoke"


def documented_answers(document: dict[str, Any], prefix: str = "/") -> set[tuple[str, str, int]]:
    """The answers of ``document``'s operations under ``prefix`` but the shared ($ref) ones,
    the front's refusals, which test_the_fronts_refusals_are_documented_for_every_operation
    provokes on every operation."""
    return {
        (path, method, int(status))
        for path, method in operations(document)
        if path.startswith(prefix)
        for status, answer in document["paths"][path][method]["responses"].items()
        if "$ref" not in answer
    }


class AmpCaller:
    """Sends requests to a service with [amp] and checks each answer against the document
    it serves; ``seen`` holds (path template, method, status) of every answer."""

    def __init__(self, client: AppClient) -> None:
        self.client = client
        self.document = served_document(client.app)
        self.seen: set[tuple[str, str, int]] = set()
        # The rate limits count by the last X-Forwarded-For entry from a loopback peer: an
        # address for each request unless one is given, so only the 429s reach a limit.
        self._addresses = (f"198.51.100.{n}" for n in itertools.count(1))

    async def __call__(
        self,
        method: str,
        template: str,
        path: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        address: str | None = None,
        **kwargs: Any,
    ) -> Any:
        sent = {"X-Forwarded-For": address or next(self._addresses), **(headers or {})}
        response = await self.client.request(
            method.upper(), path or template, headers=sent, allow_redirects=False, **kwargs
        )
        text = await response.text()
        body = orjson.loads(text) if response.content_type.endswith("json") else text
        check_against_document(
            template,
            method,
            response.status,
            response.content_type,
            body,
            response.headers,
            self.document,
        )
        self.seen.add((template, method, response.status))
        return response


async def test_real_amp_answers_match_the_document(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    private_redis: RedisServer,
    receiver: WebhookReceiver,
) -> None:
    """Every answer of the AMP endpoints the document states, provoked through the front
    on a service with [amp]: statuses, bodies, the CORS headers (their values too), the
    visitor cookie, AMP-Redirect-To and the redirects' Location."""
    # No forwarder: a queued call's delivery would take the webhook's next scripted reply.
    app = create_app(amp_settings(private_redis.url, receiver.url, {"forwarder": "off"}))
    call = AmpCaller(await aiohttp_client(FrontTestServer(app), cookie_jar=DummyCookieJar()))
    collect, submit = "/v1/amp/collect", "/v1/amp/actions/{name}"
    complete = "/v1/amp/actions/{name}/complete"
    to_cart, unknown = "/v1/amp/actions/add-to-cart", "/v1/amp/actions/remove-all"
    same_origin, from_cache = {"AMP-Same-Origin": "true"}, {"Origin": CACHE}
    evil = {"Origin": "https://www-example-com.cdn.ampproject.org.evil.example"}
    cookie = {"Cookie": "ajs_anonymous_id=visitor-4d2a"}
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, x-other"}  # fmt: skip
    client_ids = (f"amp-cache-client-{n}" for n in itertools.count())

    def form() -> FormData:  # a clientId each: only the 429s reach its limit
        return FormData({"sku": "clip-50", "clientId": next(client_ids)})

    for template, path in ((collect, collect), (submit, to_cart)):
        await call("options", template, path, headers={**from_cache, **preflight})
        await call("options", template, path, headers={**evil, **preflight})
    await call("options", submit, unknown, headers={**from_cache, **preflight})

    await call("get", collect, headers=same_origin, params={"url": f"{PUBLISHER}/a"})
    await call("get", collect, headers={**from_cache, **cookie}, params={"ampId": "amp-c-2"})
    await call("post", collect, headers=same_origin, json={"event": "Clip Viewed"})
    await call("post", collect, headers={**same_origin, "Content-Type": "text/plain"}, data=b'{"x": 1}')  # fmt: skip
    # A GET's body is read as a POST's: the refusals are the same.
    for method, address in (("get", "203.0.113.7"), ("post", "203.0.113.10")):
        await call(method, collect, headers=evil)
        await call(method, collect, headers=same_origin, params={"event": "Added\x01"})
        await call(method, collect, headers=same_origin, params={"title": "t" * 1100})
        await call(method, collect, headers={**same_origin, "Content-Type": "text/html"}, data=b"<p>")  # fmt: skip
        await call(method, collect, headers={**same_origin, "Content-Type": "application/json"}, data=b"{")  # fmt: skip
        for _ in range(4):
            await call(method, collect, headers=same_origin, address=address)

    await call("post", submit, to_cart, headers={**same_origin, **cookie}, data=form())
    redirecting = await call("post", submit, to_cart, headers=from_cache, data=form())
    hop = redirecting.headers["AMP-Redirect-To"].removeprefix(f"{PUBLISHER}/identity")
    receiver.replies = [503]
    await call("post", submit, to_cart, headers={**same_origin, **cookie}, data=form())
    receiver.replies = [400]
    await call("post", submit, to_cart, headers={**same_origin, **cookie}, data=form())
    urlencoded = {**same_origin, "Content-Type": "application/x-www-form-urlencoded"}
    await call("post", submit, to_cart, headers=urlencoded, data=b"sku=1&sku=2")
    await call("post", submit, to_cart, headers=urlencoded, data=b"sku=" + b"x" * 1100)
    await call("post", submit, to_cart, headers={**same_origin, "Content-Type": "text/plain"}, data=b"sku")  # fmt: skip
    await call("post", submit, to_cart, headers=evil, data=form())
    await call("post", submit, unknown, headers=same_origin, data=form())
    for _ in range(4):
        await call("post", submit, to_cart, headers=same_origin, data=form(), address="203.0.113.8")  # fmt: skip

    await call("get", complete, hop, headers={"Sec-Fetch-Dest": "document", "Sec-Fetch-Mode": "navigate"})  # fmt: skip
    receiver.replies = [400]
    second = await call("post", submit, to_cart, headers=from_cache, data=form())
    await call("get", complete, second.headers["AMP-Redirect-To"].removeprefix(f"{PUBLISHER}/identity"))  # fmt: skip
    await call("get", complete, f"{unknown}/complete?token=t")
    for _ in range(4):
        await call("get", complete, f"{to_cart}/complete?token=t", address="203.0.113.9")

    private_redis.stop()
    await call("get", collect, headers=same_origin)
    await call("post", collect, headers=same_origin)
    await call("post", submit, to_cart, headers={**same_origin, **cookie}, data=form())
    await call("get", complete, f"{to_cart}/complete?token=t")

    assert documented_answers(call.document, "/v1/amp/") - call.seen == set()


async def test_a_collect_redirect_is_documented_as_collects_answer(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    """With collect_redirect, collect answers 302 to it, not 204: the document says so."""
    redirect = f"{PUBLISHER}/amp/pixel-next"
    app = create_app(amp_settings(collect_redirect=redirect))
    call = AmpCaller(await aiohttp_client(FrontTestServer(app), cookie_jar=DummyCookieJar()))
    for method in ("get", "post"):
        response = await call(method, "/v1/amp/collect", headers={"AMP-Same-Origin": "true"})
        assert (response.status, response.headers["Location"]) == (302, redirect)
    assert set(call.document["paths"]["/v1/amp/collect"]["get"]["responses"]) >= {"302"}
    assert "204" not in call.document["paths"]["/v1/amp/collect"]["get"]["responses"]


async def test_document_is_served(aiohttp_client: Callable[..., Awaitable[AppClient]]) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert await response.json() == DOCUMENT


async def test_the_document_is_not_sniffed_and_may_be_kept(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    """/openapi.json lacked the X-Content-Type-Options: nosniff of the API's JSON answers
    (and their Referrer-Policy). It is public and the same for every caller: no no-store."""
    client = await aiohttp_client(FrontTestServer(create_app(make_settings())))
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/openapi.json")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "no-store" not in response.headers.get("Cache-Control", "")


async def test_the_served_document_states_the_configured_maximum_ttl(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    """The ttl maximum was 600, the default, whatever IDENTITY_MAX_TTL said: a client
    generated from the document refused ttls the service takes, or sent ones it refused."""
    client = await aiohttp_client(create_app(make_settings(max_ttl="120", default_ttl="60")))
    served = await (await client.get("/openapi.json")).json()
    schema = {**served["components"]["schemas"]["PrepareRequest"], "components": {}}
    assert schema["properties"]["ttl"]["maximum"] == 120
    for ttl in (120, 121):
        body = {**GOOD, "ttl": ttl}
        response = await client.post("/v1/handoffs", json=body, headers=auth("shop"))
        assert (response.status == 201) == Draft202012Validator(schema).is_valid(body), ttl


def request_schema(name: str) -> Draft202012Validator:
    """The document's schema of a request body, with the document's components."""
    schema = {**DOCUMENT["components"]["schemas"][name], "components": DOCUMENT["components"]}
    return Draft202012Validator(schema)


GOOD = {"anonymousId": "a", "destination": CHECKOUT_URL}
# Prepare bodies around each rule; the service must refuse (400) exactly the invalid ones.
PREPARE_BODIES = {
    "neither id": {"destination": CHECKOUT_URL},
    "both ids null": {"anonymousId": None, "userId": None, "destination": CHECKOUT_URL},
    "userId alone": {"userId": "u-1", "destination": CHECKOUT_URL},
    "userId, null anonymousId": {"anonymousId": None, "userId": "u-1", "destination": CHECKOUT_URL},
    "anonymousId alone": GOOD,
    "empty anonymousId": {**GOOD, "anonymousId": ""},
    "ttl 1.0": {**GOOD, "ttl": 1.0},
    "ttl 600.0": {**GOOD, "ttl": 600.0},
    "ttl 1e2": {**GOOD, "ttl": 1e2},
    "ttl null": {**GOOD, "ttl": None},
    "ttl 1.5": {**GOOD, "ttl": 1.5},
    "ttl 0.0": {**GOOD, "ttl": 0.0},
    "ttl 601": {**GOOD, "ttl": 601},
    "ttl true": {**GOOD, "ttl": True},
    "ttl string": {**GOOD, "ttl": "5"},
    "64 consent categories": {**GOOD, "consent": {f"c{n}": True for n in range(64)}},
    "65 consent categories": {**GOOD, "consent": {f"c{n}": True for n in range(65)}},
    "consent category of 65": {**GOOD, "consent": {"c" * 65: True}},
    "consent not boolean": {**GOOD, "consent": {"analytics": "yes"}},
    "traits null": {**GOOD, "traits": None, "context": None, "consent": None},
    "context a string": {**GOOD, "context": "en-US"},
    "http destination": {**GOOD, "destination": "http://checkout.example-pay.com/"},
    "unknown field": {**GOOD, "anonymousID": "a"},
}
EXCHANGE_BODIES = {
    "token": {"token": "t"},
    "no token": {},
    "empty token": {"token": ""},
    "context": {"token": "t", "context": {"ip": "198.51.100.9", "locale": "de-DE"}},
    "context null": {"token": "t", "context": None, "properties": None, "event": None},
    "context a string": {"token": "t", "context": "en-US"},
    "fallback null": {"token": "t", "fallback": None},
    "event of 201": {"token": "t", "event": "e" * 201},
}


@pytest.mark.parametrize("body", PREPARE_BODIES.values(), ids=PREPARE_BODIES.keys())
async def test_the_document_and_the_service_agree_on_prepare_bodies(
    client: AppClient, body: dict[str, Any]
) -> None:
    response = await client.post("/v1/handoffs", json=body, headers=auth("shop"))
    valid = request_schema("PrepareRequest").is_valid(body)
    assert (response.status != 400) == valid, (response.status, await response.text())


@pytest.mark.parametrize("body", EXCHANGE_BODIES.values(), ids=EXCHANGE_BODIES.keys())
async def test_the_document_and_the_service_agree_on_exchange_bodies(
    client: AppClient, body: dict[str, Any]
) -> None:
    response = await client.post("/v1/handoffs/exchange", json=body, headers=auth("checkout"))
    valid = request_schema("ExchangeRequest").is_valid(body)
    assert (response.status != 400) == valid, (response.status, await response.text())


async def test_a_whole_float_ttl_is_an_integer_ttl(client: AppClient) -> None:
    answer = await prepare(client, ttl=42.0)
    assert answer["expiresIn"] == 42
    assert isinstance(answer["expiresIn"], int)


def test_prepare_requires_an_anonymous_id_or_a_user_id_in_the_document() -> None:
    schema = request_schema("PrepareRequest")
    assert not schema.is_valid({"destination": CHECKOUT_URL})
    assert schema.is_valid({"userId": "u", "destination": CHECKOUT_URL})
    assert schema.is_valid({"anonymousId": "a", "destination": CHECKOUT_URL})


def test_exchange_takes_a_context_in_the_document() -> None:
    schema = request_schema("ExchangeRequest")
    assert schema.is_valid({"token": "t", "context": {"ip": "198.51.100.9"}})
    assert not schema.is_valid({"token": "t", "context": "en-US"})


@given(
    st.from_regex(DESTINATION_PATTERN, fullmatch=True).filter(lambda d: len(d) <= MAX_URL_LENGTH)
)
@settings(max_examples=300, deadline=None, database=None)
def test_every_destination_the_pattern_admits_is_accepted(destination: str) -> None:
    url = parse_destination(destination, token_param=DEFAULT_TOKEN_PARAM)
    assert len(url.href) <= MAX_URL_LENGTH


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Encoding": "gzip"}, b"not gzip at all", 400),  # malformed-request
        ({"Content-Encoding": "br"}, b"{}", 415),  # unsupported-content-encoding
    ],
)
async def test_the_fronts_answers_on_the_handoff_endpoints_match_the_document(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    """The front's refusals repeat nothing of the request, so they have no ``instance``
    (docs/api.md): the document's Problem required one, so these 400 and 415 answers of
    the handoff endpoints did not match it."""
    client = await aiohttp_client(FrontTestServer(create_app(make_settings())))
    for path in ("/v1/handoffs", "/v1/handoffs/exchange"):
        all_headers = {**auth("shop"), "Content-Type": "application/json", **headers}
        response = await client.post(path, data=body, headers=all_headers)
        assert response.status == status
        answer = await response.json(content_type=None)
        assert "instance" not in answer
        check_against_document(
            path, "post", status, response.content_type, answer, response.headers
        )


async def test_each_415_names_what_would_be_taken_as_the_document_says(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    """RFC 9110 (15.5.16, 12.5.3): a 415 for a content coding names the codings taken in
    Accept-Encoding; one for a media type, the types taken in Accept-Post. The front's
    415 for a content coding sent Accept-Encoding, rightly, where the document of the
    handoff endpoints listed Accept-Post alone."""
    client = await aiohttp_client(FrontTestServer(create_app(make_settings())))
    causes = {
        "Accept-Post": {"Content-Type": "text/plain"},
        "Accept-Encoding": {"Content-Type": "application/json", "Content-Encoding": "br"},
    }
    for path in ("/v1/handoffs", "/v1/handoffs/exchange"):
        for header, sent in causes.items():
            response = await client.post(path, data=b"{}", headers={**auth("shop"), **sent})
            assert response.status == 415
            assert set(response.headers) & set(causes) == {header}
            answer = await response.json(content_type=None)
            check_against_document(
                path, "post", 415, response.content_type, answer, response.headers
            )


def front_refusals() -> set[type[Problem]]:
    """The problems the front answers by itself, before any route is found."""
    return {
        value
        for value in vars(front).values()
        if isinstance(value, type) and issubclass(value, Problem) and value is not Problem
    }


# What provokes each of the front's refusals, for any method and path: header fields and a
# body (None: the head never ends).
REFUSALS: dict[type[Problem], tuple[str, bytes | None]] = {
    MalformedRequest: ("Host: again\r\n", b""),
    RequestTimeout: ("X-Waiting: yes\r\n", None),
    PayloadTooLarge: (f"Content-Length: {DEFAULT_MAX_BODY_BYTES + 1}\r\n", b""),
    UnsupportedContentEncoding: ("Content-Encoding: br\r\nContent-Length: 2\r\n", b"{}"),
    ExpectationFailed: ("Expect: a-miracle\r\nContent-Length: 2\r\n", b"{}"),
    HeadTooLarge: (f"X-Long: {'x' * MAX_HEAD_BYTES}\r\n", b""),
    TransferCodingNotImplemented: ("Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
}


def with_or_without_amp(amp: bool, **env: str) -> Settings:
    return amp_settings(env=env) if amp else make_settings(**env)


@pytest.mark.parametrize("amp", [False, True], ids=["without-amp", "with-amp"])
def test_every_refusal_of_the_front_is_documented_for_every_operation(amp: bool) -> None:
    """The front's refusals (408, 417, 431, 501...) were in no operation's answers."""
    document = served_document(create_app(with_or_without_amp(amp)))
    for path, method in operations(document):
        responses = document["paths"][path][method]["responses"]
        for problem in front_refusals():
            answer = responses.get(str(problem.status))
            assert answer is not None, f"{method} {path}: {problem.status} not documented"
            assert problem.slug in resolved(answer, document)["description"], (method, path)


@pytest.mark.parametrize("amp", [False, True], ids=["without-amp", "with-amp"])
async def test_the_fronts_refusals_are_documented_for_every_operation(
    aiohttp_client: Callable[..., Awaitable[AppClient]], amp: bool
) -> None:
    """Each refusal the front answers, provoked on each operation, is as documented."""
    assert set(REFUSALS) == front_refusals() - {ServiceUnavailable}
    app = create_app(with_or_without_amp(amp, head_timeout="0.5"))
    document = served_document(app)
    client = await aiohttp_client(FrontTestServer(app))
    # The client shares the server's loop: a connection whose head the server has not read
    # within head_timeout is closed unanswered (as an idle one), so few are open at once.
    at_once = asyncio.Semaphore(8)

    async def refused(method: str, path: str, problem: type[Problem]) -> None:
        fields, body = REFUSALS[problem]
        head = f"{method.upper()} {path} HTTP/1.1\r\nHost: test\r\n{fields}".encode()
        async with at_once:
            reader, writer = await open_socket(client)
            writer.write(head if body is None else head + b"\r\n" + body)
            status, headers, answer = await read_response(reader)
            writer.close()
        assert status == problem.status, (method, path, problem)
        check_against_document(
            path, method, status, headers["content-type"], orjson.loads(answer), headers, document
        )

    documented = operations(document)
    await asyncio.gather(
        *(refused(method, path, problem) for path, method in documented for problem in REFUSALS)
    )
    # Over IDENTITY_MAX_CONNECTIONS, answered before any request is read: whichever it was.
    crowded_app = create_app(with_or_without_amp(amp, max_connections="1"))
    crowded = await aiohttp_client(FrontTestServer(crowded_app))
    held, turned_away = await open_socket(crowded), await open_socket(crowded)
    status, headers, answer = await read_response(turned_away[0])
    for _, writer in (held, turned_away):
        writer.close()
    assert status == ServiceUnavailable.status
    for path, method in documented:
        check_against_document(
            path, method, status, headers["content-type"], orjson.loads(answer), headers, document
        )
