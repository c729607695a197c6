"""Settings from the environment and files, and the checks that fail fast at start."""

import json
from pathlib import Path

import pytest

from identity_service.settings import ConfigError, RedisSettings, load_settings
from identity_service.sources import hash_write_key
from tests.conftest import SECRET, make_settings

SHOP = {"write_key_hash": hash_write_key("k-shop"), "origins": ["https://checkout.example.com"]}


def problems_of(environ: dict[str, str], config_file: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ, config_file)
    return raised.value.problems


def test_no_configuration_gives_the_embedded_default_with_a_dev_source() -> None:
    settings = load_settings({})
    assert settings.redis is None
    assert settings.uses_dev_source
    assert settings.dev_write_key and len(settings.dev_write_key) >= 24
    assert [s.name for s in settings.sources] == ["dev"]
    assert (settings.default_ttl, settings.max_ttl, settings.max_body_bytes) == (300, 600, 16384)
    assert not settings.secret_configured
    assert load_settings({}).dev_write_key != settings.dev_write_key


def test_dev_write_key_can_be_fixed() -> None:
    settings = load_settings({"IDENTITY_DEV_WRITE_KEY": "fixed-dev-key"})
    assert settings.dev_write_key == "fixed-dev-key"
    assert settings.sources[0].write_key_digest.hex() == hash_write_key("fixed-dev-key")[7:]


def test_sources_from_environment_json() -> None:
    settings = make_settings()
    assert {s.name for s in settings.sources} == {"shop", "checkout", "partner"}
    assert not settings.uses_dev_source
    assert settings.secret == SECRET.encode()


def test_redis_settings_from_dsn() -> None:
    settings = make_settings("rediss://user:pw@redis.internal:6380/2", redis_timeout="0.25")
    assert settings.redis is not None
    assert settings.redis.url == "rediss://user:pw@redis.internal:6380/2"
    assert settings.redis.timeout == 0.25
    assert RedisSettings.from_dsn("unix:///run/redis.sock").url.startswith("unix://")
    with pytest.raises(ValueError, match="scheme"):
        RedisSettings.from_dsn("http://redis:6379")
    assert RedisSettings.from_dsn("rediss://redis:6380/0?ssl_cert_reqs=none")
    with pytest.raises(ValueError, match="ssl_cert_reqs must be one of none, optional, required"):
        RedisSettings.from_dsn("rediss://redis:6380/0?ssl_cert_reqs=maybe")


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "IDENTITY_REDIS_URL": "http://nope",
            "IDENTITY_MAX_TTL": "ten",
            "IDENTITY_DEFAULT_TTL": "0",
            "IDENTITY_SECRET": "short",
            "IDENTITY_MAX_BODY_BYTES": "1e9",
            "IDENTITY_LOG_LEVEL": "loud",
            "IDENTITY_TOKEN_PARAM": "a b",
            "IDENTITY_REDIS_KEY_PREFIX": "{x}",
            "IDENTITY_REDSI_URL": "redis://typo",
        }
    )
    expected = [
        "IDENTITY_REDIS_URL",
        "IDENTITY_MAX_TTL",
        "IDENTITY_DEFAULT_TTL",
        "IDENTITY_SECRET",
        "IDENTITY_MAX_BODY_BYTES",
        "IDENTITY_LOG_LEVEL",
        "IDENTITY_TOKEN_PARAM",
        "IDENTITY_REDIS_KEY_PREFIX",
        "IDENTITY_REDSI_URL",
    ]
    for name in expected:
        assert any(name in problem for problem in problems), (name, problems)
    assert len(problems) == len(expected)


