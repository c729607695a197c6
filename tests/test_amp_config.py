"""The ``[amp]`` settings (identity_service.amp.config): every rule, one problem per mistake.

Most cases go through ``IDENTITY_AMP`` (JSON), as a deployment without a file sets it; the
file cases check that the ``[amp]`` table of a TOML or YAML file reads the same and that
problems then name its keys as the file writes them (``amp.public_url``).
"""

import json
from pathlib import Path
from typing import Any

import pytest

from identity_service.amp.caches import DEFAULT_CACHES, cache_subdomain
from identity_service.amp.config import (
    MAX_COOKIE_MAX_AGE,
    AmpSettings,
    CookieSettings,
    RateLimit,
    allowed_origins,
)
from identity_service.settings import ConfigError, load_settings
from tests.conftest import SECRET, make_settings, sources_env
from tests.test_settings import DNS_HOSTS, NOT_DNS_HOSTS

HOOK_SECRET = "webhook-secret-0123456789abcdef-xyz"
BASE: dict[str, Any] = {
    "public_url": "https://www.example.com/identity/",
    "publisher_origins": ["https://www.example.com"],
    "source": "checkout",
    "actions": {
        "add-to-cart": {
            "webhook": "https://backend.example.com/hooks/cart",
            "secret": HOOK_SECRET,
            "done_url": "https://www.example.com/cart?from=amp",
        }
    },
}
ACTION = "actions.add-to-cart"


def config(**changes: Any) -> dict[str, Any]:
    """BASE with top-level keys changed; a value of None removes the key."""
    merged = {**BASE, **changes}
    return {key: value for key, value in merged.items() if value is not None}


def with_action(**changes: Any) -> dict[str, Any]:
    action = {**BASE["actions"]["add-to-cart"], **changes}
    return config(actions={"add-to-cart": {k: v for k, v in action.items() if v is not None}})


def amp_settings(amp: dict[str, Any]) -> AmpSettings:
    settings = make_settings(amp=json.dumps(amp))
    assert settings.amp is not None
    return settings.amp


def problems(amp: Any) -> list[str]:
    raw = amp if isinstance(amp, str) else json.dumps(amp)
    with pytest.raises(ConfigError) as info:
        make_settings(amp=raw)
    return info.value.problems


def test_without_amp_there_are_no_amp_settings() -> None:
    assert make_settings().amp is None


def test_a_valid_table_and_its_defaults() -> None:
    amp = amp_settings(BASE)
    assert amp.public_url == "https://www.example.com/identity"  # trailing slash stripped
    assert amp.publisher_origins == {"https://www.example.com"}
    assert amp.source == "checkout"
    assert amp.caches == DEFAULT_CACHES
    assert amp.cookie == CookieSettings()
    assert amp.cookie.name == "ajs_anonymous_id" and amp.cookie.same_site == "None"
    assert amp.cookie.secure and not amp.cookie.http_only
    assert amp.allowed_origins == {
        "https://www.example.com",
        "https://www-example-com.cdn.ampproject.org",
        "https://www-example-com.www.bing-amp.com",
    }
    action = amp.actions["add-to-cart"]
    assert action.name == "add-to-cart"
    assert action.webhook == "https://backend.example.com/hooks/cart"
    assert action.secret == HOOK_SECRET.encode()
    assert action.done_url == "https://www.example.com/cart?from=amp"
    assert HOOK_SECRET not in repr(amp)
    assert (amp.link_ttl, amp.action_ttl, amp.collect_redirect) == (30 * 86_400, 60, None)


def test_every_optional_setting() -> None:
    amp = amp_settings(
        config(
            public_url="https://www.example.com",
            publisher_origins=["https://www.example.com", "https://amp.example.com"],
            caches=["cdn.ampproject.org", "CDN.ampproject.org"],
            cookie={
                "name": "visitor_id",
                "domain": ".Example.com",
                "max_age": 86_400,
                "same_site": "lax",
                "secure": False,
                "http_only": True,
            },
            link_ttl=3600,
            action_ttl=30,
            collect_redirect="https://amp.example.com/pixel.gif",
            limit_per_ip={"requests": 100, "window_seconds": 10},
            limit_per_client={"requests": 20, "window_seconds": 10},
            max_form_bytes=4096,
            max_form_fields=10,
            webhook_timeout=1,
            webhook_attempts=2,
        )
    )
    assert amp.public_url == "https://www.example.com"
    assert amp.caches == ("cdn.ampproject.org",)
    assert amp.cookie == CookieSettings("visitor_id", ".example.com", 86_400, "Lax", False, True)
    assert amp.allowed_origins == {
        "https://www.example.com",
        "https://amp.example.com",
        "https://www-example-com.cdn.ampproject.org",
        "https://amp-example-com.cdn.ampproject.org",
    }
    assert amp.collect_redirect == "https://amp.example.com/pixel.gif"
    assert (amp.limit_per_ip, amp.limit_per_client) == (RateLimit(100, 10), RateLimit(20, 10))
    assert (amp.link_ttl, amp.action_ttl, amp.max_form_bytes, amp.max_form_fields) == (
        3600,
        30,
        4096,
        10,
    )
    assert (amp.webhook_timeout, amp.webhook_attempts) == (1.0, 2)


