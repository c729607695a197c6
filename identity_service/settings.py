"""Settings, read once at start from ``IDENTITY_*`` variables and an optional TOML/YAML file.

Every problem found is reported, one line each, in a single :class:`ConfigError`, so a
misconfigured deployment fails at start with the whole list instead of one error per
restart. Environment variables win over the file.
"""

import ipaddress
import json
import secrets
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import yaml

from identity_service import constants as c
from identity_service.sources import (
    WRITE_KEY_HASH_PREFIX,
    OriginError,
    Source,
    hash_write_key,
    parse_origin,
)

T = TypeVar("T")

CONFIG_FILE_VAR = c.ENV_PREFIX + "CONFIG_FILE"
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_TLS_CERT_REQS = ("none", "optional", "required")
SETTING_NAMES = frozenset(
    {
        "sources", "secret", "dev_write_key", "redis_url", "redis_timeout",
        "redis_max_connections", "redis_key_prefix", "default_ttl", "max_ttl",
        "max_body_bytes", "token_param", "retry_after", "shutdown_timeout", "log_level",
        "workers",
        "outbox", "forwarder", "destinations", "destination_url", "destination_write_key",
        "events_file", "batch_max_events", "batch_max_wait", "delivery_timeout",
        "delivery_max_attempts", "backoff_base", "backoff_max", "reclaim_idle",
        "started_event", "completed_event",
    }
)  # fmt: skip


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """How to reach Redis. ``url`` is a redis://, rediss:// or unix:// DSN."""

    url: str
    key_prefix: str = c.DEFAULT_REDIS_KEY_PREFIX
    timeout: float = c.DEFAULT_REDIS_TIMEOUT_SECONDS
    max_connections: int = c.DEFAULT_REDIS_MAX_CONNECTIONS

    @classmethod
    def from_dsn(cls, dsn: str, **options: Any) -> "RedisSettings":
        scheme = urlsplit(dsn).scheme
        if scheme not in REDIS_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(REDIS_SCHEMES)}, not {scheme!r}")
        cert_reqs = parse_qs(urlsplit(dsn).query).get("ssl_cert_reqs", ["required"])[-1]
        if cert_reqs not in REDIS_TLS_CERT_REQS:
            allowed = ", ".join(REDIS_TLS_CERT_REQS)
            raise ValueError(f"ssl_cert_reqs must be one of {allowed}, not {cert_reqs!r}")
        return cls(url=dsn, **options)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where events go: a Segment-compatible HTTP API, a JSONL file, or standard output."""

    name: str
    kind: Literal["http", "file", "stdout"]
    url: str = ""
    write_key: str = field(default="", repr=False)
    path: str = ""

    @property
    def batch_url(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1/batch") else base + "/v1/batch"


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """Events: whether they are emitted, where to, and how they are batched and retried."""

    enabled: bool = True
    destinations: tuple[Destination, ...] = (Destination("stdout", "stdout"),)
    forwarder_in_serve: bool = True
    batch_max_events: int = c.DEFAULT_BATCH_MAX_EVENTS
    batch_max_wait: float = c.DEFAULT_BATCH_MAX_WAIT_SECONDS
    delivery_timeout: float = c.DEFAULT_DELIVERY_TIMEOUT_SECONDS
    max_attempts: int = c.DEFAULT_DELIVERY_MAX_ATTEMPTS
    backoff_base: float = c.DEFAULT_BACKOFF_BASE_SECONDS
    backoff_max: float = c.DEFAULT_BACKOFF_MAX_SECONDS
    reclaim_idle: float = c.DEFAULT_RECLAIM_IDLE_SECONDS
    started_event: str = c.DEFAULT_STARTED_EVENT
    completed_event: str = c.DEFAULT_COMPLETED_EVENT


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the application needs, validated."""

    sources: tuple[Source, ...]
    secret: bytes
    secret_configured: bool
    dev_write_key: str | None
    redis: RedisSettings | None
    default_ttl: int = c.DEFAULT_TTL_SECONDS
    max_ttl: int = c.DEFAULT_MAX_TTL_SECONDS
    max_body_bytes: int = c.DEFAULT_MAX_BODY_BYTES
    token_param: str = c.DEFAULT_TOKEN_PARAM
    retry_after: int = c.DEFAULT_RETRY_AFTER_SECONDS
    shutdown_timeout: float = c.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    log_level: str = "info"
    workers: int = 1
    outbox: OutboxSettings = field(default_factory=OutboxSettings)

    @property
    def uses_dev_source(self) -> bool:
        return self.dev_write_key is not None

    def check_bind(self, host: str) -> None:
        """Refuse a non-loopback address unless sources and a server secret are configured."""
        if is_loopback(host):
            return
        problems = []
        if self.uses_dev_source:
            problems.append(f"binding {host} needs configured sources ({c.ENV_PREFIX}SOURCES)")
        if not self.secret_configured:
            problems.append(f"binding {host} needs a server secret ({c.ENV_PREFIX}SECRET)")
        if problems:
            raise ConfigError(problems)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(environ: Mapping[str, str], config_file: Path | None = None) -> Settings:
    """Build :class:`Settings` from the environment and an optional file; raise ConfigError."""
    reader = _Reader(environ, config_file)
    return reader.settings()


