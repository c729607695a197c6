"""The domain-B middleware mounted in real frameworks, served by real servers on loopback.

Flask (WSGI, werkzeug's server), FastAPI (ASGI, uvicorn), Django (its WSGI handler under
werkzeug, its ASGI handler under uvicorn) and aiohttp (its own server), each in front of
the real ``identity-service serve``. httpx follows the flow as a browser would: the handoff
URL answers 303 to the same URL without the token and sets ``ajs_anonymous_id`` and the
signed carry cookie; the page's handler then sees the whole restored identity (userId,
traits, consent, source), once. A used, unknown, expired, empty or over-long token falls
back to a generated id and the page still loads.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import django
import httpx
import pytest
from aiohttp import web
from conftest import DEV_WRITE_KEY, Service
from django.conf import settings as django_settings
from django.core.asgi import get_asgi_application
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, JsonResponse
from django.urls import path
from fastapi import FastAPI, Request
from flask import Flask
from flask import request as flask_request
from identity_client import AsyncIdentityClient, Identity, IdentityClient, _carry
from identity_client.middleware import (
    WSGI_ENVIRON_KEY,
    IdentityASGIMiddleware,
    IdentityWSGIMiddleware,
    identity_middleware,
)
from servers import serving_aiohttp, serving_asgi, serving_wsgi
from test_carry import signed
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix

COOKIE = "ajs_anonymous_id"
CARRY = "identity_restored"
# The sites are plain http on loopback: a Secure cookie would never be sent back.
SETTINGS: dict[str, Any] = {"cookie_secure": False, "event": "Checkout Started"}
FRAMEWORKS = ["flask", "fastapi", "django-wsgi", "django-asgi", "aiohttp"]


def page(identity: Identity | None) -> dict[str, Any]:
    """What every site's /cart page answers: the visitor its handler sees."""
    if identity is None:
        return {"anonymousId": None, "source": None}
    seen: dict[str, Any] = {"anonymousId": identity.anonymous_id, "source": identity.source}
    if identity.source != "cookie":
        seen.update(userId=identity.user_id, traits=identity.traits, consent=identity.consent)
    return seen


def generated(anonymous_id: str) -> dict[str, Any]:
    """What the handler sees after a fallback's generated id."""
    return {
        "anonymousId": anonymous_id,
        "source": "generated",
        "userId": None,
        "traits": {},
        "consent": {},
    }


def flask_site(service: Service) -> AbstractContextManager[str]:
    app = Flask(__name__)
    app.wsgi_app = IdentityWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, IdentityClient(service.url, DEV_WRITE_KEY), **SETTINGS
    )

    @app.get("/cart")
    def cart() -> dict[str, Any]:
        return page(flask_request.environ[WSGI_ENVIRON_KEY])

    return serving_wsgi(app.wsgi_app)


def fastapi_app(client: AsyncIdentityClient) -> FastAPI:
    app = FastAPI()
    # mypy cannot match the middleware's **settings to Starlette's ParamSpec factory type.
    app.add_middleware(IdentityASGIMiddleware, client=client, **SETTINGS)  # type: ignore[arg-type]

    @app.get("/cart")
    async def cart(request: Request) -> dict[str, Any]:
        return page(request.state.identity)

    return app


def django_cart(request: HttpRequest) -> JsonResponse:
    # WSGI: the middleware's environ key is in request.META; ASGI: the scope's state.
    if WSGI_ENVIRON_KEY in request.META:
        return JsonResponse(page(request.META[WSGI_ENVIRON_KEY]))
    scope = request.scope
    return JsonResponse(page(scope["state"]["identity"]))


def configure_django() -> None:
    """Minimal settings, once per process: one URL, no apps, no middleware of Django's."""
    if django_settings.configured:
        return
    urls = ModuleType("framework_tests_urls")
    urls.urlpatterns = [path("cart", django_cart)]  # type: ignore[attr-defined]
    sys.modules[urls.__name__] = urls
    django_settings.configure(
        DEBUG=False,
        DEBUG_PROPAGATE_EXCEPTIONS=True,
        SECRET_KEY="framework-tests-only-not-a-secret",
        ALLOWED_HOSTS=["localhost"],
        ROOT_URLCONF=urls.__name__,
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        USE_TZ=True,
    )
    django.setup()


