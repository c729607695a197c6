"""docs/sdk.md's backend recipes for identity.js (the shop's ``handoff``, the landing site's
``exchange`` and their two helpers), run as written in a real aiohttp app against the real
service: they hand a visitor over, and bad input or a refused call gets a problem answer,
never a 500.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import Service
from identity_client import AsyncIdentityClient, IdentityError, read_anonymous_id
from servers import serving_aiohttp

ROOT = Path(__file__).resolve().parents[3]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
RECIPES = ("def problem(", "async def json_object(", "async def handoff(", "async def exchange(")
PROBLEM = "application/problem+json"


def recipes() -> str:
    blocks = BLOCK.findall((ROOT / "docs" / "sdk.md").read_text())
    found = [block for block in blocks if block.startswith(RECIPES)]
    assert len(found) == 3, found  # the helpers, handoff, exchange
    return "\n".join(found)


def site(client: AsyncIdentityClient) -> web.Application:
    namespace: dict[str, Any] = {
        "web": web,
        "Any": Any,
        "IdentityError": IdentityError,
        "read_anonymous_id": read_anonymous_id,
        "identity": client,
    }
    exec(compile(recipes(), "<docs/sdk.md>", "exec"), namespace)  # noqa: S102 - our own docs
    app = web.Application()
    app.router.add_post("/handoff", namespace["handoff"])
    app.router.add_post("/identity/exchange", namespace["exchange"])
    return app


@pytest.fixture
def url(service: Service) -> Any:
    with serving_aiohttp(service.url, site) as served:
        yield served


def test_the_recipes_hand_a_visitor_over(url: str) -> None:
    destination = f"{url}/cart"
    prepared = httpx.post(
        f"{url}/handoff",
        json={"destination": destination},
        cookies={"ajs_anonymous_id": "recipe-visitor"},
    )
    assert prepared.status_code == 200
    token = httpx.URL(prepared.json()["redirectUrl"]).params["handoff_token"]
    landed = httpx.post(f"{url}/identity/exchange", json={"token": token, "url": destination})
    assert landed.json() == {"anonymousId": "recipe-visitor", "source": "handoff"}


@pytest.mark.parametrize(
    ("path", "content", "content_type", "status"),
    [
        ("/identity/exchange", b'{"token": ', "application/json", 400),
        ("/identity/exchange", b"[]", "application/json", 400),
        ("/identity/exchange", b'{"url": "x"}', "application/json", 400),
        ("/identity/exchange", b'{"token": 5}', "application/json", 400),
        ("/identity/exchange", b"token=t", "application/x-www-form-urlencoded", 400),
        ("/handoff", b'{"destination": ', "application/json", 400),
        ("/handoff", b'{"destination": 5}', "application/json", 400),
        ("/handoff", b"destination=x", "application/x-www-form-urlencoded", 400),
        # no visitor id (no cookie, none posted)
        ("/handoff", b'{"destination": "http://localhost/cart"}', "application/json", 400),
        # a visitor id or token that is not UTF-8 (a lone surrogate escaped in the JSON)
        (
            "/handoff",
            b'{"destination": "http://localhost/cart", "anonymousId": "v\\ud800"}',
            "application/json",
            400,
        ),
        ("/identity/exchange", b'{"token": "t\\ud800abcdefghijklmnop"}', "application/json", 400),
        # a destination the service does not allow this source
        (
            "/handoff",
            b'{"destination": "https://evil.example/", "anonymousId": "v"}',
            "application/json",
            403,
        ),
    ],
)
def test_bad_input_gets_a_problem_not_a_500(
    url: str, path: str, content: bytes, content_type: str, status: int
) -> None:
    answer = httpx.post(f"{url}{path}", content=content, headers={"Content-Type": content_type})
    assert answer.status_code == status
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert answer.json()["status"] == status
