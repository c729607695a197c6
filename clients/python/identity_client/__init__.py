"""Python client for identity-service handoffs: prepare on domain A, exchange on domain B."""

from identity_client._base import __version__
from identity_client._client import AsyncIdentityClient, IdentityClient
from identity_client.cookies import read_anonymous_id
from identity_client.errors import (
    APIError,
    AudienceMismatch,
    ConfigurationError,
    DestinationNotAllowed,
    EventTooLarge,
    FieldError,
    IdentityConnectionError,
    IdentityError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    TokenNotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from identity_client.models import Identity, PreparedHandoff

__all__ = [
    "APIError",
    "AsyncIdentityClient",
    "AudienceMismatch",
    "ConfigurationError",
    "DestinationNotAllowed",
    "EventTooLarge",
    "FieldError",
    "Identity",
    "IdentityClient",
    "IdentityConnectionError",
    "IdentityError",
    "InvalidRequest",
    "PayloadTooLarge",
    "PreparedHandoff",
    "RateLimited",
    "ServiceUnavailable",
    "TokenNotFound",
    "Unauthorized",
    "UnsupportedMediaType",
    "__version__",
    "read_anonymous_id",
]
