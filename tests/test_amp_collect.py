"""``/v1/amp/collect``: the visitor cookie, clientId links, the events, the refusals.

Every test runs on both stores and both paths to the same code: the HTTP front's fast
path (``FrontTestServer``, as ``serve`` runs) and the aiohttp route (a plain test server).
Events are observed where they end up: at a real Segment-compatible collector.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from identity_service import app_keys
from identity_service.amp import collect as collect_module
from identity_service.amp import limits, links
from identity_service.amp.context import AMP
from identity_service.app import create_app
from identity_service.constants import outbox_key
from identity_service.metrics import Metrics
from identity_service.problems import PayloadTooLarge, RateLimited, StoreUnavailable
from identity_service.settings import Settings
from identity_service.stores import memory
from identity_service.stores import resp as resp_module
from identity_service.stores.redis import RedisStore, connect
from tests.collector import WRITE_KEY, Collector, running_collector
from tests.conftest import AppClient, FrontTestServer
from tests.secrets_audit import AUDIT

PUBLISHER = "https://www.example.com"
CACHE = "https://www-example-com.cdn.ampproject.org"
COOKIE = "ajs_anonymous_id"
VISITOR = "visitor-3c1e"
CACHE_CLIENT_ID = "cache-cid-9a8b7c6d5e4f"
PATH = "/v1/amp/collect"
FAST_DELIVERY = {
    "batch_max_wait": "0.05",
    "backoff_base": "0.05",
    "backoff_max": "0.2",
    "delivery_timeout": "0.5",
}
AmpClientFactory = Callable[..., Awaitable[AppClient]]


class QuietTestServer(TestServer):
    """aiohttp's own server, without its access log: it shows the query, and on the
    publisher's origin a hit's ampId is the visitor's id."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, access_log=None, **kwargs)


def amp_config(**overrides: Any) -> str:
    config = {
        "public_url": f"{PUBLISHER}/identity",
        "publisher_origins": [PUBLISHER],
        "source": "shop",
        **overrides,
    }
    return json.dumps(config)


@pytest.fixture(params=["front", "aiohttp"])
def server_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with running_collector() as running:
        yield running


@pytest.fixture
def amp_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings_for: Callable[..., Settings],
    collector: Collector,
    server_kind: str,
) -> AmpClientFactory:
    """A client of the service with ``[amp]`` (``amp_config(**amp)``), events to the collector."""

    async def build(env: dict[str, str] | None = None, **amp: Any) -> AppClient:
        """``amp`` goes in the ``[amp]`` table, ``env`` in the other settings."""
        settings = settings_for(
            amp=amp_config(**amp),
            destination_url=collector.url,
            destination_write_key=WRITE_KEY,
            **FAST_DELIVERY,
            **(env or {}),
        )
        app = create_app(settings)
        if server_kind == "front":
            return await aiohttp_client(FrontTestServer(app))
        return await aiohttp_client(QuietTestServer(app))

    return build


@pytest.fixture
async def client(amp_client: AmpClientFactory) -> AppClient:
    return await amp_client()


def metrics(client: AppClient) -> Metrics:
    counted: Metrics = client.app[app_keys.METRICS]
    return counted


async def hit(
    client: AppClient,
    *,
    origin: str | None = None,
    cookie: str | None = None,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    **params: str,
) -> Any:
    """Send one hit; ``params`` go in the query string."""
    sent = dict(headers or {})
    if origin is not None:
        sent["Origin"] = origin
    if cookie is not None:
        AUDIT.identity(cookie, "anonymousId")
        sent["Cookie"] = f"other=1; {COOKIE}={cookie}"
    response = await client.request(method, PATH, params=params, headers=sent, data=data)
    await response.read()
    return response


def set_cookie_value(response: Any) -> str | None:
    """The visitor id a ``Set-Cookie`` of the answer keeps, or None."""
    header = response.headers.get("Set-Cookie")
    if header is None:
        return None
    name, _, rest = header.partition("=")
    assert name == COOKIE
    value: str = rest.split(";", 1)[0]
    assert "SameSite=None" in header and "Secure" in header and "Max-Age=31536000" in header
    AUDIT.identity(value, "anonymousId")
    return value


async def events_after(collector: Collector, count: int) -> list[dict[str, Any]]:
    """The collector's events once ``count`` arrived, and a moment more for any extra."""
    await collector.wait_for(count)
    await asyncio.sleep(0.3)
    return sorted(collector.events, key=lambda event: event["timestamp"])