def test_no_caches_and_no_actions() -> None:
    amp = amp_settings(config(caches=[], actions=None))
    assert amp.allowed_origins == {"https://www.example.com"}
    assert amp.actions == {}


def test_development_on_localhost() -> None:
    """http for localhost and *.localhost; such origins have no cache origins (AMP caches
    serve https sources without a port), but stay publisher origins; the dev source."""
    amp_table = {
        "public_url": "http://shop.localhost:8080/identity",
        "publisher_origins": ["http://shop.localhost:8080", "https://shop.localhost:8443"],
        "source": "dev",
        "cookie": {"same_site": "Lax", "secure": False},
        "actions": {
            "save": {
                "webhook": "http://127.0.0.1:9000/hook",
                "secret": HOOK_SECRET,
                "done_url": "http://shop.localhost:8080/done",
            },
            "save_v6": {
                "webhook": "http://[::1]:9000/hook",
                "secret": HOOK_SECRET,
                "done_url": "https://shop.localhost:8443/done",
            },
            "save-local": {
                "webhook": "http://localhost:9000/hook",
                "secret": HOOK_SECRET,
                "done_url": "http://shop.localhost:8080/done",
            },
        },
    }
    settings = load_settings({"IDENTITY_AMP": json.dumps(amp_table)})
    assert settings.amp is not None
    assert settings.amp.public_url == "http://shop.localhost:8080/identity"
    assert settings.amp.allowed_origins == {
        "http://shop.localhost:8080",
        "https://shop.localhost:8443",
    }
    assert set(settings.amp.actions) == {"save", "save_v6", "save-local"}


def test_the_dev_source_is_not_a_configured_source_when_sources_exist() -> None:
    assert problems(config(source="dev")) == [
        "IDENTITY_AMP.source is 'dev': it must name a configured source (checkout, partner, shop)"
    ]


def test_allowed_origins_skip_http_and_ports_for_caches() -> None:
    origins = ["https://www.example.com", "http://www.example.com", "https://example.com:8443"]
    assert allowed_origins(origins, ["cdn.ampproject.org"]) == {
        *origins,
        "https://www-example-com.cdn.ampproject.org",
    }


