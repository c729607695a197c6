"""The ``[amp]`` settings: the publisher's origins and AMP caches, the visitor cookie, actions.

``AmpSettings`` is what the AMP endpoints read; ``read_amp_settings`` builds it from the
``[amp]`` table of the settings file or ``IDENTITY_AMP`` (JSON), reporting every problem.
The cache origins allowed by CORS are derived here, once, from the configured publisher
origins and caches: never from a request.

Choices the issue left open (docs/amp.md lists every rule): ``public_url`` must be on a
publisher origin (the cookie is set in its answers and the origin hop lands there);
``cookie.domain`` must cover ``public_url``'s host, the one host that sets the cookie (a
browser ignores a ``Domain`` that does not), and need not cover other publisher origins;
it is no public suffix (the Public Suffix List ``publicsuffixlist`` bundles: browsers
refuse a cookie for ``co.uk`` or ``github.io``), no IP address and no single label;
a webhook may use http only to ``localhost`` or a loopback address; numbers have bounds
(``cookie.max_age`` at most the 400 days browsers keep a cookie, ``action_ttl`` at most
300 s); ``caches = []`` allows the publisher origins alone.
"""

import functools
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList
from yarl import URL

from identity_service import constants as c
from identity_service.amp.caches import DEFAULT_CACHES, cache_origins
from identity_service.urls import (
    DNS_PROBLEM,
    UrlError,
    WebUrl,
    fits_dns,
    is_localhost,
    is_loopback_host,
    parse_origin,
    read_url,
)

SameSite = Literal["None", "Lax", "Strict"]

DEFAULT_COOKIE_NAME = "ajs_anonymous_id"  # the cookie analytics.js reads
DEFAULT_COOKIE_MAX_AGE = 365 * 24 * 3600
DEFAULT_LINK_TTL = 30 * 24 * 3600
DEFAULT_ACTION_TTL = 60


@dataclass(frozen=True, slots=True)
class CookieSettings:
    """The visitor cookie the AMP endpoints read and set (analytics.js's by default)."""

    name: str = DEFAULT_COOKIE_NAME
    domain: str | None = None  # e.g. ".example.com", to share it with subdomains
    max_age: int = DEFAULT_COOKIE_MAX_AGE
    same_site: SameSite = "None"  # a Lax cookie is never sent from a cache page
    secure: bool = True
    http_only: bool = False  # analytics.js reads it


