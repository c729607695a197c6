"""The README's ten-line Python integration, run as written against the real service.

The snippets are read from README.md (and must be the same in docs/sdk.md); only the
destination's host is swapped for this test's loopback site, since the development source
hands off to localhost only. docs/sdk.md's FastAPI middleware sample runs as written too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DEV_WRITE_KEY, Service
from identity_client import IdentityClient, read_anonymous_id
from servers import serving_asgi, serving_wsgi

ROOT = Path(__file__).resolve().parents[3]
SNIPPET = re.compile(r"<!-- ten-lines: ([a-z-]+) -->\n```[a-z]+\n(.*?)```", re.DOTALL)


def snippets(path: Path) -> dict[str, str]:
    return dict(SNIPPET.findall(path.read_text()))


def run(code: str) -> Any:
    """Execute a snippet as a module would and return its ``app``."""
    namespace: dict[str, Any] = {"__name__": "snippet"}
    exec(compile(code, "<README snippet>", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["app"]


def test_the_snippets_are_about_ten_lines_and_the_same_in_docs() -> None:
    readme = snippets(ROOT / "README.md")
    assert set(readme) == {"python-domain-a", "python-domain-b", "node-domain-a", "node-domain-b"}
    for name, code in readme.items():
        lines = [line for line in code.splitlines() if line.strip()]
        assert len(lines) <= 15, name  # imports included
    sdk = snippets(ROOT / "docs" / "sdk.md")
    assert {name: readme[name] for name in sdk} == sdk
    assert set(sdk) == set(readme)
    node = snippets(ROOT / "docs" / "sdk-node.md")
    assert {name: readme[name] for name in node} == node
    assert set(node) == {"node-domain-a", "node-domain-b"}


@pytest.fixture
def environment(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_URL", service.url)
    monkeypatch.setenv("IDENTITY_WRITE_KEY", DEV_WRITE_KEY)


@pytest.fixture
def domain_b(environment: None) -> Iterator[str]:
    with serving_wsgi(run(snippets(ROOT / "README.md")["python-domain-b"])) as url:
        yield url


# analytics.js 2.0 writes the id as is; analytics.js classic writes JSON.stringify(id),
# percent-encoded: %22<id>%22. Either way domain B must get the bare id.
@pytest.mark.parametrize("stored", ["readme-visitor", "%22readme-visitor%22"])
def test_the_python_snippets_hand_the_visitor_over(domain_b: str, stored: str) -> None:
    code = snippets(ROOT / "README.md")["python-domain-a"]
    code = code.replace("https://checkout.example-pay.com", domain_b)
    with serving_wsgi(run(code)) as domain_a, httpx.Client(timeout=10) as browser:
        browser.cookies.set("ajs_anonymous_id", stored)
        go = browser.post(f"{domain_a}/checkout")
        assert go.status_code == 303
        landing = browser.get(go.headers["location"])
        assert landing.status_code == 303
        assert landing.headers["location"] == "/cart"
        set_cookie = landing.headers.get_list("set-cookie")[0]
        assert set_cookie.startswith("ajs_anonymous_id=readme-visitor;")
        assert "Secure" in set_cookie
        # httpx keeps a Secure cookie from plain http: send it as a browser on https would.
        page = httpx.get(f"{domain_b}/cart", headers={"Cookie": "ajs_anonymous_id=readme-visitor"})
        assert page.text == "hello readme-visitor"
        assert httpx.get(f"{domain_b}/cart").text == "hello new visitor"


def test_read_anonymous_id_accepts_every_form_analytics_js_writes() -> None:
    for value in ("abc-1", '"abc-1"', "%22abc-1%22", " %22abc-1%22 "):
        assert read_anonymous_id(value) == "abc-1", value
    for empty in (None, "", "%22%22", '""'):
        assert read_anonymous_id(empty) is None, empty


def test_the_python_domain_a_snippet_still_sends_a_visitor_without_a_cookie(
    domain_b: str,
) -> None:
    """No ajs_anonymous_id on domain A (analytics.js blocked, cookies cleared): the service
    refuses the prepare, and the checkout must still go on, undecorated, not fail."""
    code = snippets(ROOT / "README.md")["python-domain-a"]
    code = code.replace("https://checkout.example-pay.com", domain_b)
    with serving_wsgi(run(code)) as domain_a, httpx.Client(timeout=10) as browser:
        go = browser.post(f"{domain_a}/checkout")
        assert go.status_code == 303
        assert go.headers["location"] == f"{domain_b}/cart"


def test_the_fastapi_middleware_sample_of_the_sdk_docs_lands_the_visitor(
    service: Service, environment: None
) -> None:
    """docs/sdk.md's FastAPI sample (its settings: the cookie's domain, the event) lands a
    handed-off visitor: 303 to the clean URL with the visitor cookie on that domain."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "sdk.md").read_text(), re.DOTALL)
    (code,) = [block for block in blocks if block.startswith("from fastapi import")]
    app = run(code)
    with serving_asgi(service.url, lambda _: app) as domain_b, IdentityClient() as identity:
        handoff = identity.prepare(anonymous_id="docs-visitor", destination=f"{domain_b}/cart")
        landing = httpx.get(handoff.redirect_url)
    assert landing.status_code == 303 and landing.headers["location"] == "/cart"
    set_cookie = landing.headers.get_list("set-cookie")[0]
    assert set_cookie.startswith("ajs_anonymous_id=docs-visitor;")
    assert "Domain=.example-pay.com" in set_cookie
