"""Domain A, the shop (``shop.localhost``): a product page whose checkout links identity.js
decorates, and ``POST /handoff``, the shop backend's prepare for identity.js.

``/handoff`` is the ten lines a shop adds: read the visitor's anonymousId (the
``ajs_anonymous_id`` cookie, else the one the page's analytics.js holds, sent in the body),
prepare a handoff to the destination with the Python SDK, answer the redirect URL.
"""

import html
from dataclasses import dataclass

from aiohttp import web
from identity_client import AsyncIdentityClient, IdentityError, read_anonymous_id

from examples.checkout.pages import (
    Analytics,
    Helper,
    html_response,
    invalid,
    json_body,
    page_html,
    problem_answers,
    text_field,
    upstream_problem,
)

CLIENT = web.AppKey("client", AsyncIdentityClient)
COOKIE = "ajs_anonymous_id"


@dataclass(frozen=True)
class ShopSettings:
    analytics: Analytics
    helper_url: str
    # Where the shop links to: label -> destination URL on a checkout domain.
    checkouts: dict[str, str]
    ttl: int | None = None  # the handoff's lifetime; the service's default when None


SHOP = web.AppKey("shop", ShopSettings)


def cookie_id(request: web.Request) -> str | None:
    """The visitor's anonymousId from analytics.js's cookie (plain or a JSON string)."""
    return read_anonymous_id(request.cookies.get(COOKIE))


async def product_page(request: web.Request) -> web.Response:
    shop = request.app[SHOP]
    links = "\n".join(
        f'<p><a class="button" id="{html.escape(name)}" href="{html.escape(url)}">'
        f"Check out: {html.escape(name)}</a></p>"
        for name, url in shop.checkouts.items()
    )
    first = next(iter(shop.checkouts.values()))
    form = (
        f'<form id="checkout-form" method="get" action="{html.escape(first)}">'
        '<input type="hidden" name="coupon" value="WELCOME">'
        '<button type="submit">Check out with a coupon (a form)</button></form>'
    )
    domains = sorted({url.split("/")[2].split(":")[0] for url in shop.checkouts.values()})
    return html_response(
        page_html(
            site="shop.localhost: domain A",
            colour="#2a7",
            title="Blue mug",
            body=f"<p>A blue mug, 12 €.</p>\n{links}\n{form}",
            analytics=shop.analytics,
            helper=Helper(shop.helper_url, {"domains": domains, "tokenEndpoint": "/handoff"}),
            calls='analytics.page(); analytics.track("Product Viewed", {sku: "mug-blue"});',
        )
    )


async def handoff(request: web.Request) -> web.Response:
    """identity.js asks here, at click time, for a fresh redirect URL to ``destination``."""
    body = await json_body(request)
    destination = text_field(body, "destination")
    posted = body.get("anonymousId")
    anonymous_id = cookie_id(request) or (posted if isinstance(posted, str) else None)
    if not anonymous_id:
        raise invalid("anonymousId", "no visitor id: no ajs_anonymous_id cookie, none posted")
    context = {
        "page": {"url": request.headers.get("Referer", str(request.url))},
        "ip": request.remote,
        "userAgent": request.headers.get("User-Agent", ""),
    }
    try:
        prepared = await request.app[CLIENT].prepare(
            anonymous_id=anonymous_id,
            destination=destination,
            context=context,
            ttl=request.app[SHOP].ttl,
        )
    except IdentityError as error:
        # identity.js then sends the visitor on undecorated: the checkout still works.
        raise upstream_problem(error) from None
    return web.json_response(
        {"redirectUrl": prepared.redirect_url}, headers={"Cache-Control": "no-store"}
    )


def shop_app(client: AsyncIdentityClient, settings: ShopSettings) -> web.Application:
    app = web.Application(middlewares=[problem_answers])
    app[CLIENT] = client
    app[SHOP] = settings
    app.router.add_get("/", product_page)
    app.router.add_post("/handoff", handoff)
    return app