async def test_origin_hit_without_cookie_sets_one_and_emits_a_page_call(
    client: AppClient, collector: Collector
) -> None:
    response = await hit(
        client,
        headers={"AMP-Same-Origin": "true", "User-Agent": "UA/1"},
        ampId="amp-Xy3kq_origin",
        url=f"{PUBLISHER}/article",
        title="An article",
        referrer="https://search.example/",
        path="/article",
        section="news",
    )

    assert response.status == 204
    assert response.headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in response.headers  # same origin: no CORS
    visitor = set_cookie_value(response)
    assert visitor is not None
    (event,) = await events_after(collector, 1)
    assert event["type"] == "page"
    assert event["name"] == "An article"
    assert event["anonymousId"] == visitor
    assert event["properties"] == {
        "url": f"{PUBLISHER}/article",
        "title": "An article",
        "referrer": "https://search.example/",
        "path": "/article",
        "section": "news",
        "source": "shop",
        "anonymousId_source": "generated",
    }
    assert event["context"]["amp"] == {"clientId": "amp-Xy3kq_origin"}
    assert event["context"]["page"]["url"] == f"{PUBLISHER}/article"
    assert event["context"]["userAgent"] == "UA/1"
    assert event["context"]["library"]["name"] == "identity-service"
    assert event["messageId"] and event["integrations"] == {}
    assert metrics(client).value("identity_amp_hits_total", context="origin") == 1
    assert metrics(client).value("identity_identities_total", id_source="amp_generated") == 1
    # Not an exchange's fallback: the share of generated ids among exchanges stays 0.
    assert metrics(client).value("identity_identities_total", id_source="generated") == 0


async def test_origin_pixel_with_the_cookie_reads_it(
    client: AppClient, collector: Collector
) -> None:
    # An image pixel: no Origin, no AMP-Same-Origin; on the origin AMP's clientId is the cookie.
    response = await hit(client, cookie=VISITOR, ampId=VISITOR, event="Scrolled")

    assert response.status == 204
    assert "Set-Cookie" not in response.headers
    (event,) = await events_after(collector, 1)
    assert event["type"] == "track"
    assert event["event"] == "Scrolled"
    assert event["anonymousId"] == VISITOR
    assert event["properties"]["anonymousId_source"] == "cookie"
    assert metrics(client).value("identity_amp_hits_total", context="origin") == 1


# Real page titles and event names that are text but not str.isprintable(): a soft hyphen
# (German compounds), an emoji ZWJ sequence, a right-to-left mark (Hebrew and Arabic sites),
# an emoji newer than Python's Unicode database (U+1FAE8, Unicode 15).
READABLE_TITLES = [
    "Geschäfts\u00adbericht 2026",
    "Family \U0001f468\u200d\U0001f469\u200d\U0001f467 trip",
    "\u05e9\u05dc\u05d5\u05dd\u200f - Site",
    "Shaking \U0001fae8 news",
]


async def test_a_page_title_that_is_text_is_recorded_as_sent(
    client: AppClient, collector: Collector
) -> None:
    """amp-analytics sends ${title} as document.title has it: a hit is not refused (its
    event lost) for a format character or a character newer than Python's Unicode data."""
    for title in READABLE_TITLES:
        response = await hit(client, cookie=VISITOR, ampId=VISITOR, title=title, event=title)
        assert response.status == 204, (title, await response.text())
    events = await events_after(collector, len(READABLE_TITLES))
    assert sorted(event["context"]["page"]["title"] for event in events) == sorted(READABLE_TITLES)
    assert sorted(event["event"] for event in events) == sorted(READABLE_TITLES)


@pytest.mark.parametrize("title", ["a\x00b", "line\nbreak", "tab\there", "c1\x85next", "del\x7f"])
async def test_a_page_title_with_a_control_character_is_refused(
    client: AppClient, title: str
) -> None:
    response = await hit(client, cookie=VISITOR, ampId=VISITOR, title=title)
    assert response.status == 400
    problem = await response.json(content_type=None)
    assert problem["type"].endswith(":validation-failed")
    assert title not in problem["detail"]


async def test_a_cache_hit_with_the_cookie_links_the_client_id_for_later_hits(
    client: AppClient, collector: Collector
) -> None:
    first = await hit(client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID)
    assert first.status == 204
    assert first.headers["Access-Control-Allow-Origin"] == CACHE
    assert first.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Set-Cookie" not in first.headers

    # Later, third-party cookies blocked: only AMP's cache clientId arrives.
    later = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID, event="Read")
    assert later.status == 204
    # Attributed through the link, but the linked id is never sent back: the link may have
    # been recorded from a forged request, and whoever holds the clientId would learn it.
    assert "Set-Cookie" not in later.headers

    with_cookie, linked = await events_after(collector, 2)
    assert with_cookie["anonymousId"] == VISITOR
    assert with_cookie["properties"]["anonymousId_source"] == "cookie"
    assert with_cookie["context"]["amp"] == {"clientId": CACHE_CLIENT_ID}
    assert linked["anonymousId"] == VISITOR
    assert linked["properties"]["anonymousId_source"] == "amp_link"
    assert linked["event"] == "Read"
    counted = metrics(client)
    assert counted.value("identity_amp_hits_total", context="cache_with_cookie") == 1
    assert counted.value("identity_amp_hits_total", context="cache_without_cookie") == 1
    assert counted.value("identity_amp_links_recorded_total") == 1
    assert counted.value("identity_amp_link_attributions_total") == 1
    assert counted.value("identity_identities_total", id_source="amp_cookie") == 1
    assert counted.value("identity_identities_total", id_source="amp_link") == 1


