"""Destinations and origins read the way browsers read them (issue 10, defects 1-3).

A destination is accepted only when a WHATWG parser (what the visitor's browser runs; ada-url
here) and an RFC 3986 parser (what servers run) agree on its scheme, host and port, it
holds nothing a browser would strip or rewrite, and its query does not already name the
token parameter. The property tests check the promise behind that: whatever is accepted
yields a redirectUrl that a browser sends to an allowed origin, with exactly one token.
"""

import base64
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import pytest
from ada_url import URL, URLSearchParams
from ada_url import parse_url as ada_parse_url
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from identity_service.app import create_app
from identity_service.settings import load_settings
from identity_service.sources import Source, parse_origin
from identity_service.urls import (
    UrlError,
    _whatwg_parts,
    parse_destination,
    query_names_param,
    read_url,
    with_query_param,
)
from tests.conftest import (
    ORIGINS,
    SECRET,
    AppClient,
    ClientFactory,
    FrontTestServer,
    auth,
    prepare,
)
from tests.redis_server import RedisServer

TOKEN_PARAM = "handoff_token"
TOKEN = "T0k3n-_" + "a" * 36
DEV_KEY = "dev-write-key-for-destination-tests-7c2e"
DEV = Source(name="dev", write_key_digest=b"", allow_localhost=True)
SHOP = Source(name="shop", write_key_digest=b"", origins=frozenset(ORIGINS["shop"]))


def dev_auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{DEV_KEY}:".encode()).decode()}


@pytest.fixture
async def dev_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]], store_kind: str, redis_server: RedisServer
) -> AppClient:
    """A client of an app with only the development source (localhost destinations)."""
    env = {"IDENTITY_DEV_WRITE_KEY": DEV_KEY, "IDENTITY_SECRET": SECRET}
    if store_kind == "redis":
        env["IDENTITY_REDIS_URL"] = redis_server.url
        env["IDENTITY_REDIS_KEY_PREFIX"] = f"dest{uuid.uuid4().hex[:8]}:"
    return await aiohttp_client(FrontTestServer(create_app(load_settings(env))))


async def post_prepare(
    client: AppClient, destination: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        "/v1/handoffs", json={"anonymousId": "anon-1", "destination": destination}, headers=headers
    )
    body: dict[str, Any] = await response.json(content_type=None)
    return response.status, body


def assert_destination_refused(status: int, body: dict[str, Any]) -> None:
    assert status == 400, body
    assert body["type"].endswith(":validation-failed")
    assert [error["field"] for error in body["errors"]] == ["destination"]


def token_params(query: str, name: str = TOKEN_PARAM) -> list[str]:
    """The values of ``name`` in ``query`` split on both ``&`` and ``;``, names decoded."""
    values = []
    for part in re.split("[&;]", query):
        key, _, value = part.partition("=")
        if unquote_plus(unquote_plus(key)).strip().casefold() == name.casefold():
            values.append(unquote_plus(value))
    return values


def assert_one_token(redirect_url: str, token: str) -> None:
    browser = URL(redirect_url)
    query = browser.search.removeprefix("?")
    assert token_params(query) == [token]
    assert URLSearchParams(query).get_all(TOKEN_PARAM) == [token]
    pairs = parse_qsl(query, keep_blank_values=True)
    assert [value for key, value in pairs if key.casefold() == TOKEN_PARAM] == [token]
    # What a server reads of the redirect is what the browser reads.
    server = urlsplit(redirect_url)
    assert (server.hostname, server.query) == (browser.hostname, query)


# The defects, through the HTTP API.

DEFECT_1_HOSTS = [
    "http://evil.com\\.localhost/",
    "http://evil.com%2f.localhost/",
    "http://evil.com%5c.localhost/",
    "http://evil.com%23.localhost/",
    "http://evil.com%40.localhost/",
    "http://evil.com .localhost/",
    "http://evil.com\x00.localhost/",
    "http://evil.com\x01.localhost/",
    "http://evil.com\x7f.localhost/",
    "http://evil.com\u00a0.localhost/",
    "http://evil.com%2F.localhost/",
    "http://x.localhost\\@evil.com/",
    "http://evil.com\\@x.localhost/",
    "http:/\\evil.com/.localhost/",
    "http:evil.com/.localhost",
    "http://evil.com\u3002localhost/",
    "http://x%2elocalhost/",
]


