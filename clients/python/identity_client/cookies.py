"""Reading the visitor cookie that analytics.js writes (``ajs_anonymous_id``)."""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["read_anonymous_id", "read_cookie"]


def read_anonymous_id(value: str | None) -> str | None:
    """The anonymousId in an ``ajs_anonymous_id`` cookie value, or None when it is empty.

    analytics.js 2.0 stores the id as is; analytics.js classic stores ``JSON.stringify(id)``
    percent-encoded (``%22abc%22``), and some frameworks hand that over already decoded
    (``"abc"``). All three give ``abc``, so a handoff prepared from domain A's cookie carries
    the id analytics.js uses, never ``%22abc%22``::

        anonymous_id = read_anonymous_id(request.cookies.get("ajs_anonymous_id"))
    """
    if not value:
        return None
    anonymous_id = unquote(value.strip().strip('"')).strip('"')
    return anonymous_id or None


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """The raw value of cookie ``name`` in a ``Cookie`` request header, or None."""
    for item in (cookie_header or "").split(";"):
        key, sep, value = item.strip().partition("=")
        if sep and key == name:
            return value
    return None