async def test_a_cookieless_cache_hit_without_a_link_is_the_client_id(
    client: AppClient, collector: Collector
) -> None:
    response = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)

    assert response.status == 204
    # No new id offered: the hit is the clientId's, and a cookie with another id would make
    # the visitor a second person.
    assert "Set-Cookie" not in response.headers
    (event,) = await events_after(collector, 1)
    assert event["anonymousId"] == CACHE_CLIENT_ID
    assert event["properties"]["anonymousId_source"] == "amp_client_id"
    assert metrics(client).value("identity_amp_link_attributions_total") == 0
    assert metrics(client).value("identity_identities_total", id_source="amp_client_id") == 1


async def test_insufficient_consent_links_nothing_and_emits_nothing(
    client: AppClient, collector: Collector
) -> None:
    denied = await hit(
        client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID, consent="insufficient"
    )
    assert denied.status == 204
    assert "Set-Cookie" not in denied.headers

    later = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID, consent="sufficient")
    assert later.status == 204

    (event,) = await events_after(collector, 1)
    assert event["anonymousId"] == CACHE_CLIENT_ID
    assert event["properties"]["anonymousId_source"] == "amp_client_id"
    counted = metrics(client)
    assert counted.value("identity_amp_links_recorded_total") == 0
    assert counted.value("identity_events_skipped_total", reason="consent") == 1


async def test_a_pixel_without_origin_records_no_link(
    client: AppClient, collector: Collector
) -> None:
    # Any page can make a browser load this image with the visitor's cookie and any ampId.
    pixel = await hit(client, cookie=VISITOR, ampId=CACHE_CLIENT_ID)
    assert pixel.status == 204
    assert "Access-Control-Allow-Origin" not in pixel.headers

    later = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)
    assert later.status == 204

    first, second = await events_after(collector, 2)
    assert first["anonymousId"] == VISITOR
    assert second["anonymousId"] == CACHE_CLIENT_ID
    assert metrics(client).value("identity_amp_links_recorded_total") == 0


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://www-example-com.cdn.ampproject.org.evil.com",
        "https://www-example-org.cdn.ampproject.org",
        "http://www-example-com.cdn.ampproject.org",
    ],
)
async def test_a_refused_origin_changes_nothing(
    client: AppClient, collector: Collector, origin: str
) -> None:
    refused = await hit(client, origin=origin, cookie=VISITOR, ampId=CACHE_CLIENT_ID)
    assert refused.status == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Set-Cookie" not in refused.headers

    later = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)
    assert later.status == 204

    (event,) = await events_after(collector, 1)
    assert event["anonymousId"] == CACHE_CLIENT_ID  # no link was recorded
    counted = metrics(client)
    assert counted.value("identity_amp_refusals_total", reason="origin") == 1
    assert counted.value("identity_amp_links_recorded_total") == 0


@pytest.mark.parametrize(
    ("headers", "data", "params"),
    [
        ({"Content-Type": "text/xml"}, b"<x/>", {}),  # 415 unsupported-media-type
        ({"Content-Type": "application/json"}, b"{not json", {}),  # 400
        ({}, None, {f"p{number}": "1" for number in range(65)}),  # 413: over max_form_fields
        ({}, None, {"title": "\x00"}),  # 400 validation-failed
    ],
)
@pytest.mark.parametrize(
    "refused", [{"Origin": "https://evil.example"}, {"AMP-Same-Origin": "TRUE"}]
)
async def test_a_refused_origin_is_refused_whatever_the_hit_carries(
    client: AppClient,
    refused: dict[str, str],
    headers: dict[str, str],
    data: bytes | None,
    params: dict[str, str],
) -> None:
    """The Origin (or AMP-Same-Origin) is judged before the hit is read (docs/security.md:
    every refusal is 403, decided before any form read): a foreign page's hit is a 403,
    counted as an origin refusal, whatever its body or parameters."""
    response = await hit(client, method="POST", data=data, headers={**refused, **headers}, **params)
    assert response.status == 403
    problem = await response.json(content_type=None)
    assert problem["type"].endswith(":amp-origin-not-allowed")
    assert "Access-Control-Allow-Origin" not in response.headers
    counted = metrics(client)
    assert counted.value("identity_amp_refusals_total", reason="origin") == 1


