"""AMP cache origins: the cache subdomain of a publisher host, and a publisher's cache origins.

An AMP cache serves a publisher's page from ``https://<subdomain>.<cache domain>``, so a
credentialed request from the cached page arrives with that ``Origin``. This module derives
those origins from configuration (never from request data such as ``__amp_source_origin``).

:func:`cache_subdomain` is a port of ``createCurlsSubdomain`` from AMP's npm package
``@ampproject/toolbox-cache-url`` 2.10.1 (amp-toolbox ``packages/cache-url``), including the
``punycode`` 2.1.1 code that package bundles. ``tests/test_amp_caches.py`` runs the package
itself and compares the two. What the toolbox does, step by step:

1. The host is lower-cased (its URL parser lower-cases the host name; no IDNA mapping).
2. The hash form (step 5) is used if the host has ``--`` at positions 3-4 and does not start
   with ``xn``, is longer than 63 UTF-16 code units, has no ``.``, or mixes left-to-right and
   right-to-left characters (two fixed code-point ranges, tested on the host with its
   ``xn--`` labels decoded).
3. Otherwise ``xn--`` labels are decoded (punycode; the ideographic and full-width full stops,
   U+3002, U+FF0E and U+FF61, separate labels as ``.`` does), each ``-`` becomes ``--`` and
   then each dot becomes ``-``; the result is punycode-encoded again and lower-cased. If that
   is longer than 63 characters, the hash form is used.
4. A result with ``--`` at positions 3-4 that does not start with ``xn`` is wrapped as
   ``0-<result>-0``. The length check comes before the wrap, so a wrapped label can be up to
   67 characters long, over DNS's 63: the toolbox does so, and so does this port.
5. Hash form: the lower-case RFC 4648 base32 of the SHA-256 of the lower-cased host as given
   (its UTF-8 bytes, not its punycode form), padding removed: 52 characters.

The bundled punycode decoder is lenient in ways the standard library's is not (it reads
characters below ``0`` and some punctuation as digits, some of them negative), so decoding is
ported here line for line; encoding uses the standard library's ``punycode`` codec, which
implements the same RFC 3492 algorithm. The IDNA codecs (``encodings.idna``, the ``idna``
package) are not used: they map and validate labels (``ß`` to ``ss``, say), the toolbox
does not.

Case mapping is Python's ``str.lower`` and the toolbox's is JavaScript's ``toLowerCase``; the
two agree except on characters that Python's Unicode database does not know yet. Origins as
browsers send them are ASCII (punycode) and lower-case already, and :func:`cache_origins` only
takes those.
"""

import base64
import hashlib
import math
import re
from collections.abc import Iterable

# A pinned copy of the cache domains ("cacheDomain") in AMP's list of caches: caches.json in
# ampproject/amphtml (build-system/global-configs/caches.json), which amp-toolbox's cache-list
# package also reads. Google's and Bing's; Cloudflare's cache has been removed from it. A copy,
# not a live fetch: a new cache is a reviewed change, and callers can pass their own list.
DEFAULT_CACHES: tuple[str, ...] = ("cdn.ampproject.org", "www.bing-amp.com")

_MAX_LABEL = 63

# The toolbox's LTR_CHARS and RTL_CHARS. Its regular expressions test UTF-16 code units: a
# character outside the BMP is two surrogates, both in \u2c00-\ufb1c, so it counts as
# left-to-right (the last range of _HAS_LTR says so for Python's code points).
_HAS_LTR = re.compile(
    r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02b8\u0300-\u0590\u0800-\u1fff\u200e"
    r"\u2c00-\ufb1c\ufe00-\ufe6f\ufefd-\uffff\U00010000-\U0010ffff]"
)
_HAS_RTL = re.compile(r"[\u0591-\u06ef\u06fa-\u07ff\u200f\ufb1d-\ufdff\ufe70-\ufefc]")

# punycode.js: the RFC 3490 label separators, and what it calls non-ASCII (DEL included).
_SEPARATORS = re.compile(r"[.\u3002\uff0e\uff61]")
_NON_ASCII = re.compile(r"[^\x00-\x7e]")

# What cannot be in a URL's host: the WHATWG URL standard's forbidden domain code points
# (C0 controls, space, # % / : < > ? @ [ \ ] ^ |, DEL), and lone surrogates.
_FORBIDDEN = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f\ud800-\udfff]")

# A cache domain: lower-case LDH labels, two or more, no wildcard.
_CACHE_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+")

