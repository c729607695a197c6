"""The visitor cookie: read from a ``Cookie`` header, and the ``Set-Cookie`` that sets it.

The cookie is analytics.js's own (``ajs_anonymous_id`` by default), so a page's analytics
keeps the id the service sets, with no script change. analytics.js (classic) writes the
value JSON-encoded and percent-encoded (``%22<id>%22``), analytics-next writes it plain;
both are read. The service writes it plain.
"""

from urllib.parse import unquote

from identity_service.amp.config import CookieSettings
from identity_service.constants import MAX_ID_LENGTH
from identity_service.events import random_uuid


def visitor_id(cookie_header: str | None, cookie: CookieSettings) -> str | None:
    """The visitor's anonymousId from a ``Cookie`` header, or None when absent or unusable."""
    if not cookie_header:
        return None
    for pair in cookie_header.split(";"):
        name, found, value = pair.strip().partition("=")
        if found and name == cookie.name:
            return _usable(value)
    return None


def _usable(raw: str) -> str | None:
    value = unquote(raw.strip())
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable() or not value.isascii():
        return None
    if any(character in value for character in ';,"\\ '):
        return None
    return value


def new_visitor_id() -> str:
    return random_uuid()


def set_cookie(value: str, cookie: CookieSettings) -> str:
    """The ``Set-Cookie`` value that keeps ``value`` (an id ``visitor_id`` accepts)."""
    parts = [f"{cookie.name}={value}", "Path=/", f"Max-Age={cookie.max_age}"]
    if cookie.domain:
        parts.append(f"Domain={cookie.domain}")
    if cookie.secure:
        parts.append("Secure")
    if cookie.http_only:
        parts.append("HttpOnly")
    parts.append(f"SameSite={cookie.same_site}")
    return "; ".join(parts)
