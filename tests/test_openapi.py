"""The OpenAPI document is valid, covers every route, and real answers match it."""

from collections.abc import Awaitable, Callable
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from identity_service.app import create_app
from identity_service.openapi import openapi_dict
from tests.conftest import CHECKOUT_URL, AppClient, auth, make_settings, prepare
from tests.redis_server import RedisServer

DOCUMENT = openapi_dict()


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_every_route_is_documented_and_every_documented_path_is_routed() -> None:
    app = create_app(make_settings())
    routed = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert routed == documented


def check_against_document(
    path: str, method: str, status: int, content_type: str, body: Any
) -> None:
    responses = DOCUMENT["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented"
    content = responses[str(status)]["content"]
    assert content_type in content, f"{method} {path} {status} answered {content_type}"
    schema = {**content[content_type]["schema"], "components": DOCUMENT["components"]}
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
        check_against_document(path, method, response.status, response.content_type, body)
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
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        await call("get", path)
    private_redis.stop()
    await call("get", "/readyz")
    await call("post", prepare_path, json=good, headers=auth("shop"))
    await call("post", exchange_path, json={"token": other}, headers=auth("checkout"))

    documented = {
        (path, method, int(status))
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
    }
    assert documented - seen == set(), "documented answers the test did not provoke"


async def test_document_is_served(aiohttp_client: Callable[..., Awaitable[AppClient]]) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert await response.json() == DOCUMENT
