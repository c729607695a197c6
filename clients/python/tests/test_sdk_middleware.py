"""The domain-B middlewares (ASGI, WSGI, aiohttp) against the real service."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import DEV_WRITE_KEY, Service
from identity_client import (
    AsyncIdentityClient,
    ConfigurationError,
    Identity,
    IdentityClient,
    _carry,
)
from identity_client.middleware import (
    IdentityASGIMiddleware,
    IdentityWSGIMiddleware,
    MiddlewareSettings,
    identity_middleware,
)

HOST = "http://checkout.localhost"
COOKIE = "ajs_anonymous_id"
CARRY = "identity_restored"


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def describe(identity: Identity | None) -> dict[str, Any]:
    if identity is None:
        return {"identity": None}
    return {"anonymous_id": identity.anonymous_id, "source": identity.source}


def cookie_value(set_cookie: str) -> str:
    first = set_cookie.split(";")[0]
    name, _, value = first.partition("=")
    assert name == COOKIE
    return value


def check_set_cookie(set_cookie: str, anonymous_id: str) -> None:
    assert set_cookie == (
        f"{COOKIE}={anonymous_id}; Path=/; Max-Age=31536000; SameSite=Lax; Secure"
    )


def test_split_token_keeps_the_other_parameters_in_order() -> None:
    settings = MiddlewareSettings()
    assert settings.split_token("b=2&handoff_token=abc&a=1&c") == ("abc", "b=2&a=1&c")
    assert settings.split_token("handoff_token=abc") == ("abc", "")
    assert settings.split_token("a=1") == (None, "a=1")
    assert settings.split_token("handoff%5Ftoken=x") == ("x", "")


def test_the_cookie_is_read_raw_or_as_analytics_js_classic_json_string() -> None:
    settings = MiddlewareSettings()
    for header in (
        "ajs_anonymous_id=abc-1",
        'ajs_anonymous_id="abc-1"',
        "ajs_anonymous_id=%22abc-1%22",  # analytics.js classic: JSON.stringify, URL-encoded
        "other=1; ajs_anonymous_id=%22abc-1%22",
    ):
        identity = settings.cookie_identity(header)
        assert identity is not None and identity.anonymous_id == "abc-1", header
    assert settings.cookie_identity("ajs_anonymous_id=%22%22") is None


# ASGI


async def asgi_echo(scope: Any, receive: Any, send: Any) -> None:
    body = json.dumps(describe(scope["state"]["identity"])).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_asgi(service: Service) -> None:
    async with AsyncIdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityASGIMiddleware(asgi_echo, client)
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 4000))
        async with httpx.AsyncClient(transport=transport, base_url=HOST) as browser:
            handoff = await client.prepare("visitor-asgi", destination=f"{HOST}/cart?b=2&a=1#top")
            first = await browser.get(
                path_of(handoff.redirect_url), headers={"Referer": "http://shop.localhost/"}
            )
            assert first.status_code == 303
            assert first.headers["location"] == "/cart?b=2&a=1"
            check_set_cookie(first.headers.get_list("set-cookie")[0], "visitor-asgi")

            clean = await browser.get(
                first.headers["location"], headers={"Cookie": f"{COOKIE}=visitor-asgi"}
            )
            assert clean.status_code == 200
            assert clean.json() == {"anonymous_id": "visitor-asgi", "source": "cookie"}

            # The same token again: used, so a generated id, and the page still loads.
            again = await browser.get(path_of(handoff.redirect_url))
            assert again.status_code == 303
            generated = cookie_value(again.headers["set-cookie"])
            assert generated not in {"", "visitor-asgi"}

            # No token: untouched.
            plain = await browser.get("/cart?a=1")
            assert plain.status_code == 200
            assert "set-cookie" not in plain.headers
            assert plain.json() == {"identity": None}

            # Not a GET: untouched even with a token.
            posted = await browser.post("/cart?handoff_token=abc")
            assert posted.status_code == 200


async def test_asgi_service_down(down_service: Service) -> None:
    async with AsyncIdentityClient(down_service.url, DEV_WRITE_KEY) as client:
        app = IdentityASGIMiddleware(asgi_echo, client, cookie_domain=".checkout.localhost")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=HOST) as browser:
            answer = await browser.get("/cart?handoff_token=" + "t" * 43 + "&step=2")
            assert answer.status_code == 303
            assert answer.headers["location"] == "/cart?step=2"
            assert "set-cookie" not in answer.headers


# WSGI


def wsgi_echo(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = json.dumps(describe(environ["identity_client.identity"])).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def test_wsgi(service: Service) -> None:
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityWSGIMiddleware(
            wsgi_echo, client, cookie_same_site="None", cookie_domain="checkout.localhost"
        )
        transport = httpx.WSGITransport(app=app, remote_addr="203.0.113.8")
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare("visitor-wsgi", destination=f"{HOST}/pay/ok?order=7")
            first = browser.get(path_of(handoff.redirect_url))
            assert first.status_code == 303
            assert first.headers["location"] == "/pay/ok?order=7"
            visitor_cookie, carry = first.headers.get_list("set-cookie")
            assert visitor_cookie == (
                f"{COOKIE}=visitor-wsgi; Path=/; Max-Age=31536000; SameSite=None; "
                "Domain=checkout.localhost; Secure"
            )
            # The carry cookie is host-only: no Domain, set and cleared alike.
            carry_pair, _, attributes = carry.partition("; ")
            assert carry_pair.startswith(f"{CARRY}=")
            assert attributes == "Path=/; Max-Age=60; SameSite=None; Secure; HttpOnly"
            landed = browser.get(
                "/pay/ok?order=7", headers={"Cookie": f"{COOKIE}=visitor-wsgi; {carry_pair}"}
            )
            assert landed.json() == {"anonymous_id": "visitor-wsgi", "source": "handoff"}
            assert landed.headers["set-cookie"] == (
                f"{CARRY}=; Path=/; Max-Age=0; SameSite=None; Secure; HttpOnly"
            )
            clean = browser.get(
                "/pay/ok?order=7", headers={"Cookie": f"x=1; {COOKIE}=visitor-wsgi"}
            )
            assert clean.json() == {"anonymous_id": "visitor-wsgi", "source": "cookie"}

            # An expired token: a generated id.
            expiring = client.prepare("visitor-late", destination=f"{HOST}/cart", ttl=1)
            time.sleep(1.2)
            late = browser.get(path_of(expiring.redirect_url))
            assert late.status_code == 303
            assert late.headers["location"] == "/cart"
            assert cookie_value(late.headers["set-cookie"]) != "visitor-late"

            plain = browser.get("/cart")
            assert plain.status_code == 200
            assert plain.json() == {"identity": None}


def attributes_of(set_cookie: str) -> list[str]:
    """A ``Set-Cookie`` value's attributes, without the ``name=value`` pair."""
    return set_cookie.split("; ")[1:]