# (case id, changes to BASE or a whole table, the one problem's beginning)
ONE_PROBLEM: list[tuple[str, Any, str]] = [
    ("not a table", "[1, 2]", "IDENTITY_AMP must be a table of "),
    ("not JSON", "{public_url", "IDENTITY_AMP is not valid JSON"),
    ("unknown key", config(publisher_origin=["https://x.example"]),
     "IDENTITY_AMP.publisher_origin is not a setting (a typo?)"),
    ("public_url missing", config(public_url=None),
     "IDENTITY_AMP.public_url is required: an absolute https URL"),
    ("public_url not a string", config(public_url=42),
     "IDENTITY_AMP.public_url must be an absolute https URL (a string)"),
    ("public_url http", config(public_url="http://www.example.com/identity"),
     "IDENTITY_AMP.public_url must use https (http is allowed only for localhost)"),
    ("public_url query", config(public_url="https://www.example.com/identity?a=1"),
     "IDENTITY_AMP.public_url must not have a query or fragment"),
    ("public_url fragment", config(public_url="https://www.example.com/identity#x"),
     "IDENTITY_AMP.public_url must not have a query or fragment"),
    ("public_url backslash", config(public_url="https://evil.com\\.www.example.com/"),
     "IDENTITY_AMP.public_url is read with a different host"),
    ("public_url relative", config(public_url="/identity"),
     "IDENTITY_AMP.public_url is not a valid URL"),
    ("public_url elsewhere", config(public_url="https://id.example.net/identity"),
     "IDENTITY_AMP.public_url must be on a publisher origin (https://www.example.com), "
     "not https://id.example.net"),
    ("publisher_origins missing", config(publisher_origins=None),
     "IDENTITY_AMP.publisher_origins must be a non-empty list of origins"),
    ("publisher_origins empty", config(publisher_origins=[]),
     "IDENTITY_AMP.publisher_origins must be a non-empty list of origins"),
    ("publisher_origins string", config(publisher_origins="https://www.example.com"),
     "IDENTITY_AMP.publisher_origins must be a non-empty list of origins"),
    ("publisher origin http", config(publisher_origins=["http://www.example.com"]),
     "IDENTITY_AMP.publisher_origins: 'http://www.example.com' must use https"),
    ("publisher origin path", config(publisher_origins=["https://www.example.com/shop"]),
     "IDENTITY_AMP.publisher_origins: 'https://www.example.com/shop' must be an origin"),
    ("publisher origin wildcard", config(publisher_origins=["https://*.example.com"]),
     "IDENTITY_AMP.publisher_origins: 'https://*.example.com' wildcards are not allowed"),
    ("caches not a list", config(caches="cdn.ampproject.org"),
     "IDENTITY_AMP.caches must be a list of cache domains"),
    ("cache wildcard", config(caches=["*.bing-amp.com"]),
     "IDENTITY_AMP.caches: '*.bing-amp.com' is not a cache domain"),
    ("cache URL", config(caches=["https://cdn.ampproject.org"]),
     "IDENTITY_AMP.caches: 'https://cdn.ampproject.org' is not a cache domain"),
    ("cache port", config(caches=["cdn.ampproject.org:443"]),
     "IDENTITY_AMP.caches: 'cdn.ampproject.org:443' is not a cache domain"),
    ("cache without dot", config(caches=["localhost"]),
     "IDENTITY_AMP.caches: 'localhost' is not a cache domain"),
    ("source missing", config(source=None),
     "IDENTITY_AMP.source is required: it must name a configured source"),
    ("source unknown", config(source="blog"),
     "IDENTITY_AMP.source is 'blog': it must name a configured source (checkout, partner, shop)"),
    ("cookie not a table", config(cookie="ajs_anonymous_id"),
     "IDENTITY_AMP.cookie must be a table of domain, http_only, max_age, name, same_site, secure"),
    ("cookie unknown key", config(cookie={"path": "/"}),
     "IDENTITY_AMP.cookie.path is not a setting (a typo?)"),
    ("cookie name space", config(cookie={"name": "ajs id"}),
     "IDENTITY_AMP.cookie.name must be a cookie name"),
    ("cookie name separator", config(cookie={"name": "a;b"}),
     "IDENTITY_AMP.cookie.name must be a cookie name"),
    ("cookie name empty", config(cookie={"name": ""}),
     "IDENTITY_AMP.cookie.name must be a cookie name"),
    ("__Secure- needs secure", config(cookie={"name": "__Secure-id", "secure": False,
                                              "same_site": "Lax"}),
     "IDENTITY_AMP.cookie.name '__Secure-id' needs cookie.secure = true"),
    ("__Host- without domain", config(cookie={"name": "__Host-id", "domain": ".example.com"}),
     "IDENTITY_AMP.cookie.domain must not be set for a __Host- cookie"),
    # Browsers match the prefixes in any case (RFC 6265bis): such cookies were dropped.
    ("__SECURE- needs secure", config(cookie={"name": "__SECURE-id", "secure": False,
                                              "same_site": "Lax"}),
     "IDENTITY_AMP.cookie.name '__SECURE-id' needs cookie.secure = true"),
    ("__host- without domain", config(cookie={"name": "__host-id", "domain": ".example.com"}),
     "IDENTITY_AMP.cookie.domain must not be set for a __Host- cookie"),
    ("SameSite=None needs Secure", config(cookie={"secure": False}),
     "IDENTITY_AMP.cookie.same_site None needs cookie.secure = true"),
    ("same_site unknown", config(cookie={"same_site": "Medium"}),
     "IDENTITY_AMP.cookie.same_site must be None, Lax or Strict, not 'Medium'"),
    ("secure not a flag", config(cookie={"secure": "yes"}),
     "IDENTITY_AMP.cookie.secure must be true or false, not 'yes'"),
    ("http_only not a flag", config(cookie={"http_only": 1}),
     "IDENTITY_AMP.cookie.http_only must be true or false, not 1"),
    ("max_age zero", config(cookie={"max_age": 0}),
     f"IDENTITY_AMP.cookie.max_age must be between 1 and {MAX_COOKIE_MAX_AGE}, not 0"),
    ("max_age over 400 days", config(cookie={"max_age": MAX_COOKIE_MAX_AGE + 1}),
     "IDENTITY_AMP.cookie.max_age must be between 1 and"),
    ("max_age text", config(cookie={"max_age": "1y"}),
     "IDENTITY_AMP.cookie.max_age must be a whole number, not '1y'"),
    ("cookie domain elsewhere", config(cookie={"domain": ".example.org"}),
     "IDENTITY_AMP.cookie.domain '.example.org' must be www.example.com or a parent domain"),
    ("cookie domain look-alike", config(cookie={"domain": "ample.com"}),
     "IDENTITY_AMP.cookie.domain 'ample.com' must be www.example.com or a parent domain"),
    ("cookie domain a suffix", config(cookie={"domain": ".com"}),
     "IDENTITY_AMP.cookie.domain must be a domain name"),
    ("cookie domain URL", config(cookie={"domain": "https://example.com"}),
     "IDENTITY_AMP.cookie.domain must be a domain name"),
    ("actions not a table", config(actions=["add-to-cart"]),
     "IDENTITY_AMP.actions must be a table of action name"),
    ("action name", config(actions={"add to cart": BASE["actions"]["add-to-cart"]}),
     "IDENTITY_AMP.actions.add to cart must be named with 1 to 64 letters"),
    ("action not a table", config(actions={"add-to-cart": "https://backend.example.com"}),
     f"IDENTITY_AMP.{ACTION} must be a table of done_url, secret, webhook"),
    ("action unknown key", with_action(method="POST"),
     f"IDENTITY_AMP.{ACTION}.method is not a setting (a typo?)"),
    ("webhook missing", with_action(webhook=None), f"IDENTITY_AMP.{ACTION}.webhook is required"),
    ("webhook http", with_action(webhook="http://backend.example.com/hook"),
     f"IDENTITY_AMP.{ACTION}.webhook must use https, or http to a loopback address"),
    ("webhook http to a private address", with_action(webhook="http://10.0.0.8/hook"),
     f"IDENTITY_AMP.{ACTION}.webhook must use https, or http to a loopback address"),
    ("webhook http to *.localhost", with_action(webhook="http://hooks.localhost/hook"),
     f"IDENTITY_AMP.{ACTION}.webhook must use https, or http to a loopback address"),
    ("webhook ftp", with_action(webhook="ftp://backend.example.com/hook"),
     f"IDENTITY_AMP.{ACTION}.webhook must be an absolute http(s) URL"),
    ("webhook userinfo", with_action(webhook="https://u:p@backend.example.com/hook"),
     f"IDENTITY_AMP.{ACTION}.webhook must not carry user information"),
    ("webhook backslash", with_action(webhook="https://127.0.0.1\\@evil.com/"),
     f"IDENTITY_AMP.{ACTION}.webhook must be printable ASCII without spaces or backslashes"),
    ("webhook bad port", with_action(webhook="https://backend.example.com:99999/"),
     f"IDENTITY_AMP.{ACTION}.webhook must be an absolute http(s) URL"),
    ("secret short", with_action(secret="too-short"),
     f"IDENTITY_AMP.{ACTION}.secret must be a string of at least 32 characters"),
    ("secret missing", with_action(secret=None),
     f"IDENTITY_AMP.{ACTION}.secret must be a string of at least 32 characters"),
    ("done_url missing", with_action(done_url=None),
     f"IDENTITY_AMP.{ACTION}.done_url is required"),
    ("done_url elsewhere", with_action(done_url="https://evil.example.net/"),
     f"IDENTITY_AMP.{ACTION}.done_url must be on a publisher origin"),
    ("done_url on a cache", with_action(
        done_url="https://www-example-com.cdn.ampproject.org/c/s/www.example.com/"),
     f"IDENTITY_AMP.{ACTION}.done_url must be on a publisher origin"),
    ("done_url http", with_action(done_url="http://www.example.com/cart"),
     f"IDENTITY_AMP.{ACTION}.done_url must use https"),
    ("collect_redirect elsewhere", config(collect_redirect="https://tracker.example.net/p"),
     "IDENTITY_AMP.collect_redirect must be on a publisher origin"),
    ("link_ttl zero", config(link_ttl=0), "IDENTITY_AMP.link_ttl must be between 60 and"),
    ("action_ttl long", config(action_ttl=3600),
     "IDENTITY_AMP.action_ttl must be between 5 and 300, not 3600"),
    ("action_ttl flag", config(action_ttl=True),
     "IDENTITY_AMP.action_ttl must be a whole number, not True"),
    ("max_form_bytes", config(max_form_bytes=10), "IDENTITY_AMP.max_form_bytes must be between"),
    ("max_form_fields", config(max_form_fields=0), "IDENTITY_AMP.max_form_fields must be between"),
    ("webhook_timeout text", config(webhook_timeout="3"),
     "IDENTITY_AMP.webhook_timeout must be a number, not '3'"),
    ("webhook_timeout long", config(webhook_timeout=60),
     "IDENTITY_AMP.webhook_timeout must be between 0.1 and 30.0, not 60"),
    ("webhook_attempts", config(webhook_attempts=0),
     "IDENTITY_AMP.webhook_attempts must be between 1 and 10, not 0"),
    ("limit not a table", config(limit_per_ip=100),
     "IDENTITY_AMP.limit_per_ip must be a table of requests, window_seconds"),
    ("limit unknown key", config(limit_per_client={"requests": 5, "window": 60}),
     "IDENTITY_AMP.limit_per_client.window is not a setting (a typo?)"),
    ("limit requests", config(limit_per_ip={"requests": 0, "window_seconds": 60}),
     "IDENTITY_AMP.limit_per_ip.requests must be between 1 and"),
    ("limit window", config(limit_per_client={"requests": 5, "window_seconds": 1.5}),
     "IDENTITY_AMP.limit_per_client.window_seconds must be a whole number, not 1.5"),
]  # fmt: skip


