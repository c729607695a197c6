"""AMP cache subdomains and origins (identity_service.amp.caches), checked against AMP itself.

The vectors of the project's AMP facts (amp-facts.md, "Cache origins") are explicit cases. The
rest runs AMP's own npm package, ``@ampproject/toolbox-cache-url`` (pinned in
tests/js/package.json, installed by ``npm ci --prefix tests/js``), over host names, one ``node``
call per set: a fixed list of edge cases and a Hypothesis-generated set. Without node or the
package these tests skip, except in CI (CI set), where they fail: .ci/run installs both.
"""

import json
import shutil
import string
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from identity_service.amp.caches import DEFAULT_CACHES, cache_origins, cache_subdomain
from tests.tools import missing_tool

JS_DIR = Path(__file__).parent / "js"
SCRIPT = JS_DIR / "cache_subdomains.mjs"
PACKAGE = "@ampproject/toolbox-cache-url"

EXAMPLE_ORIGINS = frozenset(
    {"https://www-example-com.cdn.ampproject.org", "https://www-example-com.www.bing-amp.com"}
)

# amp-facts.md, "Cache origins": the toolbox's own test vectors.
FACTS_VECTORS = [
    ("www.example.com", "www-example-com"),
    ("en-us.example.com", "0-en--us-example-com-0"),
    ("hello-world.com", "hello--world-com"),
    ("hello--world.com", "hello----world-com"),
    ("xn--bcher-kva.ch", "xn--bcher-ch-65a"),
    ("toplevelnohyphens", "qsgpfjzulvuaxb66z77vlhb5gu2irvcnyp6t67cz6tqo5ae6fysa"),
]

# Edge cases whose answers the toolbox gave (2.10.1), kept here so that they are checked even
# where node is missing. Each says something the facts file does not.
TOOLBOX_VECTORS = [
    # Unicode input: the same subdomain as its punycode form...
    ("bücher.ch", "xn--bcher-ch-65a"),
    ("BÜCHER.CH", "xn--bcher-ch-65a"),
    # ...but the hash form hashes the host as given: a mixed-direction host has two.
    ("مثال.com", "exa5fcj6s3zxcv26uc5rhldpk2ugikiioj56wojefns24zimhw4q"),
    ("xn--mgbh0fb.com", "wl5c7xzoq53bsqawac2ds6zu3e2kb4mxdaklp326z4rutjned7ya"),
    # "No dot" means no ASCII dot: an ideographic full stop gives the hash form.
    ("例え。テスト", "2rlkssea7cppqstccm2ffzl4zgybhmk7a6sto3hoznjibgcyod6q"),
    ("例え.テスト", "xn----87tuqvbl9538b"),
    # A trailing dot is kept, as a trailing hyphen.
    ("example.com.", "example-com-"),
    # Positions 3-4 are UTF-16 code units: an emoji is two of them.
    ("😀--a.com", "w3zbq3cejfspbmneohpahwrxkrekb7b35iiiqkpnwoeotkiwsiha"),
    # The length check comes before the 0-...-0 wrap: this label is 67 characters.
    (
        "ab-" + "c" * 55 + ".com",
        "0-ab--" + "c" * 55 + "-com-0",
    ),
    # punycode.js 2.1.1 reads "_" as a (negative) digit where RFC 3492 has none.
    ("xn--_a.com", "~~-com"),
]


@pytest.mark.parametrize(("host", "expected"), FACTS_VECTORS + TOOLBOX_VECTORS)
def test_known_vectors(host: str, expected: str) -> None:
    assert cache_subdomain(host) == expected


def test_hash_form_is_52_lower_case_base32_characters() -> None:
    subdomain = cache_subdomain("localhost")
    assert len(subdomain) == 52
    assert set(subdomain) <= set(string.ascii_lowercase + "234567")


