"""Domain B, the checkout, in three builds that land the visitor differently.

- ``middleware`` (``checkout.localhost``): the Python SDK's aiohttp middleware exchanges the
  token before any page runs, sets ``ajs_anonymous_id`` and answers 303 to the clean URL;
  the page has no handoff code at all.
- ``helper`` (``pay.localhost``): no middleware. The page loads identity.js, which takes the
  token out of the address bar and POSTs it to ``/identity/exchange`` (below), then hands
  the id to analytics.js before it loads.
- ``node`` (``express.localhost``): the middleware build in Node, Express 5 and the Node
  SDK's middleware (node/checkout.mjs, its own process); it serves ``cart_html``'s page.
"""

from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from identity_client import AsyncIdentityClient, IdentityError
from identity_client.middleware import identity_middleware

from examples.checkout.pages import (
    Analytics,
    Helper,
    html_response,
    json_body,
    page_html,
    problem_answers,
    text_field,
    upstream_problem,
)

Mode = Literal["middleware", "helper", "node"]
SameSite = Literal["Lax", "Strict", "None"]
CLIENT = web.AppKey("client", AsyncIdentityClient)
# domain B's completion event (the service emits it at the exchange).
EVENT = "Checkout Started"


@dataclass(frozen=True)
class CheckoutSettings:
    mode: Mode
    site: str
    analytics: Analytics
    helper_url: str
    # The middleware's visitor cookie SameSite (the carry cookie is Lax when it is Strict).
    same_site: SameSite = "Lax"


CHECKOUT = web.AppKey("checkout", CheckoutSettings)


# Where the Node checkout (node/checkout.mjs) writes what its middleware saw.
SERVER_SOURCE = "__SERVER_SOURCE__"
COLOURS = {"middleware": "#27a", "helper": "#a52", "node": "#4a4"}


def cart_html(checkout: CheckoutSettings, seen: str) -> str:
    """The cart page; ``seen`` is how the server's middleware saw the visitor (``middleware``
    and ``node``)."""
    helper = None
    if checkout.mode == "helper":
        note = "<p>identity.js restores the visitor in the page.</p>"
        helper = Helper(checkout.helper_url, {"exchangeEndpoint": "/identity/exchange"})
    else:
        note = f'<p>The server saw the visitor as: <code id="server-source">{seen}</code></p>'
    return page_html(
        site=f"{checkout.site}: domain B ({checkout.mode})",
        colour=COLOURS[checkout.mode],
        title="Your cart",
        body=f'{note}<p>Blue mug, 12 €.</p><button id="pay" '
        "onclick=\"analytics.track('Order Completed', {total: 12})\">Pay</button>",
        analytics=checkout.analytics,
        helper=helper,
    )


async def cart_page(request: web.Request) -> web.Response:
    # Only the middleware's request has it: an Identity, or None without a cookie.
    identity = request.get("identity")
    seen = "none" if identity is None else identity.source
    return html_response(cart_html(request.app[CHECKOUT], seen))


async def exchange(request: web.Request) -> web.Response:
    """identity.js posts the token here; the SDK exchanges it, with fallback."""
    body = await json_body(request)
    token = text_field(body, "token")
    page = {"url": body.get("url") or request.headers.get("Referer", "")}
    if isinstance(body.get("referrer"), str):
        page["referrer"] = body["referrer"]
    context = {
        "page": page,
        "ip": request.remote,
        "userAgent": request.headers.get("User-Agent", ""),
    }
    try:
        identity = await request.app[CLIENT].exchange(
            token, fallback=True, event=EVENT, context=context
        )
    except IdentityError as error:
        # identity.js goes on without the handoff: analytics.js keeps its own id.
        raise upstream_problem(error) from None
    return web.json_response(
        {"anonymousId": identity.anonymous_id, "source": identity.source},
        headers={"Cache-Control": "no-store"},
    )


def checkout_app(client: AsyncIdentityClient, settings: CheckoutSettings) -> web.Application:
    if settings.mode == "middleware":
        # http on loopback in the demo: a Secure cookie would need https.
        middleware = identity_middleware(
            client, cookie_secure=False, cookie_same_site=settings.same_site, event=EVENT
        )
        app = web.Application(middlewares=[problem_answers, middleware])
    else:
        app = web.Application(middlewares=[problem_answers])
        app.router.add_post("/identity/exchange", exchange)
    app[CLIENT] = client
    app[CHECKOUT] = settings
    app.router.add_get("/cart", cart_page)
    return app
