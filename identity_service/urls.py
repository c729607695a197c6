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
from urllib.parse import quote, unquote_plus, urlsplit

from ada_url import HostType, idna_to_ascii, idna_to_unicode, parse_url

from identity_service.constants import MAX_URL_LENGTH

_DEFAULT_PORTS = {"http": 80, "https": 443}
_URL_PARTS = ("href", "username", "password", "protocol", "port", "hostname", "search", "host_type")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_HOST_LENGTH = 253
_QUERY_SEPARATORS = re.compile(r"[&;]")
# %25 escapes peel off one level per pass: three passes outdo any server's double decoding.
_NAME_DECODING_PASSES = 3


class UrlError(ValueError):
    """A URL or origin that the service does not accept; the message says why."""


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


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    try:
        parts = parse_url(text, _URL_PARTS)
    except ValueError as exc:
        raise UrlError("is not a valid URL") from exc
    scheme = parts["protocol"].removesuffix(":")
    if scheme not in _DEFAULT_PORTS or not parts["hostname"]:
        raise UrlError("must be an absolute http or https URL")
    if parts["username"] or parts["password"]:
        raise UrlError("must not carry user information")
    if parts["host_type"] != HostType.DEFAULT or not _is_host_name(parts["hostname"]):
        raise UrlError(
            "must name its host with letters, digits and hyphens (international names in "
            "valid xn-- form), not an IP address"
        )
    port = int(parts["port"]) if parts["port"] else None
    if port == 0:
        raise UrlError("must not use port 0")
    url = WebUrl(parts["href"], scheme, parts["hostname"], port, parts["search"][1:])
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
    that merely contain ``name`` are kept.
    """
    if not query:
        return False
    wanted = _loose_names(name)
    return any(
        not wanted.isdisjoint(_loose_names(part.partition("=")[0]))
        for part in _QUERY_SEPARATORS.split(query)
    )


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


def _check_scheme(url: WebUrl) -> None:
    if url.scheme != "https" and not is_localhost(url.host):
        raise UrlError("must use https (http is allowed only for localhost)")


def _is_host_name(host: str) -> bool:
    if len(host) > _MAX_HOST_LENGTH:
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