def aiohttp_app(client: AsyncIdentityClient) -> web.Application:
    async def cart(request: web.Request) -> web.Response:
        return web.json_response(page(request["identity"]))

    app = web.Application(middlewares=[identity_middleware(client, **SETTINGS)])
    app.router.add_get("/cart", cart)
    return app


def site(framework: str, service: Service) -> AbstractContextManager[str]:
    if framework == "flask":
        return flask_site(service)
    if framework == "fastapi":
        return serving_asgi(service.url, fastapi_app)
    if framework == "aiohttp":
        return serving_aiohttp(service.url, aiohttp_app)
    configure_django()
    if framework == "django-wsgi":
        client = IdentityClient(service.url, DEV_WRITE_KEY)
        return serving_wsgi(IdentityWSGIMiddleware(WSGIHandler(), client, **SETTINGS))
    return serving_asgi(
        service.url,
        lambda client: IdentityASGIMiddleware(get_asgi_application(), client, **SETTINGS),
    )


@pytest.fixture(scope="module")
def sites(service: Service) -> Iterator[dict[str, str]]:
    """Every framework's site, started once for the module: name -> base URL."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(site(name, service)) for name in FRAMEWORKS}


@pytest.fixture(scope="module")
def identity(service: Service) -> Iterator[IdentityClient]:
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        yield client


def visit(url: str, cookies: httpx.Cookies | None = None) -> httpx.Response:
    """GET ``url`` as a browser would, following the redirect; the jar keeps the cookie."""
    with httpx.Client(follow_redirects=True, cookies=cookies, timeout=10) as browser:
        response = browser.get(url)
        response.read()
        return response


def check_clean_redirect(response: httpx.Response, url: str) -> str:
    """The handoff request was answered 303 to ``url`` (without the token), with the visitor
    cookie and the carry cookie, which the page's answer clears; returns the cookie's
    anonymousId."""
    (handoff,) = response.history
    assert handoff.status_code == 303
    parts = urlsplit(url)
    assert handoff.headers["location"] == parts.path + (f"?{parts.query}" if parts.query else "")
    assert handoff.headers["cache-control"] == "no-store"
    assert "handoff_token" not in str(response.url)
    assert str(response.url) == url
    set_cookie, carry = handoff.headers.get_list("set-cookie")
    assert set_cookie.startswith(f"{COOKIE}=")
    assert "Path=/" in set_cookie and "SameSite=Lax" in set_cookie
    assert carry.startswith(f"{CARRY}=")
    assert {"Path=/", "Max-Age=60", "SameSite=Lax", "HttpOnly"} <= set(carry.split("; "))
    assert "Secure" not in carry  # as the visitor cookie (cookie_secure=False)
    (cleared,) = response.headers.get_list("set-cookie")
    assert cleared.startswith(f"{CARRY}=;") and "Max-Age=0" in cleared
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_handoff_restores_the_visitor_before_the_page_loads(
    framework: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    visitor = f"visitor-{framework}"
    clean = f"{sites[framework]}/cart?step=1&coupon=a%20b"
    handoff = identity.prepare(
        anonymous_id=visitor,
        user_id=f"user-{framework}",
        traits={"plan": "pro", "name": "Zoë"},
        consent={"analytics": True, "ads": False},
        destination=clean,
    )
    assert "handoff_token=" in handoff.redirect_url

    with httpx.Client(follow_redirects=True, timeout=10) as browser:
        response = browser.get(handoff.redirect_url)
        assert response.status_code == 200
        assert check_clean_redirect(response, clean) == visitor
        # The handler of the page the 303 leads to sees the whole restored identity.
        assert response.json() == {
            "anonymousId": visitor,
            "source": "handoff",
            "userId": f"user-{framework}",
            "traits": {"plan": "pro", "name": "Zoë"},
            "consent": {"analytics": True, "ads": False},
        }
        # Once: the carry cookie is gone, the next page has the visitor cookie only.
        assert CARRY not in browser.cookies
        again = browser.get(clean)
        assert again.json() == {"anonymousId": visitor, "source": "cookie"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_used_or_unknown_token_or_none_still_loads_the_page(
    framework: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    clean = f"{sites[framework]}/cart"
    handoff = identity.prepare(anonymous_id=f"once-{framework}", destination=clean)
    assert visit(handoff.redirect_url).json()["anonymousId"] == f"once-{framework}"

    ids = set()
    for url in (handoff.redirect_url, f"{clean}?handoff_token=no-such-token"):
        response = visit(url)  # a new browser: no cookie yet
        assert response.status_code == 200
        anonymous_id = check_clean_redirect(response, clean)
        assert anonymous_id != f"once-{framework}"
        assert response.json() == generated(anonymous_id)
        ids.add(anonymous_id)
    assert len(ids) == 2  # each miss gets an id of its own

    plain = visit(clean)
    assert (plain.status_code, plain.history, plain.json()) == (
        200,
        [],
        {"anonymousId": None, "source": None},
    )


def test_an_expired_token_falls_back_in_every_framework(
    sites: dict[str, str], identity: IdentityClient
) -> None:
    handoffs = {
        name: identity.prepare(anonymous_id="expiring", destination=f"{url}/cart", ttl=1)
        for name, url in sites.items()
    }
    latest = max(h.expires_at for h in handoffs.values()) + timedelta(seconds=0.2)
    while datetime.now(UTC) <= latest:
        time.sleep(0.1)
    for name, handoff in handoffs.items():
        response = visit(handoff.redirect_url)
        assert response.status_code == 200, name
        anonymous_id = check_clean_redirect(response, f"{sites[name]}/cart")
        assert anonymous_id != "expiring", name
        assert response.json() == generated(anonymous_id), name


def raw_get(
    base: str, target: str, cookie: str | None = None, extra: str = ""
) -> tuple[int, dict[str, str]]:
    """GET ``target`` sent as is (httpx would normalise a path such as ``//host/x``), with
    ``extra`` header lines (latin-1: one byte a character): the status and the headers
    (lower-case names, the last of each)."""
    parts = urlsplit(base)
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
    if cookie is not None:
        request += f"Cookie: {cookie}\r\n"
    request += extra
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall((request + "\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, *lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("path", ["//evil.example/cart", "/\\evil.example/cart", "///evil.example"])
def test_the_redirect_never_leaves_the_site(
    framework: str, path: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    """A handoff URL whose path starts with two slashes (or a slash and a backslash) must
    not become a protocol-relative Location: the browser would go to evil.example."""
    status, headers = raw_get(sites[framework], f"{path}?handoff_token=no-such-token&a=1")
    if status != 303:  # the server refused the path itself: nothing was redirected
        assert "location" not in headers, (framework, status, headers)
        return
    location = headers["location"]
    assert location.startswith("/"), location
    assert not location.startswith(("//", "/\\")), (framework, location)
    assert location.endswith("?a=1"), location


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_header_bytes_that_are_not_utf8_do_not_lose_the_handoff(
    framework: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    """A Referer and a User-Agent holding bytes that are not UTF-8 (a broken or hostile
    client; aiohttp reads them as lone surrogates, which no JSON the service reads can
    hold): the handoff lands as with any other header, never a 500 nor a refused exchange."""
    visitor = f"bytes-{framework}"
    handoff = identity.prepare(anonymous_id=visitor, destination=f"{sites[framework]}/cart")
    target = urlsplit(handoff.redirect_url)
    extra = "Referer: http://shop.localhost/caf\xc3\xa9\xff\r\nUser-Agent: agent \xfe\r\n"
    status, headers = raw_get(sites[framework], f"{target.path}?{target.query}", extra=extra)
    assert status == 303, framework
    # the carry cookie is set only after an exchange that landed the visitor
    carry = headers.get("set-cookie", "")
    assert carry.startswith(f"{CARRY}="), (framework, headers)
    value = carry.split(";", 1)[0].split("=", 1)[1]
    landed = _carry.decode(value, _carry.carry_key(DEV_WRITE_KEY), time.time())
    assert landed is not None and landed.anonymous_id == visitor, framework


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_redirect_keeps_the_path_as_sent(
    framework: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    """Escapes in the path stay as the browser sent them: ``/a%2Fb%3Fc`` is one segment
    (the WSGI servers decode it to ``/a/b?c`` in PATH_INFO; quoted back that was
    ``/a/b%3Fc``, another route)."""
    status, headers = raw_get(sites[framework], "/a%2Fb%3Fc?handoff_token=zzz&a=1")
    assert status == 303, (framework, status)
    assert headers["location"] == "/a%2Fb%3Fc?a=1", framework


@pytest.mark.parametrize("server", ["wsgi-proxyfix", "wsgi-mounted", "asgi-root-path"])
def test_the_redirect_keeps_the_prefix_the_site_is_served_under(
    server: str, service: Service
) -> None:
    """The site is served under ``/shop``, and the browser must land back under it:
    - a proxy strips the prefix and says so (werkzeug's ProxyFix with
      ``X-Forwarded-Prefix``): the app server gets ``/cart``, SCRIPT_NAME is ``/shop``;
    - the app is mounted at ``/shop`` by WSGI itself (werkzeug's DispatcherMiddleware):
      the request target already holds the prefix, which must not be added twice;
    - uvicorn's ``--root-path``, which puts the prefix in ``raw_path`` itself."""
    client = IdentityClient(service.url, DEV_WRITE_KEY)
    if server == "asgi-root-path":
        serving = serving_asgi(service.url, fastapi_app, root_path="/shop")
        cases = [("/cart?handoff_token=zzz&a=1", "/shop/cart?a=1")]
    elif server == "wsgi-proxyfix":
        app = ProxyFix(IdentityWSGIMiddleware(wsgi_page, client, **SETTINGS), x_prefix=1)
        serving = serving_wsgi(app)
        cases = [
            ("/cart?handoff_token=zzz&a=1", "/shop/cart?a=1"),
            ("/shopping?handoff_token=zzz", "/shop/shopping"),
        ]
    else:
        mounted = IdentityWSGIMiddleware(wsgi_page, client, **SETTINGS)
        serving = serving_wsgi(DispatcherMiddleware(NotFound(), {"/shop": mounted}))
        cases = [("/shop/cart?handoff_token=zzz&a=1", "/shop/cart?a=1")]
    with serving as base:
        for target, location in cases:
            status, headers = raw_get(base, target, extra="X-Forwarded-Prefix: /shop\r\n")
            assert (status, headers.get("location")) == (303, location), (server, target)


def wsgi_page(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"page"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_stale_token_keeps_the_visitor_id_already_there(
    framework: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    """A visitor who already has an id on domain B and opens a used (or expired) handoff
    link (a bookmark, a reload, a shared URL) keeps that id: the generated fallback does
    not replace the cookie, as the Node middleware does too."""
    status, headers = raw_get(
        sites[framework], "/cart?handoff_token=no-such-token", cookie=f"{COOKIE}=already-here"
    )
    assert status == 303
    assert headers["location"] == "/cart"
    assert "set-cookie" not in headers, headers
    cookie = {"Cookie": f"{COOKIE}=already-here"}
    with httpx.Client(headers=cookie, timeout=10) as browser:
        landed = browser.get(f"{sites[framework]}{headers['location']}")
    assert landed.json() == {"anonymousId": "already-here", "source": "cookie"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_forged_expired_or_foreign_carry_cookie_is_ignored(
    framework: str, sites: dict[str, str], identity: IdentityClient
) -> None:
    """The handler trusts the carry cookie only when its signature holds, it has not expired
    and it is for the visitor cookie's anonymousId; any other is ignored, and cleared."""
    handoff = identity.prepare(
        anonymous_id="carried", user_id="user-1", destination=f"{sites[framework]}/cart"
    )
    first = httpx.get(handoff.redirect_url, timeout=10)
    assert first.status_code == 303
    (carry,) = [c for c in first.headers.get_list("set-cookie") if c.startswith(f"{CARRY}=")]
    value = carry.split(";", 1)[0].split("=", 1)[1]
    payload, signature = value.split(".")
    raised = _carry._b64(_carry._unb64(payload).replace(b'"userId":"user-1"', b'"userId":"admin"'))
    assert raised != payload
    admin = Identity("carried", user_id="admin")
    other_key = _carry.encode(admin, _carry.carry_key("not-the-write-key"), 2**40)
    expired = _carry.encode(admin, _carry.carry_key(DEV_WRITE_KEY), int(time.time()) - 1)

    def landing(cookie: str) -> httpx.Response:
        return httpx.get(f"{sites[framework]}/cart", headers={"Cookie": cookie}, timeout=10)

    for cookie in (
        f"{COOKIE}=carried; {CARRY}={raised}.{signature}",  # tampered payload
        f"{COOKIE}=carried; {CARRY}={other_key}",  # signed with another key
        f"{COOKIE}=carried; {CARRY}={expired}",  # signed right, expired
        f"{COOKIE}=someone-else; {CARRY}={value}",  # another visitor's
        f"{CARRY}={value}",  # no visitor cookie
        f"{COOKIE}=carried; {CARRY}={value[:-2]}",  # bad signature
        f"{COOKIE}=carried; {CARRY}=bm90IGpzb24.x",  # malformed
        # Signed with the real key, so only decode's JSON and field checks refuse them:
        *(
            f"{COOKIE}=carried; {CARRY}={signed(payload, DEV_WRITE_KEY)}"
            for payload in (b"not json", b"[]", b'{"anonymousId": "carried"}')
        ),
        f"{COOKIE}=carried; {CARRY}=" + "A" * 5000,  # oversized
    ):
        landed = landing(cookie)
        assert landed.status_code == 200, cookie
        visitor = cookie.split(";")[0].split("=")[1] if cookie.startswith(COOKIE) else None
        expected = {"anonymousId": visitor, "source": "cookie" if visitor else None}
        assert landed.json() == expected, cookie
        (cleared,) = landed.headers.get_list("set-cookie")
        assert cleared.startswith(f"{CARRY}=;") and "Max-Age=0" in cleared, cookie

    genuine = landing(f"{COOKIE}=carried; {CARRY}={value}").json()
    assert (genuine["source"], genuine["userId"]) == ("handoff", "user-1")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("token", ["", "t" * 129])
def test_a_token_the_service_would_refuse_falls_back_quietly(
    framework: str, token: str, sites: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An empty or over-long token (the service answers 400 to it) is a bad link, not an
    error: the fallback's generated id, and no ERROR line any visitor could cause."""
    clean = f"{sites[framework]}/cart?a=1"
    with caplog.at_level(logging.INFO, logger="identity_client"):
        response = visit(f"{sites[framework]}/cart?handoff_token={token}&a=1")
    assert response.status_code == 200
    anonymous_id = check_clean_redirect(response, clean)
    assert response.json() == generated(anonymous_id)
    records = [r for r in caplog.records if r.name.startswith("identity_client")]
    assert records and all(r.levelno < logging.ERROR for r in records)
    assert not token or all(token not in r.getMessage() for r in records)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_exchange_sends_domain_b_context_to_the_service(
    framework: str, sites: dict[str, str], identity: IdentityClient, service: Service
) -> None:
    """The completion event the service delivers carries the landing request's page URL
    (without the token), referrer, client IP and user agent."""
    visitor = f"context-{framework}"
    clean = f"{sites[framework]}/cart?step=2"
    handoff = identity.prepare(anonymous_id=visitor, destination=clean)
    headers = {"Referer": "http://shop.localhost/basket", "User-Agent": f"agent/{framework}"}
    landing = httpx.get(handoff.redirect_url, headers=headers, timeout=10)
    assert landing.status_code == 303

    event = service.wait_for_event(
        lambda e: e.get("anonymousId") == visitor and e.get("event") == "Checkout Started"
    )
    context = event["context"]
    assert context["page"]["url"] == clean
    assert context["page"]["referrer"] == "http://shop.localhost/basket"
    assert context["ip"] == "127.0.0.1"
    assert context["userAgent"] == f"agent/{framework}"
