"""AMP CORS (identity_service.amp.cors): the matrix of issue 11, unit-level and over HTTP.

Expected cache origins are computed with ``amp.caches.cache_subdomain``, whose agreement with
AMP's own ``@ampproject/toolbox-cache-url`` is tested in tests/test_amp_caches.py. The
publishers cover a plain host, a punycode (IDN) host, hosts with hyphens (the ``0-...-0``
wrap and the doubled hyphen) and one long enough for the hash form.
"""

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from identity_service import app_keys
from identity_service.amp import cors
from identity_service.amp.caches import DEFAULT_CACHES, cache_subdomain
from identity_service.amp.config import AmpSettings
from identity_service.app import create_app
from identity_service.metrics import Metrics
from identity_service.middleware import handle_request
from identity_service.problems import PROBLEM_TYPE_PREFIX, AmpOriginNotAllowed
from identity_service.settings import Settings
from tests.conftest import AppClient, FrontTestServer, make_settings

LONG_HOST = "a-rather-long-host-name-for-the-hash-form.publisher-pages.example.com"
HOSTS = ["www.example.com", "xn--bcher-kva.ch", "en-us.example.com", "shop-online.example.net",
         LONG_HOST]  # fmt: skip
PUBLISHERS = [f"https://{host}" for host in HOSTS]
DEV_ORIGIN = "http://shop.localhost:8080"
CACHE_ORIGINS = [f"https://{cache_subdomain(host)}.{cache}" for host in HOSTS for cache in
                 DEFAULT_CACHES]  # fmt: skip
REFUSED = "amp-origin-not-allowed"

AMP_TABLE: dict[str, Any] = {
    "public_url": "https://www.example.com/identity",
    "publisher_origins": [*PUBLISHERS, DEV_ORIGIN],
    "source": "checkout",
}

# Origins that must be refused: look-alikes, another publisher's cache form, http forms,
# other spellings of allowed origins (browsers send the serialized origin), "null".
LOOK_ALIKES = [
    "https://www-example-com.cdn.ampproject.org.evil.com",
    "https://www.example.com.evil.com",
    "https://evil.com",
    "https://evilwww-example-com.cdn.ampproject.org",
    "https://www-example-com.evil.cdn.ampproject.org",
    f"https://{cache_subdomain('partner.example.org')}.cdn.ampproject.org",
    f"https://{cache_subdomain('www.example.org')}.www.bing-amp.com",
    "https://www-example-com.bing-amp.com",
    "https://www-example-com.ampproject.org",
    "http://www.example.com",
    "http://www-example-com.cdn.ampproject.org",
    "https://www.example.com:8443",
    "https://www.example.com:443",
    "https://www.example.com/",
    "https://WWW.EXAMPLE.COM",
    "https://bücher.ch",
    f"https://{cache_subdomain('www.example.com')}.cdn.ampproject.org:443",
    f"https://{cache_subdomain(LONG_HOST + '.evil.com')}.cdn.ampproject.org",
    "https://" + cache_subdomain(LONG_HOST).upper() + ".cdn.ampproject.org",
    "https://shop.localhost:8080",
    "null",
    "",
    "*",
]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return make_settings(None, amp=json.dumps(AMP_TABLE))


@pytest.fixture(scope="module")
def amp(settings: Settings) -> AmpSettings:
    assert settings.amp is not None
    return settings.amp


def test_the_cache_forms_cover_each_kind_of_host() -> None:
    forms = [cache_subdomain(host) for host in HOSTS]
    assert forms[:4] == [
        "www-example-com",
        "xn--bcher-ch-65a",
        "0-en--us-example-com-0",
        "shop--online-example-net",
    ]
    assert len(forms[4]) == 52 and "-" not in forms[4]  # the base32 SHA-256 form


def test_allowed_origins_are_the_publishers_and_their_cache_forms(amp: AmpSettings) -> None:
    assert amp.allowed_origins == {*PUBLISHERS, DEV_ORIGIN, *CACHE_ORIGINS}


# -- allowed_origin, unit-level ----------------------------------------------------------------


@pytest.mark.parametrize("origin", [*PUBLISHERS, DEV_ORIGIN, *CACHE_ORIGINS])
def test_an_allowed_origin_is_echoed_exactly(amp: AmpSettings, origin: str) -> None:
    assert cors.allowed_origin(amp, origin, None, None) == origin
    assert cors.allowed_origin(amp, origin, "true", PUBLISHERS[0]) == origin


@pytest.mark.parametrize("origin", LOOK_ALIKES)
def test_other_origins_are_refused(amp: AmpSettings, origin: str) -> None:
    with pytest.raises(AmpOriginNotAllowed):
        cors.allowed_origin(amp, origin, None, None)
    with pytest.raises(AmpOriginNotAllowed):  # AMP-Same-Origin does not excuse an Origin
        cors.allowed_origin(amp, origin, "true", None)