@pytest.mark.parametrize(
    ("same_site", "carry_same_site"),
    [("Lax", "Lax"), ("Strict", "Lax"), ("strict", "Lax"), ("None", "None")],
)
def test_the_carry_cookie_is_lax_when_the_visitor_cookie_is_strict(
    service: Service, same_site: str, carry_same_site: str
) -> None:
    """The request after the landing's 303 is the tail of a navigation from domain A: a
    browser sends no ``Strict`` cookie with it, so the carry cookie is ``Lax`` then, and is
    read without the visitor cookie (withheld as well). The visitor cookie keeps the site's
    SameSite; the carry cookie is cleared with the attributes it was set with. Without a
    ``Strict`` visitor cookie, a carry cookie without the visitor cookie is still ignored."""
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityWSGIMiddleware(
            wsgi_echo, client, cookie_same_site=same_site, cookie_domain="checkout.localhost"
        )
        transport = httpx.WSGITransport(app=app)
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare("visitor-ss", destination=f"{HOST}/cart")
            landing = browser.get(path_of(handoff.redirect_url))
            assert landing.status_code == 303
            visitor_cookie, carry = landing.headers.get_list("set-cookie")
            assert f"SameSite={same_site}" in attributes_of(visitor_cookie)
            assert attributes_of(carry) == [
                "Path=/",
                "Max-Age=60",
                f"SameSite={carry_same_site}",
                "Secure",
                "HttpOnly",
            ]
            # What a browser sends after the 303 when the visitor cookie is withheld.
            carry_pair = carry.split("; ")[0]
            page = browser.get("/cart", headers={"Cookie": carry_pair})
            strict = same_site.lower() == "strict"
            restored = {"anonymous_id": "visitor-ss", "source": "handoff"}
            assert page.json() == (restored if strict else {"identity": None})
            (cleared,) = page.headers.get_list("set-cookie")
            assert cleared == f"{CARRY}=; " + "; ".join(attributes_of(carry)).replace(
                "Max-Age=60", "Max-Age=0"
            )