@pytest.mark.parametrize("value", [None, "", 1, [PUBLISHER], {"origin": PUBLISHER}])
async def test_a_source_origin_in_a_json_body_that_is_no_publisher_origin_is_refused(
    client: AppClient, collector: Collector, value: Any
) -> None:
    """Present, ``__amp_source_origin`` must be a publisher origin: a JSON ``null`` (or any
    other value that is not one) is refused as an empty or wrong one is, not taken as absent."""
    AUDIT.identity(VISITOR, "anonymousId")
    body = json.dumps({"__amp_source_origin": value, "ampId": CACHE_CLIENT_ID}).encode()
    headers = {"Origin": CACHE, "Cookie": f"{COOKIE}={VISITOR}", "Content-Type": "text/plain"}
    response = await client.post(PATH, data=body, headers=headers)
    assert response.status == 403
    problem = await response.json(content_type=None)
    assert problem["type"].endswith(":amp-origin-not-allowed")
    counted = metrics(client)
    assert counted.value("identity_amp_refusals_total", reason="origin") == 1
    assert counted.value("identity_amp_links_recorded_total") == 0
    assert counted.value("identity_amp_hits_total", context="cache_with_cookie") == 0


async def test_a_wrong_source_origin_parameter_is_refused(client: AppClient) -> None:
    pixel = await hit(client, ampId=CACHE_CLIENT_ID, __amp_source_origin="https://evil.example")
    assert pixel.status == 403
    beacon = await hit(
        client, origin=CACHE, ampId=CACHE_CLIENT_ID, __amp_source_origin=CACHE, method="POST"
    )
    assert beacon.status == 403


SOURCE = f"__amp_source_origin={quote(PUBLISHER, safe='')}"
FORM_TYPE = "application/x-www-form-urlencoded"
IN_JSON = json.dumps({"__amp_source_origin": PUBLISHER})


@pytest.mark.parametrize(
    ("query", "body", "content_type", "allowed"),
    [
        (SOURCE, "", None, True),
        ("", SOURCE, FORM_TYPE, True),
        ("", IN_JSON, "application/json", True),
        (f"{SOURCE}&{SOURCE}", "", None, False),
        (f"{SOURCE}&%5F%5F{SOURCE[2:]}", "", None, False),  # the same name, escaped
        (SOURCE, SOURCE, FORM_TYPE, False),
        ("", f"{SOURCE}&{SOURCE}", FORM_TYPE, False),
        (SOURCE, IN_JSON, "text/plain", False),
        ("", f"{IN_JSON[:-1]}, {IN_JSON[1:]}", "application/json", False),
    ],
)
async def test_a_repeated_source_origin_parameter_is_refused(
    client: AppClient,
    collector: Collector,
    query: str,
    body: str,
    content_type: str | None,
    allowed: bool,
) -> None:
    """As ``cors.check`` refuses it for the other endpoints: one reader could take the first
    value and another the last (here the body's won over the query's)."""
    AUDIT.identity(VISITOR, "anonymousId")
    headers = {"Origin": CACHE, "Cookie": f"{COOKIE}={VISITOR}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    target = URL(f"{PATH}?ampId={CACHE_CLIENT_ID}&{query}", encoded=True)
    response = await client.request(
        "POST" if body else "GET", target, data=body.encode(), headers=headers
    )
    counted = metrics(client)
    if allowed:
        assert response.status == 204, await response.text()
        assert counted.value("identity_amp_links_recorded_total") == 1
        return
    assert response.status == 403
    problem = await response.json(content_type=None)
    assert problem["type"].endswith(":amp-origin-not-allowed")
    assert PUBLISHER not in problem["detail"]
    assert "Set-Cookie" not in response.headers
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.headers["Vary"] == "Origin"
    assert counted.value("identity_amp_refusals_total", reason="origin") == 1
    assert counted.value("identity_amp_links_recorded_total") == 0
    assert counted.value("identity_amp_hits_total", context="cache_with_cookie") == 0
    # Nothing was written: a later cookie-less hit is the clientId's own.
    assert (await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)).status == 204
    (event,) = await events_after(collector, 1)
    assert event["properties"]["anonymousId_source"] == "amp_client_id"


async def test_the_rate_limit_answers_429_with_retry_after(amp_client: AmpClientFactory) -> None:
    client = await amp_client(limit_per_client={"requests": 2, "window_seconds": 60})
    for _ in range(2):
        assert (await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)).status == 204

    limited = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)

    assert limited.status == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert (await hit(client, origin=CACHE, ampId="another-client-id")).status == 204
    counted = metrics(client)
    assert counted.value("identity_amp_refusals_total", reason="rate_client") == 1
    assert counted.value("identity_amp_hits_total", context="cache_without_cookie") == 3


