"""Settings from the environment and files, and the checks that fail fast at start."""

import errno
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.connection import parse_url

from identity_service.constants import DEFAULT_FORWARDER_METRICS_HOST
from identity_service.constants import DEFAULT_TRUSTED_PROXIES as DEFAULT_TRUSTED_PROXIES_NETWORKS
from identity_service.proxies import DEFAULT_TRUSTED_PROXIES
from identity_service.settings import (
    SENTINEL_PARAMETERS,
    SETTING_NAMES,
    ConfigError,
    RedisSettings,
    Settings,
    Topology,
    load_settings,
    redact_url,
    redis_url_parameters,
)
from identity_service.sources import hash_write_key, write_key_from_header
from identity_service.stores.redis import connect
from identity_service.stores.topology import lean_client
from identity_service.urls import host_port
from tests.conftest import SECRET, make_settings, sources_env
from tests.redis_server import RedisServer, free_port
from tests.test_resp import write_tls_files

SHOP = {"write_key_hash": hash_write_key("k-shop"), "origins": ["https://checkout.example.com"]}
CHECKOUT = {**SHOP, "write_key_hash": hash_write_key("k-checkout")}


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
    assert problems == ["IDENTITY_DEFAULT_TTL (700) is above IDENTITY_MAX_TTL (600, the default)"]
    assert problems_of({"IDENTITY_DEFAULT_TTL": "700", "IDENTITY_MAX_TTL": "650"}) == [
        "IDENTITY_DEFAULT_TTL (700) is above IDENTITY_MAX_TTL (650)"
    ]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "identity.toml"
    path.write_text(text)
    return path


def test_an_invalid_ttl_is_the_only_problem_and_named_as_written(tmp_path: Path) -> None:
    file = write(tmp_path, 'default_ttl = "abc"\nmax_ttl = 10\n')
    assert problems_of({}, file) == ["default_ttl must be a whole number, not 'abc'"]
    assert problems_of({"IDENTITY_MAX_TTL": "0", "IDENTITY_DEFAULT_TTL": "700"}) == [
        "IDENTITY_MAX_TTL must be between 1 and 86400, not 0"
    ]
    assert problems_of({}, write(tmp_path, "default_ttl = 700\n")) == [
        "default_ttl (700) is above max_ttl (600, the default)"
    ]
    assert problems_of({"IDENTITY_DEFAULT_TTL": "90"}, write(tmp_path, "max_ttl = 60\n")) == [
        "IDENTITY_DEFAULT_TTL (90) is above max_ttl (60)"
    ]


@pytest.mark.parametrize(
    ("environ", "text", "problem"),
    [
        (  # not a second "needs IDENTITY_REDIS_URL": it is set, and reported
            {"IDENTITY_REDIS_URL": "http://x", "IDENTITY_FORWARDER": "off"},
            f'secret = "{SECRET}"',
            "IDENTITY_REDIS_URL: scheme must be one of redis, rediss, unix, redis+cluster, rediss+cluster, redis+sentinel, rediss+sentinel, not 'http'",
        ),
        (
            {"IDENTITY_REDIS_URL": "http://x", "IDENTITY_WORKERS": "2"},
            f'secret = "{SECRET}"',
            "IDENTITY_REDIS_URL: scheme must be one of redis, rediss, unix, redis+cluster, rediss+cluster, redis+sentinel, rediss+sentinel, not 'http'",
        ),
        (  # not a second "secret is required": it is set, and reported
            {},
            'secret = 42\nredis_url = "redis://127.0.0.1:6390/0"',
            "secret must be a string",
        ),
        (  # the outbox may be meant off: no verdict on the forwarder without Redis
            {"IDENTITY_OUTBOX": "sometimes", "IDENTITY_FORWARDER": "off"},
            "",
            "IDENTITY_OUTBOX must be one of on, actions, off, not 'sometimes'",
        ),
        ({}, 'secret = "short"', "secret must be at least 32 characters"),
        ({}, 'log_level = "loud"', "log_level must be debug, info, warning or error, not 'loud'"),
        ({}, 'forwarder = "elsewhere"', "forwarder must be one of embedded, off, not 'elsewhere'"),
        (
            {"IDENTITY_FORWARDER_METRICS_PORT": "70000"},
            "",
            "IDENTITY_FORWARDER_METRICS_PORT must be between 1 and 65535, not 70000",
        ),
        (
            {},
            'forwarder_metrics_port = "metrics"',
            "forwarder_metrics_port must be a whole number, not 'metrics'",
        ),
        (
            {"IDENTITY_METRICS_PORT": "70000"},
            "",
            "IDENTITY_METRICS_PORT must be between 1 and 65535, not 70000",
        ),
        ({}, 'metrics_port = "metrics"', "metrics_port must be a whole number, not 'metrics'"),
        (
            {},
            'redis_key_prefix = "{x}"',
            "redis_key_prefix must not contain braces (they mark hash tags)",
        ),
    ],
)
def test_a_problem_is_reported_once_under_the_name_written(
    tmp_path: Path, environ: dict[str, str], text: str, problem: str
) -> None:
    assert problems_of(environ, write(tmp_path, text)) == [problem]


