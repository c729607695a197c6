"""Sources (the sites' backends), their write keys and the origins they may use.

A source authenticates Segment-style: HTTP Basic with the write key as user name, or a
Bearer token. Write keys are kept only as SHA-256 digests and compared in constant time.
Origins are exact (scheme, host, port) and read as browsers read them (urls.py); https
only, except http on localhost for development.
"""

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from identity_service import urls
from identity_service.urls import parse_origin as parse_origin

WRITE_KEY_HASH_PREFIX = "sha256:"

# The name settings.py catches around parse_origin.
OriginError = urls.UrlError


def parse_destination(text: str) -> tuple[SplitResult, str]:
    """Read an absolute destination URL as browsers do: its serialization, split, and origin.

    Prepare uses ``urls.parse_destination``, which also refuses the token parameter.
    """
    url = urls.parse_destination(text, token_param=None)
    return urlsplit(url.href), url.origin


def hash_write_key(write_key: str) -> str:
    """The form in which a write key is configured: ``sha256:<hex>``."""
    return WRITE_KEY_HASH_PREFIX + hashlib.sha256(write_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Source:
    """A backend allowed to call the service.

    ``origins`` are the exact origins it may hand off to and receive at;
    ``allow_localhost`` admits any http(s) localhost or *.localhost origin (development).
    """

    name: str
    write_key_digest: bytes
    origins: frozenset[str] = field(default_factory=frozenset)
    allow_localhost: bool = False

    def may_use(self, origin: str) -> bool:
        return origin_allowed(origin, self.origins, self.allow_localhost)


def origin_allowed(origin: str, origins: Iterable[str], allow_localhost: bool) -> bool:
    if origin in origins:
        return True
    return allow_localhost and urls.is_localhost_origin(origin)


class SourceRegistry:
    """Finds the source that a request's Authorization header belongs to."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self._sources = tuple(sources)

    def __iter__(self) -> Iterator[Source]:
        return iter(self._sources)

    def authenticate(self, authorization: str | None) -> Source | None:
        write_key = write_key_from_header(authorization)
        if write_key is None:
            return None
        digest = hashlib.sha256(write_key.encode()).digest()
        found: Source | None = None
        # Every source is compared so the time taken does not depend on which one matched.
        for source in self._sources:
            if hmac.compare_digest(digest, source.write_key_digest):
                found = source
        return found


def can_be_sent(write_key: str) -> bool:
    """Whether a request can carry ``write_key`` so that :func:`write_key_from_header` reads
    it back: a header holds no control characters, only ASCII keys are read, and HTTP
    Basic ends the user name at a ':'."""
    return write_key.isascii() and write_key.isprintable() and ":" not in write_key


def write_key_from_header(authorization: str | None) -> str | None:
    """The write key in ``Basic base64(key:)`` or ``Bearer key``, or None.

    Write keys are ASCII (``hash-key`` refuses others): the HTTP front and aiohttp decode
    other header bytes differently, and no other key can match anyway.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    if scheme == "bearer":
        key = credentials
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        key = decoded.partition(":")[0]
    else:
        return None
    return key if key and key.isascii() else None