@pytest.mark.parametrize("destination", DEFECT_1_HOSTS)
async def test_hosts_that_browsers_read_otherwise_are_refused(
    dev_client: AppClient, destination: str
) -> None:
    assert_destination_refused(*await post_prepare(dev_client, destination, dev_auth()))


DEFECT_2_CONTROLS = [
    "http://x.localhost/\r\nSet-Cookie: a=b",
    "http://x.localhost/\nLocation: https://evil.com/",
    "http://x.localhost/cart?step=1\r\n",
    "http://x.localhost/cart#\r\nX: y",
    "http://x.localhost/\tcart",
    "http://x.localhost/ cart",
    "http://x.localhost/caf\u00e9",
    "http://x.localhost/\u2028",
    " http://x.localhost/",
]


@pytest.mark.parametrize("destination", DEFECT_2_CONTROLS)
async def test_control_characters_and_whitespace_are_refused(
    dev_client: AppClient, destination: str
) -> None:
    assert_destination_refused(*await post_prepare(dev_client, destination, dev_auth()))


DEFECT_3_QUERIES = [
    "?a=1;handoff_token=evil",
    "?a=1&handoff_token=evil",
    "?handoff_token=evil",
    "?handoff_token",
    "?a=1&HANDOFF_TOKEN=evil",
    "?handoff%5Ftoken=evil",
    "?handoff%5ftoken=evil",
    "?%68andoff_token=evil",
    "?handoff%255Ftoken=evil",
    "?+handoff_token=evil",
    "?handoff_token+=evil",
    "?handoff.token=evil",
    "?handoff_token[]=evil",
    "?handoff[token=evil",
    "??handoff_token=evil",  # URLSearchParams drops the query's leading "?"
    "?a=1&?handoff_token=evil",
]


# Found in review: a reader that decodes the whole query before splitting it (and then the
# names, the double decoding the list above already assumes) reads escaped separators as
# separators: these were accepted, and their redirect carried a second token for it.
ESCAPED_SEPARATOR_QUERIES = [
    "?handoff_token%3Devil",
    "?a=1%26handoff_token%3Devil",
    "?a=%26handoff_token%3D1",
    "?a%3Bhandoff_token=evil",
    "?a=1%2526handoff_token%253Devil",
]


@pytest.mark.parametrize("query", ESCAPED_SEPARATOR_QUERIES)
async def test_a_token_parameter_behind_escaped_separators_is_refused(
    dev_client: AppClient, query: str
) -> None:
    destination = f"http://x.localhost/{query}"
    assert_destination_refused(*await post_prepare(dev_client, destination, dev_auth()))


@pytest.mark.parametrize("query", DEFECT_3_QUERIES)
async def test_a_destination_naming_the_token_parameter_is_refused(
    dev_client: AppClient, query: str
) -> None:
    destination = f"http://x.localhost/{query}"
    assert_destination_refused(*await post_prepare(dev_client, destination, dev_auth()))


async def test_the_configured_token_parameter_is_the_one_refused(
    make_client: ClientFactory,
) -> None:
    client = await make_client(token_param="xdt")
    status, body = await post_prepare(
        client, "https://checkout.example-pay.com/?a=1;XDT=evil", auth("shop")
    )
    assert_destination_refused(status, body)
    answer = await prepare(client, destination="https://checkout.example-pay.com/?handoff_token=1")
    assert token_params(urlsplit(answer["redirectUrl"]).query, "xdt") == [answer["token"]]