@pytest.mark.parametrize("host", NOT_DNS_HOSTS)
def test_a_webhook_host_no_dns_name_can_be_is_refused_as_other_hosts_are(host: str) -> None:
    """Taken at start before, its every call then failed (aiohttp's IDNA encoding raised a
    UnicodeError before any connection). Refused as a destination's host is."""
    assert problems(with_action(webhook=f"https://{host}:8443/hook")) == [
        f"IDENTITY_AMP.{ACTION}.webhook must name a host of at most 253 characters, each "
        "label (between dots) 1 to 63, as DNS allows"
    ]


@pytest.mark.parametrize("host", DNS_HOSTS)
def test_a_webhook_host_at_dns_limits_is_taken(host: str) -> None:
    webhook = f"https://{host}/hook"
    assert amp_settings(with_action(webhook=webhook)).actions["add-to-cart"].webhook == webhook


@pytest.mark.parametrize(
    ("amp", "expected"), [case[1:] for case in ONE_PROBLEM], ids=[case[0] for case in ONE_PROBLEM]
)
def test_each_mistake_is_one_problem(amp: Any, expected: str) -> None:
    found = problems(amp)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def on_host(host: str, domain: str) -> dict[str, Any]:
    """A table whose ``public_url`` is on ``host`` (its one publisher origin, no action),
    with ``cookie.domain = domain``."""
    origin = f"https://{host}"
    return config(
        public_url=f"{origin}/identity",
        publisher_origins=[origin],
        actions=None,
        cookie={"domain": domain},
    )