def test_wsgi_redirects_to_the_raw_path_when_the_server_gives_it(service: Service) -> None:
    """RAW_URI or REQUEST_URI (gunicorn, werkzeug, uWSGI) is the path as sent; without
    them, SCRIPT_NAME and PATH_INFO quoted back."""
    seen: list[tuple[str, str]] = []

    def start_response(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> None:
        seen.append((status, dict(headers)["Location"]))

    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityWSGIMiddleware(wsgi_echo, client)
        base = {"REQUEST_METHOD": "GET", "PATH_INFO": "/a/b?c", "QUERY_STRING": "handoff_token=z"}
        for extra in (
            {"RAW_URI": "/a%2Fb%3Fc?handoff_token=z"},
            {"REQUEST_URI": "/a%2Fb%3Fc?handoff_token=z"},
            {"REQUEST_URI": "http://b.localhost/a%2Fb%3Fc?handoff_token=z"},  # absolute-form
            {"RAW_URI": "/caf\xc3\xa9 x%2F?handoff_token=z"},  # raw bytes: quoted
            {},  # PATH_INFO quoted back
        ):
            list(app({**base, **extra}, start_response))
    assert seen == [
        ("303 See Other", "/a%2Fb%3Fc"),
        ("303 See Other", "/a%2Fb%3Fc"),
        ("303 See Other", "/a%2Fb%3Fc"),
        ("303 See Other", "/caf%C3%A9%20x%2F"),
        ("303 See Other", "/a/b%3Fc"),
    ]


def test_a_handoff_with_a_user_id_alone_lands_without_a_cookie(service: Service) -> None:
    """The service answers such a handoff with no anonymousId: no visitor cookie to set
    (it was a TypeError, a 500), the 303 to the clean URL all the same."""
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        transport = httpx.WSGITransport(app=IdentityWSGIMiddleware(wsgi_echo, client))
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare(user_id="user-only", destination=f"{HOST}/cart?a=1")
            answer = browser.get(path_of(handoff.redirect_url))
            assert answer.status_code == 303
            assert answer.headers["location"] == "/cart?a=1"
            assert "set-cookie" not in answer.headers


def test_wsgi_service_down(down_service: Service) -> None:
    with IdentityClient(down_service.url, DEV_WRITE_KEY) as client:
        transport = httpx.WSGITransport(app=IdentityWSGIMiddleware(wsgi_echo, client))
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            answer = browser.get("/cart?handoff_token=abc")
            assert answer.status_code == 303
            assert answer.headers["location"] == "/cart"
            assert "set-cookie" not in answer.headers


# aiohttp


async def aiohttp_echo(request: web.Request) -> web.Response:
    return web.json_response(describe(request["identity"]))


@pytest.fixture
async def aiohttp_browser(service: Service, aiohttp_client: Any) -> Any:
    client = AsyncIdentityClient(service.url, DEV_WRITE_KEY)
    app = web.Application(middlewares=[identity_middleware(client, token_param="t")])
    app.router.add_get("/{tail:.*}", aiohttp_echo)
    browser: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    yield client, browser
    await client.aclose()


async def test_aiohttp(aiohttp_browser: Any) -> None:
    client, browser = aiohttp_browser
    handoff = await client.prepare("visitor-aiohttp", destination=f"{HOST}/cart?x=1")
    token = handoff.token

    first = await browser.get(f"/cart?x=1&t={token}", allow_redirects=False)
    assert first.status == 303
    assert first.headers["Location"] == "/cart?x=1"
    check_set_cookie(first.headers["Set-Cookie"], "visitor-aiohttp")

    clean = await browser.get("/cart?x=1", headers={"Cookie": f"{COOKIE}=visitor-aiohttp"})
    assert await clean.json() == {"anonymous_id": "visitor-aiohttp", "source": "cookie"}

    again = await browser.get(f"/cart?t={token}", allow_redirects=False)
    assert again.status == 303
    assert cookie_value(again.headers["Set-Cookie"]) != "visitor-aiohttp"

    plain = await browser.get("/cart?handoff_token=not-this-one")
    assert plain.status == 200
    assert "Set-Cookie" not in plain.headers
    assert await plain.json() == {"identity": None}


def carried(set_cookies: list[str]) -> Identity | None:
    """The identity in the carry cookie among ``set_cookies`` (the dev write key's)."""
    (carry,) = [c for c in set_cookies if c.startswith(f"{CARRY}=")]
    value = carry.split(";", 1)[0].split("=", 1)[1]
    assert len(value) <= _carry.MAX_VALUE_BYTES
    return _carry.decode(value, _carry.carry_key(DEV_WRITE_KEY), time.time())


def test_traits_too_large_for_the_carry_cookie_are_left_out(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Traits that make the carry cookie over ``MAX_VALUE_BYTES`` (1,500: with the site's
    other cookies the Cookie header must stay under servers' ~8 KB line limits): the carry
    cookie holds the identity without them, and a warning names no id."""
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        transport = httpx.WSGITransport(app=IdentityWSGIMiddleware(wsgi_echo, client))
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare(
                "visitor-traits",
                user_id="user-traits",
                traits={"bio": "x" * 1000},
                consent={"analytics": True},
                destination=f"{HOST}/cart",
            )
            with caplog.at_level(logging.WARNING, logger="identity_client"):
                first = browser.get(path_of(handoff.redirect_url))
            assert first.status_code == 303
            identity = carried(first.headers.get_list("set-cookie"))
            assert identity is not None
            assert (identity.user_id, identity.traits, identity.consent, identity.source) == (
                "user-traits",
                {},
                {"analytics": True},
                "handoff",
            )
            (record,) = caplog.records
            assert record.levelno == logging.WARNING
            assert "without its traits" in record.getMessage()
            assert "visitor-traits" not in record.getMessage()
            assert "user-traits" not in record.getMessage()


def test_an_identity_too_large_for_a_cookie_is_not_carried(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """An identity over ``MAX_VALUE_BYTES`` even without its traits (here its consent): only
    the visitor cookie is set (the handler then gets the cookie's anonymousId), with a
    warning that names no id."""
    consent = {f"category-{n:02d}-" + "c" * 28: True for n in range(40)}
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        transport = httpx.WSGITransport(app=IdentityWSGIMiddleware(wsgi_echo, client))
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare(
                "visitor-large",
                user_id="user-large",
                traits={"plan": "pro"},
                consent=consent,
                destination=f"{HOST}/cart",
            )
            with caplog.at_level(logging.WARNING, logger="identity_client"):
                first = browser.get(path_of(handoff.redirect_url))
            assert first.status_code == 303
            (cookie,) = first.headers.get_list("set-cookie")
            check_set_cookie(cookie, "visitor-large")
            (record,) = caplog.records
            assert record.levelno == logging.WARNING and "too large" in record.getMessage()
            assert "visitor-large" not in record.getMessage()
            assert "user-large" not in record.getMessage()
            clean = browser.get("/cart", headers={"Cookie": f"{COOKIE}=visitor-large"})
            assert clean.json() == {"anonymous_id": "visitor-large", "source": "cookie"}


class KeylessClient:
    """A site's own exchange-only wrapper of the client: it has no carry key."""

    def __init__(self, client: AsyncIdentityClient) -> None:
        self._client = client

    async def exchange(self, token: str, **options: Any) -> Identity:
        return await self._client.exchange(token, **options)


async def test_aiohttp_with_a_client_without_a_carry_key(
    service: Service, aiohttp_client: Any
) -> None:
    """A client object without the carry key: the visitor cookie only, never a 500 (the
    middleware read the key on each request and raised AttributeError)."""
    async with AsyncIdentityClient(service.url, DEV_WRITE_KEY) as client:
        keyless: Any = KeylessClient(client)
        app = web.Application(middlewares=[identity_middleware(keyless)])
        app.router.add_get("/{tail:.*}", aiohttp_echo)
        browser: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        handoff = await client.prepare("visitor-keyless", destination=f"{HOST}/cart")

        first = await browser.get(f"/cart?handoff_token={handoff.token}", allow_redirects=False)
        assert first.status == 303
        check_set_cookie(first.headers["Set-Cookie"], "visitor-keyless")
        assert len(first.headers.getall("Set-Cookie")) == 1

        carry = _carry.encode(Identity("visitor-keyless"), client._carry_key, 2**40)
        cookie = f"{COOKIE}=visitor-keyless; {CARRY}={carry}"
        landed = await browser.get("/cart", headers={"Cookie": cookie})
        assert landed.status == 200
        assert await landed.json() == {"anonymous_id": "visitor-keyless", "source": "cookie"}
        assert landed.headers["Set-Cookie"].startswith(f"{CARRY}=;")


def test_a_misconfigured_event_is_an_error_a_bad_token_is_not(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's 400 to the site's own event (over 200 characters) is the site's
    misconfiguration: an ERROR line. A visitor's bad token (empty) gives none."""
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        for event, token, level in (("x" * 201, "t" * 43, logging.ERROR), (None, "", None)):
            app = IdentityWSGIMiddleware(wsgi_echo, client, event=event)
            transport = httpx.WSGITransport(app=app)
            with httpx.Client(transport=transport, base_url=HOST) as browser:
                caplog.clear()
                with caplog.at_level(logging.INFO, logger="identity_client"):
                    answer = browser.get(f"/cart?handoff_token={token}")
                assert answer.status_code == 303
                errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
                if level is None:
                    assert errors == []
                else:
                    (record,) = errors
                    assert "InvalidRequest" in record.getMessage()
                    assert token not in record.getMessage()


# The cookie's Domain: a domain name, or refused when the middleware is made

INVALID_COOKIE_DOMAINS = [
    "example.test; HttpOnly",  # would add an attribute to every visitor cookie
    "example.test,other.test",
    "example .test",
    "example.test\r\nSet-Cookie: x=1",
    "example.test\x00",
    "example..test",  # an empty label
    "example.test.",
    ".",
    "..example.test",
    "-example.test",
    "exa$mple.test",
    "bücher.example",  # the punycode (xn--) form is the domain a cookie holds
    "a" * 64 + ".test",  # a label over 63 characters
    ("a" * 60 + ".") * 5 + "test",  # over 253 characters
    5,
    # Browsers set no Domain cookie for a single label or an IP address: the visitor cookie
    # was never set (the service's AMP cookie.domain refuses them too).
    "localhost",
    ".com",
    "com",
    "127.0.0.1",
    ".127.0.0.1",
    "shop.0x7f",  # a last label that is a number: an IPv4 address to a browser
    "[::1]",
    "::1",
]


def make_middleware(kind: str, **settings: Any) -> object:
    """The ``kind`` middleware (wsgi, asgi, aiohttp) made with ``settings``, around a
    client of a service that is never called."""
    if kind == "wsgi":
        return IdentityWSGIMiddleware(
            wsgi_echo, IdentityClient("http://127.0.0.1:1", DEV_WRITE_KEY), **settings
        )
    client = AsyncIdentityClient("http://127.0.0.1:1", DEV_WRITE_KEY)
    if kind == "asgi":
        return IdentityASGIMiddleware(asgi_echo, client, **settings)
    return identity_middleware(client, **settings)


@pytest.mark.parametrize("kind", ["wsgi", "asgi", "aiohttp"])
@pytest.mark.parametrize("cookie_domain", INVALID_COOKIE_DOMAINS, ids=repr)
def test_an_invalid_cookie_domain_is_refused_when_the_middleware_is_made(
    kind: str, cookie_domain: object
) -> None:
    """It went into every Set-Cookie as written: a ';' added attributes, a space or an
    empty label made a cookie the browser drops (the visitor never restored)."""
    with pytest.raises(ConfigurationError, match="cookie_domain"):
        make_middleware(kind, cookie_domain=cookie_domain)


@pytest.mark.parametrize(
    "cookie_domain",
    [
        ".example-pay.com",
        "checkout.example-pay.com",
        "checkout.localhost",
        "10.example-pay.com",  # a number in a label but the last
        "xn--bcher-kva.example",
    ],
)
def test_a_cookie_domain_is_written_as_given(service: Service, cookie_domain: str) -> None:
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityWSGIMiddleware(wsgi_echo, client, cookie_domain=cookie_domain)
        transport = httpx.WSGITransport(app=app)
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare("visitor-domain", destination=f"{HOST}/cart")
            visitor_cookie = browser.get(path_of(handoff.redirect_url)).headers["set-cookie"]
    assert f"; Domain={cookie_domain}; " in visitor_cookie


@pytest.mark.parametrize("kind", ["wsgi", "asgi", "aiohttp"])
@pytest.mark.parametrize(
    "token_param", ["", "handoff token", "t\u00f6ken", "a=b", "a&b", "a.b", None, 5], ids=repr
)
def test_a_token_param_the_service_cannot_send_is_refused_when_the_middleware_is_made(
    kind: str, token_param: object
) -> None:
    """An empty one made any URL with an empty query part (``?a&&b``) a handoff: exchanged,
    answered 303, a generated id set. The service's IDENTITY_TOKEN_PARAM is ASCII letters,
    digits, '_' or '-'; so is the middlewares'."""
    with pytest.raises(ConfigurationError, match="token_param"):
        make_middleware(kind, token_param=token_param)


# The cookies' other settings: what a Set-Cookie can hold, or refused when the middleware is made

# A name is an RFC 6265 token: a ';' or ',' adds attributes or cookies, '=' moves the value,
# a space, a quote or a control character makes a cookie browsers drop.
INVALID_COOKIE_NAMES: tuple[object, ...] = (
    "",
    "ajs; Domain=evil.test",
    "ajs,other",
    "ajs id",
    "ajs=id",
    'ajs"',
    "ajs\r\nSet-Cookie: x=1",
    "ajs\x00",
    "ajs\x7f",
    "ajs_é",
    5,
)
INVALID_COOKIE_SETTINGS: list[dict[str, object]] = [
    *(
        {setting: name}
        for setting in ("cookie_name", "carry_cookie_name")
        for name in INVALID_COOKIE_NAMES
    ),
    # A path: any character but a control character or ';', starting with '/' (a browser
    # ignores any other and uses the page's directory instead).
    {"cookie_path": "/; Domain=evil.test"},
    {"cookie_path": "/shop\r\nSet-Cookie: x=1"},
    {"cookie_path": "/shop\x00"},
    {"cookie_path": "/shöp"},
    {"cookie_path": ""},
    {"cookie_path": "shop"},
    {"cookie_path": None},
    # Seconds, a whole number from 1 (0 or less deletes the cookie at once) to the 400 days
    # browsers keep a cookie (RFC 6265bis 5.6.2: any longer is cut to 400 days).
    {"cookie_max_age": float("nan")},
    {"cookie_max_age": float("inf")},
    {"cookie_max_age": -1},
    {"cookie_max_age": 0},
    {"cookie_max_age": 1.5},
    {"cookie_max_age": 400 * 24 * 3600 + 1},
    {"cookie_max_age": "3600"},
    {"cookie_max_age": True},
    # SameSite: one of the three (in any case); None only with Secure (browsers drop it
    # without).
    {"cookie_same_site": "Lax; Domain=evil.test"},
    {"cookie_same_site": ""},
    {"cookie_same_site": "None", "cookie_secure": False},
    # One name for both cookies: the carry cookie (HttpOnly, 60 s) replaced the visitor's.
    {"cookie_name": "identity_restored"},
    {"carry_cookie_name": "ajs_anonymous_id"},
    # A name's prefix its attributes do not fit (RFC 6265bis 4.1.3, in any case): browsers
    # drop the cookie. __Secure- needs Secure; __Host- Secure, Path=/ and no Domain (the
    # carry cookie never has one).
    {"cookie_name": "__Secure-ajs", "cookie_secure": False},
    {"cookie_name": "__secure-ajs", "cookie_secure": False},
    {"cookie_name": "__Host-ajs", "cookie_secure": False},
    {"cookie_name": "__Host-ajs", "cookie_domain": ".example-pay.com"},
    {"cookie_name": "__HOST-ajs", "cookie_path": "/shop"},
    {"carry_cookie_name": "__Secure-restored", "cookie_secure": False},
    {"carry_cookie_name": "__Host-restored", "cookie_path": "/shop"},
]


@pytest.mark.parametrize("kind", ["wsgi", "asgi", "aiohttp"])
@pytest.mark.parametrize("settings", INVALID_COOKIE_SETTINGS, ids=repr)
def test_invalid_cookie_settings_are_refused_when_the_middleware_is_made(
    kind: str, settings: dict[str, object]
) -> None:
    """Each went into every Set-Cookie as written (``Max-Age=nan``, ``Path=/; Domain=...``)
    or made one the browser drops: the visitor was never restored."""
    with pytest.raises(ConfigurationError, match=next(iter(settings))):
        make_middleware(kind, **settings)


def test_valid_cookie_settings_are_written_as_given(service: Service) -> None:
    settings: dict[str, Any] = {
        "cookie_name": "__Secure-ajs_id!#$%&'*+-.^`|~",
        "carry_cookie_name": "restored.1",
        "cookie_path": '/shop/a,="x',
        "cookie_max_age": 400 * 24 * 3600,
        "cookie_same_site": "None",
    }
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityWSGIMiddleware(wsgi_echo, client, **settings)
        transport = httpx.WSGITransport(app=app)
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare("visitor-settings", destination=f"{HOST}/cart")
            answer = browser.get(path_of(handoff.redirect_url))
    visitor_cookie, carry_cookie = answer.headers.get_list("set-cookie")
    assert visitor_cookie == (
        "__Secure-ajs_id!#$%&'*+-.^`|~=visitor-settings; Path=/shop/a,=\"x; "
        "Max-Age=34560000; SameSite=None; Secure"
    )
    assert carry_cookie.startswith("restored.1=")


def test_prefixed_cookie_names_are_written_when_their_attributes_fit(service: Service) -> None:
    """__Host- for both cookies, Secure, Path=/ and no Domain (the carry cookie is host-only
    even with a cookie_domain): browsers keep them."""
    settings: dict[str, Any] = {
        "cookie_name": "__Host-ajs",
        "carry_cookie_name": "__Host-restored",
    }
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        app = IdentityWSGIMiddleware(wsgi_echo, client, **settings)
        transport = httpx.WSGITransport(app=app)
        with httpx.Client(transport=transport, base_url=HOST) as browser:
            handoff = client.prepare("visitor-prefix", destination=f"{HOST}/cart")
            answer = browser.get(path_of(handoff.redirect_url))
    visitor_cookie, carry_cookie = answer.headers.get_list("set-cookie")
    assert visitor_cookie.startswith("__Host-ajs=visitor-prefix; Path=/; ")
    assert "Domain" not in visitor_cookie
    assert visitor_cookie.endswith("; Secure")
    assert carry_cookie.startswith("__Host-restored=")
    # A host-only carry cookie beside a visitor cookie for the parent domain.
    make_middleware(
        "wsgi",
        cookie_name="__Secure-ajs",
        carry_cookie_name="__Host-restored",
        cookie_domain=".example-pay.com",
    )