@pytest.mark.parametrize(
    "destination",
    [
        "https://evil.com\\@checkout.example-pay.com/",
        "https://checkout.example-pay.com\\@evil.com/",
        "https://checkout.example-pay.com%2f.evil.com/",
        "https://checkout.example-pay.com/\r\nSet-Cookie: a=b",
        "https://checkout.example-pay.com/?a=1;handoff_token=evil",
        "https:checkout.example-pay.com/",
    ],
)
async def test_configured_sources_refuse_the_same(client: AppClient, destination: str) -> None:
    assert_destination_refused(*await post_prepare(client, destination, auth("shop")))


async def test_the_stored_destination_is_what_the_browser_loads(dev_client: AppClient) -> None:
    status, answer = await post_prepare(
        dev_client, 'HTTP://Shop.LocalHost:80/a/../cart?q="x"#top', dev_auth()
    )
    assert status == 201, answer
    href = "http://shop.localhost/cart?q=%22x%22#top"
    assert (
        answer["redirectUrl"]
        == f"http://shop.localhost/cart?q=%22x%22&handoff_token={answer['token']}#top"
    )
    response = await dev_client.post(
        "/v1/handoffs/exchange", json={"token": answer["token"]}, headers=dev_auth()
    )
    assert response.status == 200
    assert (await response.json())["destination"] == href


async def test_a_redirect_has_exactly_one_token(dev_client: AppClient) -> None:
    status, answer = await post_prepare(
        dev_client, "http://x.localhost/?a=1;b=2&handoff_tokens=3&xhandoff_token=4", dev_auth()
    )
    assert status == 201, answer
    assert_one_token(answer["redirectUrl"], answer["token"])


# The parsing functions.


@pytest.mark.parametrize(
    ("text", "href", "origin"),
    [
        ("https://pay.example.com:8443/c?a=1#f", "https://pay.example.com:8443/c?a=1#f", None),
        ("HTTPS://Pay.Example.COM:443/c", "https://pay.example.com/c", "https://pay.example.com"),
        ("http://x.localhost:0080/", "http://x.localhost/", "http://x.localhost"),
        ("http://x.localhost:3000", "http://x.localhost:3000/", "http://x.localhost:3000"),
        ("https://x.localhost/a\\b?c\\d", "https://x.localhost/a/b?c\\d", None),
        ("https://x.localhost/%zz?q=<>`", "https://x.localhost/%zz?q=%3C%3E`", None),
        ("https://xn--pple-43d.localhost/", "https://xn--pple-43d.localhost/", None),
    ],
)
def test_destinations_are_stored_as_browsers_serialize_them(
    text: str, href: str, origin: str | None
) -> None:
    url = parse_destination(text, token_param=TOKEN_PARAM)
    assert url.href == href
    assert url.origin == (origin or href[: href.index("/", 8)])


@pytest.mark.parametrize(
    "text",
    [
        *DEFECT_1_HOSTS,
        *DEFECT_2_CONTROLS,
        "http://127.0.0.1/",
        "http://127.1/",
        "http://[::1]/",
        "http://0x7f.0.0.1/",
        "http://xn--a.localhost/",
        "http://-x.localhost/",
        "http://x..localhost/",
        "http://x.localhost./",
        "http://a_b.localhost/",
        "http://u:p@x.localhost/",
        "http://@x.localhost/",
        "http://x.localhost:0/",
        "http://x.localhost:65536/",
        "javascript:alert(1)//x.localhost",
        "data:text/html,<script>alert(1)</script>",
        "ws://x.localhost/",
        "//x.localhost/",
        "http://x.example.com/",
        "http://\u0430pple.localhost/",
        "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",
    ],
)
def test_hostile_destinations_are_refused(text: str) -> None:
    with pytest.raises(UrlError):
        parse_destination(text, token_param=TOKEN_PARAM)


