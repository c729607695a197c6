"""Domain B middleware: restore the visitor from a handoff token before the page loads.

On a GET whose URL carries the token parameter (``handoff_token``), the middleware exchanges
the token with ``fallback=True`` and domain B's context (the page URL without the token,
the referrer, the client's IP and user agent), sets the visitor cookie (``ajs_anonymous_id``,
the cookie analytics.js reads) and answers ``303`` to the same URL without the token, so
the page loads clean and analytics.js starts with the restored anonymousId.

- A missing, used or expired token answers a generated identity (``source="generated"``):
  the cookie is set to the new id and the page loads; a visitor who already has the cookie
  keeps it (a reloaded or bookmarked handoff URL must not replace the visitor's id), as the
  Node middleware does.
- The same handoff URL requested twice at once (a double click, a prefetch and the
  navigation) is exchanged once: a landing whose token is being exchanged waits on that
  exchange (``_Landings``).
- The ``Location`` is always a path of this site: leading slashes and backslashes collapse
  to one, so ``//evil.example/?handoff_token=...`` never redirects to another host.
- When the service is down (``ServiceUnavailable``, ``IdentityConnectionError``) or refuses
  the exchange, the middleware still answers the 303 to the clean URL, without a cookie:
  the page loads and analytics.js keeps (or makes) its own id. The exchange is never
  retried (a token works once).
- A token the service refuses (empty, over-long: 400) is bad input like a missing token:
  the fallback's generated id, logged at INFO without the token. Any other refusal (a 400
  for the site's own ``event`` or ``properties``, a bad write key) is the site's
  misconfiguration, logged at ERROR; an unreachable service at WARNING.
- Every request gets the identity: ASGI ``scope["state"]["identity"]``, WSGI
  ``environ["identity_client.identity"]``, aiohttp ``request["identity"]``. The handoff
  request itself never reaches the handler (it is answered 303), so the exchange also sets
  a carry cookie (``identity_restored``, HttpOnly, host-only, 60 s; its SameSite is the
  visitor cookie's, but ``Lax`` for ``Strict``: see ``_carry.same_site``): the exchanged
  identity, signed with a key derived from the write key (signed, not encrypted). On the
  next request (the 303's clean URL) the handler gets that ``Identity`` (``user_id``,
  ``traits``, ``consent``, ``source`` ``"handoff"`` or ``"generated"``) and the response
  clears the carry cookie; until an answer through the middleware clears it, it stays valid
  for its 60 s (it is not single-use). Any other request gets an ``Identity`` with
  ``source="cookie"`` and the visitor cookie's anonymousId, or ``None`` without the cookie.
  A carry cookie that is forged, expired, malformed, oversized or for another anonymousId
  is ignored, as is one without the visitor cookie unless that is ``Strict`` (browsers
  withhold a ``Strict`` cookie from the request after a cross-site landing's 303). An
  identity over ``_carry.MAX_VALUE_BYTES`` is carried without its traits, or not at all.

ASGI and WSGI are used as protocols: no dependency on Starlette, Flask or Django. The aiohttp
middleware imports aiohttp when it is built (the ``aiohttp`` extra).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote_plus, urlsplit

from identity_client import _carry
from identity_client._client import AsyncIdentityClient, IdentityClient
from identity_client.cookies import read_anonymous_id, read_cookie
from identity_client.errors import (
    ConfigurationError,
    IdentityConnectionError,
    IdentityError,
    ServiceUnavailable,
)
from identity_client.models import Identity

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

__all__ = [
    "IdentityASGIMiddleware",
    "IdentityWSGIMiddleware",
    "MiddlewareSettings",
    "identity_middleware",
]

logger = logging.getLogger("identity_client.middleware")

ONE_YEAR = 365 * 24 * 3600
# The service refuses (400) an exchange whose token is empty or longer than this; real
# tokens are 43 characters, so UNKNOWN_TOKEN is never one.
MAX_TOKEN_LENGTH = 128
UNKNOWN_TOKEN = "-"  # noqa: S105 - not a secret
WSGI_ENVIRON_KEY = "identity_client.identity"
# The carry cookie is for the request right after the 303 (the Node SDK's is 60 s too).
CARRY_MAX_AGE = 60

# ASGI as a protocol (typing only).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# WSGI as a protocol (typing only).
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# Characters a cookie value may hold as is (RFC 6265 cookie-octet, minus '%').
_COOKIE_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"
# Characters a path keeps as is when quoted back (RFC 3986 pchar and "/").
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# A cookie's Domain (RFC 6265 5.2.3): a domain name, its leading dot allowed; labels of
# letters, digits, '-' (not at either end) and '_', 63 characters at most, 253 in all. The
# Node middleware and identity.js check the same. Two labels at least, the last no number
# (_NUMBER: to a browser, a name whose last label is one is an IPv4 address): browsers set
# no Domain cookie for a single label (localhost, .com) or an IP address, as the service's
# AMP cookie.domain refuses them. A public suffix of more labels (co.uk) is not checked.
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NUMBER = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_MAX_DOMAIN = 253
# A cookie's name (RFC 6265 4.1.1): a token, RFC 9110's tchar; a cookie's Path: any
# printable ASCII but ';', starting with '/' (5.2.4: a browser ignores any other Path and
# uses the page's directory). The Node middleware checks the same, identity.js the name.
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_COOKIE_PATH = re.compile(r"/[\x20-\x3a\x3c-\x7e]*")
# The token's query parameter: what the service's IDENTITY_TOKEN_PARAM may be (ASCII letters,
# digits, '_' or '-'). An empty one would take every empty part of a query (``?a&&b``) for a
# handoff. The Node middleware and identity.js check the same.
_TOKEN_PARAM = re.compile(r"[A-Za-z0-9_-]+")
# The longest Max-Age browsers keep (RFC 6265bis 5.6.2: a longer one is cut to 400 days).
MAX_COOKIE_AGE = 400 * 24 * 3600
_SAME_SITE = ("lax", "strict", "none")


@dataclass(frozen=True)
class MiddlewareSettings:
    """What the three middlewares share: the token parameter, the cookies and the event."""

    token_param: str = "handoff_token"  # noqa: S105 - a parameter name
    cookie_name: str = "ajs_anonymous_id"
    cookie_domain: str | None = None
    cookie_max_age: int = ONE_YEAR
    cookie_same_site: Literal["Lax", "Strict", "None"] = "Lax"
    cookie_secure: bool = True
    cookie_path: str = "/"
    event: str | None = None
    properties: dict[str, Any] | None = None
    # The exchanged identity for the request after the 303 (identity_client._carry).
    carry_cookie_name: str = "identity_restored"

    def __post_init__(self) -> None:
        """Refuse, when the middleware is made, a token parameter the service cannot send,
        and a setting that written into the Set-Cookie as given would add attributes (a
        ';') or make a cookie browsers drop or cut."""
        if not _fullmatch(_TOKEN_PARAM, self.token_param):
            raise ConfigurationError(
                f"token_param {self.token_param!r} is not a parameter the service can send "
                "(ASCII letters, digits, '_' or '-', as IDENTITY_TOKEN_PARAM)"
            )
        if self.cookie_domain and not _is_cookie_domain(self.cookie_domain):
            raise ConfigurationError(
                f"cookie_domain {self.cookie_domain!r} is not a domain name browsers set "
                "a cookie for (e.g. .example-pay.com; an internationalized one in its "
                "xn-- form; no single label such as localhost, no IP address)"
            )
        for setting, name in (
            ("cookie_name", self.cookie_name),
            ("carry_cookie_name", self.carry_cookie_name),
        ):
            if not _fullmatch(_COOKIE_NAME, name):
                raise ConfigurationError(
                    f"{setting} {name!r} is not a cookie name (letters, digits and "
                    "!#$%&'*+-.^_`|~; no space, ';', ',', '=' or control character)"
                )
        if self.cookie_name == self.carry_cookie_name:
            raise ConfigurationError(
                f"cookie_name and carry_cookie_name are both {self.cookie_name!r}: the carry "
                "cookie (HttpOnly, 60 s) would replace the visitor cookie"
            )
        if not _fullmatch(_COOKIE_PATH, self.cookie_path):
            raise ConfigurationError(
                f"cookie_path {self.cookie_path!r} is not a cookie path (a path starting "
                "with '/', of printable ASCII without ';')"
            )
        max_age = self.cookie_max_age
        if not (isinstance(max_age, int) and not isinstance(max_age, bool)) or not (
            0 < max_age <= MAX_COOKIE_AGE
        ):
            raise ConfigurationError(
                f"cookie_max_age must be a whole number of seconds from 1 to {MAX_COOKIE_AGE} "
                "(400 days, the longest browsers keep a cookie)"
            )
        same_site = self.cookie_same_site
        if not isinstance(same_site, str) or same_site.lower() not in _SAME_SITE:
            raise ConfigurationError(f"cookie_same_site {same_site!r} is not Lax, Strict or None")
        if same_site.lower() == "none" and not self.cookie_secure:
            raise ConfigurationError(
                "cookie_same_site None needs cookie_secure: browsers drop a SameSite=None "
                "cookie that is not Secure"
            )
        # The carry cookie is host-only whatever cookie_domain is.
        for setting, name, domain in (
            ("cookie_name", self.cookie_name, self.cookie_domain),
            ("carry_cookie_name", self.carry_cookie_name, None),
        ):
            unfit = _unfit_prefix(name, self.cookie_secure, self.cookie_path, domain)
            if unfit:
                raise ConfigurationError(
                    f"{setting} {name!r} {unfit}: browsers drop a cookie whose name's prefix "
                    "its attributes do not fit"
                )

    def set_cookie(self, anonymous_id: str) -> str:
        return self._set_cookie(
            self.cookie_name, quote(anonymous_id, safe=_COOKIE_SAFE), self.cookie_max_age
        )

    def _set_cookie(self, name: str, value: str, max_age: int, *, carry: bool = False) -> str:
        """A ``Set-Cookie`` value; the carry cookie is HttpOnly, host-only (no ``Domain``:
        the userId and traits in it go to this host, not its subdomains) and ``Lax`` when
        the visitor cookie is ``Strict`` (``_carry.same_site``)."""
        parts = [f"{name}={value}", f"Path={self.cookie_path}", f"Max-Age={max_age}"]
        same_site = _carry.same_site(self.cookie_same_site) if carry else self.cookie_same_site
        parts.append(f"SameSite={same_site}")
        if self.cookie_domain and not carry:
            parts.append(f"Domain={self.cookie_domain}")
        if self.cookie_secure:
            parts.append("Secure")
        if carry:
            parts.append("HttpOnly")
        return "; ".join(parts)

    def cookie_identity(self, cookie_header: str | None) -> Identity | None:
        anonymous_id = read_anonymous_id(read_cookie(cookie_header, self.cookie_name))
        return Identity(anonymous_id=anonymous_id, source="cookie") if anonymous_id else None

    def carry_cookie(self, identity: Identity, key: bytes) -> str | None:
        """The ``Set-Cookie`` value carrying ``identity`` to the next request: without its
        traits when they make it over ``_carry.MAX_VALUE_BYTES``, None when even that is."""
        expires = int(time.time()) + CARRY_MAX_AGE
        value = _carry.encode(identity, key, expires)
        if value is None:
            value = _carry.encode(replace(identity, traits={}), key, expires)
            logger.warning(
                "restored identity too large for the %s cookie: %s",
                self.carry_cookie_name,
                "carried without its traits"
                if value
                else "the next request's handler gets only the anonymousId",
            )
        if value is None:
            return None
        return self._set_cookie(self.carry_cookie_name, value, CARRY_MAX_AGE, carry=True)

    def restored(
        self, cookie_header: str | None, key: bytes | None
    ) -> tuple[Identity | None, str | None]:
        """The identity of a request without a token, and the ``Set-Cookie`` value that
        clears the carry cookie (None: there is none). A valid carry cookie for the visitor
        cookie's anonymousId gives the exchanged identity; so does one without a visitor
        cookie when that is ``Strict`` (browsers withhold it from the request after a
        cross-site landing's 303, the very request the carry cookie is for). Any other is
        ignored, as is every one without a key (a client that has none)."""
        visitor = self.cookie_identity(cookie_header)
        value = read_cookie(cookie_header, self.carry_cookie_name)
        if value is None:
            return visitor, None
        clear = self._set_cookie(self.carry_cookie_name, "", 0, carry=True)
        carried = None if key is None else _carry.decode(value, key, time.time())
        if carried is None:
            return visitor, clear
        if visitor is None:
            withheld = self.cookie_same_site.lower() == "strict"
            return (carried if withheld else visitor), clear
        return (carried if carried.anonymous_id == visitor.anonymous_id else visitor), clear

    def split_token(self, query: str) -> tuple[str | None, str]:
        """The token in ``query`` (raw) and the query without it, other parameters kept
        in order and as they were written."""
        token: str | None = None
        kept = []
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if unquote_plus(name) == self.token_param:
                if token is None:
                    token = unquote_plus(value)
            elif part:
                kept.append(part)
        return token, "&".join(kept)

    def landed(self, identity: Identity, cookie_header: str | None) -> tuple[Identity, str | None]:
        """The request's identity after an exchange, and the ``Set-Cookie`` value (None: the
        cookie stays). A generated id does not replace the visitor's cookie; an identity
        without an anonymousId (a handoff prepared with a userId alone) sets none."""
        existing = self.cookie_identity(cookie_header)
        if identity.source == "generated" and existing is not None:
            return existing, None
        if identity.anonymous_id is None:
            return identity, None
        return identity, self.set_cookie(identity.anonymous_id)

    @staticmethod
    def usable(token: str) -> str:
        """``token``, or a token that can exist nowhere when the service would refuse it
        (empty or over ``MAX_TOKEN_LENGTH``): such a link is bad input, not an error, and
        gets the fallback's generated id like an unknown token."""
        if 0 < len(token) <= MAX_TOKEN_LENGTH:
            return token
        logger.info("handoff token empty or too long: exchanged as an unknown token")
        return UNKNOWN_TOKEN

    def exchange_options(self, context: dict[str, Any]) -> dict[str, Any]:
        """The exchange's arguments besides the token: always with ``fallback``."""
        return {
            "fallback": True,
            "event": self.event,
            "properties": self.properties,
            "context": context,
        }

    def settle(
        self, outcome: Identity | IdentityError, cookie_header: str | None, key: bytes | None
    ) -> tuple[Identity | None, list[str]]:
        """The request's identity and the ``Set-Cookie`` values after the exchange's
        ``outcome``: the visitor cookie and the carry cookie (none without a key), or none
        when the visitor keeps the cookie's id; a failed exchange is logged and leaves the
        cookie's visitor."""
        if isinstance(outcome, IdentityError):
            _failed(outcome)
            return self.cookie_identity(cookie_header), []
        identity, cookie = self.landed(outcome, cookie_header)
        if cookie is None:
            return identity, []
        carry = None if key is None else self.carry_cookie(identity, key)
        return identity, [cookie] if carry is None else [cookie, carry]

    def context(
        self, url: str, referrer: str | None, ip: str | None, user_agent: str | None
    ) -> dict[str, Any]:
        page: dict[str, Any] = {"url": _utf8(url)}
        if referrer:
            page["referrer"] = _utf8(referrer)
        context: dict[str, Any] = {"page": page}
        if ip:
            context["ip"] = _utf8(ip)
        if user_agent:
            context["userAgent"] = _utf8(user_agent)
        return context