@pytest.mark.parametrize(
    ("host", "domain", "own"),
    [
        ("shop.example.co.uk", ".co.uk", "example.co.uk"),  # ICANN, two labels
        ("shop.github.io", "github.io", "shop.github.io"),  # the list's private section
        ("myapp.appspot.com", ".appspot.com", "myapp.appspot.com"),
        ("www.example.com.au", "COM.AU", "example.com.au"),
    ],
)
def test_a_public_suffix_cookie_domain_is_refused_at_start(
    host: str, domain: str, own: str
) -> None:
    """Browsers refuse a cookie whose Domain is a public suffix (RFC 6265 5.3, the Public
    Suffix List): with such a domain the cookie bridge would never set its cookie."""
    assert problems(on_host(host, domain)) == [
        f"IDENTITY_AMP.cookie.domain {domain!r} is a public suffix (publicsuffix.org): "
        f"browsers refuse a cookie for it, so the visitor cookie would never be set; use "
        f"your own domain ('.{own}') or leave cookie.domain unset"
    ]


@pytest.mark.parametrize("domain", ["com", ".com", "localhost", "192.0.2.10", "[::1]", "::1"])
def test_a_single_label_or_an_ip_address_cookie_domain_is_refused(domain: str) -> None:
    assert problems(config(cookie={"domain": domain})) == [
        f"IDENTITY_AMP.cookie.domain must be a domain name such as '.example.com', not {domain!r}"
    ]


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("shop.example.co.uk", ".example.co.uk"),
        ("shop.github.io", "shop.github.io"),  # a site of its own under a private suffix
        ("id.corp.internal", ".corp.internal"),  # a name the list does not know
    ],
)
def test_a_registrable_cookie_domain_is_kept(host: str, domain: str) -> None:
    assert amp_settings(on_host(host, domain)).cookie.domain == domain


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        config(
            public_url="http://www.example.com",
            caches=["*.bing-amp.com"],
            source="blog",
            cookie={"secure": False, "colour": "blue"},
            actions={"add-to-cart": {"webhook": "http://x.example", "secret": "s"}},
        )
    )
    assert [line.split(" ")[0] for line in found] == [
        "IDENTITY_AMP.public_url",
        "IDENTITY_AMP.caches:",
        "IDENTITY_AMP.source",
        "IDENTITY_AMP.cookie.colour",
        "IDENTITY_AMP.cookie.same_site",
        f"IDENTITY_AMP.{ACTION}.webhook",
        f"IDENTITY_AMP.{ACTION}.secret",
        f"IDENTITY_AMP.{ACTION}.done_url",
    ]