def test_checks_across_settings_name_what_the_file_says(tmp_path: Path) -> None:
    assert problems_of({}, write(tmp_path, 'redis_url = "redis://127.0.0.1:6390/0"')) == [
        "secret is required with redis_url: every instance must derive the same token lookup ids"
    ]
    assert problems_of({}, write(tmp_path, "workers = 2\nforwarder = 'off'")) == [
        "forwarder=off needs IDENTITY_REDIS_URL: without Redis the events are in this process, "
        "and only its own forwarder can deliver them",
        "workers above 1 needs Redis (IDENTITY_REDIS_URL): each worker would keep its own "
        "memory store, and a token prepared in one could not be exchanged in another",
    ]


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
    load_settings({}, host=host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.internal"])  # noqa: S104
def test_non_loopback_bind_needs_sources_and_secret(host: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, host=host)
    assert len(raised.value.problems) == 2
    with pytest.raises(ConfigError) as raised:
        load_settings({"IDENTITY_SOURCES": json.dumps({"shop": SHOP})}, host=host)
    assert raised.value.problems == [f"binding {host} needs a server secret (IDENTITY_SECRET)"]
    load_settings({"IDENTITY_SOURCES": sources_env(), "IDENTITY_SECRET": SECRET}, host=host)


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


def test_an_events_file_that_cannot_be_opened_is_refused(tmp_path: Path) -> None:
    """An events file in a directory that does not exist (or a directory itself) was taken
    at start, then every delivery failed and was retried until dead-lettered."""
    missing = tmp_path / "missing" / "events.jsonl"
    (problem,) = problems_of({"IDENTITY_EVENTS_FILE": str(missing)})
    assert problem == (
        f"IDENTITY_EVENTS_FILE must be a file in an existing directory: {missing.parent} "
        "is not a directory"
    )
    plain = tmp_path / "plain"
    plain.write_text("")
    (problem,) = problems_of({"IDENTITY_EVENTS_FILE": str(plain / "events.jsonl")})
    assert problem.endswith(f"{plain} is not a directory")
    (problem,) = problems_of({"IDENTITY_EVENTS_FILE": str(tmp_path)})
    assert problem == f"IDENTITY_EVENTS_FILE must be a file, not the directory {tmp_path}"
    config = tmp_path / "config.toml"
    config.write_text(f'events_file = "{missing}"\n')
    (problem,) = problems_of({}, config)
    assert problem.startswith("events_file must be a file in an existing directory")
    for path in (tmp_path / "events.jsonl", plain, "events.jsonl"):
        settings = load_settings({"IDENTITY_EVENTS_FILE": str(path)})
        assert [d.path for d in settings.outbox.destinations] == [str(path)]


def test_an_events_file_this_user_cannot_reach_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a directory on the way that the service's user may not search
    (EACCES, which pathlib's is_dir raises) made every command a PermissionError traceback
    at start, not a problem of the settings. (Root searches any directory: simulated.)"""

    def refused(_path: Path) -> bool:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "is_dir", refused)
    path = tmp_path / "locked" / "events.jsonl"
    assert problems_of({"IDENTITY_EVENTS_FILE": str(path)}) == [
        f"IDENTITY_EVENTS_FILE cannot be reached ({path}): Permission denied"
    ]


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
allow_insecure = true
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
        "IDENTITY_OUTBOX must be one of on, actions, off",
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


def test_redis_addresses_are_shown_without_their_password() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://ops:p%40ss@h:1/0?ssl_cert_reqs=none") == (
        "rediss://ops:***@h:1/0?ssl_cert_reqs=none"
    )
    assert redact_url("redis://ops@h/0") == "redis://ops@h/0"
    assert redact_url("unix:///run/r.sock?db=1&password=pw&Password=x") == (
        "unix:///run/r.sock?db=1&password=***&Password=***"
    )
    settings = make_settings("redis://default:hunter2@redis.internal:6379/0")
    assert settings.redis is not None
    assert settings.redis.address == "redis://default:***@redis.internal:6379/0"


INSECURE = "would send the write key in clear text to collector.example.com"


@pytest.mark.parametrize(
    ("environ", "text", "problem"),
    [
        (
            {
                "IDENTITY_DESTINATION_URL": "http://collector.example.com",
                "IDENTITY_DESTINATION_WRITE_KEY": "wk",
            },
            "",
            f"IDENTITY_DESTINATION_URL {INSECURE}: use https, or set "
            "IDENTITY_DESTINATION_ALLOW_INSECURE to true",
        ),
        (
            {},
            'destination_url = "http://collector.example.com/"\ndestination_write_key = "wk"',
            f"destination_url {INSECURE}: use https, or set destination_allow_insecure to true",
        ),
        (
            {
                "IDENTITY_DESTINATIONS": json.dumps(
                    {"rudder": {"url": "http://collector.example.com:8080", "write_key": "wk"}}
                )
            },
            "",
            f"destinations.rudder.url {INSECURE}: use https, or set "
            "destinations.rudder.allow_insecure to true",
        ),
        (
            {},
            '[destinations.rudder]\nurl = "http://collector.example.com"\nwrite_key = "wk"\n'
            'allow_insecure = "yes"',
            "destinations.rudder.allow_insecure must be true or false, not 'yes'",
        ),
        (
            {
                "IDENTITY_DESTINATION_URL": "http://collector.example.com",
                "IDENTITY_DESTINATION_WRITE_KEY": "wk",
                "IDENTITY_DESTINATION_ALLOW_INSECURE": "1",
            },
            "",
            "IDENTITY_DESTINATION_ALLOW_INSECURE must be true or false, not '1'",
        ),
        (  # a malformed URL is a problem, not a crash
            {"IDENTITY_DESTINATION_URL": "http://[::1", "IDENTITY_DESTINATION_WRITE_KEY": "wk"},
            "",
            "IDENTITY_DESTINATION_URL must be an http(s) URL of a Segment-compatible API",
        ),
    ],
)
def test_a_write_key_is_not_sent_in_clear_text_off_loopback(
    tmp_path: Path, environ: dict[str, str], text: str, problem: str
) -> None:
    assert problems_of(environ, write(tmp_path, text)) == [problem]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://127.3.2.1/", "http://[::1]:9000", "http://localhost:3000"],
)
def test_http_destinations_on_loopback_need_no_permission(url: str) -> None:
    environ = {"IDENTITY_DESTINATION_URL": url, "IDENTITY_DESTINATION_WRITE_KEY": "wk"}
    (destination,) = load_settings(environ).outbox.destinations
    assert destination.url == url


def test_http_destinations_off_loopback_when_allowed(tmp_path: Path) -> None:
    environ = {
        "IDENTITY_DESTINATION_URL": "http://collector.example.com",
        "IDENTITY_DESTINATION_WRITE_KEY": "wk",
        "IDENTITY_DESTINATION_ALLOW_INSECURE": "true",
        "IDENTITY_DESTINATIONS": json.dumps(
            {"rudder": {"url": "http://rudder.internal", "write_key": "k", "allow_insecure": True}}
        ),
    }
    destinations = load_settings(environ).outbox.destinations
    assert [d.url for d in destinations] == [
        "http://collector.example.com",
        "http://rudder.internal",
    ]
    file = write(
        tmp_path,
        'destination_url = "http://collector.example.com"\ndestination_write_key = "wk"\n'
        "destination_allow_insecure = true\n",
    )
    assert load_settings({}, file).outbox.destinations[0].url == "http://collector.example.com"


def test_front_limits_have_defaults() -> None:
    settings = load_settings({})
    assert (settings.head_timeout, settings.body_timeout, settings.max_connections) == (
        10.0,
        10.0,
        1024,
    )


def test_front_limits_from_the_environment_and_a_file(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "IDENTITY_HEAD_TIMEOUT": "2.5",
            "IDENTITY_BODY_TIMEOUT": "30",
            "IDENTITY_MAX_CONNECTIONS": "1000000",
        }
    )
    assert (settings.head_timeout, settings.body_timeout, settings.max_connections) == (
        2.5,
        30.0,
        1_000_000,
    )
    file = write(tmp_path, "head_timeout = 0.1\nbody_timeout = 600\nmax_connections = 1\n")
    settings = load_settings({}, file)
    assert (settings.head_timeout, settings.body_timeout, settings.max_connections) == (
        0.1,
        600.0,
        1,
    )


def test_front_limits_out_of_range_are_explained() -> None:
    problems = problems_of(
        {
            "IDENTITY_HEAD_TIMEOUT": "0.05",
            "IDENTITY_BODY_TIMEOUT": "601",
            "IDENTITY_MAX_CONNECTIONS": "1000001",
        }
    )
    assert problems == [
        "IDENTITY_HEAD_TIMEOUT must be between 0.1 and 600.0, not 0.05",
        "IDENTITY_BODY_TIMEOUT must be between 0.1 and 600.0, not 601.0",
        "IDENTITY_MAX_CONNECTIONS must be between 1 and 1000000, not 1000001",
    ]
    assert problems_of({"IDENTITY_MAX_CONNECTIONS": "0", "IDENTITY_HEAD_TIMEOUT": "soon"}) == [
        "IDENTITY_HEAD_TIMEOUT must be a number, not 'soon'",
        "IDENTITY_MAX_CONNECTIONS must be between 1 and 1000000, not 0",
    ]


def test_the_repr_of_settings_holds_no_secret() -> None:
    settings = load_settings(
        {
            "IDENTITY_SECRET": "s3cret-" + "x" * 40,
            "IDENTITY_REDIS_URL": "redis://ops:hunter2-pw@127.0.0.1:6390/0",
            "IDENTITY_DEV_WRITE_KEY": "dev-key-not-for-logs",
        }
    )
    text = repr(settings)
    for secret in ("s3cret-", "hunter2-pw", "dev-key-not-for-logs"):
        assert secret not in text


@pytest.mark.parametrize(
    ("value", "port"), [(None, 9464), ("9100", 9100), ("0", None), ("off", None), ("OFF", None)]
)
def test_the_forwarder_metrics_port_defaults_to_9464_and_turns_off(
    value: str | None, port: int | None
) -> None:
    env = {} if value is None else {"forwarder_metrics_port": value}
    settings = make_settings(**env)
    assert settings.forwarder_metrics_port == port
    assert settings.forwarder_metrics_host == DEFAULT_FORWARDER_METRICS_HOST


ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - a bind address named, not bound


@pytest.mark.parametrize(
    ("env", "host", "address"),
    [
        ({}, None, None),  # unset: /metrics on the API's port, as before
        ({"IDENTITY_METRICS_PORT": "0"}, ANY_ADDRESS, None),
        ({"IDENTITY_METRICS_PORT": "off"}, ANY_ADDRESS, None),
        ({"IDENTITY_METRICS_PORT": "9100"}, None, ("127.0.0.1", 9100)),
        ({"IDENTITY_METRICS_PORT": "9100"}, ANY_ADDRESS, (ANY_ADDRESS, 9100)),  # the API's host
        ({"IDENTITY_METRICS_PORT": "9100"}, "::1", ("::1", 9100)),
        (
            {"IDENTITY_METRICS_PORT": "9100", "IDENTITY_METRICS_HOST": "10.0.0.7"},
            ANY_ADDRESS,
            ("10.0.0.7", 9100),
        ),
    ],
)
def test_serves_metrics_port_is_off_by_default_and_on_the_apis_host(
    env: dict[str, str], host: str | None, address: tuple[str, int] | None
) -> None:
    environ = {"IDENTITY_SOURCES": sources_env(), "IDENTITY_SECRET": SECRET, **env}
    settings = load_settings(environ, host=host, port=8080)
    if address is None:
        assert settings.metrics_port is None
    else:
        assert (settings.metrics_host, settings.metrics_port) == address


def test_a_metrics_port_that_is_the_apis_port_is_a_problem(tmp_path: Path) -> None:
    """One of them would fail to bind (or, with SO_REUSEPORT, share the API's connections)."""
    complaint = (
        "({port}) is the API's port (--port): give /metrics a port of its own, or unset it to "
        "serve /metrics on the API's port"
    )
    with pytest.raises(ConfigError) as raised:
        load_settings({"IDENTITY_METRICS_PORT": "8080"}, port=8080)
    assert raised.value.problems == [f"IDENTITY_METRICS_PORT {complaint.format(port=8080)}"]
    config = write(tmp_path, "metrics_port = 9000")
    with pytest.raises(ConfigError) as raised:
        load_settings({}, config, port=9000)
    assert raised.value.problems == [f"metrics_port {complaint.format(port=9000)}"]
    # Another port, or the forwarder's command, which serves no API: no problem.
    assert load_settings({"IDENTITY_METRICS_PORT": "8080"}, port=8081).metrics_port == 8080
    assert load_settings({"IDENTITY_METRICS_PORT": "8080"}).metrics_port == 8080


def test_destinations_take_the_events_of_the_sources_they_name(tmp_path: Path) -> None:
    path = tmp_path / "identity.toml"
    path.write_text(
        '[destinations.shop-segment]\nurl = "https://api.segment.io"\nwrite_key = "wk-a"\n'
        'sources = ["shop"]\n'
        '[destinations.everything]\nurl = "https://api.segment.io"\nwrite_key = "wk-b"\n'
    )
    environ = {"IDENTITY_SOURCES": json.dumps({"shop": SHOP, "checkout": CHECKOUT})}
    outbox = load_settings(environ, path).outbox
    assert [(d.name, d.sources) for d in outbox.destinations] == [
        ("shop-segment", frozenset({"shop"})),
        ("everything", None),
    ]
    assert outbox.routes_by_source
    single = load_settings(
        {
            **environ,
            "IDENTITY_DESTINATION_URL": "https://api.segment.io",
            "IDENTITY_DESTINATION_WRITE_KEY": "wk",
            "IDENTITY_DESTINATION_SOURCES": "shop, checkout",
        }
    )
    assert single.outbox.destinations[0].sources == frozenset({"shop", "checkout"})
    # Without sources every destination takes every event, and entries carry no source.
    assert not load_settings(environ).outbox.routes_by_source


@pytest.mark.parametrize(
    ("sources", "problem"),
    [
        (
            ["shop", "chekout"],
            "destinations.a.sources names 'chekout', not a configured source (checkout, shop)",
        ),
        ({"shop": True}, "destinations.a.sources must be a list of source names"),
        ([], "destinations.a.sources must name at least one source, without empty names"),
        ([1], "destinations.a.sources must be a list of source names"),
    ],
)
def test_a_destinations_sources_must_be_configured_sources(sources: object, problem: str) -> None:
    destinations = {"a": {"url": "https://api.segment.io", "write_key": "wk", "sources": sources}}
    environ = {
        "IDENTITY_SOURCES": json.dumps({"shop": SHOP, "checkout": CHECKOUT}),
        "IDENTITY_DESTINATIONS": json.dumps(destinations),
    }
    assert problems_of(environ) == [problem]


def test_the_single_destinations_sources_name_the_development_source_without_sources() -> None:
    environ = {
        "IDENTITY_DESTINATION_URL": "https://api.segment.io",
        "IDENTITY_DESTINATION_WRITE_KEY": "wk",
        "IDENTITY_DESTINATION_SOURCES": "shop",
    }
    assert problems_of(environ) == [
        "IDENTITY_DESTINATION_SOURCES names 'shop', not a configured source (dev)"
    ]
    environ["IDENTITY_DESTINATION_SOURCES"] = "dev"
    assert load_settings(environ).outbox.destinations[0].sources == frozenset({"dev"})


def test_sources_no_destination_takes_are_named() -> None:
    routed = {"a": {"url": "https://api.segment.io", "write_key": "wk", "sources": ["shop"]}}
    environ = {
        "IDENTITY_SOURCES": json.dumps({"shop": SHOP, "checkout": CHECKOUT}),
        "IDENTITY_DESTINATIONS": json.dumps(routed),
    }
    assert load_settings(environ).outbox.routed_nowhere(["shop", "checkout"]) == ["checkout"]
    everything = {**routed, "b": {"url": "https://api.segment.io", "write_key": "wk"}}
    environ["IDENTITY_DESTINATIONS"] = json.dumps(everything)
    assert load_settings(environ).outbox.routed_nowhere(["shop", "checkout"]) == []
    environ.update(IDENTITY_DESTINATIONS=json.dumps(routed), IDENTITY_OUTBOX="off")
    assert load_settings(environ).outbox.routed_nowhere(["shop", "checkout"]) == []


def test_cluster_and_sentinel_urls() -> None:
    cluster = RedisSettings.from_dsn("rediss+cluster://ops:pw@n1:7000,n2:7001,[::1]:7002")
    assert cluster.topology == "cluster"
    assert cluster.nodes == (("n1", 7000), ("n2", 7001), ("::1", 7002))
    assert cluster.node_url == "rediss://ops:pw@n1:7000/0"
    assert cluster.address == "rediss+cluster://ops:***@n1:7000,n2:7001,[::1]:7002"
    sentinel = RedisSettings.from_dsn(
        "rediss+sentinel://:pw@s1:26379,s2:26379/my%20master/3"
        "?sentinel_password=spw&ssl_cert_reqs=none"
    )
    assert (sentinel.topology, sentinel.service) == ("sentinel", "my master")
    assert sentinel.nodes == (("s1", 26379), ("s2", 26379))
    assert sentinel.node_url == "rediss://:pw@s1:26379/3?ssl_cert_reqs=none"
    assert sentinel.sentinel_auth == (None, "spw")
    assert "spw" not in sentinel.address and "sentinel_password=***" in sentinel.address
    single = RedisSettings.from_dsn("redis://h:1/0")
    assert (single.topology, single.node_url, single.nodes) == ("single", "redis://h:1/0", ())


@pytest.mark.parametrize(
    ("url", "node_url"),
    [
        ("redis+cluster://[::1]:7000,n2:7001", "redis://[::1]:7000/0"),
        ("rediss+sentinel://u:pw@[fe80::1]:26379/svc/2", "rediss://u:pw@[fe80::1]:26379/2"),
    ],
)
def test_an_ipv6_first_node_is_bracketed_in_the_node_url(url: str, node_url: str) -> None:
    settings = RedisSettings.from_dsn(url)
    assert settings.node_url == node_url
    host, port = settings.nodes[0]
    assert ":" in host and not host.startswith("[")
    # What the clients read it with: an unbracketed host made this a ValueError.
    options = parse_url(settings.node_url)  # type: ignore[no-untyped-call]
    assert (options["host"], options["port"]) == (host, port)


def test_host_port_brackets_ipv6_hosts() -> None:
    assert host_port("::1", 7000) == "[::1]:7000"
    assert host_port("127.0.0.1", 7000) == "127.0.0.1:7000"
    assert host_port("redis.internal", 6379) == "redis.internal:6379"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+sentinel://s1:26379", "ends with /<service name>"),
        ("redis+sentinel://s1:26379/a/b/c", "ends with /<service name>"),
        ("redis+sentinel://s1:26379/master/x", "database must be a number"),
        ("redis+cluster://n1:7000/2", "only database 0"),
        ("redis+cluster://n1:7000,n2", "host:port"),
        ("redis+cluster://n1:70000", "host:port"),
        ("redis+mesh://n1:7000", "scheme must be one of"),
    ],
)
def test_bad_topology_urls_are_explained(url: str, complaint: str) -> None:
    (problem,) = problems_of({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": SECRET})
    assert problem.startswith("IDENTITY_REDIS_URL: ") and complaint in problem


def test_redis_shards_and_wait() -> None:
    settings = make_settings("redis://h:1/0", redis_shards="48", redis_wait="1,50")
    assert settings.redis is not None
    assert (settings.redis.shards, settings.redis.wait) == (48, (1, 50))
    default = make_settings("redis://h:1/0")
    assert default.redis is not None
    assert (default.redis.shards, default.redis.wait) == (16, None)
    for wait in ("1", "0,50", "1,0", "x,y", "1,50,2"):
        (problem,) = problems_of(
            {"IDENTITY_REDIS_URL": "redis://h:1/0", "IDENTITY_SECRET": SECRET,
             "IDENTITY_REDIS_WAIT": wait}
        )  # fmt: skip
        assert problem.startswith("IDENTITY_REDIS_WAIT must be <replicas>,<milliseconds>")
    assert problems_of({"IDENTITY_REDIS_SHARDS": "0"})


def test_a_redis_wait_not_well_below_the_redis_timeout_is_refused(tmp_path: Path) -> None:
    """A WAIT holds its connection for up to its milliseconds, and the client drops a
    connection that makes no progress for IDENTITY_REDIS_TIMEOUT: with a WAIT as long as
    the timeout, every request failed (503) while a replica was down. At most half of it."""
    base = {"IDENTITY_REDIS_URL": "redis://h:1/0", "IDENTITY_SECRET": SECRET}
    (problem,) = problems_of({**base, "IDENTITY_REDIS_WAIT": "1,1000"})
    assert problem.startswith(
        "IDENTITY_REDIS_WAIT must wait at most half of IDENTITY_REDIS_TIMEOUT (1 s: 500 ms), "
        "not 1000 ms"
    )
    (problem,) = problems_of(
        {**base, "IDENTITY_REDIS_WAIT": "1,2000", "IDENTITY_REDIS_TIMEOUT": "3"}
    )
    assert "at most half of IDENTITY_REDIS_TIMEOUT (3 s: 1500 ms), not 2000 ms" in problem
    for wait, timeout in (("1,500", "1"), ("2,2000", "4"), ("1,5", "0.01")):
        settings = load_settings(
            {**base, "IDENTITY_REDIS_WAIT": wait, "IDENTITY_REDIS_TIMEOUT": timeout}
        )
        assert settings.redis is not None and settings.redis.wait is not None
    # In a file, both are named by their keys; a bad timeout is reported alone.
    config = tmp_path / "config.toml"
    config.write_text('redis_url = "redis://h:1/0"\nredis_wait = "1,800"\n')
    (problem,) = problems_of({"IDENTITY_SECRET": SECRET}, config)
    assert "redis_wait must wait at most half of redis_timeout (1 s: 500 ms)" in problem
    (problem,) = problems_of(
        {**base, "IDENTITY_REDIS_WAIT": "1,800", "IDENTITY_REDIS_TIMEOUT": "x"}
    )
    assert problem.startswith("IDENTITY_REDIS_TIMEOUT")


def test_a_reclaim_idle_time_a_batch_can_outlast_is_refused(tmp_path: Path) -> None:
    """A forwarder keeps the entries of its batch claimed between sends, not while the
    batch fills (batch_max_wait) and is sent (delivery_timeout), and up to a second
    before: another forwarder reclaiming sooner took the batch over mid-send and sent it
    a second time."""
    base = {"IDENTITY_REDIS_URL": "redis://h:1/0", "IDENTITY_SECRET": SECRET}
    (problem,) = problems_of({**base, "IDENTITY_RECLAIM_IDLE": "5"})
    assert problem.startswith(
        "IDENTITY_RECLAIM_IDLE (5) must be more than IDENTITY_DELIVERY_TIMEOUT (10, the "
        "default) + IDENTITY_BATCH_MAX_WAIT (0.5, the default) + 1 s (11.5 s): "
    )
    assert "mid-send" in problem
    (problem,) = problems_of({**base, "IDENTITY_DELIVERY_TIMEOUT": "59"})
    assert problem.startswith("IDENTITY_RECLAIM_IDLE (60, the default) must be more than")
    (problem,) = problems_of(
        {**base, "IDENTITY_RECLAIM_IDLE": "2", "IDENTITY_DELIVERY_TIMEOUT": "0.5",
         "IDENTITY_BATCH_MAX_WAIT": "0.5"}
    )  # fmt: skip
    assert (
        "(2) must be more than IDENTITY_DELIVERY_TIMEOUT (0.5) + IDENTITY_BATCH_MAX_WAIT (0.5)"
        in problem
    )
    for reclaim, timeout, wait in (("11.6", "10", "0.5"), ("2", "0.5", "0.4"), ("1.2", "0.1", "0")):
        settings = load_settings(
            {**base, "IDENTITY_RECLAIM_IDLE": reclaim, "IDENTITY_DELIVERY_TIMEOUT": timeout,
             "IDENTITY_BATCH_MAX_WAIT": wait}
        )  # fmt: skip
        assert settings.outbox.reclaim_idle == float(reclaim)
    # In a file, all three are named by their keys; a bad value is reported alone.
    config = tmp_path / "config.toml"
    config.write_text('redis_url = "redis://h:1/0"\nreclaim_idle = 3\ndelivery_timeout = 4\n')
    (problem,) = problems_of({"IDENTITY_SECRET": SECRET}, config)
    assert problem.startswith(
        "reclaim_idle (3) must be more than delivery_timeout (4) + batch_max_wait (0.5, the "
        "default) + 1 s (5.5 s)"
    )
    (problem,) = problems_of(
        {**base, "IDENTITY_RECLAIM_IDLE": "1", "IDENTITY_DELIVERY_TIMEOUT": "x"}
    )
    assert problem.startswith("IDENTITY_DELIVERY_TIMEOUT must be a number")
    # Neither in embedded mode, where nothing is reclaimed, nor with the outbox off.
    load_settings({"IDENTITY_RECLAIM_IDLE": "1"})
    load_settings({**base, "IDENTITY_RECLAIM_IDLE": "1", "IDENTITY_OUTBOX": "off"})


def test_the_readme_names_every_setting() -> None:
    """Each ``IDENTITY_*`` variable is named in the README (most in its settings tables)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [n for n in sorted(SETTING_NAMES) if f"IDENTITY_{n.upper()}" not in readme]
    assert missing == []


def readme_defaults(readme: str) -> dict[str, str]:
    """Each setting's default as the README states it: the Default column of the
    configuration table, or the value in parentheses next to a name in the others
    (`IDENTITY_BATCH_MAX_WAIT` (0.5 s), `Cross-Domain Handoff Started`
    (`IDENTITY_STARTED_EVENT`))."""
    table = readme.partition("| Variable | Default | Meaning |")[2].partition("\n\n")[0]
    found = re.findall(r"^\| `IDENTITY_(\w+)` \| ([^|]+?) \|", table, re.MULTILINE)
    found += re.findall(r"`IDENTITY_(\w+)` \((`[^`]+`|[\d.]+)(?: s)?\)", readme)
    found += [(n, v) for v, n in re.findall(r"(`[^`]+`) \(`IDENTITY_(\w+)`\)", readme)]
    found += re.findall(r"^\| `IDENTITY_(\w+)` \| (`[^`]+`) \(default\)", readme, re.MULTILINE)
    return {name.lower(): value.strip("`") for name, value in found}


def test_the_readme_states_each_default_the_settings_have() -> None:
    """A default the README states, set explicitly, gives the settings left unset; one
    stated as none, random or off is unset."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    defaults = readme_defaults(readme)
    # The destinations' settings have none: unset, there is no such destination.
    destinations = {n for n in SETTING_NAMES if n.startswith("destination")} | {"events_file"}
    assert set(defaults) == SETTING_NAMES - destinations | {"config_file"}
    base = {
        "IDENTITY_SECRET": SECRET,
        "IDENTITY_DEV_WRITE_KEY": "dev-write-key",
        "IDENTITY_REDIS_URL": "redis://127.0.0.1:1/0",  # for the redis_* settings
    }
    unset = load_settings(base)
    for name, default in defaults.items():
        if not default.startswith(("none", "random")):
            variable = f"IDENTITY_{name.upper()}"
            assert load_settings({**base, variable: default}) == unset, (variable, default)


# The password of the URLs below: no problem may quote any part of it.
PASSWORD_PARTS = ("topsecret", "PASSTAIL")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://:topsecret/PASSTAIL@127.0.0.1:1/0", "percent-encode / ? # @ in the password"),
        ("redis://:topsecret?PASSTAIL@127.0.0.1:1/0", "percent-encode / ? # @ in the password"),
        ("redis://:topsecret#PASSTAIL@127.0.0.1:1/0", "percent-encode / ? # @ in the password"),
        ("rediss+cluster://:topsecret/PASSTAIL@n1:7000", "percent-encode"),
        ("redis://:topsecret@127.0.0.1:99999/0", "the port is not a number from 1 to 65535"),
        ("redis://:topsecret@127.0.0.1:0/0", "the port is not a number from 1 to 65535"),
        ("redis://:topsecret@[::1:6379/0", "is not a valid URL"),
        ("redis:topsecret@127.0.0.1:6379/0", "must start with redis://"),
        ("redis://:topsecret@127.0.0.1:1/abc", "the database must be a number"),
        ("redis://:topsecret@127.0.0.1:1/1/2", "the database must be a number"),
        ("redis://:topsecret@127.0.0.1:1?db=x", "the database must be a number"),
        ("redis://:topsecret@127.0.0.1:1?db=-1", "the database must be a number"),
        ("redis://:topsecret@127.0.0.1:1/0?socket_timeout=abc", "parameter socket_timeout"),
        ("redis://:topsecret@127.0.0.1:1/0?ssl_cert_reqs=none", "TLS parameters"),
        ("redis://:topsecret@127.0.0.1:1/0?ssl_check_hostname=false", "need a rediss:// URL"),
        ("unix://:topsecret@/?ssl_ca_certs=/ca.pem", "need a rediss:// URL"),
        ("redis+sentinel://s1:26379/m/0?ssl_cert_reqs=none", "need a rediss:// URL"),
        # redis-py reads the first: the check read the last.
        ("rediss://:topsecret@h:1/0?ssl_cert_reqs=x&ssl_cert_reqs=none", "not 'x'"),
        ("unix://", "names the socket"),
    ],
)
def test_one_node_urls_are_checked_as_redis_py_reads_them(url: str, complaint: str) -> None:
    """Each passed the settings, then made start exit with a traceback (one quoting the
    rest of the password), or connect elsewhere than said, or fail at every connection."""
    (problem,) = problems_of({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": SECRET})
    assert problem.startswith("IDENTITY_REDIS_URL: ") and complaint in problem, problem
    assert not any(part in problem for part in PASSWORD_PARTS), problem


def test_a_redis_url_in_a_file_is_checked_alike(tmp_path: Path) -> None:
    url = "redis://:topsecret/PASSTAIL@127.0.0.1:1/0"
    path = tmp_path / "identity.yaml"
    path.write_text(f"redis_url: {url}\nsecret: {SECRET}\n")
    (problem,) = problems_of({}, path)
    assert problem.startswith("redis_url: ") and "percent-encode" in problem
    assert not any(part in problem for part in PASSWORD_PARTS), problem


@pytest.mark.parametrize(
    "url",
    [
        "redis://:p%2F%3F%23%40w@127.0.0.1:6379/3",
        "redis://127.0.0.1",
        "redis://h:6379/",
        "rediss://h:6380/0?ssl_cert_reqs=optional&ssl_check_hostname=false",
        "unix:///run/redis.sock?db=2",
        "redis://h:1/0?socket_timeout=0.5",
        # Found in review: refused by the first version of these checks.
        "redis://h:6379/0?client_name=shop@eu",
    ],
)
def test_valid_one_node_urls_pass(url: str) -> None:
    settings = make_settings(url)
    assert settings.redis is not None and settings.redis.node_url == url


UNKNOWN = "docs/redis-topologies.md lists those a Redis URL takes"


@pytest.mark.parametrize(
    ("url", "problems"),
    [
        # redis-py passed these on to its connections: every admin command failed with a
        # TypeError, and the request path's client ignored them.
        ("redis://localhost:6379/0?foo=1", [f"unknown parameter foo: {UNKNOWN}"]),
        (
            "rediss://:topsecret@h:6380/0?ssl_cert_reqs=none&sockettimeout=1&ssl_ca_path=/ca",
            [f"unknown parameter sockettimeout: {UNKNOWN}", f"unknown parameter ssl_ca_path: {UNKNOWN}"],
        ),
        ("unix:///run/redis.sock?db=1&foo=1&foo=2", [f"unknown parameter foo: {UNKNOWN}"]),
        ("redis://h:1/0?DB=1", [f"unknown parameter DB: {UNKNOWN}"]),  # redis-py: case matters
        ("redis://h:1/0?f%6Fo=1", [f"unknown parameter foo: {UNKNOWN}"]),  # as parse_qs reads it
        ("redis://h:1/0?a%0Ab=1", [f"unknown parameter 'a\\nb': {UNKNOWN}"]),
        ("redis://h:1/0?=1", ["a parameter without a name (=value)"]),
        ("redis://h:1/0?sentinel_password=x", ["the parameter sentinel_password is for a +sentinel URL"]),
        # With another problem: both.
        ("redis://h:1/x?foo=1", [f"unknown parameter foo: {UNKNOWN}", "the database must be a number"]),
        ("redis+sentinel://s1:26379/m?sentinel_username=w&foo=1", [f"unknown parameter foo: {UNKNOWN}"]),
        # The clients of a Cluster and of Sentinel failed on these ("got multiple values").
        (
            "redis+cluster://n1:7000,n2:7001?max_connections=8&socket_timeout=2&timeout=1",
            [
                "the parameter max_connections is not for a +cluster URL: IDENTITY_REDIS_MAX_CONNECTIONS sets it",
                "the parameter socket_timeout is not for a +cluster URL: IDENTITY_REDIS_TIMEOUT sets it",
                "the parameter timeout is not for a +cluster URL: IDENTITY_REDIS_TIMEOUT sets the timeouts",
            ],
        ),
        (
            "redis+sentinel://s1:26379/m?socket_connect_timeout=2",
            ["the parameter socket_connect_timeout is not for a +sentinel URL: IDENTITY_REDIS_TIMEOUT sets it"],
        ),
        ("redis+cluster://n1:7000?retry_on_timeout=yes", ["the parameter retry_on_timeout is not for a +cluster URL"]),
        ("redis+cluster://n1:7000?db=0", ["a Cluster has only database 0 (no db parameter)"]),
        ("redis+cluster://n1:7000?sentinel_username=w", ["the parameter sentinel_username is for a +sentinel URL"]),
    ],
)  # fmt: skip
def test_redis_url_parameters_the_service_does_not_take_are_refused_by_name(
    url: str, problems: list[str]
) -> None:
    found = problems_of({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": SECRET})
    assert len(found) == len(problems), found
    for problem, complaint in zip(found, problems, strict=True):
        assert problem.startswith("IDENTITY_REDIS_URL: ") and complaint in problem, problem
        assert "topsecret" not in problem and "=" not in problem.replace("(=value)", ""), problem


@pytest.mark.parametrize(
    "url",
    [
        # An & in a password parameter: the rest of the password is read as parameters.
        "redis://h:1/0?password=topsecret&PASSTAIL=1",
        "redis://h:1/0?password=topsecret&PASSTAIL",
        "redis+sentinel://s:26379/m?sentinel_password=topsecret&PASSTAIL=1",
        "redis+cluster://n:7000?password=topsecret&timeout=1",  # a name it knows, too
        # A ? in the password ending in digits: the host is lost, the rest is the query.
        "redis://:123?PASSTAIL=x@h:1/0",
    ],
)
def test_a_parameter_that_may_be_the_rest_of_a_password_is_not_named(url: str) -> None:
    (problem,) = problems_of({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": SECRET})
    assert problem == (
        "IDENTITY_REDIS_URL: a parameter the service does not take, where the rest of a "
        "password may be (percent-encode ? & @ in the password)"
    )


@pytest.mark.parametrize(
    "url",
    [
        # An @ in the user info and a ? in the password: the netloc holds an @ of the
        # password, the rest of the password is the query.
        "redis://u:p@ss?PASSTAIL=x@redis.example:6379/0",
        "redis://alice@corp.com:hunter2?PASSTAIL=z@redis.example:6379/0",
        "redis+sentinel://u:p@ss?PASSTAIL=1@s1:26379,s2:26379/m",
        "redis+cluster://u:p@ss?PASSTAIL=1@n1:7000,n2:7001",
    ],
)
def test_no_part_of_a_password_with_an_at_and_a_question_mark_is_named(url: str) -> None:
    problems = problems_of({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": SECRET})
    assert problems
    for problem in problems:
        assert "PASSTAIL" not in problem and "hunter2" not in problem, problem


def test_a_percent_encoded_sentinel_parameter_stays_with_the_sentinels() -> None:
    sentinel = RedisSettings.from_dsn(
        "redis+sentinel://s1:26379/m?sentinel_p%61ssword=spw&sentinel_%75sername=su"
    )
    assert sentinel.sentinel_auth == ("su", "spw")
    # The master's connections would fail on it (redis-py: an unexpected keyword argument).
    assert sentinel.node_url == "redis://s1:26379/0"


def test_the_docs_list_every_redis_url_parameter_the_service_takes() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "redis-topologies.md").read_text()
    section = docs.partition("\n## URL parameters")[2].partition("\n#")[0]
    listed = set(re.findall(r"`(\w+)=`", section))
    assert listed == redis_url_parameters() | set(SENTINEL_PARAMETERS)


# A secret in each file, that its error must not quote.
CONFIG_SECRET = "SuperSecretServerValue-0123456789abcdef"


@pytest.mark.parametrize(
    ("name", "text", "complaint"),
    [
        ("c.yaml", f'secret: "{CONFIG_SECRET}\nworkers: 1\n', "found unexpected end of stream"),
        ("c.yaml", f"secret: {CONFIG_SECRET}: x\n", "(line 1, column 48)"),
        ("c.yaml", f"destinations:\n  seg:\n    write_key: {CONFIG_SECRET}: [\n", "(line 3"),
        ("c.yaml", f"secret: *{CONFIG_SECRET}\n", "found undefined alias '...'"),
        ("c.yaml", f"secret: !{CONFIG_SECRET} x\n", "(line 1, column 9)"),
        ("c.yaml", "secret: \x00\n", "special characters are not allowed"),
        ("c.toml", f'secret = "{CONFIG_SECRET}\nworkers = 1\n', "(at line 1, column 50)"),
        ("c.toml", f"secret = {CONFIG_SECRET}\n", "Invalid value (at line 1, column 10)"),
    ],
)
def test_a_config_files_syntax_error_quotes_none_of_it(
    tmp_path: Path, name: str, text: str, complaint: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    (problem,) = problems_of({}, path)
    assert problem.startswith(f"config file {path}: ") and complaint in problem, problem
    assert "Secret" not in problem and "\n" not in problem, problem


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("default_ttl = inf", ["default_ttl must be a whole number, not inf"]),
        ("workers = -inf", ["workers must be a whole number, not -inf"]),
        ("redis_shards = nan", ["redis_shards must be a whole number, not nan"]),
        (
            "workers = 2.9\nmax_ttl = 600.7",
            [
                "max_ttl must be a whole number, not 600.7",
                "workers must be a whole number, not 2.9",
            ],
        ),
        ("retry_after = 1.0", ["retry_after must be a whole number, not 1.0"]),
        ("redis_timeout = inf", ["redis_timeout must be between 0.01 and 60.0, not inf"]),
    ],
)
def test_integer_settings_in_a_file_take_whole_numbers_only(
    tmp_path: Path, text: str, problems: list[str]
) -> None:
    """``inf`` made an OverflowError; 2.9 was cut to 2, where a variable's "2.9" (or
    "1.0") is refused."""
    assert problems_of({}, write(tmp_path, text + "\n")) == problems
    assert problems_of({"IDENTITY_RETRY_AFTER": "1.0"}) == [
        "IDENTITY_RETRY_AFTER must be a whole number, not '1.0'"
    ]


def test_a_config_file_that_is_not_utf8_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "identity.toml"
    path.write_bytes(b"\xff\xfe")
    assert problems_of({}, path) == [f"config file {path}: not UTF-8 (byte 1)"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1: x\n", "unknown settings 1"),
        ("1: x\ncolour: blue\n", "unknown settings 1, colour"),
        (
            "sources:\n  shop:\n    write_key_hash: x\n    origins: [https://a.example]\n"
            "    1: x\n    foo: y\n",
            "sources.shop: unknown settings 1, foo",
        ),
    ],
)
def test_keys_that_are_numbers_are_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "identity.yaml"
    path.write_text(text)
    problems = problems_of({}, path)
    assert any(problem in p for p in problems), problems


def test_an_empty_config_file_variable_is_unset() -> None:
    settings = load_settings({"IDENTITY_CONFIG_FILE": "", "IDENTITY_MAX_TTL": "450"})
    assert settings.max_ttl == 450


def test_a_flag_wins_and_is_named_as_written(tmp_path: Path) -> None:
    flags: dict[str, tuple[str, object]] = {"workers": ("--workers", -3)}
    environ = {"IDENTITY_WORKERS": "2"}
    with pytest.raises(ConfigError) as raised:
        load_settings(environ, write(tmp_path, "workers = 4\n"), flags)
    assert raised.value.problems == ["--workers must be between 1 and 64, not -3"]
    with pytest.raises(ConfigError) as raised:
        load_settings({}, None, {"workers": ("--workers", 2)})
    assert raised.value.problems[0].startswith("--workers above 1 needs Redis (IDENTITY_REDIS_URL)")


# A value of each parameter a Redis URL takes. A redis-py release that reads one more
# makes the first test below fail until it has a value here and a line in the docs.
PARAMETER_VALUES = {
    "db": "1",
    # The default user takes any password when it has none, if named (AUTH <password>
    # alone is refused then).
    "username": "default",
    "password": "any&username=default",
    "client_name": "identity-test",
    "socket_timeout": "2",
    "socket_connect_timeout": "2",
    "socket_read_size": "65536",
    "socket_keepalive": "yes",
    "retry_on_timeout": "yes",
    "retry_on_error": "x",  # redis-py reads it as list("x"): taken, and of no use in a URL
    "max_connections": "4",
    "health_check_interval": "30",
    "timeout": "2",
    "protocol": "3",
    "legacy_responses": "no",
    "sentinel_username": "watcher",
    "sentinel_password": "any",
    "ssl_cert_reqs": "required",
    "ssl_check_hostname": "yes",
    "ssl_min_version": str(ssl.TLSVersion.TLSv1_2.value),
    "ssl_include_verify_flags": "VERIFY_X509_PARTIAL_CHAIN",
    "ssl_exclude_verify_flags": "VERIFY_X509_STRICT",
    # ssl_ca_certs, ssl_certfile and ssl_keyfile: the test's files (in every rediss URL).
    "ssl_ca_certs": "",
    "ssl_certfile": "",
    "ssl_keyfile": "",
}


def test_each_redis_url_parameter_the_service_takes_has_a_value_to_test() -> None:
    assert set(PARAMETER_VALUES) == redis_url_parameters() | set(SENTINEL_PARAMETERS)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server's TLS port, and the directory of its CA, certificate and key."""
    directory = tmp_path_factory.mktemp("tls-redis")
    write_tls_files(directory)
    tls_port = free_port()
    server = RedisServer(
        directory,
        tls_port=str(tls_port),
        tls_cert_file=str(directory / "server.pem"),
        tls_key_file=str(directory / "server.key"),
        tls_ca_cert_file=str(directory / "ca.pem"),
        tls_auth_clients="no",
    )
    server.start()
    yield tls_port, directory
    server.stop()


# The parameters each topology's URL does not take: its clients fail on them (a Cluster's
# ignores a db), or they are for the sentinels.
REFUSED = {
    "single": {*SENTINEL_PARAMETERS},
    "sentinel": {"socket_timeout", "socket_connect_timeout", "timeout", "max_connections"},
    "cluster": {"socket_timeout", "socket_connect_timeout", "timeout", "max_connections",
                "retry_on_timeout", "db", *SENTINEL_PARAMETERS},
}  # fmt: skip


async def use(settings: RedisSettings) -> None:
    """Builds the clients of ``settings`` as serve and forward do: on one node, both ping
    it; a Sentinel's and a Cluster's (no such set-up here) are built, with a node
    connection made (not opened) for Sentinel's."""
    admin = connect(settings)
    lean = lean_client(settings, 2.0)
    try:
        if settings.topology == "single":
            assert await admin.ping()
            assert await lean.execute("PING") == b"PONG"
        elif isinstance(admin, Redis):
            admin.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    finally:
        await admin.aclose()
        await lean.close()


@pytest.mark.parametrize("topology", ["single", "sentinel", "cluster"])
@pytest.mark.parametrize("name", sorted(PARAMETER_VALUES))
async def test_the_clients_work_with_each_redis_url_parameter_the_settings_take(
    name: str, topology: str, redis_server: RedisServer, tls_redis: tuple[int, Path]
) -> None:
    """What the settings take, every client built from the URL works with, against a real
    Redis (with TLS for the ssl_ ones). What they refuse, named, made redis-py's clients
    fail with a TypeError at every command (for a Cluster's db: ignored)."""
    tls_port, files = tls_redis
    tls = name.startswith("ssl_")
    query = f"{name}={PARAMETER_VALUES[name]}"
    if tls:
        files_query = "&".join(
            f"{key}={files / file}"
            for key, file in (("ssl_ca_certs", "ca.pem"), ("ssl_certfile", "server.pem"),
                              ("ssl_keyfile", "server.key"))
        )  # fmt: skip
        query = files_query if not PARAMETER_VALUES[name] else f"{query}&{files_query}"
    scheme, port = ("rediss", tls_port) if tls else ("redis", redis_server.port)
    node_url = f"{scheme}://127.0.0.1:{port}/0?{query}"
    url = {
        "single": node_url,
        "sentinel": f"{scheme}+sentinel://127.0.0.1:{port}/m/0?{query}",
        "cluster": f"{scheme}+cluster://127.0.0.1:{port}?{query}",
    }[topology]
    if name not in REFUSED[topology]:
        await use(RedisSettings.from_dsn(url, timeout=2.0))
        return
    (problem,) = problems_of({"IDENTITY_REDIS_URL": url, "IDENTITY_SECRET": SECRET})
    assert f"{name} " in problem or (name == "db" and "only database 0" in problem), problem
    if (topology, name) == ("cluster", "db"):
        return
    unchecked = RedisSettings(
        url=url, topology=cast(Topology, topology), node_url=node_url,
        nodes=(("127.0.0.1", port),), service="m", timeout=2.0,
    )  # fmt: skip
    with pytest.raises(TypeError, match=name):
        await use(unchecked)


@pytest.mark.parametrize("env_name", ["IDENTITY_redis_url", "IDENTITY_Redis_Url"])
def test_a_setting_variable_not_in_upper_case_is_a_problem(env_name: str) -> None:
    """Only IDENTITY_REDIS_URL is read: IDENTITY_redis_url passed as a known setting and was
    ignored, so the service started on the memory store without a word."""
    problems = problems_of({env_name: "redis://127.0.0.1:6390/0"})
    assert problems == [f"{env_name} is not a setting (a typo?)"]


@pytest.mark.parametrize("env_name", ["IDENTITY_SOURCES", "IDENTITY_DESTINATIONS", "IDENTITY_AMP"])
def test_an_empty_table_variable_is_unset(env_name: str) -> None:
    """An empty variable counts as unset (README): a table's was read as JSON, and refused
    as "not valid JSON", so IDENTITY_SOURCES= stopped the start."""
    settings = load_settings({env_name: ""})
    assert [source.name for source in settings.sources] == ["dev"]
    assert [d.name for d in settings.outbox.destinations] == ["stdout"]
    assert settings.amp is None


def test_an_empty_variable_leaves_the_file_value(tmp_path: Path) -> None:
    """An empty variable is unset, so the file's value holds, as it does without the
    variable: IDENTITY_MAX_TTL= (a compose file's ${MAX_TTL} left empty) dropped the file's
    max_ttl for the default, IDENTITY_SOURCES= its sources, without a word."""
    file = write(
        tmp_path,
        f'max_ttl = 450\n[sources.shop]\nwrite_key_hash = "{hash_write_key("k")}"\n'
        'origins = ["https://shop.example"]\n',
    )
    settings = load_settings({"IDENTITY_MAX_TTL": "", "IDENTITY_SOURCES": ""}, file)
    assert settings.max_ttl == 450
    assert [source.name for source in settings.sources] == ["shop"]
    assert problems_of({"IDENTITY_MAX_TTL": ""}, write(tmp_path, "max_ttl = 0\n")) == [
        "max_ttl must be between 1 and 86400, not 0"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2@api.segment.io",  # aiohttp raised a ValueError at every send
        "https://user@api.segment.io",
        "https://:pw@h.io",
        "https://api.segment.io:abc",  # failed every send: InvalidUrlClientError
        "https://api.segment.io:99999",
        "https://api.segment.io:0",
        "http://collector.example\\@127.0.0.1:8080",  # loopback to urllib, refused by yarl
        "https://api.segment.io?region=eu",  # posted to /?region=eu/v1/batch
        "https://api.segment.io/#v1",  # posted to / (the fragment is not sent)
        "https://api.segment.io\\v1",  # yarl refuses a backslash in the authority
    ],
)
def test_a_destination_url_the_forwarder_cannot_post_to_is_refused(url: str) -> None:
    """Each was accepted at start; the forwarder then failed every send (or crashed), or
    posted the batches elsewhere than /v1/batch. The problem quotes none of the URL."""
    environ = {"IDENTITY_DESTINATION_URL": url, "IDENTITY_DESTINATION_WRITE_KEY": "wk"}
    assert problems_of(environ) == [
        "IDENTITY_DESTINATION_URL must be the base URL of a Segment-compatible API: a host, "
        "an optional port (1 to 65535) and path, without user information, query, fragment "
        "or backslash before the path (the key goes in IDENTITY_DESTINATION_WRITE_KEY)"
    ]
    table = {"d": {"url": url, "write_key": "wk"}}
    [problem] = problems_of({"IDENTITY_DESTINATIONS": json.dumps(table)})
    assert problem.startswith("destinations.d.url must be the base URL"), problem


@pytest.mark.parametrize(
    "url",
    [
        "https://api.segment.io",
        "https://api.segment.io/",
        "https://hosted.rudder.example:8443/data/v1/batch",
        "http://127.0.0.1:8080",
        "http://[::1]:8080/collect",
        "https://api.segment.io\n",  # a Secret made from a file: aiohttp drops the newline
        "https://collector.example/a\\b",  # a backslash in the path is sent as it is
    ],
)
def test_a_destination_base_url_is_taken_as_it_is(url: str) -> None:
    environ = {"IDENTITY_DESTINATION_URL": url, "IDENTITY_DESTINATION_WRITE_KEY": "wk"}
    [destination] = load_settings(environ).outbox.destinations
    assert destination.url == url


def test_two_sources_with_one_write_key_are_a_problem(tmp_path: Path) -> None:
    """A request is the source its key matches, the last of those: the first source could
    never authenticate (its prepares were the other's, refused its origins), unreported."""
    key_hash = hash_write_key("one-key")
    text = "".join(
        f'[sources.{name}]\nwrite_key_hash = "{key_hash}"\norigins = ["https://{name}.example"]\n'
        for name in ("shop", "blog", "checkout")
    )
    text += f'[sources.other]\nwrite_key_hash = "{hash_write_key("k2")}"\norigins = ["https://o.example"]\n'
    assert problems_of({}, write(tmp_path, text)) == [
        "sources shop, blog, checkout have the same write_key_hash: each source needs its "
        "own write key (identity-service new-key makes one)"
    ]


def test_off_in_a_yaml_file_is_off(tmp_path: Path) -> None:
    """YAML reads an unquoted off as false: `outbox: off`, as documented, was refused with
    "outbox must be a string" (forwarder and redis_wait too) and the port's with "must be a
    whole number, not False"."""
    path = tmp_path / "identity.yaml"
    path.write_text(
        "outbox: off\nforwarder: off\nredis_wait: off\nforwarder_metrics_port: off\n"
        f"redis_url: redis://127.0.0.1:6390/0\nsecret: {SECRET}\n"
    )
    settings = load_settings({}, path)
    assert not settings.outbox.enabled
    assert not settings.outbox.forwarder_in_serve
    assert settings.redis is not None and settings.redis.wait is None
    assert settings.forwarder_metrics_port is None
    path.write_text("outbox: on\n")
    assert load_settings({}, path).outbox.enabled


@pytest.mark.parametrize("key", ["clé-de-dev", "dev\x01key", "dev:key"])
def test_a_dev_write_key_no_request_can_carry_is_a_problem(key: str) -> None:
    """The service reads only ASCII keys from a request (and a header holds no control
    characters, HTTP Basic no ':' in the user name): the development source was made with
    a key that could not authenticate, and start-up pointed to it."""
    problems = problems_of({"IDENTITY_DEV_WRITE_KEY": key})
    assert problems == [
        "IDENTITY_DEV_WRITE_KEY must be printable ASCII without ':': no request could carry "
        "it (identity-service new-key makes one)"
    ]
    assert key not in problems[0]
    if not key.isascii():  # refused on the way in (a control character: by the front)
        assert write_key_from_header(f"Bearer {key}") is None


def test_an_empty_value_in_the_file_is_unset_for_a_table_as_for_any_setting(
    tmp_path: Path,
) -> None:
    """A file's "" was unset for every setting (``redis_url = ""``: the memory store) but a
    table's, read as a value: ``sources = ""`` and ``amp = ""`` were refused as no table."""
    settings = load_settings({}, write(tmp_path, 'sources = ""\namp = ""\nredis_url = ""\n'))
    assert [source.name for source in settings.sources] == ["dev"]
    assert settings.amp is None and settings.redis is None


def test_off_reads_alike_in_every_setting_that_takes_it() -> None:
    """``off`` with spaces around was off for the port and redis_wait, and refused by
    outbox and forwarder ("must be one of on, off, not ' off '")."""
    environ = {
        "IDENTITY_REDIS_URL": "redis://127.0.0.1:6390/0",
        "IDENTITY_SECRET": SECRET,
        **dict.fromkeys(("IDENTITY_OUTBOX", "IDENTITY_FORWARDER", "IDENTITY_REDIS_WAIT"), " Off "),
        "IDENTITY_FORWARDER_METRICS_PORT": "off\n",
        "IDENTITY_METRICS_PORT": " OFF",
    }
    settings = load_settings(environ)
    assert not settings.outbox.enabled and not settings.outbox.forwarder_in_serve
    assert settings.redis is not None and settings.redis.wait is None
    assert settings.forwarder_metrics_port is None
    assert settings.metrics_port is None


AMP_WITH_ACTION = json.dumps(
    {
        "public_url": "https://www.example.com/identity",
        "publisher_origins": ["https://www.example.com"],
        "source": "shop",
        "actions": {
            "add-to-cart": {
                "webhook": "https://api.example.com/cart",
                "secret": "an-action-webhook-secret-0123456789",
                "done_url": "https://www.example.com/cart",
            }
        },
    }
)


def test_outbox_actions_keeps_the_webhook_calls_and_emits_no_event(tmp_path: Path) -> None:
    """``actions``, in any case, from the environment or a file: the outbox runs for the
    AMP actions' webhook calls and no event is emitted; without Redis no standard output
    destination is added (it would print nothing)."""
    environ = {"IDENTITY_SOURCES": json.dumps({"shop": SHOP}), "IDENTITY_AMP": AMP_WITH_ACTION}
    outbox = load_settings({**environ, "IDENTITY_OUTBOX": " Actions "}).outbox
    assert (outbox.mode, outbox.enabled, outbox.emits_events) == ("actions", True, False)
    assert [d.name for d in outbox.destinations] == ["amp-action-add-to-cart"]
    assert not outbox.events_wait and outbox.routed_nowhere(["shop"]) == []
    path = tmp_path / "identity.yaml"
    path.write_text("outbox: actions\n")
    assert load_settings(environ, path).outbox.mode == "actions"
    on = load_settings(environ).outbox
    assert (on.mode, on.enabled, on.emits_events) == ("on", True, True)
    off = load_settings({**environ, "IDENTITY_OUTBOX": "off"}).outbox
    assert (off.mode, off.enabled, off.emits_events) == ("off", False, False)


def test_an_unknown_outbox_value_is_one_problem_listing_the_three(tmp_path: Path) -> None:
    assert problems_of({"IDENTITY_OUTBOX": "events"}) == [
        "IDENTITY_OUTBOX must be one of on, actions, off, not 'events'"
    ]
    assert problems_of({}, write(tmp_path, 'outbox = "webhooks"\n')) == [
        "outbox must be one of on, actions, off, not 'webhooks'"
    ]


def test_an_events_destination_with_outbox_actions_is_one_problem(tmp_path: Path) -> None:
    """``actions`` emits no event: a destination of events would never receive anything.
    Every one configured is named in one line, as the user wrote it."""
    sources = {"IDENTITY_SOURCES": json.dumps({"shop": SHOP})}
    environ = {
        **sources,
        "IDENTITY_OUTBOX": "actions",
        "IDENTITY_AMP": AMP_WITH_ACTION,
        "IDENTITY_DESTINATION_URL": "https://api.segment.io",
        "IDENTITY_DESTINATION_WRITE_KEY": "wk",
        "IDENTITY_EVENTS_FILE": str(tmp_path / "events.jsonl"),
    }
    assert problems_of(environ) == [
        "IDENTITY_OUTBOX=actions emits no events: IDENTITY_DESTINATION_URL, "
        "IDENTITY_EVENTS_FILE would never receive anything; remove them, or set "
        "IDENTITY_OUTBOX=on"
    ]
    file = write(
        tmp_path,
        'outbox = "actions"\n[destinations.segment]\n'
        'url = "https://api.segment.io"\nwrite_key = "wk"\n',
    )
    assert problems_of(sources, file) == [
        "outbox=actions emits no events: destinations.segment would never receive "
        "anything; remove it, or set outbox=on"
    ]


def test_a_redis_wait_of_spaces_is_a_value_as_in_every_setting() -> None:
    """Only an empty variable is unset: IDENTITY_REDIS_WAIT of spaces alone was taken as
    unset, where any other setting's is a value (IDENTITY_MAX_TTL=' ' is refused)."""
    environ = {"IDENTITY_REDIS_URL": "redis://127.0.0.1:6390/0", "IDENTITY_SECRET": SECRET}
    assert problems_of({**environ, "IDENTITY_REDIS_WAIT": "  ", "IDENTITY_MAX_TTL": " "}) == [
        "IDENTITY_MAX_TTL must be a whole number, not ' '",
        "IDENTITY_REDIS_WAIT must be <replicas>,<milliseconds> (1 to 16 replicas, 1 to 10000 "
        "ms), not '  '",
    ]


@pytest.mark.parametrize(
    ("environ", "text", "named"),
    [
        ({"IDENTITY_SOURCES": "{}"}, "", "IDENTITY_SOURCES"),
        ({}, "[sources]\n", "sources"),
        ({"IDENTITY_SOURCES": "{}", "IDENTITY_DEV_WRITE_KEY": "dev-key"}, "", "IDENTITY_SOURCES"),
    ],
)
def test_an_empty_sources_table_is_a_problem(
    tmp_path: Path, environ: dict[str, str], text: str, named: str
) -> None:
    """Sources configured as an empty table (a template's list left empty) started the
    service on the development source, whose write key is generated or any the
    deployment chose, without a word; only leaving sources unset means that source."""
    file = write(tmp_path, text) if text else None
    assert problems_of(environ, file) == [
        f"{named} names no source: configure at least one, or leave it unset for the "
        "development source"
    ]


# A host name of 253 characters, DNS's longest: three labels of 63 and one of 61.
LONGEST_HOST = ".".join(letter * 63 for letter in "abc") + "." + "d" * 61
# Host names no DNS name can be, as urls._is_host_name refuses them in origins: a resolver
# refuses each (Python's before asking: UnicodeError for a label, an error from DNS else).
NOT_DNS_HOSTS = (LONGEST_HOST + "x", "a" * 64 + ".example", "a..example", ".example")
# And names at DNS's limits, which it holds (a final dot is the root's, not a label).
DNS_HOSTS = (LONGEST_HOST, LONGEST_HOST + ".", "a" * 63 + ".example", "redis.data.")


def where_hosts_are_read(host: str) -> list[tuple[dict[str, str], str | None]]:
    """Settings naming ``host`` where the service reads a host name, each with the host the
    process would listen on: the destinations, each Redis URL form, the forwarder's metrics
    host, and ``serve --host``."""
    with_secret = {"IDENTITY_SOURCES": sources_env(), "IDENTITY_SECRET": SECRET}
    redis_urls = (
        f"redis://{host}:6379/0",
        f"rediss://:pw@{host}/1",
        f"redis+cluster://n1:7000,{host}:7001",
        f"redis+sentinel://{host}:26379/master",
    )
    table = {"d": {"url": f"https://{host}:8443/v1", "write_key": "wk"}}
    return [
        ({"IDENTITY_DESTINATION_URL": f"https://{host}", "IDENTITY_DESTINATION_WRITE_KEY": "wk"}, None),
        ({"IDENTITY_DESTINATIONS": json.dumps(table)}, None),
        *(({**with_secret, "IDENTITY_REDIS_URL": url}, None) for url in redis_urls),
        ({"IDENTITY_FORWARDER_METRICS_HOST": host}, None),
        ({"IDENTITY_METRICS_HOST": host}, None),
        (with_secret, host),
    ]  # fmt: skip


@pytest.mark.parametrize("host", NOT_DNS_HOSTS)
def test_a_host_name_no_dns_name_can_be_is_refused_wherever_a_host_is_read(host: str) -> None:
    """Each was taken at start: every delivery, Redis command or bind then failed (with a
    UnicodeError traceback for a long label). Refused as source origins are, in one line
    that quotes no Redis URL."""
    for environ, bind in where_hosts_are_read(host):
        with pytest.raises(ConfigError) as raised:
            load_settings(environ, host=bind)
        (problem,) = raised.value.problems
        assert "at most 253 characters, each label (between dots) 1 to 63" in problem, problem
        assert "pw" not in problem


@pytest.mark.parametrize("host", DNS_HOSTS)
def test_a_host_name_at_dns_limits_is_taken_wherever_a_host_is_read(host: str) -> None:
    for environ, bind in where_hosts_are_read(host):
        load_settings(environ, host=bind)


@pytest.mark.parametrize("name", ["_", "-", "__", "_-_"])
def test_a_token_parameter_or_destination_name_of_only_underscores_or_hyphens_is_taken(
    name: str,
) -> None:
    """Found in review: refused as not "letters, digits, '_' or '-'" (the check dropped
    them and asked str.isalnum of nothing), though the chart's schema, the SDKs and
    identity.js take them as IDENTITY_TOKEN_PARAM's rule: the chart rendered what the
    service then refused at start."""
    assert load_settings({"IDENTITY_TOKEN_PARAM": name}).token_param == name
    destinations = json.dumps({name: {"url": "https://api.segment.io/v1/batch", "write_key": "k"}})
    settings = load_settings({"IDENTITY_DESTINATIONS": destinations})
    assert [d.name for d in settings.outbox.destinations] == [name]


@pytest.mark.parametrize("name", ["hand\u00e9", "\u0663\u0664", "token\u00b2", "\uff21"])
def test_a_token_parameter_or_destination_name_outside_ascii_is_a_problem(name: str) -> None:
    """ "Letters, digits, '_' or '-'" meant any Unicode letter or digit (``str.isalnum``):
    a token parameter a browser sends percent-encoded, so never matched as written, and a
    destination name that goes into Redis keys and metric labels."""
    assert problems_of({"IDENTITY_TOKEN_PARAM": name}) == [
        f"IDENTITY_TOKEN_PARAM must be letters, digits, '_' or '-', not {name!r}"
    ]
    destinations = json.dumps({name: {"url": "https://api.segment.io/v1/batch", "write_key": "k"}})
    assert f"destination name {name!r} must be letters, digits, '_' or '-'" in problems_of(
        {"IDENTITY_DESTINATIONS": destinations}
    )


# -- IDENTITY_TRUSTED_PROXIES ------------------------------------------------------------------


def networks_of(settings: Settings) -> list[str]:
    return [str(network) for network in settings.trusted_proxies.networks]


def test_trusted_proxies_default_to_loopback_and_private_networks() -> None:
    """Unset (or empty, as an unset variable is), the networks trusted before the setting."""
    for environ in ({}, {"IDENTITY_TRUSTED_PROXIES": ""}):
        settings = load_settings(environ)
        assert settings.trusted_proxies == DEFAULT_TRUSTED_PROXIES
        assert networks_of(settings) == list(DEFAULT_TRUSTED_PROXIES_NETWORKS)


@pytest.mark.parametrize(
    ("value", "networks"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        (" 10.1.0.0/16 , 192.0.2.7,fd00::/8 ", ["10.1.0.0/16", "192.0.2.7/32", "fd00::/8"]),
        ("2001:db8::1", ["2001:db8::1/128"]),
        ("off", []),
        (" OFF ", []),
    ],
)
def test_trusted_proxies_from_the_environment(value: str, networks: list[str]) -> None:
    settings = load_settings({"IDENTITY_TRUSTED_PROXIES": value})
    assert networks_of(settings) == networks


@pytest.mark.parametrize(
    ("name", "text", "networks"),
    [
        ("c.toml", 'trusted_proxies = ["10.0.0.0/8", "fd00::/8"]', ["10.0.0.0/8", "fd00::/8"]),
        ("c.toml", 'trusted_proxies = "10.0.0.0/8, 192.0.2.7"', ["10.0.0.0/8", "192.0.2.7/32"]),
        ("c.toml", 'trusted_proxies = "off"', []),
        ("c.yaml", "trusted_proxies: [10.0.0.0/8, '::1']", ["10.0.0.0/8", "::1/128"]),
        ("c.yaml", "trusted_proxies: off", []),  # YAML reads it as false
    ],
)
def test_trusted_proxies_from_a_file(
    tmp_path: Path, name: str, text: str, networks: list[str]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert networks_of(load_settings({}, path)) == networks


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("10.0.0.0/8,,192.0.2.7", "IDENTITY_TRUSTED_PROXIES entry 2 is empty"),
        ("10.0.0.0/8,", "IDENTITY_TRUSTED_PROXIES entry 2 is empty"),
        (
            "10.0.0.0/8, 10.0.0.300",
            "IDENTITY_TRUSTED_PROXIES entry 2 (10.0.0.300) is not an IP address or a CIDR "
            "network (10.0.0.0/8, fc00::/7)",
        ),
        (
            "10.0.0.0/33",
            "IDENTITY_TRUSTED_PROXIES entry 1 (10.0.0.0/33) is not an IP address or a CIDR "
            "network (10.0.0.0/8, fc00::/7)",
        ),
        (
            "10.0.0.1/8",
            "IDENTITY_TRUSTED_PROXIES entry 1 (10.0.0.1/8) has host bits set: the network is "
            "10.0.0.0/8",
        ),
        (
            "::ffff:10.0.0.0/104",
            "IDENTITY_TRUSTED_PROXIES entry 1 (::ffff:10.0.0.0/104) is an IPv4-mapped IPv6 "
            "network, which no address matches (they are read as IPv4): list it as IPv4",
        ),
        (
            "off, 10.0.0.0/8",
            "IDENTITY_TRUSTED_PROXIES entry 1 is off, which trusts no proxy only alone",
        ),
        (
            ",".join(["10.0.0.1"] * 257),
            "IDENTITY_TRUSTED_PROXIES lists 257 entries, more than 256",
        ),
    ],
)
def test_bad_trusted_proxies_are_explained(value: str, complaint: str) -> None:
    assert problems_of({"IDENTITY_TRUSTED_PROXIES": value}) == [complaint]


def test_every_bad_trusted_proxy_is_reported_and_no_other_text_is_quoted() -> None:
    """An entry that holds more than an address may hold can be anything (a pasted
    secret): it is named by its position alone."""
    value = "10.0.0.0/8, proxy.example.com, s3cret-T0ken!, 10.0.0.1/8"
    problems = problems_of({"IDENTITY_TRUSTED_PROXIES": value})
    assert problems == [
        "IDENTITY_TRUSTED_PROXIES entry 2 is not an IP address or a CIDR network "
        "(10.0.0.0/8, fc00::/7)",
        "IDENTITY_TRUSTED_PROXIES entry 3 is not an IP address or a CIDR network "
        "(10.0.0.0/8, fc00::/7)",
        "IDENTITY_TRUSTED_PROXIES entry 4 (10.0.0.1/8) has host bits set: the network is "
        "10.0.0.0/8",
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("trusted_proxies = []", "trusted_proxies lists no proxy: write off to trust none"),
        (
            "trusted_proxies = 10",
            "trusted_proxies must be addresses and CIDR networks, comma-separated, or off",
        ),
        (
            "trusted_proxies = ['10.0.0.0/8', 7]",
            "trusted_proxies must be addresses and CIDR networks, comma-separated, or off",
        ),
        ("trusted_proxies = ['10.0.0.0/8', '']", "trusted_proxies entry 2 is empty"),
    ],
)
def test_bad_trusted_proxies_in_a_file_are_explained(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert problems_of({}, path) == [complaint]