def test_a_kept_destination_is_read_anew_for_another_token_parameter_or_limit() -> None:
    # Destinations read once are kept (urls._read_destination), keyed on all that decides.
    text = "https://checkout.example-pay.com/cart?xdt=1"
    for _ in range(2):
        assert parse_destination(text, token_param=TOKEN_PARAM).href == text
        with pytest.raises(UrlError, match="'xdt'"):
            parse_destination(text, token_param="xdt")
        with pytest.raises(UrlError, match="at most 20 characters"):
            parse_destination(text, token_param=TOKEN_PARAM, max_length=20)


@pytest.mark.parametrize("query", [q.removeprefix("?") for q in DEFECT_3_QUERIES])
def test_query_names_the_token_parameter(query: str) -> None:
    assert query_names_param(query, TOKEN_PARAM)


@pytest.mark.parametrize(
    "query", ["", "a=1", "xhandoff_token=1", "handoff_tokens=1", "a=handoff_token", "handoff=1"]
)
def test_query_without_the_token_parameter(query: str) -> None:
    assert not query_names_param(query, TOKEN_PARAM)


@pytest.mark.parametrize(
    ("href", "redirect"),
    [
        ("https://a.test/", "https://a.test/?t=v"),
        ("https://a.test/p?", "https://a.test/p?t=v"),
        ("https://a.test/p?a=1&", "https://a.test/p?a=1&t=v"),
        ("https://a.test/p?a=1#f?b=2", "https://a.test/p?a=1&t=v#f?b=2"),
        ("https://a.test/p#", "https://a.test/p?t=v#"),
        # A "?" ending a query belongs to its last pair (found by hypothesis).
        ("https://localhost/?:0?", "https://localhost/?:0?&t=v"),
        ("https://a.test/p?a=1?#f", "https://a.test/p?a=1?&t=v#f"),
    ],
)
def test_the_token_goes_last_in_the_query_before_the_fragment(href: str, redirect: str) -> None:
    assert with_query_param(href, "t", "v") == redirect


@pytest.mark.parametrize(
    "text",
    [
        "https://evil.com\\.example.com",
        "https://checkout.example.com%2f.evil.com",
        "https://checkout.example.com/.",
        "https://checkout.example.com/?",
        "https://10.0.0.1",
        "https://checkout.example.com\t",
        "http://evil.com\\.localhost",
        "https://u@checkout.example.com",
    ],
)
def test_configured_origins_are_read_the_browser_way(text: str) -> None:
    with pytest.raises(UrlError):
        parse_origin(text)


def test_localhost_origins_are_read_the_browser_way() -> None:
    assert DEV.may_use("http://x.localhost:3000")
    assert not DEV.may_use("http://evil.com\\.localhost")
    assert not DEV.may_use("http://evil.com%2f.localhost")
    assert not DEV.may_use("HTTP://X.LOCALHOST")  # not a serialized origin


# Properties: whatever is accepted is safe to redirect a browser to.