@pytest.mark.parametrize(
    "host", ["", "example.com:443", "a b.com", "a/b.com", "a@b.com", "\ud800.com"]
)
def test_not_a_host(host: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        cache_subdomain(host)


@pytest.mark.parametrize("host", ["xn--ü.com", "xn--zzzzzzzzzzzzzzz.com", "www.xn--{.com"])
def test_punycode_the_toolbox_refuses(host: str) -> None:
    with pytest.raises(ValueError, match="invalid punycode"):
        cache_subdomain(host)


# cache_origins


def test_cache_origins_of_a_publisher() -> None:
    assert cache_origins("https://www.example.com", DEFAULT_CACHES) == EXAMPLE_ORIGINS
    assert cache_origins("https://www.example.com", ["cdn.ampproject.org"]) == {
        "https://www-example-com.cdn.ampproject.org"
    }
    assert cache_origins("https://www.example.com", []) == frozenset()


@pytest.mark.parametrize(
    "look_alike",
    [
        "https://www.example.com.evil.com",
        "https://evil.www.example.com",
        "https://wwwexample.com",
        "https://www-example.com",
        "https://www.example-com.com",
        "https://www.example.co",
        "https://www-example-com.cdn.ampproject.org",
        "https://xn--www-example-com-s3b.evil",
    ],
)
def test_look_alikes_get_other_origins(look_alike: str) -> None:
    origins = cache_origins(look_alike, DEFAULT_CACHES)
    assert len(origins) == 2
    assert not origins & EXAMPLE_ORIGINS
    for origin in origins:
        assert not origin.startswith(("https://www-example-com.", "https://0-www-example-com"))


def test_cache_origins_are_of_the_listed_caches_only() -> None:
    origins = cache_origins("https://www.example.com", ["cdn.ampproject.org"])
    assert "https://www-example-com.cdn.ampproject.org.evil.com" not in origins
    assert all(origin.endswith(".cdn.ampproject.org") for origin in origins)


@pytest.mark.parametrize(
    ("origin", "match"),
    [
        ("http://www.example.com", "not an https origin"),
        ("www.example.com", "not an https origin"),
        ("HTTPS://www.example.com", "not an https origin"),
        ("https://www.example.com:8443", "port"),
        ("https://www.example.com:443", "port"),
        ("https://www.example.com/", "not a normalised origin"),
        ("https://WWW.example.com", "not a normalised origin"),
        ("https://bücher.ch", "not a normalised origin"),
        ("https://", "not a normalised origin"),
        ("https://user@www.example.com", "not a normalised origin"),
    ],
)
def test_cache_origins_refuses(origin: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cache_origins(origin, DEFAULT_CACHES)


@pytest.mark.parametrize(
    "cache",
    [
        "*.bing-amp.com",
        ".cdn.ampproject.org",
        "cdn.ampproject.org.",
        "CDN.ampproject.org",
        "ampproject",
    ],
)
def test_cache_origins_refuses_a_cache_that_is_no_domain(cache: str) -> None:
    with pytest.raises(ValueError, match="not an AMP cache domain"):
        cache_origins("https://www.example.com", [cache])


def test_cache_origins_refuses_one_string_for_caches() -> None:
    with pytest.raises(TypeError):
        cache_origins("https://www.example.com", "cdn.ampproject.org")


# AMP's own package, run by node


@dataclass(frozen=True)
class ToolboxAnswer:
    """What the toolbox said for one host: a subdomain and cache URLs, or what it threw."""

    subdomain: str | None
    cache_urls: dict[str, str]
    error: str | None


Toolbox = Callable[[Sequence[str]], list[ToolboxAnswer]]


@pytest.fixture(scope="module")
def toolbox() -> Toolbox:
    """Runs tests/js/cache_subdomains.mjs over host names; skips (fails in CI) without it."""
    node = shutil.which("node")
    installed = JS_DIR / "node_modules" / PACKAGE / "package.json"
    missing = []
    if node is None:
        missing.append("node is not on PATH")
    if not installed.is_file():
        missing.append("tests/js/node_modules has no toolbox (npm ci --prefix tests/js)")
    if missing:
        reason = f"AMP's {PACKAGE} cannot run: " + "; ".join(missing)
        missing_tool(reason, ".ci/run installs node and runs npm ci")
    assert node is not None
    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"][PACKAGE]
    version = json.loads(installed.read_text())["version"]
    assert version == pinned, (
        f"tests/js/node_modules has {PACKAGE} {version}, not the pinned {pinned}: npm ci --prefix tests/js"
    )

    def run(hosts: Sequence[str]) -> list[ToolboxAnswer]:
        completed = subprocess.run(
            [node, str(SCRIPT)],
            input=json.dumps({"hosts": list(hosts), "caches": list(DEFAULT_CACHES)}),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        answer = json.loads(completed.stdout)
        assert answer["version"] == pinned
        results = answer["results"]
        assert len(results) == len(hosts)
        return [
            ToolboxAnswer(r.get("subdomain"), r.get("cacheUrls", {}), r.get("error"))
            for r in results
        ]

    return run


def _disagreements(hosts: Sequence[str], answers: Sequence[ToolboxAnswer]) -> list[str]:
    """Where cache_subdomain and cache_origins disagree with the toolbox, one line each."""
    lines = []
    for host, answer in zip(hosts, answers, strict=True):
        try:
            ours = cache_subdomain(host)
        except ValueError as error:
            if answer.error is None:
                lines.append(f"{host!r}: toolbox {answer.subdomain!r}, ours raised {error}")
            continue
        if answer.error is not None:
            lines.append(f"{host!r}: toolbox threw {answer.error}, ours {ours!r}")
            continue
        if ours != answer.subdomain:
            lines.append(f"{host!r}: toolbox {answer.subdomain!r}, ours {ours!r}")
            continue
        # The toolbox's cache URL ends with the host as its URL parser read it: lower-cased
        # and whole, else the two were not given the same host.
        for cache, url in answer.cache_urls.items():
            origin, _, source = url.partition("/c/s/")
            if origin != f"https://{ours}.{cache}" or source != host.lower():
                lines.append(f"{host!r}: toolbox's {cache} URL is {url!r}")
        normalised = host.isascii() and host == host.lower()
        if normalised and "." in host and not host.startswith(".") and ".." not in host:
            expected = {url.partition("/c/s/")[0] for url in answer.cache_urls.values()}
            if cache_origins(f"https://{host}", DEFAULT_CACHES) != expected:
                lines.append(f"{host!r}: cache_origins is not {sorted(expected)}")
    return lines


EDGE_HOSTS = [
    # plain
    "www.example.com",
    "example.com",
    "a.b",
    "shop.example.co.uk",
    "127.0.0.1",
    "123.com",
    "www-example-com.cdn.ampproject.org",
    # upper case
    "WWW.EXAMPLE.COM",
    "Hello-World.Com",
    # hyphens
    "hello-world.com",
    "en-us.example.com",
    "hello--world.com",
    "-leading.example.com",
    "trailing-.example.com",
    "a-b-c.d-e-f.com",
    # double hyphen at 3-4
    "ab--cd.com",
    "AB--CD.COM",
    "ab---c.com",
    "a--b.com",
    "abc--d.com",
    # punycode
    "xn--bcher-kva.ch",
    "XN--BCHER-KVA.CH",
    "www.xn--bcher-kva.ch",
    "xn--80ak6aa92e.com",
    "xn--mgbh0fb.com",
    "xn--mgbh0fb.xn--mgbaam7a8h",
    "xn--r8jz45g.xn--zckzah",
    "xn--.com",
    "xn--a.com",
    "xn---abc.com",
    "xn--_a.com",
    "xn--ü.com",
    "xn--zzzzzzzzzzzzzzz.com",
    "www.xn--{.com",
    # Unicode
    "bücher.ch",
    "BÜCHER.CH",
    "münchen-straße.de",
    "straße.de",
    "例え.テスト",
    "例え。テスト",
    "例え\uff0eテスト",
    "παράδειγμα.δοκιμή",
    "ΣΊΣΥΦΟΣ.gr",
    "пример.испытание",
    "İstanbul.com.tr",
    "😀.example.com",
    "😀--a.com",
    "a\u0301.com",
    # right to left, alone and mixed
    "مثال.إختبار",
    "مثال.com",
    "עברית.co.il",
    "a\u200fb.com",
    "\u200eexample.com",
    # lengths
    "a" * 59 + ".com",
    "a" * 60 + ".com",
    "a-" * 25 + "b.com",
    "ab-" + "c" * 55 + ".com",
    "ab-" + "c" * 56 + ".com",
    "例えば日本語のとても長いドメイン名のラベルです例えば日本語のとても長いドメイン名.jp",
    # no dot
    "localhost",
    "toplevelnohyphens",
    "TOPLEVEL",
    "bücher",
    # dots
    "example.com.",
    "www.example.com.",
    ".example.com",
    "a..b",
    # other characters a host may hold
    "under_score.example.com",
    "a_b.com",
    "a~b!c$d.com",
]


def test_edge_hosts_against_the_toolbox(toolbox: Toolbox) -> None:
    assert len(EDGE_HOSTS) >= 60
    disagreements = _disagreements(EDGE_HOSTS, toolbox(EDGE_HOSTS))
    assert not disagreements, "\n".join(disagreements)


_UNICODE = "üßçéİıΣσςπ例えテスト中文한국어мирשלוםمثالߊ\u0301\u200e\u200f😀\U0001d518\u3002ǅ\u212a"
_ASCII = string.ascii_letters + string.digits + "-" * 8
_PUNCTUATION = "_!$&'()*+,;=~`{}\""


def _characters() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_ASCII),
        st.sampled_from(_UNICODE),
        st.sampled_from(_PUNCTUATION),
        st.characters(categories=("L", "M", "N", "Pd")),
    )


def _labels() -> st.SearchStrategy[str]:
    unicode_text = st.text(
        st.one_of(st.sampled_from(_UNICODE), _characters()), min_size=1, max_size=12
    )
    return st.one_of(
        st.text(st.sampled_from(_ASCII), max_size=12),
        st.text(st.sampled_from(string.ascii_lowercase + "-"), min_size=1, max_size=12),
        st.text(_characters(), max_size=12),
        st.text(st.sampled_from(_ASCII), min_size=30, max_size=64),
        # valid punycode, any case
        unicode_text.map(lambda text: "xn--" + text.encode("punycode").decode("ascii")),
        unicode_text.map(lambda text: "XN--" + text.encode("punycode").decode("ascii").upper()),
        # junk after xn--, for the decoder's quirks and errors
        st.text(st.sampled_from(_ASCII + _PUNCTUATION), max_size=12).map("xn--".__add__),
    )


@st.composite
def _hosts(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_labels(), min_size=1, max_size=4))
    host = labels[0]
    for label in labels[1:]:
        host += draw(st.sampled_from(".....\u3002\uff0e")) + label
    if draw(st.booleans()) and draw(st.booleans()):
        host += "."
    return host


def test_generated_hosts_against_the_toolbox(toolbox: Toolbox) -> None:
    """200 Hypothesis-generated hosts, compared in one node run (so: no shrinking)."""
    hosts: list[str] = []

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate])
    @given(_hosts().filter(bool))
    def collect(host: str) -> None:
        hosts.append(host)

    collect()
    hosts = list(dict.fromkeys(hosts))
    assert len(hosts) > 100
    disagreements = _disagreements(hosts, toolbox(hosts))
    assert not disagreements, "\n".join(disagreements)