def test_same_origin_needs_amp_same_origin_true(amp: AmpSettings) -> None:
    assert cors.allowed_origin(amp, None, "true", None) is None
    for value in (None, "", "false", "TRUE", "1", "true, true"):
        with pytest.raises(AmpOriginNotAllowed):
            cors.allowed_origin(amp, None, value, None)


@pytest.mark.parametrize("source_origin", [PUBLISHERS[0], DEV_ORIGIN])
def test_a_publisher_source_origin_is_accepted(amp: AmpSettings, source_origin: str) -> None:
    assert cors.allowed_origin(amp, CACHE_ORIGINS[0], None, source_origin) == CACHE_ORIGINS[0]
    assert cors.allowed_origin(amp, None, "true", source_origin) is None


@pytest.mark.parametrize(
    "source_origin",
    [CACHE_ORIGINS[0], "https://evil.com", "https://www.example.com/", "http://www.example.com",
     "", "null"],
)  # fmt: skip
def test_a_wrong_source_origin_is_refused(amp: AmpSettings, source_origin: str) -> None:
    """``__amp_source_origin`` grants nothing and must be a publisher origin when present."""
    for origin, same in ((PUBLISHERS[0], None), (CACHE_ORIGINS[0], None), (None, "true")):
        with pytest.raises(AmpOriginNotAllowed):
            cors.allowed_origin(amp, origin, same, source_origin)


def test_the_source_origin_does_not_allow_an_origin(amp: AmpSettings) -> None:
    evil_cache = f"https://{cache_subdomain('evil.com')}.cdn.ampproject.org"
    with pytest.raises(AmpOriginNotAllowed):
        cors.allowed_origin(amp, evil_cache, None, "https://evil.com")


def test_cors_headers() -> None:
    assert cors.cors_headers(CACHE_ORIGINS[0]) == {
        "Access-Control-Allow-Origin": CACHE_ORIGINS[0],
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "AMP-Redirect-To",
        "Vary": "Origin",
    }
    assert cors.cors_headers(None) == {"Vary": "Origin"}


# -- over HTTP ---------------------------------------------------------------------------------

ClientFor = Callable[[Settings], Awaitable[AppClient]]
# The stand-in endpoint's state changes: the origin each was allowed for.
STATE_CHANGES = web.AppKey("state_changes", list[str | None])


async def change_state(request: web.Request) -> web.Response:
    """A stand-in AMP endpoint: the CORS check, then a state change (counted)."""
    origin = cors.check(request)
    request.app[STATE_CHANGES].append(origin)
    return web.json_response({"ok": True}, headers=cors.cors_headers(origin))


@pytest.fixture
def client_for(aiohttp_client: Callable[..., Awaitable[AppClient]]) -> ClientFor:
    """A client of an app routing only the preflight and a stand-in endpoint, with the
    service's middleware: the other AMP handlers are not needed to test CORS."""

    async def build(settings: Settings) -> AppClient:
        app = web.Application(middlewares=[handle_request])
        app[app_keys.SETTINGS] = settings
        app[app_keys.METRICS] = Metrics()
        app[STATE_CHANGES] = []
        app.router.add_route("OPTIONS", "/v1/amp/{tail:.*}", cors.preflight)
        app.router.add_post("/v1/amp/test", change_state)
        return await aiohttp_client(TestServer(app))

    return build


@pytest.fixture
async def client(client_for: ClientFor, settings: Settings) -> AppClient:
    return await client_for(settings)


def state_changes(client: AppClient) -> int:
    return len(client.app[STATE_CHANGES])


def refusals(client: AppClient) -> int:
    metrics: Metrics = client.app[app_keys.METRICS]
    return int(metrics.value(cors.REFUSALS_METRIC, reason="origin"))


async def assert_refused(response: Any) -> None:
    assert response.status == 403
    problem = await response.json(content_type=None)
    assert problem["type"] == PROBLEM_TYPE_PREFIX + REFUSED
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize("origin", [PUBLISHERS[0], PUBLISHERS[1], DEV_ORIGIN, *CACHE_ORIGINS])
async def test_an_allowed_origin_over_http(client: AppClient, origin: str) -> None:
    response = await client.post(
        "/v1/amp/test", params={"__amp_source_origin": PUBLISHERS[0]}, headers={"Origin": origin}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Expose-Headers"] == "AMP-Redirect-To"
    assert response.headers["Vary"] == "Origin"
    assert state_changes(client) == 1


async def test_same_origin_over_http(client: AppClient) -> None:
    response = await client.post("/v1/amp/test", headers={"AMP-Same-Origin": "true"})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.headers["Vary"] == "Origin"
    assert state_changes(client) == 1


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        *(({"Origin": origin}, {}) for origin in LOOK_ALIKES if origin),
        ({}, {}),
        ({"AMP-Same-Origin": "false"}, {}),
        ({"AMP-Same-Origin": "true"}, {"__amp_source_origin": "https://evil.com"}),
        ({"Origin": CACHE_ORIGINS[0]}, {"__amp_source_origin": CACHE_ORIGINS[0]}),
        ({"Origin": PUBLISHERS[0], "AMP-Same-Origin": "true"}, {"__amp_source_origin": ""}),
    ],
)
async def test_a_refusal_over_http_changes_nothing(
    client: AppClient, headers: dict[str, str], query: dict[str, str]
) -> None:
    response = await client.post("/v1/amp/test", params=query, headers=headers)
    await assert_refused(response)
    assert state_changes(client) == 0
    assert refusals(client) == 1