def _fullmatch(pattern: re.Pattern[str], value: object) -> bool:
    """Whether ``value`` is a string ``pattern`` matches whole."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _unfit_prefix(name: str, secure: bool, path: str, domain: str | None) -> str | None:
    """What a cookie named ``name`` with these attributes lacks for its name's prefix
    (RFC 6265bis 4.1.3, matched in any case: ``__Secure-`` needs ``Secure``; ``__Host-``
    needs ``Secure``, ``Path=/`` and no ``Domain``), or None. The Node middleware and
    identity.js check the same."""
    prefix = name[:9].lower()
    if not prefix.startswith(("__secure-", "__host-")):
        return None
    if not secure:
        return "needs cookie_secure"
    if prefix.startswith("__host-") and domain:
        return "cannot have a cookie_domain (a __Host- cookie is host-only)"
    if prefix.startswith("__host-") and path != "/":
        return "needs cookie_path '/'"
    return None


def _is_cookie_domain(domain: object) -> bool:
    """Whether ``domain`` can be a cookie's ``Domain`` as it is (see ``_DOMAIN_LABEL``)."""
    if not isinstance(domain, str):
        return False
    name = domain.removeprefix(".")
    labels = name.split(".")
    return (
        len(name) <= _MAX_DOMAIN
        and len(labels) > 1
        and all(_DOMAIN_LABEL.fullmatch(label) for label in labels)
        and not _NUMBER.fullmatch(labels[-1])
    )


