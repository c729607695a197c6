"""``GET /v1/identity.js``: the browser helper as served (type, caching, ETag, 304, HEAD, 405).

The script's behaviour in a browser is tested in tests/test_checkout_browser.py; here it is
also checked for syntax with ``node --check`` (skipped without node, except in CI).
"""

import hashlib
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import pytest

from identity_service.app import create_app
from identity_service.browser_helper import helper_script, script_of
from tests.conftest import AppClient, FrontTestServer, make_settings
from tests.tools import missing_tool

PATH = "/v1/identity.js"
SOURCE = resources.files("identity_service").joinpath("static/identity.js").read_bytes()
# The script's version: the first 12 hex digits of the file's SHA-256, written where the
# file names it.
VERSION = hashlib.sha256(SOURCE).hexdigest()[:12]
SERVED = SOURCE.replace(b"__IDENTITY_JS_VERSION__", VERSION.encode())


@pytest.fixture
async def service(aiohttp_client: Callable[..., Awaitable[AppClient]]) -> AppClient:
    return await aiohttp_client(FrontTestServer(create_app(make_settings())))


async def test_the_script_is_served_cacheable_with_a_strong_etag(service: AppClient) -> None:
    response = await service.get(PATH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    etag = response.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{12}-[0-9a-f]{32}"', etag), etag  # strong: no W/
    assert await response.read() == SERVED
    # The version the page asks for is only a cache key: the same script, the same tag.
    again = await service.get(PATH, params={"v": "0.0.0"})
    assert again.headers["ETag"] == etag
    assert await again.read() == SERVED


def test_the_version_is_a_digest_of_the_script() -> None:
    """It was 1.0.0 whatever the script held: after an upgrade that changed the script,
    pages kept the URL of their ?v=1.0.0, and caches the old script for their max-age."""
    assert helper_script().version == VERSION


def test_the_tag_carries_the_version_the_script_announces() -> None:
    script = helper_script()
    assert f'var VERSION = "{script.version}";'.encode() in script.body
    assert f"identity.js {script.version}:".encode() in script.body  # its first line too
    assert f'/v1/identity.js?v={script.version}"'.encode() in script.body  # and its usage
    assert b"__IDENTITY_JS_VERSION__" not in script.body
    assert script.etag.startswith(f"{script.version}-")


def test_the_tag_is_the_files_one_digest() -> None:
    """The version and the tag come from one SHA-256 of the file: the served bytes (the
    file with its version written in) were hashed a second time for the tag, which told
    nothing more, since they follow from the file."""
    digest = hashlib.sha256(SOURCE).hexdigest()
    assert helper_script().etag == f"{digest[:12]}-{digest[12:44]}"


def test_any_change_to_the_script_is_a_new_version_and_a_new_tag() -> None:
    script = helper_script()
    for changed in (
        SOURCE.replace(b"ES5 plus fetch.", b"ES5 plus fetch!"),  # a comment only
        SOURCE.replace(b"timeout: 5000", b"timeout: 6000"),
        SOURCE + b"\n",
    ):
        assert changed != SOURCE
        other = script_of(changed)
        assert other.version != script.version and other.etag != script.etag
        assert f'var VERSION = "{other.version}";'.encode() in other.body
    assert script_of(SOURCE) == script  # the same script, the same version and tag
    with pytest.raises(RuntimeError, match="names no VERSION"):
        script_of(SOURCE.replace(b"__IDENTITY_JS_VERSION__", b"1.0.0"))


@pytest.mark.parametrize(
    "if_none_match",
    [
        "{tag}",
        "W/{tag}",  # If-None-Match compares weakly
        '"other", {tag}',
        "*",
    ],
)
async def test_if_none_match_with_the_current_tag_answers_304(
    service: AppClient, if_none_match: str
) -> None:
    tag = (await service.get(PATH)).headers["ETag"]
    response = await service.get(PATH, headers={"If-None-Match": if_none_match.format(tag=tag)})
    assert response.status == 304
    assert response.headers["ETag"] == tag
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    assert await response.read() == b""


@pytest.mark.parametrize(
    "if_none_match", ['"1.0.0-stale"', f'"{VERSION}-stale"', "not a tag", 'W/"x", "y"']
)
async def test_another_tag_gets_the_script(service: AppClient, if_none_match: str) -> None:
    response = await service.get(PATH, headers={"If-None-Match": if_none_match})
    assert response.status == 200
    assert await response.read() == SERVED


async def test_head_sends_the_headers_without_the_body(service: AppClient) -> None:
    get = await service.get(PATH)
    head = await service.head(PATH)
    assert head.status == 200
    for name in ("Content-Type", "Content-Length", "ETag", "Cache-Control"):
        assert head.headers[name] == get.headers[name]
    assert int(head.headers["Content-Length"]) == len(SERVED)
    assert await head.read() == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_other_methods_answer_a_problem(service: AppClient, method: str) -> None:
    response = await service.request(method, PATH, data=b"alert(1)")
    assert response.status == 405
    assert response.headers["Content-Type"] == "application/problem+json"
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD"}
    body = await response.json(content_type=None)
    assert body["type"] == "urn:identity-service:problem:method-not-allowed"
    assert "alert" not in await response.text()


def test_the_script_is_valid_javascript(tmp_path: Path) -> None:
    """The file, and the script served (its version written in)."""
    node = shutil.which("node")
    if node is None:
        missing_tool("node is missing", ".ci/run installs nodejs")
    served = tmp_path / "identity.js"
    served.write_bytes(helper_script().body)
    path = resources.files("identity_service").joinpath("static/identity.js")
    with resources.as_file(path) as file:
        for script in (file, served):
            checked = subprocess.run(
                [node, "--check", str(script)], capture_output=True, text=True, check=False
            )
            assert checked.returncode == 0, checked.stderr
