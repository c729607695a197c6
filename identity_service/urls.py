"""URLs read the way browsers read them: destinations, configured origins, the token parameter.

A browser follows ``redirectUrl`` with a WHATWG URL parser (ada-url here); servers and
this service's neighbours read URLs with RFC 3986 parsers such as ``urllib.parse``. The
two disagree on backslashes, percent-escapes in hosts, control characters, tabs and
newlines, so a URL is accepted only when it leaves nothing to disagree on: printable
ASCII without spaces, http or https, a plain host name, no user information, and the same
scheme, host and port under both readings, of the text given and of what is stored. What
is stored and answered is the WHATWG serialization (``href``): exactly what the browser
will request.
"""

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote, unquote_plus, urlsplit

from ada_url import HostType, idna_to_ascii, idna_to_unicode

# ada's own C binding, the one its Python adapter (ada_url.parse_url) calls: read through
# it directly, a URL costs one parse and a handful of calls instead of the adapter's
# lookup, decoding and dict for each part (a sixth of a prepare's CPU before).
from ada_url._ada_wrapper import ffi as _ada_ffi  # type: ignore[import-not-found]
from ada_url._ada_wrapper import lib as _ada_lib

from identity_service.constants import MAX_URL_LENGTH

_DEFAULT_PORTS = {"http": 80, "https": 443}
# What ada's components hold for a part the URL does not have.
_OMITTED = 0xFFFFFFFF
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")  # its length: fits_dns's
# DNS's limits (RFC 1035, 2.3.4): 255 octets on the wire are 253 characters written out.
_MAX_HOST_LENGTH = 253
_MAX_LABEL_LENGTH = 63
_QUERY_SEPARATORS = re.compile(r"[&;]")
# %25 escapes peel off one level per pass: three passes outdo any server's double decoding.
_NAME_DECODING_PASSES = 3


class UrlError(ValueError):
    """A URL or origin that the service does not accept; the message says why."""


class _WhatwgParts(NamedTuple):
    """What read_url needs of a WHATWG parse: the parts ada's ``parse_url`` would give."""

    href: str
    scheme: str  # without the ":"
    hostname: str
    port: int | None  # None when the URL names no port
    query: str  # the search without its "?"
    has_credentials: bool
    host_type: int  # a HostType


@dataclass(frozen=True, slots=True)
class WebUrl:
    """An absolute http(s) URL that browsers and servers read alike."""

    href: str
    scheme: str
    host: str
    port: int | None  # None for the scheme's default port
    query: str  # without the "?"

    @property
    def origin(self) -> str:
        """The serialized origin: ``scheme://host[:port]``, default ports left out."""
        if self.port is None:
            return f"{self.scheme}://{self.host}"
        return f"{self.scheme}://{self.host}:{self.port}"


def host_port(host: str, port: int) -> str:
    """``host:port`` as URLs and Redis's tools write it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# What a host name past those limits is told, wherever one is read (settings, [amp]): no
# connection to it, nor bind, could succeed (Python's resolver and aiohttp's IDNA encoding
# raise UnicodeError before asking DNS about a long or empty label).
DNS_PROBLEM = "at most 253 characters, each label (between dots) 1 to 63, as DNS allows"


def fits_dns(host: str) -> bool:
    """Whether ``host`` is within DNS's limits: at most 253 characters (a final dot aside),
    each label 1 to 63. Lengths only: an IP address fits, and a name that does not could
    never be resolved (its URL would fail at every connection)."""
    name = host[:-1] if host.endswith(".") else host
    return len(name) <= _MAX_HOST_LENGTH and all(
        0 < len(label) <= _MAX_LABEL_LENGTH for label in name.split(".")
    )


def is_localhost(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def read_url(text: str) -> WebUrl:
    """Read an absolute http(s) URL that browsers and servers agree on, or raise UrlError."""
    # Browsers drop tabs and newlines, trim spaces and control characters, and encode the
    # rest; anything they would rewrite is refused rather than guessed at.
    if not (text.isascii() and text.isprintable()) or " " in text:
        raise UrlError(
            "must be printable ASCII without spaces: percent-encode other characters and "
            "write international host names in their xn-- form"
        )
    parts = _whatwg_parts(text)
    if parts is None:
        raise UrlError("is not a valid URL")
    scheme = parts.scheme
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise UrlError("must be an absolute http or https URL")
    if parts.has_credentials:
        raise UrlError("must not carry user information")
    if parts.host_type != HostType.DEFAULT or not _is_host_name(parts.hostname):
        raise UrlError(
            "must name its host with letters, digits and hyphens (international names in "
            "valid xn-- form), not an IP address"
        )
    port = parts.port
    if port == 0:
        raise UrlError("must not use port 0")
    url = WebUrl(parts.href, scheme, parts.hostname, port, parts.query)
    expected = (scheme, url.host, _DEFAULT_PORTS[scheme] if port is None else port)
    for reading in (text, url.href) if url.href != text else (text,):
        if _server_reading(reading) != expected:
            raise UrlError(
                "is read with a different host by browsers and servers: look for a "
                "backslash, '@', '%' or a missing '//' before the path"
            )
    return url


def parse_destination(
    text: str, *, token_param: str | None, max_length: int = MAX_URL_LENGTH
) -> WebUrl:
    """A prepare's destination: https (http only for localhost), without ``token_param``."""
    return _read_destination(text, token_param, max_length)