def _utf8(text: str) -> str:
    """``text`` as JSON can carry it to the service: aiohttp reads header bytes that are not
    UTF-8 as lone surrogates (surrogateescape), which the service refuses in an exchange's
    body (and refused, the handoff was lost); they become U+FFFD. ASGI and WSGI servers give
    headers latin-1 decoded, which this leaves as they are."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _location(path: str, query: str) -> str:
    """The redirect target: ``path`` with one leading slash (``//host`` or ``/\\host`` would
    send the browser to another host) and ``query``."""
    path = "/" + path.lstrip("/\\")
    return f"{path}?{query}" if query else path


def _failed(error: IdentityError) -> None:
    # A visitor's link cannot make a 400 (usable() replaced the tokens the service would
    # refuse): an InvalidRequest is the site's own event or properties, so an ERROR.
    if isinstance(error, ServiceUnavailable | IdentityConnectionError):
        logger.warning("handoff exchange failed, page served without it: %r", error)
    else:
        logger.error("handoff exchange refused, page served without it: %r", error)


def _key_of(client: IdentityClient | AsyncIdentityClient) -> bytes | None:
    """The client's carry-cookie key, read once; None (no carry) for a client object
    without one, as the Node middleware does with a client without ``carryKey``."""
    key: bytes | None = getattr(client, "_carry_key", None)
    return key


def _with_cookie(headers: Iterable[tuple[bytes, bytes]], cookie: str) -> list[tuple[bytes, bytes]]:
    return [*headers, (b"set-cookie", cookie.encode("latin-1"))]


class _Landings:
    """The exchanges in flight, by token, of one async middleware. The same handoff URL
    requested twice at once (a double click, a prefetch and the navigation) made two
    exchanges: the second found the token used and set the visitor cookie to a generated
    id, and whichever answer the browser kept decided who the visitor was. A landing whose
    token is being exchanged now waits on that exchange: the token is exchanged once.

    Only a handed-off identity is shared: a generated one (an unknown, used or expired
    token, or a bad link, all exchanged as one unknown token) is no one's, so a landing
    that waited on one makes its own exchange and gets an id of its own. Nothing is kept
    once the exchange is over: a later landing with the token exchanges it again (and
    finds it used), as before."""

    def __init__(self) -> None:
        self._flying: dict[str, asyncio.Task[Identity]] = {}

    async def exchange(
        self, token: str, run: Callable[[], Coroutine[Any, Any, Identity]]
    ) -> Identity:
        loop = asyncio.get_running_loop()
        flight = self._flying.get(token)
        if flight is not None and flight.get_loop() is loop:
            try:
                identity = await asyncio.shield(flight)
            except IdentityError:
                raise  # the service down for that landing is down for this one
            if identity.source == "handoff":
                return identity
            return await run()
        # A task of its own: a landing whose request is cancelled (the browser went on)
        # does not cancel the exchange the others wait on.
        flight = loop.create_task(run())
        self._flying[token] = flight
        flight.add_done_callback(lambda done: self._landed(token, done))
        return await asyncio.shield(flight)

    def _landed(self, token: str, flight: asyncio.Task[Identity]) -> None:
        if self._flying.get(token) is flight:
            del self._flying[token]
        if not flight.cancelled():
            flight.exception()  # retrieved: no "never retrieved" log when no one waits


class _SyncLandings:
    """``_Landings`` for the WSGI middleware, whose landings are threads."""

    @dataclass
    class _Flight:
        done: threading.Event
        identity: Identity | None = None
        error: BaseException | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flying: dict[str, _SyncLandings._Flight] = {}

    def exchange(self, token: str, run: Callable[[], Identity]) -> Identity:
        with self._lock:
            flight = self._flying.get(token)
            leading = flight is None
            if flight is None:
                flight = self._flying[token] = self._Flight(threading.Event())
        if not leading:
            flight.done.wait()  # the exchange's own timeout bounds it
            if flight.error is not None:
                raise flight.error
            if flight.identity is not None and flight.identity.source == "handoff":
                return flight.identity
            return run()
        try:
            flight.identity = run()
            return flight.identity
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                del self._flying[token]
            flight.done.set()


class IdentityASGIMiddleware:
    """ASGI middleware (Starlette, FastAPI, Django ASGI) around ``app``."""

    def __init__(self, app: ASGIApp, client: AsyncIdentityClient, **settings: Any) -> None:
        self.app = app
        self.client = client
        self.key = _key_of(client)
        self.settings = MiddlewareSettings(**settings)
        self._landings = _Landings()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1").lower(): value.decode("latin-1")
            for key, value in scope.get("headers", [])
        }
        state = scope.setdefault("state", {})
        token, query = self.settings.split_token(scope.get("query_string", b"").decode("latin-1"))
        if scope.get("method") != "GET" or token is None:
            state["identity"], clear = self.settings.restored(headers.get("cookie"), self.key)
            if clear is None:
                await self.app(scope, receive, send)
                return

            async def clearing(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = _with_cookie(message.get("headers", []), clear)
                await send(message)

            await self.app(scope, receive, clearing)
            return
        raw_path = scope.get("raw_path")
        root_path = scope.get("root_path", "")
        path = (
            _mounted(root_path.encode("utf-8", "replace"), raw_path.decode("latin-1"))
            if raw_path
            else quote(root_path + scope["path"])
        )
        host = headers.get("host")
        if host is None and scope.get("server"):
            host = "{}:{}".format(*scope["server"])
        url = f"{scope.get('scheme', 'http')}://{host or 'localhost'}{_location(path, query)}"
        client_addr = scope.get("client")
        context = self.settings.context(
            url,
            headers.get("referer"),
            client_addr[0] if client_addr else None,
            headers.get("user-agent"),
        )
        response_headers = [
            (b"location", _location(path, query).encode("latin-1")),
            (b"cache-control", b"no-store"),
            (b"content-length", b"0"),
        ]
        outcome: Identity | IdentityError
        try:
            usable = self.settings.usable(token)
            options = self.settings.exchange_options(context)
            outcome = await self._landings.exchange(
                usable, lambda: self.client.exchange(usable, **options)
            )
        except IdentityError as error:
            outcome = error
        state["identity"], cookies = self.settings.settle(outcome, headers.get("cookie"), self.key)
        for cookie in cookies:
            response_headers = _with_cookie(response_headers, cookie)
        await send({"type": "http.response.start", "status": 303, "headers": response_headers})
        await send({"type": "http.response.body", "body": b""})


class IdentityWSGIMiddleware:
    """WSGI middleware (Flask: ``app.wsgi_app = IdentityWSGIMiddleware(app.wsgi_app, client)``,
    Django: wrap ``get_wsgi_application()``)."""

    def __init__(self, app: WSGIApp, client: IdentityClient, **settings: Any) -> None:
        self.app = app
        self.client = client
        self.key = _key_of(client)
        self.settings = MiddlewareSettings(**settings)
        self._landings = _SyncLandings()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        token, query = self.settings.split_token(environ.get("QUERY_STRING", ""))
        cookie_header = environ.get("HTTP_COOKIE")
        if environ.get("REQUEST_METHOD") != "GET" or token is None:
            environ[WSGI_ENVIRON_KEY], clear = self.settings.restored(cookie_header, self.key)
            if clear is None:
                return self.app(environ, start_response)

            def clearing(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
                return start_response(status, [*headers, ("Set-Cookie", clear)], *exc_info)

            return self.app(environ, clearing)
        path = _wsgi_path(environ)
        host = environ.get("HTTP_HOST") or (
            f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
        )
        url = f"{environ.get('wsgi.url_scheme', 'http')}://{host}{_location(path, query)}"
        context = self.settings.context(
            url,
            environ.get("HTTP_REFERER"),
            environ.get("REMOTE_ADDR"),
            environ.get("HTTP_USER_AGENT"),
        )
        headers = [
            ("Location", _location(path, query)),
            ("Cache-Control", "no-store"),
            ("Content-Length", "0"),
        ]
        outcome: Identity | IdentityError
        try:
            usable = self.settings.usable(token)
            options = self.settings.exchange_options(context)
            outcome = self._landings.exchange(
                usable, lambda: self.client.exchange(usable, **options)
            )
        except IdentityError as error:
            outcome = error
        environ[WSGI_ENVIRON_KEY], cookies = self.settings.settle(outcome, cookie_header, self.key)
        headers.extend(("Set-Cookie", cookie) for cookie in cookies)
        start_response("303 See Other", headers)
        return [b""]


def _mounted(prefix: bytes, path: str) -> str:
    """``path`` as the app server received it (escaped), under the ``prefix`` the app is
    mounted at (``SCRIPT_NAME``, ASGI's ``root_path``) when it is not there yet: a proxy
    that strips the prefix before the app server sends the app ``/cart`` for the browser's
    ``/shop/cart`` and says so (werkzeug's ``ProxyFix(x_prefix=1)``, uvicorn's
    ``--root-path``); the browser must be sent back to ``/shop/cart``. A path already
    under the prefix is kept as it is: WSGI's own mounts (gunicorn's ``SCRIPT_NAME``,
    werkzeug's DispatcherMiddleware) and uvicorn put it in the request target themselves.
    (So ``/shop/shop/x`` behind a stripping proxy goes back to ``/shop/x``: no server
    tells the two apart.)"""
    mount = quote(prefix, safe=_PATH_SAFE).rstrip("/")
    if not mount or path == mount or path.startswith(mount + "/"):
        return path
    return mount + path


def _wsgi_path(environ: dict[str, Any]) -> str:
    """The request's path as the browser sent it: the raw request target (``RAW_URI``,
    ``REQUEST_URI``: gunicorn, werkzeug, uWSGI) without its query, else ``SCRIPT_NAME`` and
    ``PATH_INFO`` quoted back. PATH_INFO is decoded: ``/a%2Fb%3Fc`` is ``/a/b?c`` there, and
    quoting that back gives ``/a/b%3Fc``, another route."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw:
        target = raw.partition("?")[0].partition("#")[0]
        if not target.startswith("/"):  # absolute-form (a proxy request): its path
            target = urlsplit(target).path
        if target:
            # Escapes stay as sent; only bytes a Location cannot hold are quoted.
            sent = quote(target.encode("latin-1", "replace"), safe=_PATH_SAFE + "%")
            # PEP 3333: SCRIPT_NAME holds the path's bytes, latin-1 decoded.
            return _mounted(environ.get("SCRIPT_NAME", "").encode("latin-1", "replace"), sent)
    # PEP 3333: paths are latin-1 decoded bytes; quote them back as sent.
    path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1")
    return quote(path, safe=_PATH_SAFE) or "/"


