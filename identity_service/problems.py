"""The service's errors, each one an RFC 9457 problem type.

Handlers and the store raise these; one middleware renders them as
``application/problem+json``. A problem's ``type`` is a stable URN; docs/api.md lists them.
"""

from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:identity-service:problem:"


class Problem(Exception):
    """Base of every error the service answers with; subclasses set the class variables."""

    status: int = 500
    slug: str = "internal-error"
    title: str = "Internal error"

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug

    def headers(self) -> dict[str, str]:
        """Extra response headers this problem requires."""
        return {}

    def body(self, instance: str | None) -> dict[str, Any]:
        """The problem document; ``instance`` is left out for requests that cannot be read."""
        document = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extensions,
        }
        if instance is not None:
            document["instance"] = instance
        return document


class MalformedJson(Problem):
    status = 400
    slug = "malformed-json"
    title = "Request body is not valid JSON"


class ValidationFailed(Problem):
    status = 400
    slug = "validation-failed"
    title = "Request body failed validation"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(detail, errors=errors)


class Unauthorized(Problem):
    status = 401
    slug = "unauthorized"
    title = "Missing or invalid credentials"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="identity-service", charset="UTF-8"'}


class DestinationNotAllowed(Problem):
    status = 403
    slug = "destination-not-allowed"
    title = "Destination origin is not allowed for this source"


class AudienceMismatch(Problem):
    status = 403
    slug = "audience-mismatch"
    title = "Handoff was prepared for an origin this source may not receive"


class NotFound(Problem):
    status = 404
    slug = "not-found"
    title = "No such resource"


class TokenNotFound(Problem):
    status = 404
    slug = "token-not-found"
    title = "Handoff token is unknown, expired or already used"


class MethodNotAllowed(Problem):
    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"

    def __init__(self, detail: str, allowed: list[str]) -> None:
        super().__init__(detail)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class PayloadTooLarge(Problem):
    status = 413
    slug = "payload-too-large"
    title = "Request body is too large"


class OversizedEvent(Problem):
    status = 413
    slug = "event-too-large"
    title = "An event of this handoff would be too large to deliver"


class UnsupportedMediaType(Problem):
    status = 415
    slug = "unsupported-media-type"
    title = "Request body must be application/json"

    def headers(self) -> dict[str, str]:
        return {"Accept-Post": ACCEPTED_BODY_TYPE}


class UnsupportedHitType(UnsupportedMediaType):
    """An AMP collect hit whose body is neither a form nor JSON: its answer names the types
    collect reads (amp-analytics' beacon sends JSON as text/plain)."""

    title = "A hit's body must be a form or JSON"

    def headers(self) -> dict[str, str]:
        return {"Accept-Post": HIT_BODY_TYPES}


# What a 415 names as taken (openapi.py and amp/openapi.py state them from here): a hit's
# and a handoff body's media types, a body's content codings.
HIT_BODY_TYPES = "application/x-www-form-urlencoded, application/json, text/plain"
ACCEPTED_BODY_TYPE = "application/json"
ACCEPTED_CONTENT_CODINGS = "gzip, deflate"


class RetryLater(Problem):
    """A problem whose request may succeed if sent again after ``retry_after`` seconds."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(RetryLater):
    status = 503
    slug = "service-unavailable"
    title = "A dependency of the service is unavailable"


class HttpError(Problem):
    """An HTTP error raised by aiohttp itself that has no problem type of its own."""

    slug = "http-error"

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.title = reason


class StoreUnavailable(Exception):
    """Raised by a store when its backend cannot be reached or answers too slowly.

    The middleware turns it into :class:`ServiceUnavailable` with the configured Retry-After.
    """


class MalformedRequest(Problem):
    """A request that is not valid HTTP/1.1; the detail names the rule, never the bytes."""

    status = 400
    slug = "malformed-request"
    title = "Request is not valid HTTP/1.1"


class RequestTimeout(Problem):
    status = 408
    slug = "request-timeout"
    title = "Request did not arrive in time"


class ExpectationFailed(Problem):
    status = 417
    slug = "expectation-failed"
    title = "Expectation cannot be met"


class UnsupportedContentEncoding(Problem):
    status = 415
    slug = "unsupported-content-encoding"
    title = "Request body's content coding is not supported"

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": ACCEPTED_CONTENT_CODINGS}


class TransferCodingNotImplemented(Problem):
    """A transfer coding before ``chunked`` (RFC 9112, 6.1: 501 for one not understood)."""

    status = 501
    slug = "transfer-coding-not-implemented"
    title = "Request's transfer coding is not implemented"


class HeadTooLarge(Problem):
    status = 431
    slug = "request-header-fields-too-large"
    title = "Request head is too large"


class AmpOriginNotAllowed(Problem):
    """An AMP request from an origin that is neither the publisher's nor its cache form."""

    status = 403
    slug = "amp-origin-not-allowed"
    title = "Origin is not the publisher's or one of its AMP cache origins"


class UnknownAction(Problem):
    status = 404
    slug = "unknown-action"
    title = "No such AMP action"


class RateLimited(RetryLater):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"


# What an AMP action's 415 names as taken.
FORM_BODY_TYPES = "multipart/form-data, application/x-www-form-urlencoded, application/json"


class MalformedForm(Problem):
    """An AMP action's form that cannot be read."""

    status = 400
    slug = "malformed-form"
    title = "Form submission cannot be read"


class UnsupportedFormType(Problem):
    status = 415
    slug = "unsupported-form-type"
    title = "Form must be multipart/form-data, application/x-www-form-urlencoded or JSON"

    def headers(self) -> dict[str, str]:
        return {"Accept-Post": FORM_BODY_TYPES}


class ActionInProgress(RetryLater):
    """An origin hop's landing while another landing of the hop holds its lease (its webhook
    call in flight) past the time this one waited for it: try again after ``retry_after``."""

    status = 503
    slug = "action-in-progress"
    title = "Another landing of this action is being applied"


class ActionNotApplied(Problem):
    """An AMP action's webhook refused the action (or it could not be queued for a retry)."""

    status = 502
    slug = "action-not-applied"
    title = "The action could not be applied"