# Each part of a generated URL is usually plausible and sometimes hostile, so that a fair
# share of the examples is accepted and the properties have something to check.
SCHEMES = (["https", "http", "HTTPS", "hTtP"], ["javascript", "data", "ftp", "ws", "file", ""])
AFTER_SCHEME = (
    ["://"],
    [":", ":/", ":///", ":\\\\", ":/\\", "://\\", ":\\/", ":\t//", "//", ":\r\n//"],
)
USERINFO = ([""], ["u@", "u:p@", "@", ":@", "evil.com@", "evil.com\\@", "x.localhost@", "%40@"])
LABELS = (
    ["x", "shop", "checkout", "a-b", "xn--pple-43d", "LOCALHOST", "evil"],
    ["evil.com", "\u0430pple", "\uff4c\uff4f\uff43\uff41\uff4c", "127.0.0.1", "[::1]",
     "0x7f", "1", "xn--a", "-x", "a_b"],
)  # fmt: skip
JOINERS = (
    ["."],
    ["\\", "/", "@", "%2e", "%2f", "%5c", "%23", "%40", "%00", "\u3002", "\uff0e", " ", "\t",
     "\u00a0", ":", "#", "?", "..", "", "\\@", "%252e"],
)  # fmt: skip
PORTS = (["", ":", ":3000", ":443", ":80", ":8443", ":0080"], [":0", ":65536", ":+80", ":80:80"])
PATHS = (
    ["", "/", "/cart", "/a/b/", "/a\\b", "//evil.com", "/%2F%2Fevil.com", "/..", "/@evil.com",
     "/%0d%0a", "/a;b=c", '/"q"'],
    ["/\r\nSet-Cookie: a=b", "/\t/", "/caf\u00e9", "/ ", "/\x00"],
)  # fmt: skip
QUERIES = (
    ["", "?", "?a=1", "?a=1;b=2&c", "?x=handoff_token", "?handoff_tokens=1;a=2",
     "?a=%26handoff%3D1", '?q=<>"`', "?a=1&", "?a\\b"],
    ["?a=1;handoff_token=evil", "?handoff_token=evil", "?HANDOFF_TOKEN=x",
     "?handoff%5Ftoken=x", "?handoff%255Ftoken=x", "?handoff.token=x", "?handoff_token[]=x",
     "?+handoff_token=x", "?a=1&&handoff_token", "?%68andoff_token=1", "?a=1\r\nX: y",
     "?a=%26handoff_token%3D1"],
)  # fmt: skip
FRAGMENTS = (
    ["", "#", "#f", "#?handoff_token=x", "#a&handoff_token=b"],
    ["#\r\n", "#\t", "#\u00e9"],
)
HOSTILE_CHARACTERS = "\\/@:%#?;&=+.[] \t\r\n\x00\x0b\x1f\x7f\u00a0\u2028\u3002\uff0e\ufeff\u0430"
DEV_ENDS = (
    ["localhost"],
    ["localhost.", ".localhost%2e", "%2elocalhost", ".localhost\\"],
)
SHOP_ENDS = (
    ["checkout.example-pay.com"],
    [
        ".checkout.example-pay.com",
        ".com",
        "checkout.example-pay.com.",
        "checkout.example-pay.com\\",
    ],
)

Choices = tuple[list[str], list[str]]


