"""Origins, write keys and authentication."""

import base64

import pytest

from identity_service.sources import (
    OriginError,
    Source,
    SourceRegistry,
    hash_write_key,
    parse_destination,
    parse_origin,
    write_key_from_header,
)


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("https://Checkout.Example.com", "https://checkout.example.com"),
        ("https://checkout.example.com/", "https://checkout.example.com"),
        ("https://checkout.example.com:443", "https://checkout.example.com"),
        ("https://checkout.example.com:8443", "https://checkout.example.com:8443"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://shop.localhost", "http://shop.localhost"),
    ],
)
def test_origins_are_normalised(text: str, origin: str) -> None:
    assert parse_origin(text) == origin


@pytest.mark.parametrize(
    "text",
    [
        "http://checkout.example.com",
        "*://checkout.example.com",
        "https://*.example.com",
        "https://checkout.example.com/path",
        "https://checkout.example.com?q=1",
        "checkout.example.com",
        "ftp://checkout.example.com",
        "http://localhost.example.com",
    ],
)
def test_bad_origins_are_refused(text: str) -> None:
    with pytest.raises(OriginError):
        parse_origin(text)


def test_destination_keeps_its_url_and_gives_its_origin() -> None:
    url, origin = parse_destination("https://pay.example.com:8443/c?a=1#f")
    assert origin == "https://pay.example.com:8443"
    assert (url.path, url.query, url.fragment) == ("/c", "a=1", "f")


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (basic("wk_1"), "wk_1"),
        (basic("wk_1", "ignored"), "wk_1"),
        ("Bearer wk_2", "wk_2"),
        ("bearer   wk_2 ", "wk_2"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Basic", None),
        ("Basic %%%", None),
        (basic(""), None),
        ("Token wk_3", None),
    ],
)
def test_write_key_from_header(header: str | None, key: str | None) -> None:
    assert write_key_from_header(header) == key


def make_source(name: str, key: str, *origins: str) -> Source:
    digest = bytes.fromhex(hash_write_key(key).removeprefix("sha256:"))
    return Source(name=name, write_key_digest=digest, origins=frozenset(origins))


def test_registry_finds_the_source_of_a_write_key() -> None:
    registry = SourceRegistry(
        [make_source("shop", "k-shop", "https://a.test"), make_source("pay", "k-pay")]
    )
    found = registry.authenticate(basic("k-pay"))
    assert found is not None and found.name == "pay"
    assert registry.authenticate("Bearer k-shop") is not None
    assert registry.authenticate("Bearer k-nope") is None
    assert registry.authenticate(None) is None


def test_source_origins_are_exact_unless_localhost_is_allowed() -> None:
    source = make_source("shop", "k", "https://a.test")
    assert source.may_use("https://a.test")
    assert not source.may_use("https://b.a.test")
    assert not source.may_use("http://localhost:3000")
    dev = Source(name="dev", write_key_digest=b"", allow_localhost=True)
    assert dev.may_use("http://localhost:3000")
    assert dev.may_use("https://checkout.localhost")
    assert not dev.may_use("https://localhost.evil.test")


def test_write_key_hash_format() -> None:
    assert hash_write_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