# punycode.js 2.1.1's Bootstring parameters (RFC 3492) and its overflow bound.
_BASE = 36
_T_MIN = 1
_T_MAX = 26
_SKEW = 38
_DAMP = 700
_INITIAL_BIAS = 72
_INITIAL_N = 128
_MAX_INT = 2**31 - 1


def cache_subdomain(host: str) -> str:
    """The AMP cache subdomain of a publisher host, as ``@ampproject/toolbox-cache-url`` has it.

    ``www.example.com`` gives ``www-example-com``, ``en-us.example.com`` gives
    ``0-en--us-example-com-0``, and a host with no dot gives the 52-character hash form.
    The host is a host name alone (no scheme, port or path), ASCII or Unicode, any case.

    Raises ``ValueError`` for an empty host, for one with a character that a URL's host
    cannot hold, and where the toolbox throws: an ``xn--`` label its punycode decoder refuses.
    """
    if not host or _FORBIDDEN.search(host):
        raise ValueError(f"not a host name: {host!r}")
    domain = host.lower()
    if _is_eligible_for_human_readable(domain):
        encoded = _human_readable(domain)
        if len(encoded) > _MAX_LABEL:
            return _hash_form(domain)
        if _has_invalid_hyphen34(encoded):
            encoded = f"0-{encoded}-0"
        return encoded
    return _hash_form(domain)


def cache_origins(publisher_origin: str, caches: Iterable[str]) -> frozenset[str]:
    """The origins ``https://<subdomain>.<cache>`` that serve ``publisher_origin``'s pages.

    ``publisher_origin`` is a normalised https origin, as a browser serialises it:
    ``https://`` and a lower-case ASCII host (punycode for an IDN), nothing else.

    Raises ``ValueError`` for anything else. An ``http://`` origin has no cache origins of its
    own: the cache subdomain depends on the host alone, so an http origin's cache origin
    would be its https twin's, and a cached page's requests must not be taken for one. An
    origin with a port is refused too: caches fetch from the default port and drop the port
    from the subdomain, so ``https://example.com:8443`` would share ``https://example.com``'s
    cache origins. Each cache is a domain such as ``cdn.ampproject.org`` (see
    :data:`DEFAULT_CACHES`); a pattern such as ``*.bing-amp.com`` is refused.
    """
    scheme, separator, host = publisher_origin.partition("://")
    if scheme != "https" or not separator:
        raise ValueError(
            f"not an https origin: {publisher_origin!r} (AMP caches serve https sources only)"
        )
    if ":" in host:
        raise ValueError(f"an origin with a port has no AMP cache origins: {publisher_origin!r}")
    if not host.isascii() or host != host.lower() or not host or _FORBIDDEN.search(host):
        raise ValueError(
            f"not a normalised origin (lower-case ASCII host, nothing after it): "
            f"{publisher_origin!r}"
        )
    if isinstance(caches, str):
        raise TypeError("caches is a collection of cache domains, not one string")
    subdomain = cache_subdomain(host)
    origins: set[str] = set()
    for cache in caches:
        if not _CACHE_DOMAIN.fullmatch(cache):
            raise ValueError(f"not an AMP cache domain: {cache!r}")
        origins.add(f"https://{subdomain}.{cache}")
    return frozenset(origins)


def _utf16_length(text: str) -> int:
    """``text.length`` in JavaScript: UTF-16 code units."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _has_invalid_hyphen34(text: str) -> bool:
    """The toolbox's ``hasInvalidHyphen34_``: ``--`` at UTF-16 code units 3-4, not ``xn``."""
    units = text.encode("utf-16-le", "surrogatepass")
    return units[4:8] == "--".encode("utf-16-le") and units[0:4] != "xn".encode("utf-16-le")


def _is_eligible_for_human_readable(domain: str) -> bool:
    """The toolbox's ``isEligibleForHumanReadableCacheEncoding_``, in its order."""
    if _has_invalid_hyphen34(domain):
        return False
    unicode = _to_unicode(domain)  # it decodes (and may throw) before the other checks
    return (
        _utf16_length(domain) <= _MAX_LABEL
        and not (_HAS_LTR.search(unicode) and _HAS_RTL.search(unicode))
        and "." in domain
    )


def _human_readable(domain: str) -> str:
    """The toolbox's ``constructHumanReadableCurlsCacheDomain_``."""
    unicode = _to_unicode(domain)
    return _to_ascii(unicode.replace("-", "--").replace(".", "-")).lower()