def test_redis_needs_a_server_secret() -> None:
    problems = problems_of({"IDENTITY_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert problems == [
        "IDENTITY_SECRET is required with IDENTITY_REDIS_URL: every instance must derive "
        "the same token lookup ids"
    ]


def test_default_ttl_may_not_exceed_max_ttl() -> None:
    problems = problems_of({"IDENTITY_DEFAULT_TTL": "700"})
    assert problems == ["IDENTITY_DEFAULT_TTL (700) is above IDENTITY_MAX_TTL (600)"]


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"origins": ["https://a.test"]}, "write_key_hash"),
        ({"write_key_hash": "plain-key", "origins": ["https://a.test"]}, "write_key_hash"),
        ({"write_key_hash": "sha256:abcd", "origins": ["https://a.test"]}, "64 hex digits"),
        ({"write_key_hash": hash_write_key("k")}, "origins"),
        ({"write_key_hash": hash_write_key("k"), "origins": ["http://a.test"]}, "https"),
        ({"write_key_hash": hash_write_key("k"), "origins": ["https://*.a.test"]}, "wildcard"),
        ({"write_key_hash": hash_write_key("k"), "origins": ["https://a.test"], "x": 1}, "unknown"),
        ("not a table", "must be a table"),
    ],
)
def test_bad_sources_are_explained(spec: object, complaint: str) -> None:
    problems = problems_of({"IDENTITY_SOURCES": json.dumps({"shop": spec})})
    assert len(problems) == 1
    assert problems[0].startswith("sources.shop")
    assert complaint in problems[0]


def test_sources_json_must_parse() -> None:
    assert problems_of({"IDENTITY_SOURCES": "{not json"})[0].startswith(
        "IDENTITY_SOURCES is not valid JSON"
    )


def test_dev_write_key_with_configured_sources_is_refused() -> None:
    problems = problems_of(
        {"IDENTITY_SOURCES": json.dumps({"shop": SHOP}), "IDENTITY_DEV_WRITE_KEY": "k"}
    )
    assert "IDENTITY_DEV_WRITE_KEY" in problems[0]


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "identity.toml"
    path.write_text(
        f"""
secret = "{SECRET}"
redis_url = "redis://127.0.0.1:6390/0"
max_ttl = 900

[sources.shop]
write_key_hash = "{SHOP["write_key_hash"]}"
origins = ["https://checkout.example.com"]
"""
    )
    settings = load_settings({}, path)
    assert settings.max_ttl == 900
    assert settings.redis is not None and settings.redis.url.endswith(":6390/0")
    assert [s.name for s in settings.sources] == ["shop"]
    assert settings.sources[0].may_use("https://checkout.example.com")


def test_yaml_file_named_by_environment_and_overridden_by_it(tmp_path: Path) -> None:
    path = tmp_path / "identity.yaml"
    path.write_text(
        f"""
secret: {SECRET}
max_ttl: 900
sources:
  shop:
    write_key_hash: "{SHOP["write_key_hash"]}"
    origins: [https://checkout.example.com]
"""
    )
    settings = load_settings({"IDENTITY_CONFIG_FILE": str(path), "IDENTITY_MAX_TTL": "450"})
    assert settings.max_ttl == 450
    assert settings.secret_configured