async def test_repeated_headers_and_parameters_are_refused(client: AppClient) -> None:
    allowed = [("Origin", PUBLISHERS[0]), ("Origin", "https://evil.com")]
    await assert_refused(await client.post("/v1/amp/test", headers=allowed))
    same = [("AMP-Same-Origin", "true"), ("AMP-Same-Origin", "true")]
    await assert_refused(await client.post("/v1/amp/test", headers=same))
    source = f"/v1/amp/test?__amp_source_origin={PUBLISHERS[0]}&__amp_source_origin=x"
    await assert_refused(await client.post(source, headers={"AMP-Same-Origin": "true"}))
    assert state_changes(client) == 0
    assert refusals(client) == 3


@pytest.mark.parametrize("origin", [PUBLISHERS[0], CACHE_ORIGINS[1], CACHE_ORIGINS[-1]])
async def test_a_preflight_from_an_allowed_origin(client: AppClient, origin: str) -> None:
    response = await client.options(
        "/v1/amp/actions/add-to-cart",
        params={"__amp_source_origin": PUBLISHERS[0]},
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, AMP-Same-Origin, x-evil",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST"
    # Only the allowed request headers: never AMP-Same-Origin, so a foreign page cannot send it.
    assert response.headers["Access-Control-Allow-Headers"] == "content-type"
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in response.headers["Vary"]
    assert state_changes(client) == 0


async def test_a_preflight_without_extra_headers(client: AppClient) -> None:
    response = await client.options(
        "/v1/amp/collect",
        headers={"Origin": CACHE_ORIGINS[0], "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 204
    assert "Access-Control-Allow-Headers" not in response.headers


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        *(({"Origin": origin}, {}) for origin in LOOK_ALIKES if origin),
        ({}, {}),
        ({"AMP-Same-Origin": "true"}, {}),
        ({"Origin": CACHE_ORIGINS[0]}, {"__amp_source_origin": "https://evil.com"}),
    ],
)
async def test_a_preflight_from_anywhere_else_is_refused(
    client: AppClient, headers: dict[str, str], query: dict[str, str]
) -> None:
    response = await client.options(
        "/v1/amp/actions/add-to-cart",
        params=query,
        headers={**headers, "Access-Control-Request-Method": "POST"},
    )
    await assert_refused(response)
    assert refusals(client) == 1


def _full_app_builds() -> bool:
    """Whether ``create_app`` can route the AMP endpoints (their handlers import)."""
    try:
        import identity_service.amp.routes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _full_app_builds(), reason="the AMP handlers do not import yet")
async def test_the_preflight_of_the_served_service(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
) -> None:
    """The preflight through the service itself: its routes, middleware and HTTP front (with
    the action configured: an unknown one's preflight is its POST's 404)."""
    action = {
        "webhook": "https://backend.example.com/hooks/cart",
        "secret": "webhook-secret-0123456789abcdef-xyz",
        "done_url": f"{PUBLISHERS[0]}/cart",
    }
    table = {**AMP_TABLE, "actions": {"add-to-cart": action}}
    client = await aiohttp_client(
        FrontTestServer(create_app(make_settings(None, amp=json.dumps(table))))
    )
    for path in ("/v1/amp/collect", "/v1/amp/actions/add-to-cart"):
        allowed = await client.options(
            path, headers={"Origin": CACHE_ORIGINS[0], "Access-Control-Request-Method": "POST"}
        )
        assert allowed.status == 204
        assert allowed.headers["Access-Control-Allow-Origin"] == CACHE_ORIGINS[0]
        refused = await client.options(
            path, headers={"Origin": LOOK_ALIKES[0], "Access-Control-Request-Method": "POST"}
        )
        await assert_refused(refused)
    metrics = client.app[app_keys.METRICS]
    assert metrics.value(cors.REFUSALS_METRIC, reason="origin") == 2


@pytest.mark.skipif(not _full_app_builds(), reason="the AMP handlers do not import yet")
async def test_preflights_only_for_the_endpoints_a_page_fetches(
    aiohttp_client: Callable[..., Awaitable[AppClient]], settings: Settings
) -> None:
    """OPTIONS is routed for collect and the actions only, not for any ``/v1/amp/*``."""
    client = await aiohttp_client(FrontTestServer(create_app(settings)))
    preflight = {"Origin": CACHE_ORIGINS[0], "Access-Control-Request-Method": "GET"}
    for path in (
        "/v1/amp/anything",
        "/v1/amp/actions/add-to-cart/complete",
        "/v1/amp/collect/more",
        "/v1/amp/",
    ):
        response = await client.options(path, headers=preflight)
        assert response.status in (404, 405), path
        assert "Access-Control-Allow-Origin" not in response.headers