def test_an_invalid_publisher_origin_is_not_blamed_on_the_urls_on_it() -> None:
    found = problems(config(publisher_origins=["https://www.example.com/x"]))
    assert found == [
        "IDENTITY_AMP.publisher_origins: 'https://www.example.com/x' must be an origin "
        "(scheme, host and port) without a path"
    ]


TOML = f"""
[sources.checkout]
write_key_hash = "sha256:{"0" * 64}"
origins = ["https://www.example.com"]

[amp]
public_url = "https://www.example.com/identity"
publisher_origins = ["https://www.example.com"]
source = "checkout"
caches = ["cdn.ampproject.org"]

[amp.cookie]
domain = ".example.com"
max_age = 31536000

[amp.actions.add-to-cart]
webhook = "https://backend.example.com/hooks/cart"
secret = "{HOOK_SECRET}"
done_url = "https://www.example.com/cart"
"""

YAML = f"""
amp:
  public_url: https://www.example.com/identity
  publisher_origins: [https://www.example.com]
  source: dev
  actions:
    add-to-cart:
      webhook: https://backend.example.com/hooks/cart
      secret: {HOOK_SECRET}
      done_url: https://www.example.com/cart
"""


def test_the_table_of_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "identity.toml"
    path.write_text(TOML)
    amp = load_settings({"IDENTITY_SECRET": SECRET}, path).amp
    assert amp is not None
    assert amp.cookie.domain == ".example.com"
    assert amp.allowed_origins == {
        "https://www.example.com",
        f"https://{cache_subdomain('www.example.com')}.cdn.ampproject.org",
    }
    assert amp.actions["add-to-cart"].done_url == "https://www.example.com/cart"


def test_the_table_of_a_yaml_file_with_the_dev_source(tmp_path: Path) -> None:
    path = tmp_path / "identity.yaml"
    path.write_text(YAML)
    amp = load_settings({}, path).amp
    assert amp is not None and amp.source == "dev"


def test_file_problems_name_the_file_keys(tmp_path: Path) -> None:
    path = tmp_path / "identity.toml"
    path.write_text(
        TOML.replace('public_url = "https://', 'public_url = "http://').replace(
            "max_age = 31536000", "max_age = -1\nsame_site = 'Lax'"
        )
    )
    with pytest.raises(ConfigError) as info:
        load_settings({"IDENTITY_SECRET": SECRET}, path)
    assert [line.split(" ")[0] for line in info.value.problems] == [
        "amp.public_url",
        "amp.cookie.max_age",
    ]


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "identity.toml"
    path.write_text(TOML)
    other = config(source="checkout", public_url="https://www.example.com/other")
    settings = load_settings(
        {"IDENTITY_SECRET": SECRET, "IDENTITY_SOURCES": sources_env(), "IDENTITY_AMP":
         json.dumps(other)}, path
    )  # fmt: skip
    assert settings.amp is not None
    assert settings.amp.public_url == "https://www.example.com/other"
