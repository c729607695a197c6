"""``GET /v1/identity.js``: the browser helper (static/identity.js), cacheable and revalidated.

The script is read from the package once, at start. Its version is a digest of the file
(:func:`script_of`), written where the file names it, so any change to the script is a new
version: a new ``?v=`` URL for the pages that name it, and a new strong ETag (the version
and the next 32 hex digits of the same digest: the bytes served follow from the file, so
one digest, computed once at start, names both). Answers are public and cached for an hour;
``If-None-Match`` with the current tag (or ``*``) answers 304. HEAD is routed with GET by
aiohttp and sends the same headers without the body. A ``?v=`` query (the version the page
expects) is ignored: it only makes a new version a new URL for caches.
"""

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

CONTENT_TYPE = "text/javascript; charset=utf-8"
CACHE_CONTROL = "public, max-age=3600"
# Where static/identity.js names its version (its first line, its usage comment, VERSION).
VERSION_TOKEN = b"__IDENTITY_JS_VERSION__"
VERSION_DIGITS = 12  # hex digits of the SHA-256 of the file: 48 bits
TAG_DIGITS = 32  # the ETag's further hex digits of that digest: 128 bits


@dataclass(frozen=True, slots=True)
class Script:
    body: bytes
    etag: str  # the tag's value, without quotes
    version: str


@functools.cache
def helper_script() -> Script:
    """The packaged static/identity.js, as served."""
    source = resources.files("identity_service").joinpath("static/identity.js").read_bytes()
    return script_of(source)


def script_of(source: bytes) -> Script:
    """The script served for the file ``source``: its version, the first VERSION_DIGITS hex
    digits of the file's SHA-256, in place of each VERSION_TOKEN."""
    if b'var VERSION = "' + VERSION_TOKEN + b'";' not in source:
        raise RuntimeError("static/identity.js names no VERSION")
    digest = hashlib.sha256(source).hexdigest()
    version = digest[:VERSION_DIGITS]
    body = source.replace(VERSION_TOKEN, version.encode())
    # The body follows from the file: the tag is more of the same digest, not a second one.
    tag = f"{version}-{digest[VERSION_DIGITS : VERSION_DIGITS + TAG_DIGITS]}"
    return Script(body, tag, version)


async def load_helper_script(_app: web.Application) -> None:
    """At start: the script and its tag are ready before the first request (and a package
    missing its data file fails here, not on a visitor's page)."""
    helper_script()


async def identity_js(request: web.Request) -> web.Response:
    script = helper_script()
    headers = {
        "ETag": f'"{script.etag}"',
        "Cache-Control": CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
    }
    # RFC 9110 13.1.2: If-None-Match compares weakly, so W/"tag" matches too.
    if any(tag.value in (script.etag, "*") for tag in request.if_none_match or ()):
        return web.Response(status=304, headers=headers)
    return web.Response(body=script.body, headers={**headers, "Content-Type": CONTENT_TYPE})
