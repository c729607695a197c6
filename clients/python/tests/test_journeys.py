"""The journeys of docs/journeys.md through the Python SDK, against the real service.

Each journey runs over real HTTP: the sites are Flask apps under werkzeug, the third
parties (a payment provider, an identity provider) small WSGI apps that redirect as theirs
do, and httpx follows the redirects as the visitor's browser would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from conftest import DEV_WRITE_KEY, OTHER_WRITE_KEY, SHOP_WRITE_KEY, Service
from flask import Flask, jsonify, redirect, request
from identity_client import (
    AudienceMismatch,
    IdentityClient,
    InvalidRequest,
    TokenNotFound,
)
from identity_client.middleware import WSGI_ENVIRON_KEY, IdentityWSGIMiddleware
from servers import serving_wsgi
from werkzeug import Response


@pytest.fixture(scope="module")
def identity(service: Service) -> Iterator[IdentityClient]:
    with IdentityClient(service.url, DEV_WRITE_KEY) as client:
        yield client


def domain_b(identity: IdentityClient) -> Flask:
    """A domain-B site with the middleware: every page answers the visitor it sees."""
    app = Flask("domain_b")
    # Plain http on loopback: a Secure cookie would not come back.
    app.wsgi_app = IdentityWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, identity, cookie_secure=False
    )

    @app.get("/<path:page>")
    def any_page(page: str) -> Any:
        visitor = request.environ[WSGI_ENVIRON_KEY]
        return {
            "page": page,
            "query": request.query_string.decode(),
            "anonymousId": visitor.anonymous_id if visitor else None,
        }

    return app


@pytest.fixture(scope="module")
def site(identity: IdentityClient) -> Iterator[str]:
    with serving_wsgi(domain_b(identity)) as url:
        yield url


def payment_provider() -> Flask:
    """Takes the payment, then sends the visitor to ``return_url`` with its own parameter
    added, as payment providers do."""
    app = Flask("payment_provider")

    @app.get("/pay")
    def pay() -> Response:
        return_url = request.args["return_url"]
        separator = "&" if "?" in return_url else "?"
        return redirect(f"{return_url}{separator}payment_id=pi_3Kq", 303)

    return app


def identity_provider() -> Flask:
    """An OAuth 2.0 authorization endpoint that signs everyone in: back to ``redirect_uri``
    with a code and the ``state`` it was given, or (a login page) to ``return_to``."""
    app = Flask("identity_provider")

    @app.get("/authorize")
    def authorize() -> Response:
        query = urlencode({"code": "auth-code-1", "state": request.args["state"]})
        return redirect(f"{request.args['redirect_uri']}?{query}", 302)

    @app.get("/login")
    def login() -> Response:
        return redirect(request.args["return_to"], 303)

    return app


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    with serving_wsgi(payment_provider()) as url:
        yield url


@pytest.fixture(scope="module")
def idp() -> Iterator[str]:
    with serving_wsgi(identity_provider()) as url:
        yield url


def browse(url: str) -> httpx.Response:
    with httpx.Client(follow_redirects=True, timeout=10) as browser:
        return browser.get(url)


# (a) A payment provider's return URL


def test_the_payment_return_url_restores_the_visitor_after_a_long_payment(
    identity: IdentityClient, site: str, provider: str
) -> None:
    success = f"{site}/payment/success?order=42"
    with pytest.raises(InvalidRequest) as refused:
        identity.prepare(anonymous_id="payer-1", destination=success, ttl=601)
    assert [error.field for error in refused.value.errors] == ["ttl"]
    assert "between 1 and 600" in refused.value.errors[0].message

    # Domain A: the handoff lives as long as the payment may take, within the maximum.
    handoff = identity.prepare(anonymous_id="payer-1", destination=success, ttl=600)
    assert handoff.expires_in == 600
    pay = f"{provider}/pay?" + urlencode({"amount": "42.00", "return_url": handoff.redirect_url})

    page = browse(pay)

    assert page.status_code == 200
    assert [r.status_code for r in page.history] == [303, 303]  # the provider, the middleware
    assert str(page.url) == f"{success}&payment_id=pi_3Kq"  # no token, the provider's kept
    assert page.json() == {
        "page": "payment/success",
        "query": "order=42&payment_id=pi_3Kq",
        "anonymousId": "payer-1",
    }


# (b) An OAuth/SSO round trip


def oauth_app(identity: IdentityClient, idp: str) -> Flask:
    """Domain A sends the visitor to sign in with the handoff token as ``state``; the
    callback exchanges it: the identity comes back, and a forged or replayed callback
    (no valid token) is refused."""
    app = Flask("oauth_app")

    @app.get("/login")
    def login() -> Response:
        callback = f"{request.host_url}callback"
        handoff = identity.prepare(
            anonymous_id=request.cookies["ajs_anonymous_id"], destination=callback
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": "shop",
                "redirect_uri": callback,
                "state": handoff.token,
            }
        )
        return redirect(f"{idp}/authorize?{query}", 303)

    @app.get("/callback")
    def callback() -> Any:
        try:
            visitor = identity.exchange(request.args["state"])
        except TokenNotFound:
            return jsonify(error="unknown or used state"), 400
        return {"code": request.args["code"], "anonymousId": visitor.anonymous_id}

    return app


def test_an_oauth_round_trip_carries_the_token_in_state(identity: IdentityClient, idp: str) -> None:
    app = oauth_app(identity, idp)
    with serving_wsgi(app) as shop, httpx.Client(follow_redirects=True, timeout=10) as browser:
        browser.cookies.set("ajs_anonymous_id", "signing-in-1")
        signed_in = browser.get(f"{shop}/login")
        assert signed_in.json() == {"code": "auth-code-1", "anonymousId": "signing-in-1"}
        state = parse_qs(urlsplit(str(signed_in.url)).query)["state"][0]
        # The callback replayed (or forged): the state works once.
        replayed = browser.get(f"{shop}/callback?code=auth-code-1&state={state}")
        assert replayed.status_code == 400


def test_a_return_to_after_sign_in_lands_through_the_middleware(
    identity: IdentityClient, site: str, idp: str
) -> None:
    handoff = identity.prepare(anonymous_id="signing-in-2", destination=f"{site}/account")
    page = browse(f"{idp}/login?" + urlencode({"return_to": handoff.redirect_url}))
    assert str(page.url) == f"{site}/account"
    assert page.json()["anonymousId"] == "signing-in-2"


def test_the_callback_must_be_an_origin_the_exchanging_source_may_receive(
    configured_service: Service,
) -> None:
    callback = "https://checkout.example.com/oauth/callback"
    with (
        IdentityClient(configured_service.url, SHOP_WRITE_KEY) as shop,
        IdentityClient(configured_service.url, OTHER_WRITE_KEY) as other,
    ):
        handoff = shop.prepare(anonymous_id="signing-in-3", destination=callback)
        with pytest.raises(AudienceMismatch):
            other.exchange(handoff.token)
        with pytest.raises(TokenNotFound):  # the mismatch used the token up
            shop.exchange(handoff.token)
        state = shop.prepare(anonymous_id="signing-in-3", destination=callback).token
        assert shop.exchange(state).anonymous_id == "signing-in-3"


# (c) A mobile app opening the web


def test_a_mobile_app_opens_the_web_as_the_same_visitor(
    identity: IdentityClient, site: str, service: Service
) -> None:
    # The app's backend prepares for the app's anonymousId, with the app's Segment context;
    # the app opens the redirect URL (a universal link / App Link to the web).
    handoff = identity.prepare(
        anonymous_id="app-install-7",
        user_id="user-7",
        traits={"plan": "pro"},
        destination=f"{site}/account/orders?from=app",
        context={"app": {"name": "Shop", "version": "5.2.0"}, "os": {"name": "iOS"}},
    )
    page = browse(handoff.redirect_url)
    assert str(page.url) == f"{site}/account/orders?from=app"
    assert page.json()["anonymousId"] == "app-install-7"
    # Domain A's started event is the app's: it carries the app's context.
    started = service.wait_for_event(
        lambda e: (
            e.get("anonymousId") == "app-install-7"
            and e.get("event") == "Cross-Domain Handoff Started"
        )
    )
    assert started["context"]["app"] == {"name": "Shop", "version": "5.2.0"}
    assert started["context"]["os"] == {"name": "iOS"}