# A site hands its visitors to a few checkout and sign-in URLs, and reading one costs about
# 20 µs (two parsers and the query's names): kept for the destinations read last. One read
# for the first time pays that; a refused one is read again each time (UrlError is raised,
# not kept). A flood of distinct URLs only churns it: at most 256 of them, a few KB each.
@functools.lru_cache(maxsize=256)
def _read_destination(text: str, token_param: str | None, max_length: int) -> WebUrl:
    url = read_url(text)
    _check_scheme(url)
    if token_param is not None and query_names_param(url.query, token_param):
        raise UrlError(
            f"must not carry the {token_param!r} query parameter, in any spelling: the "
            "service adds it"
        )
    if len(url.href) > max_length:
        raise UrlError(f"must be at most {max_length} characters once encoded")
    return url


def parse_origin(text: str) -> str:
    """Normalise a configured origin such as ``https://checkout.example.com``."""
    if "*" in text:
        raise UrlError("wildcards are not allowed; list each origin")
    url = read_url(text)
    _check_scheme(url)
    if "?" in text or "#" in text or urlsplit(text).path not in ("", "/"):
        raise UrlError("must be an origin (scheme, host and port) without a path")
    return url.origin


def is_localhost_origin(origin: str) -> bool:
    """Whether ``origin`` is the serialized origin of an http(s) localhost or *.localhost URL."""
    try:
        url = read_url(origin)
    except UrlError:
        return False
    return is_localhost(url.host) and url.origin == origin


def query_names_param(query: str, name: str) -> bool:
    """Whether some server could read a parameter of ``query`` as ``name``.

    The query is split on ``&`` and on ``;`` (older Python, Go before 1.17, some Java
    servers), and each parameter name is compared loosely: ``+`` and percent-escapes
    decoded (repeatedly, for double encoding), cut at a NUL, surrounding whitespace
    trimmed, leading ``?`` dropped (URLSearchParams), case ignored (ASP.NET), ``.`` and
    spaces read as ``_`` and ``name[...]`` read as ``name`` or ``name_...`` (PHP). Names
    that merely contain ``name`` are kept. The whole query is read so once decoded too
    (repeatedly): a reader that decodes it before splitting it takes an escaped ``&``,
    ``;`` or ``=`` for a separator.
    """
    wanted = _loose_names(name)
    for _ in range(_NAME_DECODING_PASSES + 1):
        if not query:
            return False
        if any(
            not wanted.isdisjoint(_loose_names(part.partition("=")[0]))
            for part in _QUERY_SEPARATORS.split(query)
        ):
            return True
        decoded = unquote(query)
        if decoded == query:
            return False
        query = decoded
    return False


def with_query_param(href: str, name: str, value: str) -> str:
    """``href`` (a WHATWG serialization) with ``name=value`` last in its query."""
    # In a serialized URL the first "#" starts the fragment and the first "?" the query.
    base, sharp, fragment = href.partition("#")
    _, question, query = base.partition("?")
    if not question:
        base += "?"
    elif query and not query.endswith("&"):
        base += "&"  # even after a "?" that ends a query: there it is the pair's own text
    return f"{base}{quote(name, safe='')}={quote(value, safe='')}{sharp}{fragment}"


def _whatwg_parts(text: str) -> _WhatwgParts | None:
    """``text`` as the WHATWG URL parser (ada) reads it, or None when it is no URL."""
    encoded = text.encode()
    url = _ada_lib.ada_parse(encoded, len(encoded))
    try:
        if not _ada_lib.ada_is_valid(url):
            return None
        href = _ada_text(_ada_lib.ada_get_href(url))
        # Offsets into href (ada's url_aggregator): the scheme ends at protocol_end, with
        # its ":"; the search runs from search_start (its "?") to the hash or the end.
        components = _ada_lib.ada_get_components(url)
        search_start, hash_start = components.search_start, components.hash_start
        query_end = len(href) if hash_start == _OMITTED else hash_start
        return _WhatwgParts(
            href=href,
            scheme=href[: components.protocol_end - 1],
            hostname=_ada_text(_ada_lib.ada_get_hostname(url)),
            port=None if components.port == _OMITTED else components.port,
            query="" if search_start == _OMITTED else href[search_start + 1 : query_end],
            has_credentials=bool(_ada_lib.ada_has_credentials(url)),
            host_type=_ada_lib.ada_get_host_type(url),
        )
    finally:
        _ada_lib.ada_free(url)


def _ada_text(string: object) -> str:
    """An ``ada_string`` (a view into the parsed URL) as a str, copied out."""
    data, length = string.data, string.length  # type: ignore[attr-defined]
    return _ada_ffi.buffer(data, length)[:].decode() if length else ""


def _check_scheme(url: WebUrl) -> None:
    if url.scheme != "https" and not is_localhost(url.host):
        raise UrlError("must use https (http is allowed only for localhost)")


@functools.lru_cache(maxsize=256)  # destinations name few hosts; a flood only churns it
def _is_host_name(host: str) -> bool:
    if not fits_dns(host):  # a final dot fits DNS, and fails the labels below
        return False
    for label in host.split("."):
        if not _HOST_LABEL.fullmatch(label):
            return False
        # A punycode label must decode, and encode back to itself.
        if label.startswith("xn--"):
            decoded = idna_to_unicode(label)
            if decoded == label or idna_to_ascii(decoded) != label.encode():
                return False
    return True


def _server_reading(text: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port as an RFC 3986 parser (``urllib.parse``) reads ``text``."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return "", None, None
    if parts.username is not None:
        return "", None, None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, _DEFAULT_PORTS.get(scheme) if port is None else port


@functools.lru_cache(maxsize=64)
def _loose_names(name: str) -> frozenset[str]:
    for _ in range(_NAME_DECODING_PASSES):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    # A leading "?" is dropped by URLSearchParams (a query given as "??name=…") and by lax
    # servers, so "?name" may be read as "name".
    name = name.partition("\x00")[0].strip().lstrip("?").strip().casefold()
    name = name.replace(".", "_").replace(" ", "_")
    return frozenset({name.partition("[")[0], name.replace("[", "_")})
