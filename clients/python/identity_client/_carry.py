"""The carry cookie: the exchanged identity, signed, for the request after the 303.

The middleware answers the handoff request with a 303, so the handler that renders the page
runs on the next request, which only has the visitor cookie. The carry cookie brings the
rest of the exchanged identity (userId, traits, consent, source) to that request:
``base64url(compact JSON) "." base64url(HMAC-SHA256)``, under a key derived from the write
key. It is signed, not encrypted: the browser can read what it holds (it is HttpOnly, so
page scripts cannot). The Node SDK writes and reads the same format (carry.ts), and both
suites check the vectors of ``clients/carry-vectors.json``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from identity_client.models import Identity

# Derivation label: the key signs carry cookies and nothing else.
_KEY_LABEL = b"identity-service-client carry cookie v1"
# Browsers keep about 4 KB per cookie, but servers refuse a Cookie header line over about
# 8 KB (aiohttp 8190 bytes, nginx 8k) before any middleware runs, and the carry cookie
# shares that line with the site's other cookies. The Node SDK's MAX_CARRY_BYTES is the same.
MAX_VALUE_BYTES = 1500


def same_site(visitor_same_site: str) -> str:
    """The carry cookie's ``SameSite`` for a visitor cookie's ``visitor_same_site``: the
    same, except ``Lax`` for ``Strict`` (any case). The request after the landing's 303 is
    the tail of a navigation another site started, and browsers send no ``Strict`` cookie
    with it, so a ``Strict`` carry cookie would miss the one request it is for. ``Lax`` is
    sent on a cross-site top-level GET, which that request is; the cookie is HttpOnly,
    signed, 60 s and cleared when read (docs/sdk.md). The Node SDK's carrySameSite is the same.
    """
    return "Lax" if visitor_same_site.lower() == "strict" else visitor_same_site


def carry_key(write_key: str) -> bytes:
    """The signing key of the carry cookie, derived from (and never equal to) the write key."""
    return hmac.new(write_key.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def _not_json(constant: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON (Node's JSON.parse refuses them)."""
    raise ValueError(constant)


def encode(identity: Identity, key: bytes, expires: int) -> str | None:
    """The cookie value for ``identity`` valid until ``expires`` (Unix seconds), or None when
    it would be over ``MAX_VALUE_BYTES``."""
    document = {
        "anonymousId": identity.anonymous_id,
        "userId": identity.user_id,
        "traits": identity.traits,
        "consent": identity.consent,
        "source": identity.source,
        "exp": expires,
    }
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=str)
    payload = _b64(text.encode())
    value = f"{payload}.{_signature(key, payload)}"
    return value if len(value) <= MAX_VALUE_BYTES else None


def decode(value: str, key: bytes, now: float) -> Identity | None:
    """The identity in a carry cookie ``value``, or None when it is forged, expired,
    malformed or oversized. Never raises."""
    if len(value) > MAX_VALUE_BYTES or not value.isascii():
        return None
    payload, sep, signature = value.partition(".")
    if not sep or not hmac.compare_digest(signature, _signature(key, payload)):
        return None
    try:
        document: Any = json.loads(_unb64(payload), parse_constant=_not_json)
    except (ValueError, binascii.Error):  # UnicodeDecodeError and JSONDecodeError included
        return None
    if not isinstance(document, dict) or "userId" not in document:
        return None
    anonymous_id, user_id = document.get("anonymousId"), document.get("userId")
    traits, consent = document.get("traits"), document.get("consent")
    source, expires = document.get("source"), document.get("exp")
    if not (
        isinstance(anonymous_id, str)
        and anonymous_id
        and (user_id is None or isinstance(user_id, str))
        and isinstance(traits, dict)
        and isinstance(consent, dict)
        and source in ("handoff", "generated")
        and isinstance(expires, int | float)
        and not isinstance(expires, bool)
        and expires > now
    ):
        return None
    return Identity(
        anonymous_id=anonymous_id,
        user_id=user_id,
        traits=traits,
        consent=consent,
        source=source,
    )
