"""Exceptions mapped from the service's RFC 9457 problem documents.

Every exception carries ``status``, ``type`` (the full ``urn:identity-service:problem:...``),
``title`` and ``detail``. None of them ever holds the write key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBLEM_PREFIX = "urn:identity-service:problem:"


@dataclass(frozen=True)
class FieldError:
    """One entry of a validation problem's ``errors`` list."""

    field: str
    message: str


class IdentityError(Exception):
    """Base of every error this package raises."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        type: str | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail

    def __str__(self) -> str:
        head = " ".join(str(part) for part in (self.status, self.title) if part is not None)
        return f"{head}: {self.detail}" if head else self.detail

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, type={self.type!r}, "
            f"title={self.title!r}, detail={self.detail!r})"
        )


class ConfigurationError(IdentityError):
    """The client lacks its base URL or write key, or a setting is invalid (a base URL
    that is not http(s) or holds user info, a query or a fragment; a write key with a ':'
    or what is not printable ASCII; a negative or non-finite backoff or timeout, a timeout
    of 0, a negative ``max_retries``): raised when the client is made, before any
    request. Also a
    middleware's cookie setting a Set-Cookie cannot hold as given (a ``cookie_domain``
    that is not a domain name, a ``cookie_name`` that is not a token, a ``cookie_path``
    with a ';', a ``cookie_max_age`` that is not 1 to 400 days...), when the middleware is
    made. And an ``AsyncIdentityClient`` used from an event loop other than the one its
    connections belong to, while that one is open (one client per event loop)."""


class IdentityConnectionError(IdentityError, ConnectionError):
    """The service could not be reached, or its answer was lost (timeout, reset...).

    Also a builtin ``ConnectionError``."""


class APIError(IdentityError):
    """A problem answer of a type this client does not know (or a non-problem error)."""


class InvalidRequest(APIError):
    """``validation-failed`` or ``malformed-json`` (400); ``errors`` lists the field errors."""

    def __init__(self, detail: str, *, errors: list[FieldError] | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.errors: list[FieldError] = errors or []


class Unauthorized(APIError):
    """``unauthorized`` (401): no, malformed or unknown write key."""


class DestinationNotAllowed(APIError):
    """``destination-not-allowed`` (403): the destination's origin is not the source's."""


class AudienceMismatch(APIError):
    """``audience-mismatch`` (403): the handoff is not for this source. The token is used up."""


class TokenNotFound(APIError):
    """``token-not-found`` (404): unknown, expired or already used token."""


class PayloadTooLarge(APIError):
    """``payload-too-large`` (413): the body is over the service's limit."""


class EventTooLarge(PayloadTooLarge):
    """``event-too-large`` (413): an event would be over 32 KB as sent."""


class UnsupportedMediaType(APIError):
    """``unsupported-media-type`` (415)."""


class RateLimited(APIError):
    """``rate-limited`` (429); ``retry_after`` in seconds when the service sent it."""

    def __init__(self, detail: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retry_after = retry_after


class ServiceUnavailable(APIError):
    """``service-unavailable`` (503): the store is down; ``retry_after`` in seconds."""

    def __init__(self, detail: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retry_after = retry_after


PROBLEM_CLASSES: dict[str, type[APIError]] = {
    "validation-failed": InvalidRequest,
    "malformed-json": InvalidRequest,
    "unauthorized": Unauthorized,
    "destination-not-allowed": DestinationNotAllowed,
    "audience-mismatch": AudienceMismatch,
    "token-not-found": TokenNotFound,
    "payload-too-large": PayloadTooLarge,
    "event-too-large": EventTooLarge,
    "unsupported-media-type": UnsupportedMediaType,
    "rate-limited": RateLimited,
    "service-unavailable": ServiceUnavailable,
}

STATUS_CLASSES: dict[int, type[APIError]] = {
    401: Unauthorized,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    503: ServiceUnavailable,
}
