"""Prepare and exchange over HTTP, on the memory store and on Redis."""

import base64
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from identity_service import app_keys
from identity_service.clock import iso_time
from tests.conftest import (
    CHECKOUT_URL,
    WRITE_KEYS,
    AppClient,
    ClientFactory,
    auth,
    exchange,
    prepare,
)


class FixedClock:
    """Stands in for the time module in handoff.py: ``time()`` is always ``NOW``."""

    NOW = 1_795_000_000.25

    @staticmethod
    def time() -> float:
        return FixedClock.NOW


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("identity_service.handoff.time", FixedClock)


async def test_prepare_answers_token_expiry_and_redirect_url(
    client: AppClient, fixed_clock: None
) -> None:
    answer = await prepare(client)

    token = answer["token"]
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert answer["expiresIn"] == 300
    assert answer["expiresAt"] == iso_time(FixedClock.NOW + 300)
    redirect = urlsplit(answer["redirectUrl"])
    assert (redirect.scheme, redirect.netloc, redirect.path) == (
        "https",
        "checkout.example-pay.com",
        "/cart",
    )
    assert parse_qs(redirect.query) == {"step": ["1"], "handoff_token": [token]}
    assert redirect.fragment == "summary"


async def test_tokens_are_unique(client: AppClient) -> None:
    tokens = {(await prepare(client))["token"] for _ in range(50)}
    assert len(tokens) == 50


async def test_exchange_restores_the_whole_identity_once(
    client: AppClient, fixed_clock: None
) -> None:
    token = (
        await prepare(
            client,
            userId="user-42",
            traits={"plan": "pro"},
            context={"page": {"url": "https://www.example.com/cart"}, "userAgent": "UA/1"},
            consent={"analytics": True, "advertising": False},
        )
    )["token"]

    status, identity = await exchange(client, token)

    assert status == 200
    assert identity["anonymousId"] == "anon-7f3a"
    assert identity["userId"] == "user-42"
    assert identity["traits"] == {"plan": "pro"}
    assert identity["context"]["userAgent"] == "UA/1"
    assert identity["consent"] == {"analytics": True, "advertising": False}
    assert identity["source"] == "handoff"
    assert identity["preparedBy"] == "shop"
    assert identity["destination"] == CHECKOUT_URL
    assert identity["preparedAt"] == iso_time(FixedClock.NOW)
    again, problem = await exchange(client, token)
    assert again == 404
    assert problem["type"].endswith(":token-not-found")


async def test_user_id_alone_is_enough(client: AppClient) -> None:
    answer = await client.post(
        "/v1/handoffs",
        json={"userId": "user-9", "destination": CHECKOUT_URL},
        headers=auth("shop"),
    )
    assert answer.status == 201
    status, identity = await exchange(client, (await answer.json())["token"])
    assert (status, identity["anonymousId"], identity["userId"]) == (200, None, "user-9")


async def test_bearer_authorization_works_like_basic(client: AppClient) -> None:
    token = (await prepare(client))["token"]
    response = await client.post(
        "/v1/handoffs/exchange",
        json={"token": token},
        headers={"Authorization": f"Bearer {WRITE_KEYS['checkout']}"},
    )
    assert response.status == 200


async def test_requested_ttl_is_used(client: AppClient) -> None:
    answer = await prepare(client, ttl=42)
    assert answer["expiresIn"] == 42


async def test_redirect_url_keeps_the_query_and_the_fragment(client: AppClient) -> None:
    # A destination already naming the token parameter is refused (test_destinations.py).
    answer = await prepare(client, destination="https://checkout.example-pay.com/pay?a=b%20c#top")
    redirect = urlsplit(answer["redirectUrl"])
    assert redirect.query == f"a=b%20c&handoff_token={answer['token']}"
    assert redirect.fragment == "top"


async def test_token_parameter_name_is_configurable(make_client: ClientFactory) -> None:
    client = await make_client(token_param="xdt")
    answer = await prepare(client)
    assert parse_qs(urlsplit(answer["redirectUrl"]).query)["xdt"] == [answer["token"]]


async def test_other_source_with_the_origin_may_exchange(client: AppClient) -> None:
    # The preparing source is allowed the origin too, so it may receive there.
    token = (await prepare(client))["token"]
    status, _ = await exchange(client, token, source="shop")
    assert status == 200


async def test_exchange_by_a_source_not_allowed_the_origin_fails_and_burns_token(
    client: AppClient,
) -> None:
    token = (await prepare(client))["token"]

    status, problem = await exchange(client, token, source="partner")
    assert status == 403
    assert problem["type"].endswith(":audience-mismatch")

    status, _ = await exchange(client, token)
    assert status == 404
    metrics = client.app[app_keys.METRICS]
    assert metrics.value("identity_handoff_misses_total", source="partner", reason="audience") == 1


async def test_an_audience_mismatch_does_not_tell_the_handoff_origin(client: AppClient) -> None:
    """The origin is sealed with the identity, for the sources allowed it. Found in review:
    the 403 named it to the source that is not."""
    token = (await prepare(client))["token"]
    status, problem = await exchange(client, token, source="partner")
    assert status == 403
    assert "checkout.example-pay.com" not in str(problem)


async def test_fallback_answers_a_generated_anonymous_id_and_counts_the_miss(
    client: AppClient,
) -> None:
    status, identity = await exchange(client, "no-such-token", fallback=True)

    assert status == 200
    assert uuid.UUID(identity.pop("anonymousId")).version == 4
    # As docs/api.md says: empty objects, nulls for the rest.
    empty: dict[str, object] = {}
    assert identity == {
        "userId": None, "traits": empty, "context": empty, "consent": empty,
        "source": "generated", "preparedBy": None, "preparedAt": None, "destination": None,
    }  # fmt: skip
    metrics = client.app[app_keys.METRICS]
    assert metrics.value("identity_handoff_fallbacks_total", source="checkout") == 1
    assert (
        metrics.value("identity_handoff_misses_total", source="checkout", reason="not_found") == 1
    )


async def test_fallback_is_not_used_when_the_token_is_valid(client: AppClient) -> None:
    token = (await prepare(client))["token"]
    status, identity = await exchange(client, token, fallback=True)
    assert (status, identity["source"], identity["anonymousId"]) == (200, "handoff", "anon-7f3a")


async def test_answers_with_identity_or_token_are_not_cached_nor_referred(
    client: AppClient,
) -> None:
    prepared = await client.post(
        "/v1/handoffs",
        json={"anonymousId": "a", "destination": CHECKOUT_URL},
        headers=auth("shop"),
    )
    token = (await prepared.json())["token"]
    exchanged = await client.post(
        "/v1/handoffs/exchange", json={"token": token}, headers=auth("checkout")
    )
    for response in (prepared, exchanged):
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Request-ID"]


async def test_request_id_is_echoed_when_sane(client: AppClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    response = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert response.headers["X-Request-ID"] != "bad id\twith spaces"


async def test_health_and_readiness(client: AppClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready"}


async def test_metrics_are_in_prometheus_text_format(client: AppClient) -> None:
    await prepare(client)
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'identity_handoffs_prepared_total{source="shop"} 1.0' in await response.text()


def test_app_factory_does_no_io() -> None:
    # Building the app with an unreachable Redis must not fail or connect.
    from identity_service.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings("redis://127.0.0.1:1/0"))
    assert isinstance(app, web.Application)
    assert app_keys.STORE not in app