def _hash_form(domain: str) -> str:
    """The toolbox's ``constructFallbackCurlsCacheDomain_``: base32 of SHA-256, 52 characters."""
    digest = hashlib.sha256(domain.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def _to_unicode(domain: str) -> str:
    """punycode.js ``toUnicode`` for a host (a host has no ``@``, so no e-mail handling)."""
    return ".".join(
        _decode(label[4:].lower()) if label.startswith("xn--") else label
        for label in _SEPARATORS.split(domain)
    )


def _to_ascii(text: str) -> str:
    """punycode.js ``toASCII``: each label with a character above ``~`` becomes ``xn--...``."""
    return ".".join(
        "xn--" + _encode(label) if _NON_ASCII.search(label) else label
        for label in _SEPARATORS.split(text)
    )


def _encode(label: str) -> str:
    """punycode.js ``encode``: RFC 3492 over the label's code points.

    JavaScript strings are UTF-16, so a surrogate pair that decoding produced is one code
    point to punycode.js; the round trip through UTF-16 makes it one here too.
    """
    code_points = label.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return code_points.encode("punycode").decode("ascii")


def _basic_to_digit(code_point: int) -> int:
    """punycode.js 2.1.1 ``basicToDigit``, its quirks included.

    Its unsigned-looking comparisons are signed in JavaScript: a code point below ``0`` reads
    as ``code_point - 22`` and one in ``:`` to ``@`` or ``[`` to `````` as a negative digit.
    """
    if code_point - 0x30 < 0x0A:
        return code_point - 0x16
    if code_point - 0x41 < 0x1A:
        return code_point - 0x41
    if code_point - 0x61 < 0x1A:
        return code_point - 0x61
    return _BASE


def _adapt(delta: int, num_points: int, first_time: bool) -> float:
    """punycode.js ``adapt`` (RFC 3492 section 3.4) in JavaScript's double arithmetic.

    The bias can come out as ``-inf`` when a quirky digit made ``delta`` equal ``-38``.
    """
    k = 0
    delta = delta // _DAMP if first_time else _to_int32(delta) >> 1
    delta += delta // num_points
    while delta > ((_BASE - _T_MIN) * _T_MAX) >> 1:
        delta //= _BASE - _T_MIN
        k += _BASE
    if delta + _SKEW == 0:
        return -math.inf
    return float(math.floor(k + ((_BASE - _T_MIN + 1) * delta) / (delta + _SKEW)))


def _to_int32(value: int) -> int:
    """JavaScript's ToInt32, which its ``>>`` applies to its left operand."""
    return (value + 2**31) % 2**32 - 2**31


def _decode(encoded: str) -> str:
    """punycode.js 2.1.1 ``decode``, line for line; ``ValueError`` where it throws."""
    output: list[int] = []
    i = 0
    n = _INITIAL_N
    bias: float = _INITIAL_BIAS
    basic = max(encoded.rfind("-"), 0)
    for char in encoded[:basic]:
        if ord(char) >= 0x80:
            raise ValueError(f"invalid punycode {encoded!r}: not a basic code point")
        output.append(ord(char))
    index = basic + 1 if basic > 0 else 0
    while index < len(encoded):
        old_i = i
        w = 1
        k = _BASE
        while True:
            if index >= len(encoded):
                raise ValueError(f"invalid punycode {encoded!r}: invalid input")
            digit = _basic_to_digit(ord(encoded[index]))
            index += 1
            if digit >= _BASE or digit > (_MAX_INT - i) // w:
                raise ValueError(f"invalid punycode {encoded!r}: overflow")
            i += digit * w
            t = _T_MIN if k <= bias else _T_MAX if k >= bias + _T_MAX else int(k - bias)
            if digit < t:
                break
            if w > _MAX_INT // (_BASE - t):
                raise ValueError(f"invalid punycode {encoded!r}: overflow")
            w *= _BASE - t
            k += _BASE
        out = len(output) + 1
        bias = _adapt(i - old_i, out, old_i == 0)
        if i // out > _MAX_INT - n:
            raise ValueError(f"invalid punycode {encoded!r}: overflow")
        n += i // out
        i = abs(i) % out if i >= 0 else -(abs(i) % out)  # JavaScript's %: the dividend's sign
        output.insert(i, n)  # as Array.prototype.splice(i, 0, n), negative i included
        i += 1
    if any(not 0 <= code_point <= 0x10FFFF for code_point in output):
        raise ValueError(f"invalid punycode {encoded!r}: not a code point")
    return "".join(map(chr, output))