async def test_behind_a_cdn_each_visitor_is_counted_under_their_own_address(
    amp_client: AmpClientFactory,
) -> None:
    """Defect: only the last ``X-Forwarded-For`` entry was read, which behind a CDN in front
    of the publisher's proxy is the CDN's: every visitor shared one counter, and one over
    the limit throttled them all. With the CDN's network trusted, each visitor is the
    rightmost entry no trusted proxy wrote, whatever earlier entries claim."""
    client = await amp_client(
        {"trusted_proxies": "127.0.0.1, 198.51.100.0/24"},
        limit_per_ip={"requests": 2, "window_seconds": 60},
    )

    async def through_the_cdn(chain: str, n: int) -> int:
        forwarded = {"X-Forwarded-For": chain}
        answer = await hit(client, origin=CACHE, ampId=f"client-{n}", headers=forwarded)
        return int(answer.status)

    for n, edge in enumerate(("198.51.100.20", "198.51.100.21")):
        assert await through_the_cdn(f"6.6.6.{n}, 203.0.113.7, {edge}", n) == 204
    assert await through_the_cdn("6.6.6.9, 203.0.113.7, 198.51.100.22", 2) == 429
    assert await through_the_cdn("192.0.2.9, 198.51.100.20", 3) == 204  # another visitor
    assert metrics(client).value("identity_amp_refusals_total", reason="rate_ip") == 1
    # The counters are the visitors' own: 203.0.113.7's is full, 192.0.2.9's has room.
    ctx = client.app[AMP]
    with pytest.raises(RateLimited):
        await limits.check_limits(ctx, "203.0.113.7", None)
    await limits.check_limits(ctx, "192.0.2.9", None)


async def test_a_peer_outside_the_trusted_proxies_is_counted_under_its_own_address(
    amp_client: AmpClientFactory,
) -> None:
    """Defect: any loopback or private peer was trusted, so another pod on the network
    could claim a new address with each hit and never be limited. Trusted proxies listed,
    this peer (127.0.0.1) is not among them: whatever address it names, it is counted as
    itself."""
    client = await amp_client(
        {"trusted_proxies": "10.0.0.0/8"}, limit_per_ip={"requests": 2, "window_seconds": 60}
    )
    statuses = []
    for n in range(3):
        claimed = {"X-Forwarded-For": f"192.0.2.{n}"}
        statuses.append((await hit(client, origin=CACHE, ampId=f"c-{n}", headers=claimed)).status)
    assert statuses == [204, 204, 429]
    with pytest.raises(RateLimited):
        await limits.check_limits(client.app[AMP], "127.0.0.1", None)


async def test_a_hit_over_the_limit_writes_no_event_and_no_link(
    amp_client: AmpClientFactory, collector: Collector
) -> None:
    client = await amp_client(limit_per_client={"requests": 1, "window_seconds": 60})
    assert (await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID, event="First")).status == 204

    # With the cookie, the hit would link the clientId: over its limit, it links nothing.
    limited = await hit(client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID, event="Over")
    assert limited.status == 429
    assert (await hit(client, origin=CACHE, ampId="another-client-id", event="Last")).status == 204

    events = await events_after(collector, 2)
    assert [event["event"] for event in events] == ["First", "Last"]
    assert [e["properties"]["anonymousId_source"] for e in events] == ["amp_client_id"] * 2
    counted = metrics(client)
    assert counted.value("identity_amp_links_recorded_total") == 0
    assert counted.value("identity_amp_hits_total", context="cache_with_cookie") == 0


async def test_a_store_error_mid_hit_answers_503_and_leaves_no_link(
    client: AppClient, collector: Collector
) -> None:
    """The event and the link are written in the hit's one script on one Redis node: when
    the event cannot be written, neither is the link."""
    redis_settings = client.app[app_keys.SETTINGS].redis
    if redis_settings is None:
        pytest.skip("the memory store cannot fail")
    shards = range(redis_settings.shards)
    streams = [outbox_key(redis_settings.key_prefix, shard, len(shards)) for shard in shards]
    async with connect(redis_settings) as redis:
        saved = [await redis.dump(stream) for stream in streams]
        for stream in streams:  # an XADD to a string fails inside the script
            await redis.set(stream, "not a stream")
        failed = await hit(client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID)
        for stream, dumped in zip(streams, saved, strict=True):
            await redis.delete(stream)
            if dumped is not None:
                await redis.restore(stream, 0, dumped)

    assert failed.status == 503
    assert failed.headers["Content-Type"] == "application/problem+json"
    assert "Retry-After" in failed.headers
    # No link was left behind: a later cookie-less hit is the clientId's own.
    assert (await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)).status == 204
    (event,) = await events_after(collector, 1)
    assert event["properties"]["anonymousId_source"] == "amp_client_id"
    assert metrics(client).value("identity_amp_links_recorded_total") == 0