@pytest.mark.parametrize(
    ("name", "text", "complaint"),
    [
        ("c.toml", "max_ttl = ", "config file"),
        ("c.yaml", "a: [", "config file"),
        ("c.yaml", "- a list", "must hold a table"),
        ("c.ini", "x=1", "must end in"),
        ("c.toml", "colour = 'blue'", "unknown settings colour"),
        ("c.toml", "max_ttl = 'long'", "max_ttl must be a whole number"),
        ("c.toml", "secret = 42", "secret must be a string"),
    ],
)
def test_bad_files_are_explained(tmp_path: Path, name: str, text: str, complaint: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    problems = problems_of({}, path)
    assert any(complaint in p for p in problems), problems


def test_missing_file_is_explained(tmp_path: Path) -> None:
    assert "No such file" in problems_of({}, tmp_path / "absent.toml")[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.5"])
def test_loopback_binds_need_nothing(host: str) -> None:
    load_settings({}).check_bind(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.internal"])  # noqa: S104
def test_non_loopback_bind_needs_sources_and_secret(host: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}).check_bind(host)
    assert len(raised.value.problems) == 2
    with pytest.raises(ConfigError) as raised:
        load_settings({"IDENTITY_SOURCES": json.dumps({"shop": SHOP})}).check_bind(host)
    assert raised.value.problems == [f"binding {host} needs a server secret (IDENTITY_SECRET)"]
    make_settings().check_bind(host)


def test_events_go_to_stdout_by_default_and_to_a_configured_destination() -> None:
    assert [d.kind for d in load_settings({}).outbox.destinations] == ["stdout"]
    settings = load_settings(
        {
            "IDENTITY_DESTINATION_URL": "https://api.segment.io",
            "IDENTITY_DESTINATION_WRITE_KEY": "wk",
            "IDENTITY_BATCH_MAX_EVENTS": "250",
        }
    )
    (destination,) = settings.outbox.destinations
    assert destination.batch_url == "https://api.segment.io/v1/batch"
    assert destination.write_key == "wk"
    assert "wk" not in repr(destination)
    assert settings.outbox.batch_max_events == 250


def test_destinations_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
events_file = "/tmp/events.jsonl"
[destinations.segment]
url = "https://api.segment.io/v1/batch"
write_key = "wk1"
[destinations.rudder]
url = "http://rudderstack.internal:8080"
write_key = "wk2"
"""
    )
    destinations = load_settings({}, path).outbox.destinations
    assert [(d.name, d.kind) for d in destinations] == [
        ("segment", "http"),
        ("rudder", "http"),
        ("file", "file"),
    ]
    assert destinations[0].batch_url == "https://api.segment.io/v1/batch"
    assert destinations[1].batch_url == "http://rudderstack.internal:8080/v1/batch"


def test_destinations_from_the_environment_as_json() -> None:
    settings = load_settings(
        {
            "IDENTITY_DESTINATIONS": json.dumps(
                {"segment": {"url": "https://api.segment.io", "write_key": "wk"}}
            )
        }
    )
    assert [(d.name, d.kind) for d in settings.outbox.destinations] == [("segment", "http")]
    problems = problems_of(
        {"IDENTITY_DESTINATIONS": json.dumps({"rudder": {"url": "ftp://x"}})}
    ) + problems_of({"IDENTITY_DESTINATIONS": "{not json"})
    for expected in (
        "destinations.rudder.url must be an http(s) URL",
        "destinations.rudder.write_key is required",
        "IDENTITY_DESTINATIONS is not valid JSON",
    ):
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_bad_event_settings_are_explained() -> None:
    problems = problems_of(
        {
            "IDENTITY_DESTINATION_URL": "ftp://x",
            "IDENTITY_OUTBOX": "sometimes",
            "IDENTITY_FORWARDER": "elsewhere",
            "IDENTITY_BATCH_MAX_EVENTS": "2501",
            "IDENTITY_BATCH_MAX_WAIT": "-1",
        }
    )
    for expected in (
        "IDENTITY_DESTINATION_URL must be an http(s) URL",
        "IDENTITY_DESTINATION_WRITE_KEY is required",
        "IDENTITY_OUTBOX must be one of on, off",
        "IDENTITY_FORWARDER must be one of embedded, off",
        "IDENTITY_BATCH_MAX_EVENTS must be between 1 and 2500",
        "IDENTITY_BATCH_MAX_WAIT must be between 0 and 60",
    ):
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_forwarder_off_needs_redis() -> None:
    problems = problems_of({"IDENTITY_FORWARDER": "off"})
    assert problems[0].startswith("IDENTITY_FORWARDER=off needs IDENTITY_REDIS_URL")
    assert not make_settings("redis://127.0.0.1:6399/0", forwarder="off").outbox.forwarder_in_serve


def test_workers_need_redis() -> None:
    assert make_settings("redis://127.0.0.1:1/0", workers="4").workers == 4
    assert make_settings(None).workers == 1
    (problem,) = problems_of({"IDENTITY_WORKERS": "2"})
    assert "IDENTITY_WORKERS above 1 needs Redis" in problem
    assert problems_of({"IDENTITY_WORKERS": "0"})