def printable(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


PARTS_READ = ("href", "protocol", "hostname", "port", "search", "username", "password", "host_type")


def pick(choices: Choices, hostile_odds: int, only_printable: bool) -> st.SearchStrategy[str]:
    """A plausible choice, or one time in ``hostile_odds`` a hostile one (0: never)."""
    plausible, hostile = choices
    if only_printable:
        hostile = [text for text in hostile if printable(text)] or plausible
    if not hostile_odds:
        return st.sampled_from(plausible)
    return st.integers(0, hostile_odds - 1).flatmap(
        lambda n: st.sampled_from(hostile if n == 0 else plausible)
    )


def urls(ends: Choices, hostile_odds: int, only_printable: bool) -> st.SearchStrategy[str]:
    def part(choices: Choices, odds: int = hostile_odds) -> st.SearchStrategy[str]:
        return pick(choices, odds, only_printable)

    label = st.tuples(part(LABELS, 2 * hostile_odds), part(JOINERS, 2 * hostile_odds))
    host = st.builds(
        lambda labels, end: "".join(a + b for a, b in labels) + end,
        st.lists(label, max_size=2),
        part(ends),
    )
    scheme, after, userinfo, port, path, query, fragment = (
        part(p) for p in (SCHEMES, AFTER_SCHEME, USERINFO, PORTS, PATHS, QUERIES, FRAGMENTS)
    )
    return st.builds("".join, st.tuples(scheme, after, userinfo, host, port, path, query, fragment))


def destinations(ends: Choices) -> st.SearchStrategy[str]:
    """URLs with hostile parts: some only what a backend could type, some mangled further."""
    typed = urls(ends, hostile_odds=4, only_printable=True)
    mangled = urls(ends, hostile_odds=5, only_printable=False)
    # And hostile characters dropped in anywhere.
    sprinkled = st.builds(
        lambda url, index, text: url[:index] + text + url[index:],
        urls(ends, hostile_odds=5, only_printable=False),
        st.integers(min_value=0, max_value=60),
        st.text(alphabet=HOSTILE_CHARACTERS, min_size=1, max_size=3),
    )
    return st.one_of(typed, typed, mangled, sprinkled)


def plausible_destinations(ends: Choices) -> st.SearchStrategy[str]:
    """URLs from the plausible parts only (with backslashes, ``//`` and ``@`` in paths)."""
    return urls(ends, hostile_odds=0, only_printable=True)


def dev_allowed(browser: URL) -> bool:
    host = browser.hostname
    return browser.protocol in ("http:", "https:") and (
        host == "localhost" or host.endswith(".localhost")
    )


def check_accepted_redirect(text: str, source: Source, allowed: Any) -> bool:
    """``text`` is refused (False), or its redirectUrl takes a browser to an allowed origin."""
    try:
        url = parse_destination(text, token_param=TOKEN_PARAM)
    except UrlError as exc:
        event("refused", str(exc).partition(":")[0])
        return False
    if not source.may_use(url.origin):
        event("refused", "origin not allowed")
        return False
    event("refused", "no: accepted")
    redirect = with_query_param(url.href, TOKEN_PARAM, TOKEN)
    browser = URL(redirect)
    assert allowed(browser), (text, redirect)
    assert browser.origin == url.origin
    assert browser.href == redirect  # nothing for the browser to rewrite
    assert printable(redirect)
    assert_one_token(redirect, TOKEN)
    return True


@settings(max_examples=400, deadline=None)
@given(st.one_of(destinations(DEV_ENDS), destinations(SHOP_ENDS), st.text(max_size=40)))
def test_the_lean_reading_is_what_adas_own_adapter_reads(text: str) -> None:
    """urls.py reads ada's C binding directly: the parts must be those ada_url.parse_url gives."""
    try:
        adapter = ada_parse_url(text, PARTS_READ)
    except ValueError:
        assert _whatwg_parts(text) is None
        return
    parts = _whatwg_parts(text)
    assert parts is not None
    assert parts.href == adapter["href"]
    assert f"{parts.scheme}:" == adapter["protocol"]
    assert parts.hostname == adapter["hostname"]
    assert parts.port == (int(adapter["port"]) if adapter["port"] else None)
    assert parts.query == adapter["search"][1:]
    assert parts.has_credentials == bool(adapter["username"] or adapter["password"])
    assert parts.host_type == adapter["host_type"]


@settings(max_examples=300, deadline=None)
@given(destinations(DEV_ENDS))
def test_accepted_localhost_destinations_stay_on_localhost(text: str) -> None:
    check_accepted_redirect(text, DEV, dev_allowed)


@settings(max_examples=150, deadline=None)
@given(plausible_destinations(DEV_ENDS))
def test_plausible_localhost_destinations_are_accepted_and_stay_on_localhost(text: str) -> None:
    assert check_accepted_redirect(text, DEV, dev_allowed), text


@settings(max_examples=300, deadline=None)
@given(st.one_of(destinations(SHOP_ENDS), plausible_destinations(SHOP_ENDS)))
def test_accepted_destinations_stay_on_the_source_origins(text: str) -> None:
    check_accepted_redirect(text, SHOP, lambda browser: browser.origin in ORIGINS["shop"])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=destinations(DEV_ENDS))
async def test_http_answers_refuse_or_redirect_to_localhost(
    dev_client: AppClient, text: str
) -> None:
    status, answer = await post_prepare(dev_client, text, dev_auth())
    if status != 201:
        assert status in (400, 403), answer
        return
    redirect = answer["redirectUrl"]
    assert dev_allowed(URL(redirect)), (text, redirect)
    assert_one_token(redirect, answer["token"])
    response = await dev_client.post(
        "/v1/handoffs/exchange", json={"token": answer["token"]}, headers=dev_auth()
    )
    destination = (await response.json())["destination"]
    assert with_query_param(destination, TOKEN_PARAM, answer["token"]) == redirect
    assert read_url(destination).href == destination