async def test_a_full_memory_store_answers_a_new_client_id_503_and_counts_the_others(
    amp_client: AmpClientFactory, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new clientId made a rate counter in the memory store, without bound. Full, it
    answers a hit that needs a new counter 503 with Retry-After, records nothing of it, and
    goes on counting (and serving) the clientIds it holds."""
    monkeypatch.setattr(memory, "MAX_COUNTERS", 3)
    client = await amp_client(limit_per_client={"requests": 2, "window_seconds": 60})
    if client.app[app_keys.SETTINGS].redis is not None:
        pytest.skip("Redis is bounded by its maxmemory (test_amp_store)")
    # The address's counter and each clientId's: three in all.
    for client_id, event in (("client-one", "One"), ("client-two", "Two")):
        assert (await hit(client, origin=CACHE, ampId=client_id, event=event)).status == 204

    refused = await hit(client, origin=CACHE, ampId="client-three", event="Refused")
    assert refused.status == 503
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert "Retry-After" in refused.headers

    assert (await hit(client, origin=CACHE, ampId="client-one", event="Again")).status == 204
    assert (await hit(client, origin=CACHE, ampId="client-one", event="Over")).status == 429
    events = await events_after(collector, 3)
    assert [event["event"] for event in events] == ["One", "Two", "Again"]
    assert metrics(client).value("identity_store_errors_total") == 1


async def test_a_beacon_body_as_json_or_form_is_read(
    client: AppClient, collector: Collector
) -> None:
    # sendBeacon with a string body sends text/plain (amp-analytics' useBody: JSON).
    beacon = await hit(
        client,
        method="POST",
        origin=CACHE,
        data=json.dumps({"event": "Clicked", "button": "subscribe", "count": 2}).encode(),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        ampId=CACHE_CLIENT_ID,
    )
    form = await hit(
        client,
        method="POST",
        origin=CACHE,
        data=b"event=Shared&network=mastodon",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        ampId=CACHE_CLIENT_ID,
    )
    assert (beacon.status, form.status) == (204, 204)

    events = {event["event"]: event for event in await events_after(collector, 2)}
    assert events["Clicked"]["properties"]["button"] == "subscribe"
    assert events["Clicked"]["properties"]["count"] == 2
    assert events["Shared"]["properties"]["network"] == "mastodon"


async def test_bodies_and_queries_are_bounded(amp_client: AmpClientFactory) -> None:
    client = await amp_client(max_form_bytes=1024, max_form_fields=4)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    big = await hit(client, method="POST", origin=CACHE, data=b"x=" + b"a" * 2000, headers=headers)
    assert big.status == 413
    many = await hit(client, origin=CACHE, a="1", b="2", c="3", d="4", e="5")
    assert many.status == 413
    typed = await hit(
        client, method="POST", origin=CACHE, data=b"<x/>", headers={"Content-Type": "text/xml"}
    )
    assert typed.status == 415
    counted = metrics(client)
    assert counted.value("identity_amp_refusals_total", reason="payload_too_large") == 2
    assert counted.value("identity_amp_hits_total", context="cache_without_cookie") == 0


async def test_an_unsupported_hit_body_names_the_types_collect_reads(client: AppClient) -> None:
    """The 415 says what collect reads (a form, or JSON as application/json or text/plain),
    not the handoff API's application/json alone."""
    typed = await hit(
        client, method="POST", origin=CACHE, data=b"<x/>", headers={"Content-Type": "text/xml"}
    )
    assert typed.status == 415
    accepted = {kind.strip() for kind in typed.headers["Accept-Post"].split(",")}
    assert accepted == {"application/x-www-form-urlencoded", "application/json", "text/plain"}
    problem = await typed.json(content_type=None)
    assert problem["type"].endswith(":unsupported-media-type")
    assert "application/json" not in problem["title"]
    for kind in accepted:  # each type it names is read
        body = b'{"x": "1"}' if "json" in kind or "text" in kind else b"x=1"
        sent = await hit(
            client, method="POST", origin=CACHE, data=body, headers={"Content-Type": kind}
        )
        assert sent.status == 204, kind


async def test_a_configured_next_hop_is_a_302(amp_client: AmpClientFactory) -> None:
    client = await amp_client(collect_redirect=f"{PUBLISHER}/pixel.gif")
    response = await client.get(
        PATH,
        params={"ampId": "amp-origin-client-id"},
        headers={"AMP-Same-Origin": "true"},
        allow_redirects=False,
    )
    assert response.status == 302
    assert response.headers["Location"] == f"{PUBLISHER}/pixel.gif"
    assert set_cookie_value(response) is not None


async def test_collect_is_answered_on_the_front_without_a_body(
    amp_client: AmpClientFactory, server_kind: str
) -> None:
    if server_kind != "front":
        pytest.skip("raw HTTP of the front")
    client = await amp_client()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    request = (
        f"GET {PATH}?ampId={CACHE_CLIENT_ID}&title=%E2%9C%93%ff HTTP/1.1\r\n"
        f"Host: x\r\nOrigin: {CACHE}\r\nX-Request-ID: collect-1\r\n\r\n"
    ).encode()
    bad_origins = (
        f"GET {PATH} HTTP/1.1\r\nHost: x\r\nOrigin: {CACHE}\r\nOrigin: https://evil.example\r\n\r\n"
    ).encode()
    writer.write(request + request + bad_origins)
    heads = []
    for _ in range(3):
        heads.append((await reader.readuntil(b"\r\n\r\n")).decode())
    writer.close()
    for head in heads[:2]:
        assert head.startswith("HTTP/1.1 204 No Content\r\n")
        assert "\r\nContent-Length:" not in head and "\r\nContent-Type:" not in head
        assert "X-Request-ID: collect-1\r\n" in head
        assert f"Access-Control-Allow-Origin: {CACHE}\r\n" in head
        assert "Cache-Control: no-store\r\n" in head
    assert heads[2].startswith("HTTP/1.1 403 ")  # a repeated Origin is no allowed one


async def test_other_methods_go_to_the_application(client: AppClient) -> None:
    response = await client.put(PATH, data=b"")
    assert response.status == 405


async def test_refusals_before_collect_vary_on_origin_too(client: AppClient) -> None:
    # Found in review: the 405s and the front's 413 had no Vary.
    too_large = client.app[app_keys.SETTINGS].max_body_bytes + 1
    answers = [
        await client.put(PATH, data=b""),
        await client.head(PATH, headers={"Origin": CACHE}),
        await client.post(PATH, data=b"x" * too_large, headers={"Origin": CACHE}),
    ]
    assert [answer.status for answer in answers] == [405, 405, 413]
    for answer in answers:
        assert answer.headers.getall("Vary") == ["Origin"], answer.status


async def test_head_records_no_hit(client: AppClient, collector: Collector) -> None:
    for headers in ({"Origin": CACHE}, {"AMP-Same-Origin": "true"}, {}):
        response = await client.head(
            PATH, params={"ampId": CACHE_CLIENT_ID, "event": "Read"}, headers=headers
        )
        assert response.status == 405
        assert "Set-Cookie" not in response.headers
    assert (await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)).status == 204
    (event,) = await events_after(collector, 1)
    assert event["type"] == "page"  # the GET's, not a HEAD's "Read"
    counted = metrics(client)
    assert counted.value("identity_amp_hits_total", context="cache_without_cookie") == 1
    assert counted.value("identity_amp_hits_total", context="origin") == 0