@dataclass(frozen=True, slots=True)
class ActionSettings:
    """One state change an AMP page may ask for (``POST /v1/amp/actions/{name}``)."""

    name: str
    webhook: str  # where the publisher's backend applies it: https, or http to loopback
    secret: bytes = field(repr=False)  # the webhook calls' HMAC-SHA256 key
    done_url: str = ""  # where the visitor lands after the origin hop: a publisher origin


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``requests`` in each window of ``window_seconds``."""

    requests: int
    window_seconds: int


@dataclass(frozen=True, slots=True)
class AmpSettings:
    """Everything the AMP endpoints need, validated."""

    public_url: str  # the service's base URL on the publisher's origin, no trailing slash
    publisher_origins: frozenset[str]
    source: str  # the configured source whose events these are
    allowed_origins: frozenset[str]  # publisher origins and their cache origins
    caches: tuple[str, ...] = DEFAULT_CACHES
    cookie: CookieSettings = field(default_factory=CookieSettings)
    actions: Mapping[str, ActionSettings] = field(default_factory=dict)
    link_ttl: int = DEFAULT_LINK_TTL
    action_ttl: int = DEFAULT_ACTION_TTL
    collect_redirect: str | None = None  # collect's 302 next hop, on a publisher origin
    limit_per_ip: RateLimit = field(default_factory=lambda: RateLimit(600, 60))
    limit_per_client: RateLimit = field(default_factory=lambda: RateLimit(120, 60))
    max_form_bytes: int = 16_384
    max_form_fields: int = 64
    webhook_timeout: float = 3.0  # each webhook attempt
    webhook_attempts: int = 3  # within the visitor's wait; then the hop fails


# What the [amp] table and its sub-tables may hold; anything else is reported as a typo.
AMP_KEYS = frozenset(
    {
        "public_url", "publisher_origins", "caches", "source", "cookie", "actions", "link_ttl",
        "action_ttl", "collect_redirect", "limit_per_ip", "limit_per_client", "max_form_bytes",
        "max_form_fields", "webhook_timeout", "webhook_attempts",
    }
)  # fmt: skip
COOKIE_KEYS = frozenset({"name", "domain", "max_age", "same_site", "secure", "http_only"})
ACTION_KEYS = frozenset({"webhook", "secret", "done_url"})
LIMIT_KEYS = frozenset({"requests", "window_seconds"})

# Browsers cap a cookie's lifetime at 400 days (RFC 6265bis); a longer Max-Age is cut there.
MAX_COOKIE_MAX_AGE = 400 * 24 * 3600
MAX_LINK_TTL = 400 * 24 * 3600
MAX_ACTION_TTL = 300
SAME_SITE_VALUES: tuple[SameSite, ...] = ("None", "Lax", "Strict")
# RFC 6265's cookie-name: an RFC 7230 token.
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
_ACTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def read_amp_settings(
    raw: object, *, where: str, source_names: Collection[str], problems: list[str]
) -> AmpSettings | None:
    """The ``[amp]`` settings from ``raw`` (the parsed table), or None if it has problems.

    ``where`` names the table as the user wrote it (``amp`` in a file, ``IDENTITY_AMP`` in the
    environment); each problem is appended to ``problems`` as one line naming its key, such
    as ``amp.public_url must use https ...``. ``source_names`` are the configured sources
    (the development source's name when none is configured): ``source`` must be one of them.
    """
    return _AmpReader(where, problems).read(raw, source_names)


def allowed_origins(publisher_origins: Iterable[str], caches: Iterable[str]) -> frozenset[str]:
    """The origins the AMP endpoints answer: the publisher origins and their cache origins.

    Only an https origin without a port has cache origins (AMP caches fetch https sources on
    the default port); other publisher origins, such as ``http://localhost:8080`` in
    development, are allowed as themselves.
    """
    caches = tuple(caches)
    allowed: set[str] = set()
    for origin in publisher_origins:
        allowed.add(origin)
        try:
            allowed |= cache_origins(origin, caches)
        except ValueError:
            continue  # http or a port: no cache serves it
    return frozenset(allowed)


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The Public Suffix List the package bundles (read once, only when a cookie domain is
    configured; no network): the suffixes browsers set no cookie for."""
    return PublicSuffixList()


class _AmpReader:
    """Reads the ``[amp]`` table, appending one line per problem to ``problems``."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        self.found_before = len(problems)

    def read(self, raw: object, source_names: Collection[str]) -> AmpSettings | None:
        amp = self.table(raw, "", AMP_KEYS)
        if amp is None:
            return None
        origins = self.publisher_origins(amp.get("publisher_origins"))
        public_url = self.public_url(amp.get("public_url"), origins)
        caches = self.caches(amp.get("caches"))
        source = self.source(amp.get("source"), source_names)
        cookie = self.cookie(amp.get("cookie"), public_url)
        actions = self.actions(amp.get("actions"), origins)
        collect_redirect = self.page_url(amp.get("collect_redirect"), "collect_redirect", origins)
        defaults = AmpSettings("", frozenset(), "", frozenset())
        settings = AmpSettings(
            public_url=public_url.href.rstrip("/") if public_url else "",
            publisher_origins=origins or frozenset(),
            source=source or "",
            allowed_origins=allowed_origins(origins or (), caches),
            caches=caches,
            cookie=cookie,
            actions=actions,
            link_ttl=self.integer(amp, "link_ttl", defaults.link_ttl, 60, MAX_LINK_TTL),
            action_ttl=self.integer(amp, "action_ttl", defaults.action_ttl, 5, MAX_ACTION_TTL),
            collect_redirect=collect_redirect,
            limit_per_ip=self.limit(amp, "limit_per_ip", defaults.limit_per_ip),
            limit_per_client=self.limit(amp, "limit_per_client", defaults.limit_per_client),
            max_form_bytes=self.integer(
                amp, "max_form_bytes", defaults.max_form_bytes, 256, 1 << 20
            ),
            max_form_fields=self.integer(amp, "max_form_fields", defaults.max_form_fields, 1, 1000),
            webhook_timeout=self.number(
                amp, "webhook_timeout", defaults.webhook_timeout, 0.1, 30.0
            ),
            webhook_attempts=self.integer(
                amp, "webhook_attempts", defaults.webhook_attempts, 1, 10
            ),
        )
        return None if len(self.problems) > self.found_before else settings

    # -- the settings --------------------------------------------------------------------

    def publisher_origins(self, value: Any) -> frozenset[str] | None:
        """The normalised publisher origins, or None when missing or any is invalid."""
        if not isinstance(value, list) or not value:
            self.problem("publisher_origins", "must be a non-empty list of origins")
            return None
        origins: set[str] = set()
        valid = True
        for text in value:
            try:
                origins.add(parse_origin(str(text)))
            except UrlError as exc:
                self.problem("publisher_origins", f"{text!r} {exc}", separator=": ")
                valid = False
        return frozenset(origins) if valid else None

    def public_url(self, value: Any, origins: frozenset[str] | None) -> WebUrl | None:
        """The service's base URL: https (http for localhost), no query or fragment."""
        if isinstance(value, str) and ("?" in value or "#" in value):
            self.problem("public_url", "must not have a query or fragment: it is a base URL")
            return None
        href = self.page_url(value, "public_url", origins, required=True)
        return None if href is None else read_url(href)

    def page_url(
        self, value: Any, key: str, origins: frozenset[str] | None, *, required: bool = False
    ) -> str | None:
        """A URL the visitor's browser loads: https (http for localhost), on a publisher
        origin (checked only when the publisher origins are valid); its serialization."""
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.problem(
                key,
                "is required: an absolute https URL"
                if value is None
                else "must be an absolute https URL (a string)",
            )
            return None
        try:
            url = read_url(value)
        except UrlError as exc:
            self.problem(key, str(exc))
            return None
        if url.scheme != "https" and not is_localhost(url.host):
            self.problem(key, "must use https (http is allowed only for localhost)")
            return None
        if len(url.href) > c.MAX_URL_LENGTH:
            self.problem(key, f"must be at most {c.MAX_URL_LENGTH} characters once encoded")
            return None
        if origins is not None and url.origin not in origins:
            self.problem(
                key,
                f"must be on a publisher origin ({', '.join(sorted(origins))}), not {url.origin}",
            )
            return None
        return url.href

    def caches(self, value: Any) -> tuple[str, ...]:
        """The AMP cache domains: plain lower-case domain names, AMP's list by default."""
        if value is None:
            return DEFAULT_CACHES
        if not isinstance(value, list):
            self.problem("caches", "must be a list of cache domains such as 'cdn.ampproject.org'")
            return DEFAULT_CACHES
        caches: list[str] = []
        for domain in value:
            text = str(domain)
            try:
                host = read_url(f"https://{text}/").host if "/" not in text else ""
            except UrlError:
                host = ""
            if host != text.lower() or "." not in host:
                self.problem(
                    "caches",
                    f"{domain!r} is not a cache domain: write a domain name such as "
                    "'cdn.ampproject.org' (no scheme, port, path or wildcard)",
                    separator=": ",
                )
            elif host not in caches:
                caches.append(host)
        return tuple(caches)

    def source(self, value: Any, source_names: Collection[str]) -> str | None:
        """The source whose events these are: one of ``source_names``."""
        if isinstance(value, str) and value in source_names:
            return value
        names = ", ".join(sorted(source_names))
        given = "is required" if value is None else f"is {value!r}"
        self.problem("source", f"{given}: it must name a configured source ({names})")
        return None

    def cookie(self, value: Any, public_url: WebUrl | None) -> CookieSettings:
        """The ``cookie`` table: the visitor cookie's name and attributes, defaults filled."""
        defaults = CookieSettings()
        table = self.table(value, "cookie", COOKIE_KEYS) if value is not None else {}
        if table is None:
            return defaults
        name = table.get("name", defaults.name)
        if not isinstance(name, str) or not _COOKIE_NAME.fullmatch(name):
            self.problem(
                "cookie.name",
                f"must be a cookie name (letters, digits and !#$%&'*+-.^_`|~), not {name!r}",
            )
            name = defaults.name
        secure = self.flag(table, "secure", defaults.secure, prefix="cookie.")
        same_site = self.same_site(table.get("same_site"), defaults.same_site)
        if same_site == "None" and not secure:
            self.problem(
                "cookie.same_site",
                "None needs cookie.secure = true: browsers drop a SameSite=None cookie "
                "without Secure",
            )
        # Browsers match the prefixes in any case (RFC 6265bis).
        prefix = name.lower()
        if prefix.startswith(("__secure-", "__host-")) and not secure:
            self.problem("cookie.name", f"{name!r} needs cookie.secure = true (its prefix)")
        domain = self.cookie_domain(table.get("domain"), public_url)
        if domain is not None and prefix.startswith("__host-"):
            self.problem("cookie.domain", "must not be set for a __Host- cookie")
        return CookieSettings(
            name=name,
            domain=domain,
            max_age=self.integer(
                table, "max_age", defaults.max_age, 1, MAX_COOKIE_MAX_AGE, prefix="cookie."
            ),
            same_site=same_site,
            secure=secure,
            http_only=self.flag(table, "http_only", defaults.http_only, prefix="cookie."),
        )

    def same_site(self, value: Any, default: SameSite) -> SameSite:
        """``None``, ``Lax`` or ``Strict``, in any case, written as browsers expect."""
        if value is None:
            return default
        for allowed in SAME_SITE_VALUES:
            if isinstance(value, str) and value.lower() == allowed.lower():
                return allowed
        self.problem("cookie.same_site", f"must be None, Lax or Strict, not {value!r}")
        return default

    def cookie_domain(self, value: Any, public_url: WebUrl | None) -> str | None:
        """The cookie's ``Domain``: a parent domain of the public URL's host (or the host)."""
        if value is None:
            return None
        text = value.lower() if isinstance(value, str) else ""
        host = text.removeprefix(".")
        try:
            valid = read_url(f"https://{host}/").host == host and "." in host
        except UrlError:
            valid = False
        if not valid:
            self.problem(
                "cookie.domain",
                f"must be a domain name such as '.example.com', not {value!r}",
            )
            return None
        if _public_suffixes().is_public(host):
            own = _public_suffixes().privatesuffix(public_url.host) if public_url else None
            instead = f"your own domain ('.{own}')" if own else "your own domain"
            self.problem(
                "cookie.domain",
                f"{value!r} is a public suffix (publicsuffix.org): browsers refuse a cookie "
                f"for it, so the visitor cookie would never be set; use {instead} or leave "
                "cookie.domain unset",
            )
            return None
        if public_url is not None and not (
            public_url.host == host or public_url.host.endswith("." + host)
        ):
            self.problem(
                "cookie.domain",
                f"{value!r} must be {public_url.host} or a parent domain of it: browsers "
                "ignore a cookie whose Domain does not cover the host that sets it "
                "(amp.public_url's)",
            )
            return None
        return text

    def actions(self, value: Any, origins: frozenset[str] | None) -> dict[str, ActionSettings]:
        """The ``actions`` table: each name's webhook, secret and ``done_url``."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem("actions", "must be a table of action name to {webhook, secret, done_url}")
            return {}
        actions: dict[str, ActionSettings] = {}
        for name, spec in value.items():
            where = f"actions.{name}"
            if not _ACTION_NAME.fullmatch(str(name)):
                self.problem(where, "must be named with 1 to 64 letters, digits, '_' or '-'")
                continue
            table = self.table(spec, where, ACTION_KEYS)
            if table is None:
                continue
            webhook = self.webhook(table.get("webhook"), f"{where}.webhook")
            secret = self.secret(table.get("secret"), f"{where}.secret")
            done_url = self.page_url(
                table.get("done_url"), f"{where}.done_url", origins, required=True
            )
            if webhook and secret and done_url:
                actions[str(name)] = ActionSettings(str(name), webhook, secret, done_url)
        return actions

    def webhook(self, value: Any, key: str) -> str | None:
        """Where an action is applied: https, or http to a loopback address.

        The service calls it (aiohttp, so yarl reads it); it must read the same with
        ``urllib.parse``, so nothing is left for the two to disagree on.
        """
        if not isinstance(value, str) or not value:
            self.problem(key, "is required: the https URL of the publisher's action endpoint")
            return None
        if not (value.isascii() and value.isprintable()) or " " in value or "\\" in value:
            self.problem(key, "must be printable ASCII without spaces or backslashes")
            return None
        try:
            parts = urlsplit(value)
            reading = (parts.scheme, parts.hostname, parts.port)
            url = URL(value)
            agreed = reading == (url.scheme, url.host, url.explicit_port)
        except ValueError:
            agreed, parts = False, urlsplit("")
        if not agreed or parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(key, "must be an absolute http(s) URL")
            return None
        if parts.username is not None or parts.password is not None:
            self.problem(key, "must not carry user information")
            return None
        if not fits_dns(parts.hostname):
            # Every call would fail: aiohttp's IDNA encoding raises before any connection.
            self.problem(key, f"must name a host of {DNS_PROBLEM}")
            return None
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            self.problem(
                key,
                "must use https, or http to a loopback address (127.0.0.0/8, ::1, "
                "localhost): its calls carry the visitor's id and the form's fields",
            )
            return None
        return value

    def secret(self, value: Any, key: str) -> bytes | None:
        """A webhook signing secret: at least as long as the server secret must be."""
        if not isinstance(value, str) or len(value) < c.MIN_SECRET_LENGTH:
            self.problem(key, f"must be a string of at least {c.MIN_SECRET_LENGTH} characters")
            return None
        return value.encode()

    def limit(self, amp: Mapping[str, Any], key: str, default: RateLimit) -> RateLimit:
        """A rate limit table: ``requests`` in each window of ``window_seconds``."""
        value = amp.get(key)
        if value is None:
            return default
        table = self.table(value, key, LIMIT_KEYS)
        if table is None:
            return default
        prefix = f"{key}."
        return RateLimit(
            requests=self.integer(table, "requests", default.requests, 1, 1_000_000, prefix=prefix),
            window_seconds=self.integer(
                table, "window_seconds", default.window_seconds, 1, 86_400, prefix=prefix
            ),
        )

    # -- typed values ----------------------------------------------------------------------

    def table(self, value: Any, key: str, allowed: frozenset[str]) -> dict[str, Any] | None:
        """``value`` as a table of the ``allowed`` keys; unknown keys are reported."""
        if not isinstance(value, dict):
            self.problem(key, f"must be a table of {', '.join(sorted(allowed))}")
            return None
        for unknown in sorted(str(name) for name in value if name not in allowed):
            self.problem(f"{key}.{unknown}" if key else unknown, "is not a setting (a typo?)")
        return cast(dict[str, Any], value)

    def integer(
        self,
        table: Mapping[str, Any],
        key: str,
        default: int,
        low: int,
        high: int,
        prefix: str = "",
    ) -> int:
        value = table.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(prefix + key, f"must be a whole number, not {value!r}")
            return default
        if not low <= value <= high:
            self.problem(prefix + key, f"must be between {low} and {high}, not {value}")
            return default
        return value

    def number(
        self, table: Mapping[str, Any], key: str, default: float, low: float, high: float
    ) -> float:
        value = table.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"must be a number, not {value!r}")
            return default
        if not low <= value <= high:
            self.problem(key, f"must be between {low} and {high}, not {value}")
            return default
        return float(value)

    def flag(self, table: Mapping[str, Any], key: str, default: bool, prefix: str = "") -> bool:
        value = table.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(prefix + key, f"must be true or false, not {value!r}")
            return default
        return value

    def problem(self, key: str, message: str, separator: str = " ") -> None:
        """Report ``key`` (dotted, under the table) as the user wrote it, then ``message``."""
        name = f"{self.where}.{key}" if key else self.where
        self.problems.append(f"{name}{separator}{message}")