def identity_middleware(client: AsyncIdentityClient, **settings: Any) -> Middleware:
    """An aiohttp middleware: ``web.Application(middlewares=[identity_middleware(client)])``.
    The identity is ``request["identity"]``."""
    from aiohttp import web

    config = MiddlewareSettings(**settings)
    key = _key_of(client)
    landings = _Landings()
    # aiohttp >= 3.12 recommends typed RequestKeys; the documented key here is "identity".
    not_app_key: type[Warning] = getattr(web, "NotAppKeyWarning", UserWarning)

    def expose(request: web.Request, identity: Identity | None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", not_app_key)
            request["identity"] = identity

    @web.middleware
    async def middleware(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        token, query = config.split_token(request.rel_url.raw_query_string)
        cookie_header = request.headers.get("Cookie")
        if request.method != "GET" or token is None:
            identity, clear = config.restored(cookie_header, key)
            expose(request, identity)
            if clear is None:
                return await handler(request)
            try:
                answer = await handler(request)
            except web.HTTPException as exc:  # a raised answer (redirect, 404...) clears it too
                exc.headers.add("Set-Cookie", clear)
                raise
            if not answer.prepared:  # a streamed answer's headers are already sent
                answer.headers.add("Set-Cookie", clear)
            return answer
        path = request.rel_url.raw_path
        url = f"{request.scheme}://{request.host}{_location(path, query)}"
        context = config.context(
            url, request.headers.get("Referer"), request.remote, request.headers.get("User-Agent")
        )
        response = web.Response(
            status=303,
            headers={"Location": _location(path, query), "Cache-Control": "no-store"},
        )
        outcome: Identity | IdentityError
        try:
            usable = config.usable(token)
            options = config.exchange_options(context)
            outcome = await landings.exchange(usable, lambda: client.exchange(usable, **options))
        except IdentityError as error:
            outcome = error
        landed, cookies = config.settle(outcome, cookie_header, key)
        expose(request, landed)
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    return middleware