async def test_a_failed_link_write_leaves_the_hit_recorded(
    client: AppClient, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_keep(key_id: bytes, record: bytes, ttl_seconds: int) -> None:
        raise StoreUnavailable("the store is down for kept records")

    store = client.app[AMP].store
    if isinstance(store, RedisStore):
        # One Redis node writes the link in the hit's own script, which fails whole (see
        # test_amp_store.py); the link is a write of its own where the keys lie in
        # different slots, as on a Cluster.
        monkeypatch.setattr(store, "one_script_hits", False)
    monkeypatch.setattr(store, "keep", failing_keep)
    response = await hit(client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID)

    assert response.status == 204  # as an action stands when its link fails
    (event,) = await events_after(collector, 1)
    assert event["anonymousId"] == VISITOR
    counted = metrics(client)
    assert counted.value("identity_amp_link_failures_total") == 1
    assert counted.value("identity_amp_links_recorded_total") == 0
    assert counted.value("identity_store_errors_total") == 0


async def test_collect_answers_vary_on_origin(client: AppClient, server_kind: str) -> None:
    answers = [
        await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID),
        await hit(client, headers={"AMP-Same-Origin": "true"}, ampId=CACHE_CLIENT_ID),
        await hit(client, ampId=CACHE_CLIENT_ID),
    ]
    if server_kind == "aiohttp":  # the front renders problems itself (front.py)
        answers.append(await hit(client, origin="https://evil.example"))
    for answer in answers:
        assert answer.headers.getall("Vary") == ["Origin"], answer.status


async def test_without_amp_there_is_no_collect(
    aiohttp_client: Callable[..., Awaitable[AppClient]], settings_for: Callable[..., Settings]
) -> None:
    app: web.Application = create_app(settings_for())
    client = await aiohttp_client(FrontTestServer(app))
    assert (await client.get(PATH)).status == 404


async def test_a_cookieless_cache_hit_with_an_unreadable_link_is_the_client_ids(
    client: AppClient, collector: Collector
) -> None:
    # A record under the clientId's key that does not open (kept under another link
    # secret, or damaged) is no link: the hit is the clientId's, its event emitted once.
    ctx = client.app[AMP]
    _, key_id = links.link_key(ctx, CACHE_CLIENT_ID)
    await ctx.store.keep(key_id, b"\x01" + bytes(40), 60)

    response = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID, event="Read")

    assert response.status == 204
    events = await events_after(collector, 1)
    assert [(e["anonymousId"], e["properties"]["anonymousId_source"]) for e in events] == [
        (CACHE_CLIENT_ID, "amp_client_id")
    ]
    assert metrics(client).value("identity_amp_link_attributions_total") == 0