class _Reader:
    """Reads typed values from env (``IDENTITY_NAME``) then file (``name``), noting problems."""

    def __init__(self, environ: Mapping[str, str], config_file: Path | None) -> None:
        self.environ = environ
        self.problems: list[str] = []
        path = config_file or (
            Path(environ[CONFIG_FILE_VAR]) if CONFIG_FILE_VAR in environ else None
        )
        self.file: dict[str, Any] = self._read_file(path) if path else {}
        for env_name in sorted(environ):
            name = env_name.removeprefix(c.ENV_PREFIX).lower()
            known = name in SETTING_NAMES or env_name == CONFIG_FILE_VAR
            if env_name.startswith(c.ENV_PREFIX) and not known:
                self.problems.append(f"{env_name} is not a setting (a typo?)")

    def settings(self) -> Settings:
        default_ttl = self.integer("default_ttl", c.DEFAULT_TTL_SECONDS, 1, 86_400)
        max_ttl = self.integer("max_ttl", c.DEFAULT_MAX_TTL_SECONDS, 1, 86_400)
        if default_ttl > max_ttl:
            self.problems.append(
                f"{c.ENV_PREFIX}DEFAULT_TTL ({default_ttl}) is above "
                f"{c.ENV_PREFIX}MAX_TTL ({max_ttl})"
            )
        sources = self.sources()
        dev_write_key = self.text("dev_write_key", None)
        if sources and dev_write_key is not None:
            self.problems.append(
                f"{c.ENV_PREFIX}DEV_WRITE_KEY is only for the development source; "
                "remove it when sources are configured"
            )
        if not sources:
            dev_write_key = dev_write_key or secrets.token_urlsafe(24)
            sources = [_dev_source(dev_write_key)]
        else:
            dev_write_key = None
        redis = self.redis_settings()
        outbox = self.outbox_settings()
        if outbox.enabled and not outbox.forwarder_in_serve and redis is None:
            self.problems.append(
                f"{c.ENV_PREFIX}FORWARDER=off needs {c.ENV_PREFIX}REDIS_URL: without Redis "
                "the events are in this process, and only its own forwarder can deliver them"
            )
        secret_text = self.text("secret", None)
        if secret_text is not None and len(secret_text) < c.MIN_SECRET_LENGTH:
            self.problems.append(
                f"{c.ENV_PREFIX}SECRET must be at least {c.MIN_SECRET_LENGTH} characters"
            )
        if secret_text is None and redis is not None:
            self.problems.append(
                f"{c.ENV_PREFIX}SECRET is required with {c.ENV_PREFIX}REDIS_URL: every instance "
                "must derive the same token lookup ids"
            )
        token_param = self.text("token_param", c.DEFAULT_TOKEN_PARAM) or ""
        if not token_param.replace("_", "").replace("-", "").isalnum():
            self.problems.append(
                f"{c.ENV_PREFIX}TOKEN_PARAM must be letters, digits, '_' or '-', "
                f"not {token_param!r}"
            )
        log_level = (self.text("log_level", "info") or "info").lower()
        if log_level not in ("debug", "info", "warning", "error"):
            self.problems.append(
                f"{c.ENV_PREFIX}LOG_LEVEL must be debug, info, warning or error, not {log_level!r}"
            )
        workers = self.integer("workers", 1, 1, c.MAX_WORKERS)
        if workers > 1 and redis is None:
            self.problems.append(
                f"{c.ENV_PREFIX}WORKERS above 1 needs Redis ({c.ENV_PREFIX}REDIS_URL): each worker "
                "would keep its own memory store, and a token prepared in one could not be "
                "exchanged in another"
            )
        settings = Settings(
            sources=tuple(sources),
            secret=(secret_text or secrets.token_urlsafe(32)).encode(),
            secret_configured=secret_text is not None,
            dev_write_key=dev_write_key,
            redis=redis,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            max_body_bytes=self.integer("max_body_bytes", c.DEFAULT_MAX_BODY_BYTES, 256, 1 << 20),
            token_param=token_param,
            retry_after=self.integer("retry_after", c.DEFAULT_RETRY_AFTER_SECONDS, 1, 3600),
            shutdown_timeout=self.number(
                "shutdown_timeout", c.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS, 0.0, 600.0
            ),
            log_level=log_level,
            workers=workers,
            outbox=outbox,
        )
        if self.problems:
            raise ConfigError(self.problems)
        return settings

    def outbox_settings(self) -> OutboxSettings:
        enabled = self.choice("outbox", "on", ("on", "off")) == "on"
        forwarder = self.choice("forwarder", "embedded", ("embedded", "off"))
        return OutboxSettings(
            enabled=enabled,
            destinations=tuple(self.destinations()),
            forwarder_in_serve=forwarder == "embedded",
            batch_max_events=self.integer(
                "batch_max_events", c.DEFAULT_BATCH_MAX_EVENTS, 1, c.MAX_BATCH_EVENTS
            ),
            batch_max_wait=self.number("batch_max_wait", c.DEFAULT_BATCH_MAX_WAIT_SECONDS, 0, 60),
            delivery_timeout=self.number(
                "delivery_timeout", c.DEFAULT_DELIVERY_TIMEOUT_SECONDS, 0.1, 300
            ),
            max_attempts=self.integer(
                "delivery_max_attempts", c.DEFAULT_DELIVERY_MAX_ATTEMPTS, 1, 1000
            ),
            backoff_base=self.number("backoff_base", c.DEFAULT_BACKOFF_BASE_SECONDS, 0.001, 60),
            backoff_max=self.number("backoff_max", c.DEFAULT_BACKOFF_MAX_SECONDS, 0.001, 3600),
            reclaim_idle=self.number("reclaim_idle", c.DEFAULT_RECLAIM_IDLE_SECONDS, 0.1, 86_400),
            started_event=self.text("started_event", c.DEFAULT_STARTED_EVENT) or "",
            completed_event=self.text("completed_event", c.DEFAULT_COMPLETED_EVENT) or "",
        )

    def destinations(self) -> list[Destination]:
        found: list[Destination] = []
        url = self.text("destination_url", None)
        write_key = self.text("destination_write_key", None)
        if url is not None or write_key is not None:
            env = c.ENV_PREFIX + "DESTINATION_"
            found.extend(
                self._http_destination(
                    "default", (url, env + "URL"), (write_key, env + "WRITE_KEY")
                )
            )
        table = self.table("destinations") or {}
        if not isinstance(table, dict):
            self.problems.append("destinations must be a table of destination name to settings")
            table = {}
        for name, spec in table.items():
            where = f"destinations.{name}"
            if not isinstance(spec, dict) or set(spec) - {"url", "write_key"}:
                self.problems.append(f"{where} must be a table with url and write_key")
                continue
            url_setting = (spec.get("url"), f"{where}.url")
            key_setting = (spec.get("write_key"), f"{where}.write_key")
            found.extend(self._http_destination(str(name), url_setting, key_setting))
        events_file = self.text("events_file", None)
        if events_file is not None:
            found.append(Destination("file", "file", path=events_file))
        names = [d.name for d in found]
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.problems.append(f"destination name {name!r} is used twice")
        for destination in found:
            if not destination.name.replace("_", "").replace("-", "").isalnum():
                self.problems.append(
                    f"destination name {destination.name!r} must be letters, digits, '_' or '-'"
                )
        return found or [Destination("stdout", "stdout")]

    def _http_destination(
        self, name: str, url_setting: tuple[Any, str], key_setting: tuple[Any, str]
    ) -> list[Destination]:
        """A destination from its (value, setting name) pairs for the URL and write key."""
        (url, url_name), (write_key, key_name) = url_setting, key_setting
        problems = len(self.problems)
        parsed = urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            self.problems.append(f"{url_name} must be an http(s) URL of a Segment-compatible API")
        if not isinstance(write_key, str) or not write_key:
            self.problems.append(f"{key_name} is required with {url_name}")
        if len(self.problems) > problems:
            return []
        return [Destination(name, "http", url=str(url), write_key=str(write_key))]

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = (self.text(name, default) or default).lower()
        if value not in allowed:
            self.problems.append(
                f"{c.ENV_PREFIX}{name.upper()} must be one of {', '.join(allowed)}, not {value!r}"
            )
            return default
        return value

    def redis_settings(self) -> RedisSettings | None:
        url = self.text("redis_url", None)
        timeout = self.number("redis_timeout", c.DEFAULT_REDIS_TIMEOUT_SECONDS, 0.01, 60.0)
        max_connections = self.integer(
            "redis_max_connections", c.DEFAULT_REDIS_MAX_CONNECTIONS, 1, 10_000
        )
        prefix = self.text("redis_key_prefix", c.DEFAULT_REDIS_KEY_PREFIX) or ""
        if "{" in prefix or "}" in prefix:
            self.problems.append(
                f"{c.ENV_PREFIX}REDIS_KEY_PREFIX must not contain braces (they mark hash tags)"
            )
        if url is None:
            return None
        try:
            return RedisSettings.from_dsn(
                url, key_prefix=prefix, timeout=timeout, max_connections=max_connections
            )
        except ValueError as exc:
            self.problems.append(f"{c.ENV_PREFIX}REDIS_URL: {exc}")
            return None

    def table(self, name: str) -> Any:
        """A table setting: JSON in the environment, else the file's table, else None."""
        env_name = c.ENV_PREFIX + name.upper()
        if env_name not in self.environ:
            return self.file.get(name)
        try:
            return json.loads(self.environ[env_name])
        except json.JSONDecodeError as exc:
            self.problems.append(f"{env_name} is not valid JSON: {exc.msg}")
            return None

    def sources(self) -> list[Source]:
        raw = self.table("sources")
        if raw is None:
            return []
        if not isinstance(raw, dict):
            self.problems.append("sources must be a table of source name to settings")
            return []
        return [s for name, spec in raw.items() if (s := self._source(str(name), spec))]

    def _source(self, name: str, spec: Any) -> Source | None:
        where = f"sources.{name}"
        if not isinstance(spec, dict):
            self.problems.append(f"{where} must be a table with write_key_hash and origins")
            return None
        unknown = set(spec) - {"write_key_hash", "origins"}
        if unknown:
            self.problems.append(f"{where}: unknown settings {', '.join(sorted(unknown))}")
        key_hash = spec.get("write_key_hash")
        digest = b""
        if not isinstance(key_hash, str) or not key_hash.startswith(WRITE_KEY_HASH_PREFIX):
            self.problems.append(
                f"{where}.write_key_hash must be '{WRITE_KEY_HASH_PREFIX}<64 hex digits>' "
                "(identity-service hash-key prints it)"
            )
        else:
            try:
                digest = bytes.fromhex(key_hash.removeprefix(WRITE_KEY_HASH_PREFIX))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                self.problems.append(f"{where}.write_key_hash must have 64 hex digits")
        origins_spec = spec.get("origins")
        if not isinstance(origins_spec, list) or not origins_spec:
            self.problems.append(f"{where}.origins must be a non-empty list of origins")
            origins_spec = []
        origins = set()
        for text in origins_spec:
            try:
                origins.add(parse_origin(str(text)))
            except OriginError as exc:
                self.problems.append(f"{where}.origins: {text!r} {exc}")
        return Source(name=name, write_key_digest=digest, origins=frozenset(origins))

    def _lookup(self, name: str) -> tuple[str, Any]:
        env_name = c.ENV_PREFIX + name.upper()
        if env_name in self.environ:
            return env_name, self.environ[env_name]
        return name, self.file.get(name)

    def text(self, name: str, default: str | None) -> str | None:
        where, value = self._lookup(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            self.problems.append(f"{where} must be a string")
            return default
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self._ranged(name, default, low, high, int, "a whole number")

    def number(self, name: str, default: float, low: float, high: float) -> float:
        return self._ranged(name, default, low, high, float, "a number")

    def _ranged(
        self, name: str, default: T, low: T, high: T, kind: Callable[[Any], T], what: str
    ) -> T:
        where, value = self._lookup(name)
        if value is None or value == "":
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            parsed = kind(value)
        except (TypeError, ValueError):
            self.problems.append(f"{where} must be {what}, not {value!r}")
            return default
        if not low <= parsed <= high:  # type: ignore[operator]
            self.problems.append(f"{where} must be between {low} and {high}, not {parsed}")
            return default
        return parsed

    def _read_file(self, path: Path) -> dict[str, Any]:
        try:
            text = path.read_text()
        except OSError as exc:
            self.problems.append(f"config file {path}: {exc.strerror}")
            return {}
        try:
            if path.suffix == ".toml":
                data: Any = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                self.problems.append(f"config file {path}: must end in .toml, .yaml or .yml")
                return {}
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            self.problems.append(f"config file {path}: {exc}")
            return {}
        if not isinstance(data, dict):
            self.problems.append(f"config file {path}: must hold a table of settings")
            return {}
        unknown = set(data) - SETTING_NAMES
        if unknown:
            self.problems.append(
                f"config file {path}: unknown settings {', '.join(sorted(unknown))}"
            )
        return data


def _dev_source(write_key: str) -> Source:
    digest = bytes.fromhex(hash_write_key(write_key).removeprefix(WRITE_KEY_HASH_PREFIX))
    return Source(name=c.DEV_SOURCE_NAME, write_key_digest=digest, allow_localhost=True)