@pytest.mark.parametrize("linked", [False, True])
async def test_a_cookieless_cache_hit_too_large_to_deliver_is_refused_once_counted(
    amp_client: AmpClientFactory, collector: Collector, linked: bool
) -> None:
    client = await amp_client(max_form_bytes=16_384)
    if linked:
        assert (
            await hit(client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID)
        ).status == 204
    large = await hit(
        client,
        method="POST",
        origin=CACHE,
        # Within the body's 16 KB, and each %01 is \u0001 (6 bytes) in the event's JSON.
        data=b"note=" + b"%01" * 5_450,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        ampId=CACHE_CLIENT_ID,
    )

    assert large.status == 413
    assert large.headers["Content-Type"] == "application/problem+json"
    problem = await large.json(content_type=None)
    assert problem["type"] == "urn:identity-service:problem:event-too-large"
    assert "collect event" in problem["detail"]
    assert (await hit(client, origin=CACHE, ampId="cache-cid-after", event="After")).status == 204
    events = await events_after(collector, 2 if linked else 1)
    assert [e.get("event") for e in events] == [None, "After"] if linked else ["After"]
    assert all("note" not in e["properties"] for e in events)
    # Counted as a hit (rate limits included) though refused.
    assert metrics(client).value("identity_amp_hits_total", context="cache_without_cookie") == 2


async def test_a_cookieless_cache_hit_is_one_redis_write_unless_it_is_linked(
    client: AppClient, collector: Collector, store_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store_kind != "redis":
        pytest.skip("counts what the service writes to one Redis node")
    # Records the link, and loads the script, before counting.
    assert (await hit(client, origin=CACHE, cookie=VISITOR, ampId=CACHE_CLIENT_ID)).status == 204
    writes: list[list[bytes]] = []
    flush = resp_module.Connection._flush

    def counted_flush(self: resp_module.Connection) -> None:
        # The hits' commands only: the forwarder's reads and acks go out too.
        sent = [
            name
            for command in self._outgoing
            for name in (b"EVALSHA", b"XADD")
            if f"\r\n{name.decode()}\r\n".encode() in command
        ]
        if sent:
            writes.append(sent)
        flush(self)

    monkeypatch.setattr(resp_module.Connection, "_flush", counted_flush)
    unlinked = await hit(client, origin=CACHE, ampId="cache-cid-unlinked")
    unlinked_writes, writes[:] = list(writes), []
    linked = await hit(client, origin=CACHE, ampId=CACHE_CLIENT_ID)
    monkeypatch.undo()

    assert (unlinked.status, linked.status) == (204, 204)
    # Without a link its event is written in the script that counts it: one round trip.
    assert unlinked_writes == [[b"EVALSHA"]]
    # A link is sealed: the event it attributes is built once it is read, and follows.
    assert writes == [[b"EVALSHA"], [b"XADD"]]
    events = await events_after(collector, 3)
    assert [(e["anonymousId"], e["properties"]["anonymousId_source"]) for e in events] == [
        (VISITOR, "cookie"),
        ("cache-cid-unlinked", "amp_client_id"),
        (VISITOR, "amp_link"),
    ]


# A hit's query and form body are read by yarl's query_to_pairs (a C unquoter), which must
# read them exactly as the standard library does: the same pairs, the same refusal.
_QUERY_TEXT = st.text(
    alphabet=st.sampled_from(list("ab=&+;% 2BFfzC3A9E08D\u00e9\u2603\U0001f600\x00\n")),
    max_size=40,
)


@given(text=_QUERY_TEXT, max_fields=st.integers(min_value=1, max_value=6))
@settings(max_examples=3000, deadline=None)
def test_a_hit_is_read_as_parse_qsl_reads_it(text: str, max_fields: int) -> None:
    def read(parse: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]] | str:
        try:
            return parse()
        except (ValueError, PayloadTooLarge):
            return "refused"

    expected = read(lambda: parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields))
    assert read(lambda: collect_module._form(text, max_fields)) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"title": "lone \\ud800 surrogate"}',
        b'{"event": "\\udfff"}',
        b'{"title": "\\ud800", "__amp_source_origin": "https://www.example.com"}',
    ],
)
async def test_a_json_hit_with_a_lone_surrogate_is_refused_not_a_500(
    client: AppClient, body: bytes
) -> None:
    """JSON's \\uD800 escapes decode to no character: the body is malformed JSON."""
    response = await hit(
        client,
        method="POST",
        cookie=VISITOR,
        data=body,
        headers={"AMP-Same-Origin": "true", "Content-Type": "text/plain"},
        ampId=VISITOR,
    )
    assert response.status == 400
    problem = await response.json(content_type=None)
    assert problem["type"].endswith(":malformed-json")
