"""Settings, read once at start from ``IDENTITY_*`` variables and an optional TOML/YAML file.

Every problem found is reported, one line each, in a single :class:`ConfigError`, so a
misconfigured deployment fails at start with the whole list instead of one error per
restart. Environment variables win over the file.
"""

import json
import re
import secrets
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import SplitResult, parse_qs, unquote, unquote_plus, urlsplit

import yaml

from identity_service import constants as c
from identity_service.amp.config import AmpSettings, read_amp_settings
from identity_service.proxies import DEFAULT_TRUSTED_PROXIES, TrustedProxies, read_trusted_proxies
from identity_service.sources import (
    WRITE_KEY_HASH_PREFIX,
    OriginError,
    Source,
    can_be_sent,
    hash_write_key,
    parse_origin,
)
from identity_service.urls import DNS_PROBLEM, fits_dns, host_port, is_loopback_host

T = TypeVar("T")
Choice = TypeVar("Choice", bound=str)  # one of a setting's allowed values

CONFIG_FILE_VAR = c.ENV_PREFIX + "CONFIG_FILE"
REDIS_SCHEMES = (
    "redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel",
    "rediss+sentinel",
)  # fmt: skip
# Query parameters of a sentinel URL that are for the sentinels, not for the master.
SENTINEL_PARAMETERS = ("sentinel_username", "sentinel_password")
# The query parameters a Redis URL may carry are those redis-py's parse_url reads into a
# value of their type (its URL_QUERY_ARGUMENT_PARSERS, which its releases add to) and these,
# which it passes on as text and both its connections and the service's own clients read:
# the credentials, the client's name, and the TLS files and check (stores/resp.py's
# tls_context). redis-py passes any other on too: its connections fail on it with a
# TypeError, the request path's clients ignore it. redis_url_parameters() has them all.
REDIS_TEXT_PARAMETERS = (
    "username", "password", "client_name", "ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile",
    "ssl_keyfile",
)  # fmt: skip
# Parameters a +cluster or +sentinel URL may not carry: the service passes its own to those
# clients, which failed on the second value ("got multiple values for keyword argument").
TOPOLOGY_SET_PARAMETERS = {
    "socket_timeout": "IDENTITY_REDIS_TIMEOUT sets it",
    "socket_connect_timeout": "IDENTITY_REDIS_TIMEOUT sets it",
    "timeout": "IDENTITY_REDIS_TIMEOUT sets the timeouts",
    "max_connections": "IDENTITY_REDIS_MAX_CONNECTIONS sets it",
}
PASSWORD_PARAMETERS = ("password", "sentinel_password")
REDIS_TLS_CERT_REQS = ("none", "optional", "required")
REDACTED = "***"
# How a problem with a Redis URL ends when the rest of a password may be the cause.
PERCENT_ENCODE = "(percent-encode / ? # @ in the password)"
DATABASE_PROBLEM = "the database must be a number, 0 or more"
DESTINATION_KEYS = frozenset({"url", "write_key", "allow_insecure", "sources"})
SETTING_NAMES = frozenset(
    {
        "sources", "secret", "dev_write_key", "redis_url", "redis_timeout",
        "redis_max_connections", "redis_key_prefix", "redis_shards", "redis_wait",
        "default_ttl", "max_ttl",
        "max_body_bytes", "token_param", "retry_after", "shutdown_timeout", "head_timeout",
        "body_timeout", "max_connections", "log_level", "workers",
        "outbox", "forwarder", "destinations", "destination_url", "destination_write_key",
        "destination_allow_insecure", "destination_sources",
        "events_file", "batch_max_events", "batch_max_wait", "delivery_timeout",
        "delivery_max_attempts", "backoff_base", "backoff_max", "reclaim_idle",
        "started_event", "completed_event", "amp", "forwarder_metrics_port",
        "forwarder_metrics_host", "metrics_port", "metrics_host", "trusted_proxies",
    }
)  # fmt: skip


class RedisUrlError(ValueError):
    """The problems of a Redis URL, one message each (none quotes the URL)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


Topology = Literal["single", "cluster", "sentinel"]


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """How to reach Redis. ``url`` is a redis://, rediss:// or unix:// DSN (one node), a
    redis+cluster:// DSN (seed nodes of a Cluster) or a redis+sentinel:// DSN (sentinels
    and the master's service name); each with a TLS form (rediss…)."""

    url: str = field(repr=False)  # may hold a password; `address` masks it
    key_prefix: str = c.DEFAULT_REDIS_KEY_PREFIX
    timeout: float = c.DEFAULT_REDIS_TIMEOUT_SECONDS
    max_connections: int = c.DEFAULT_REDIS_MAX_CONNECTIONS
    shards: int = c.KEY_SHARDS
    # WAIT after each prepare and exchange: (replicas, timeout in ms); None: no WAIT.
    wait: tuple[int, int] | None = None
    topology: Topology = "single"
    # A one-node URL with the credentials, TLS and db of ``url``: how to reach each node
    # (the host and port are the first seed's; a Cluster's and a Sentinel's clients swap
    # them for each node's).
    node_url: str = field(default="", repr=False)
    # A Cluster's seed nodes, or the sentinels.
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""  # the master's name, with Sentinel
    sentinel_auth: tuple[str | None, str | None] = field(default=(None, None), repr=False)

    @classmethod
    def from_dsn(cls, dsn: str, **options: Any) -> "RedisSettings":
        """Settings of ``dsn``, checked as redis-py will read it; ValueError says what is
        wrong without quoting the URL, which may hold a password."""
        parts = _split(dsn)
        scheme = parts.scheme
        if scheme not in REDIS_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(REDIS_SCHEMES)}, not {scheme!r}")
        if not dsn.startswith(f"{scheme}://"):  # as redis-py reads it: lower case only
            raise ValueError(f"must start with {scheme}://")
        if parts.fragment or "@" in parts.path or "@" in parts.query.partition("=")[0]:
            # The rest of a password with an unencoded / ? or # in it (an @ in a query
            # parameter's value, ?client_name=a@b, is no such rest).
            raise ValueError(f"an @ or a # after the host {PERCENT_ENCODE}")
        problems = _parameter_problems(parts, scheme.partition("+")[2] or "single")
        try:
            settings = cls._read(dsn, parts, **options)
        except ValueError as exc:
            raise RedisUrlError([*problems, str(exc)]) from None
        if problems:
            raise RedisUrlError(problems)
        return settings

    @classmethod
    def _read(cls, dsn: str, parts: SplitResult, **options: Any) -> "RedisSettings":
        """Settings of ``dsn`` (split as ``parts``), its query parameters checked apart."""
        scheme = parts.scheme
        if "+" not in scheme:
            _node_options(dsn)
            return cls(url=dsn, node_url=dsn, **options)
        base, _, topology = scheme.partition("+")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        nodes = tuple(_host_port(node) for node in hosts.split(","))
        path = [segment for segment in parts.path.split("/") if segment]
        service, db = "", "0"
        if topology == "sentinel":
            if not path or len(path) > 2:
                raise ValueError("a sentinel URL ends with /<service name>[/<db>]")
            service, db = path[0], (path[1] if len(path) == 2 else "0")
        elif path and path != ["0"]:
            raise ValueError("a Cluster has only database 0")
        pairs = parts.query.split("&")
        # Names as parse_qs reads them (sentinel_p%61ssword is sentinel_password).
        node_query = "&".join(
            p for p in pairs if unquote_plus(p.partition("=")[0]) not in SENTINEL_PARAMETERS
        )
        at = f"{userinfo}@" if userinfo else ""
        node_url = f"{base}://{at}{host_port(*nodes[0])}/{db}" + (
            f"?{node_query}" if node_query else ""
        )
        _node_options(node_url)
        query = parse_qs(parts.query)
        sentinel_auth = tuple(query.get(name, [None])[-1] for name in SENTINEL_PARAMETERS)
        return cls(
            url=dsn,
            topology="cluster" if topology == "cluster" else "sentinel",
            node_url=node_url,
            nodes=nodes,
            service=unquote(service),
            sentinel_auth=(sentinel_auth[0], sentinel_auth[1]),
            **options,
        )

    @property
    def address(self) -> str:
        """The URL to show in messages and logs: without its password."""
        return redact_url(self.url)


def redis_url_parameters() -> frozenset[str]:
    """The query parameters a one-node Redis URL may carry (REDIS_TEXT_PARAMETERS)."""
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    return frozenset(URL_QUERY_ARGUMENT_PARSERS) | frozenset(REDIS_TEXT_PARAMETERS)


def _parameter_problems(parts: SplitResult, topology: str) -> list[str]:
    """One problem for each query parameter of ``parts`` that redis-py would pass on to
    connections that fail on it (the service's own clients would ignore it), or that the
    ``topology``'s clients fail on. Each names its parameter as parse_qs reads it, never a
    value, nor a name where the rest of a password may be."""
    # Where the rest of a password may be: after a password parameter (an & in its value),
    # and up to the query's last @ (a ? in the password; the user info before it may hold an
    # @ too, as in redis://u:p@ss?tail=x@host).
    hidden_before = parts.query.rfind("@")
    problems: list[str] = []
    at, after_password = 0, False
    for pair in parts.query.split("&"):
        name = unquote_plus(pair.partition("=")[0])
        hidden = after_password or at < hidden_before
        at += len(pair) + 1
        after_password = after_password or name.lower() in PASSWORD_PARAMETERS
        problem = _parameter_problem(name, topology) if pair else ""
        if problem and hidden:
            problem = (
                "a parameter the service does not take, where the rest of a password may be "
                "(percent-encode ? & @ in the password)"
            )
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def _parameter_problem(name: str, topology: str) -> str:
    """What is wrong with the query parameter ``name`` of a ``topology`` URL, or ""."""
    if name in SENTINEL_PARAMETERS:
        return "" if topology == "sentinel" else f"the parameter {name} is for a +sentinel URL"
    if not name:
        return "a parameter without a name (=value)"
    if name not in redis_url_parameters():
        shown = name if re.fullmatch(r"[\w.-]+", name, re.ASCII) else repr(name)
        return f"unknown parameter {shown}: docs/redis-topologies.md lists those a Redis URL takes"
    if topology != "single" and name in TOPOLOGY_SET_PARAMETERS:
        return f"the parameter {name} is not for a +{topology} URL: {TOPOLOGY_SET_PARAMETERS[name]}"
    if topology == "cluster" and name == "db":
        return "a Cluster has only database 0 (no db parameter)"
    if topology == "cluster" and name == "retry_on_timeout":
        return (
            "the parameter retry_on_timeout is not for a +cluster URL: redis-py's Cluster "
            "client does not take it"
        )
    return ""


def _split(url: str) -> SplitResult:
    """``url`` split; ValueError without urllib's text, which may quote the host."""
    try:
        return urlsplit(url)
    except ValueError:  # an unclosed [, or a bracketed host that is no IPv6 address
        raise ValueError(f"is not a valid URL {PERCENT_ENCODE}") from None


def _node_options(url: str) -> dict[str, Any]:
    """redis-py's connection options of the one-node URL ``url`` (its ``parse_url``),
    refusing at start what it would take silently (a port 0, a database that is no number)
    or refuse only when connecting. ValueError quotes no part of ``url``."""
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url

    parts = _split(url)
    tls = parts.scheme == "rediss"
    if parts.scheme != "unix":
        try:
            port = parts.port
        except ValueError:  # urllib's text quotes the port: the rest of a password
            port = 0
        if port == 0:
            raise ValueError(f"the port is not a number from 1 to 65535 {PERCENT_ENCODE}")
        _check_host(parts.hostname)
        if parts.path.strip("/") and not _is_number(parts.path.strip("/")):
            raise ValueError(DATABASE_PROBLEM)
    elif not parts.path:
        raise ValueError("a unix:// URL names the socket: unix:///path/to/redis.sock")
    if not tls and any(name.startswith("ssl_") for name in parse_qs(parts.query)):
        raise ValueError("TLS parameters (ssl_...) need a rediss:// URL")
    try:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        # "Invalid value for '<name>' in connection URL.": quote only its own names.
        named = [name for name in URL_QUERY_ARGUMENT_PARSERS if f"'{name}'" in str(exc)]
        if named == ["db"]:
            problem = DATABASE_PROBLEM
        elif len(named) == 1:
            problem = f"the parameter {named[0]} has a value redis-py does not take"
        else:
            problem = "is not a redis://, rediss:// or unix:// URL"
        raise ValueError(problem) from None
    if options.get("db", 0) < 0:
        raise ValueError(DATABASE_PROBLEM)
    cert_reqs = options.get("ssl_cert_reqs", "required")
    if cert_reqs not in REDIS_TLS_CERT_REQS:
        allowed = ", ".join(REDIS_TLS_CERT_REQS)
        raise ValueError(f"ssl_cert_reqs must be one of {allowed}, not {cert_reqs!r}")
    return options


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _host_port(node: str) -> tuple[str, int]:
    host, colon, port = node.rpartition(":")
    if not colon or not host or not _is_number(port) or not 0 < int(port) <= 65535:
        raise ValueError("each node is host:port, with a port between 1 and 65535")
    host = host.strip("[]")
    _check_host(host)
    return host, int(port)


def _check_host(host: str | None) -> None:
    """Refuse a Redis host name no DNS name can be: every connection would fail."""
    if host and not fits_dns(host):
        raise ValueError(f"each host must be a name of {DNS_PROBLEM}")


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and any ``password`` parameter masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    query = "&".join(_redact_parameter(pair) for pair in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # Not urlunsplit: it drops the "//" of unix:///path.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def _redact_parameter(pair: str) -> str:
    key = pair.partition("=")[0]
    return f"{key}={REDACTED}" if unquote(key).lower() in PASSWORD_PARAMETERS else pair


# The outbox destination of each configured AMP action: ``amp-action-<action name>``.
ACTION_DESTINATION_PREFIX = "amp-action-"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where events go: a Segment-compatible HTTP API, a JSONL file, or standard output;
    or, kind ``webhook``, an AMP action's webhook (``url``, signed with ``secret``), which
    receives only the entries addressed to it.

    ``sources``: the sources whose events it receives (a site's own Segment source); None,
    the default, receives every source's events."""

    name: str
    kind: Literal["http", "file", "stdout", "webhook"]
    url: str = ""
    write_key: str = field(default="", repr=False)
    path: str = ""
    secret: bytes = field(default=b"", repr=False)  # a webhook's HMAC-SHA256 key
    sources: frozenset[str] | None = None

    @property
    def batch_url(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1/batch") else base + "/v1/batch"

    @property
    def addressed_only(self) -> bool:
        """Whether it receives only entries addressed to it (``only``), never events."""
        return self.kind == "webhook"

    @property
    def batched(self) -> bool:
        """Whether its events go out in batches held to the batch API's sizes (32 KB an
        event, 500 KB a batch); a webhook's bodies go one by one, whatever their size."""
        return self.kind != "webhook"


def action_destination_name(action: str) -> str:
    """The outbox destination that retries the webhook calls of AMP action ``action``."""
    return ACTION_DESTINATION_PREFIX + action


def action_destinations(amp: AmpSettings | None) -> list[Destination]:
    """One ``webhook`` destination per configured AMP action (none without ``[amp]``)."""
    if amp is None:
        return []
    return [
        Destination(
            action_destination_name(action.name),
            "webhook",
            url=action.webhook,
            secret=action.secret,
        )
        for action in amp.actions.values()
    ]


# IDENTITY_OUTBOX: ``on``, the events and the AMP actions' queued webhook calls; ``actions``,
# the webhook calls alone (no events emitted); ``off``, neither.
OutboxMode = Literal["on", "actions", "off"]
OUTBOX_MODES: tuple[OutboxMode, ...] = ("on", "actions", "off")


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """The outbox: what it carries (``mode``), where to, and how it is batched and
    retried."""

    mode: OutboxMode = "on"
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

    @property
    def enabled(self) -> bool:
        """Whether the outbox runs (``on``, ``actions``): its forwarders deliver, and an AMP
        action's webhook call that fails transiently is queued in it for them."""
        return self.mode != "off"

    @property
    def emits_events(self) -> bool:
        """Whether handoffs and AMP hits emit Segment events (``on``); ``actions`` carries
        the AMP actions' webhook calls alone."""
        return self.mode == "on"

    @property
    def events_destinations(self) -> int:
        """How many destinations receive events (the AMP actions' webhooks do not)."""
        return sum(not destination.addressed_only for destination in self.destinations)

    @property
    def events_wait(self) -> bool:
        """Whether events are emitted with no destination to take them: on Redis they wait
        in the outbox for one (untrimmed, shown as destination ``(none)``, warned of at
        start)."""
        return self.emits_events and not self.events_destinations

    @property
    def routes_by_source(self) -> bool:
        """Whether some destination takes only some sources' events: then each outbox entry
        is written with its source's name, which the feeds route on."""
        return any(destination.sources is not None for destination in self.destinations)

    def routed_nowhere(self, source_names: list[str]) -> list[str]:
        """The sources whose events no destination takes (every events destination names
        ``sources`` and none names them): their events would be dropped unseen."""
        if not self.emits_events:
            return []
        takers = [d for d in self.destinations if not d.addressed_only]
        if any(d.sources is None for d in takers):
            return []
        taken = {name for d in takers for name in d.sources or ()}
        return [name for name in source_names if name not in taken]


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the application needs, validated."""

    sources: tuple[Source, ...]
    secret: bytes = field(repr=False)
    secret_configured: bool
    dev_write_key: str | None = field(repr=False)
    redis: RedisSettings | None
    default_ttl: int = c.DEFAULT_TTL_SECONDS
    max_ttl: int = c.DEFAULT_MAX_TTL_SECONDS
    max_body_bytes: int = c.DEFAULT_MAX_BODY_BYTES
    token_param: str = c.DEFAULT_TOKEN_PARAM
    retry_after: int = c.DEFAULT_RETRY_AFTER_SECONDS
    shutdown_timeout: float = c.DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
    head_timeout: float = c.DEFAULT_HEAD_TIMEOUT_SECONDS
    body_timeout: float = c.DEFAULT_BODY_TIMEOUT_SECONDS
    max_connections: int = c.DEFAULT_MAX_CONNECTIONS
    log_level: str = "info"
    workers: int = 1
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    amp: AmpSettings | None = None  # the AMP endpoints, when [amp] is configured
    # The peers whose X-Forwarded-For names the client (AMP's per-address rate limits).
    trusted_proxies: TrustedProxies = DEFAULT_TRUSTED_PROXIES
    # `identity-service forward`'s /metrics and /healthz; no port: not served.
    forwarder_metrics_port: int | None = c.DEFAULT_FORWARDER_METRICS_PORT
    forwarder_metrics_host: str = c.DEFAULT_FORWARDER_METRICS_HOST
    # `identity-service serve`'s /metrics and /healthz on a port of their own, and then not
    # /metrics on the API's port; None: /metrics on the API's port. The host: the API's.
    metrics_port: int | None = None
    metrics_host: str = c.DEFAULT_HOST
    # The development write key's setting as the user wrote it (IDENTITY_DEV_WRITE_KEY,
    # dev_write_key): start-up names it in place of the key. "": the key was generated.
    dev_write_key_setting: str = ""

    @property
    def uses_dev_source(self) -> bool:
        return self.dev_write_key is not None

    def bind_problems(self, host: str) -> list[str]:
        """What keeps these settings from serving on ``host``: a name past DNS's limits (the
        bind would fail), or a non-loopback address without configured sources and a server
        secret."""
        if not fits_dns(host):
            return [f"cannot listen on {host}: a host name must have {DNS_PROBLEM}"]
        if is_loopback_host(host):
            return []
        problems = []
        if self.uses_dev_source:
            problems.append(f"binding {host} needs configured sources ({c.ENV_PREFIX}SOURCES)")
        if not self.secret_configured:
            problems.append(f"binding {host} needs a server secret ({c.ENV_PREFIX}SECRET)")
        return problems


def load_settings(
    environ: Mapping[str, str],
    config_file: Path | None = None,
    flags: Mapping[str, tuple[str, object]] | None = None,
    *,
    problems: Iterable[str] = (),
    host: str | None = None,
    port: int | None = None,
) -> Settings:
    """Build :class:`Settings` from the environment and an optional file; raise ConfigError.

    ``flags``: settings given on the command line, which win over both, as setting name to
    (the option as written, its value): ``{"workers": ("--workers", 4)}``. ``problems``:
    the command line's own, reported first with the settings'; ``host`` and ``port``: the
    address to serve the API on, whose problems (Settings.bind_problems, a metrics port
    that is the API's) are reported with them too; the metrics port's host defaults to
    ``host``."""
    reader = _Reader(environ, config_file, flags or {})
    reader.problems[:0] = problems
    return reader.settings(host, port)


class _Reader:
    """Reads typed values from env (``IDENTITY_NAME``) then file (``name``), noting problems."""

    def __init__(
        self,
        environ: Mapping[str, str],
        config_file: Path | None,
        flags: Mapping[str, tuple[str, object]],
    ) -> None:
        self.environ = environ
        self.flags = flags
        self.problems: list[str] = []
        self.source_names: list[str] = []  # the configured sources, once read
        # Settings already reported: a check across settings skips them, since it would
        # judge the default in place of what the user wrote.
        self.invalid: set[str] = set()
        config_path = self.variable("config_file")
        path = config_file or (Path(config_path) if config_path is not None else None)
        self.file: dict[str, Any] = self._read_file(path) if path else {}
        for env_name in sorted(environ):
            # Only the upper-case name is read: IDENTITY_redis_url would be ignored.
            name = env_name.removeprefix(c.ENV_PREFIX)
            known = name == name.upper() and name.lower() in SETTING_NAMES
            known = known or env_name == CONFIG_FILE_VAR
            if env_name.startswith(c.ENV_PREFIX) and not known:
                self.problems.append(f"{env_name} is not a setting (a typo?)")

    def settings(self, host: str | None = None, port: int | None = None) -> Settings:
        default_ttl = self.integer("default_ttl", c.DEFAULT_TTL_SECONDS, 1, 86_400)
        max_ttl = self.integer("max_ttl", c.DEFAULT_MAX_TTL_SECONDS, 1, 86_400)
        if default_ttl > max_ttl and self.valid("default_ttl", "max_ttl"):
            self.problems.append(
                f"{self.named('default_ttl', default_ttl, like='max_ttl')} is above "
                f"{self.named('max_ttl', max_ttl, like='default_ttl')}"
            )
        sources = self.sources()
        dev_write_key = self.text("dev_write_key", None)
        if dev_write_key is not None and not can_be_sent(dev_write_key):
            # Not quoted: it is a secret.
            self.problem(
                "dev_write_key",
                "must be printable ASCII without ':': no request could carry it "
                "(identity-service new-key makes one)",
            )
            dev_write_key = None
        if sources and dev_write_key is not None:
            self.problem(
                "dev_write_key",
                "is only for the development source; remove it when sources are configured",
            )
        dev_write_key_setting = self.where("dev_write_key") if dev_write_key else ""
        if not sources:
            dev_write_key = dev_write_key or secrets.token_urlsafe(24)
            sources = [_dev_source(dev_write_key)]
        else:
            dev_write_key = None
        source_names = [source.name for source in sources]
        amp = self.amp_settings(source_names)
        redis = self.redis_settings()
        outbox = self.outbox_settings(amp, source_names)
        # "Needs Redis" holds once a Redis URL is given, even one reported as invalid.
        has_redis = self.given("redis_url")
        redis_url = self.where("redis_url")
        forwarder_off = outbox.enabled and not outbox.forwarder_in_serve
        if forwarder_off and not has_redis and self.valid("outbox"):
            self.problems.append(
                f"{self.where('forwarder')}=off needs {redis_url}: without Redis "
                "the events are in this process, and only its own forwarder can deliver them"
            )
        secret_text = self.text("secret", None)
        if secret_text is not None and len(secret_text) < c.MIN_SECRET_LENGTH:
            self.problem("secret", f"must be at least {c.MIN_SECRET_LENGTH} characters")
        if secret_text is None and has_redis and self.valid("secret"):
            self.problems.append(
                f"{self.where('secret', like='redis_url')} is required with {redis_url}: "
                "every instance must derive the same token lookup ids"
            )
        token_param = self.text("token_param", c.DEFAULT_TOKEN_PARAM) or ""
        if not _is_name(token_param):
            self.problem("token_param", f"must be letters, digits, '_' or '-', not {token_param!r}")
        log_level = (self.text("log_level", "info") or "info").lower()
        if log_level not in ("debug", "info", "warning", "error"):
            self.problem("log_level", f"must be debug, info, warning or error, not {log_level!r}")
        if has_redis and outbox.enabled:
            self.reclaim_after_sends(outbox)
        workers = self.integer("workers", 1, 1, c.MAX_WORKERS)
        if workers > 1 and not has_redis:
            self.problems.append(
                f"{self.where('workers')} above 1 needs Redis ({redis_url}): each worker "
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
            head_timeout=self.number("head_timeout", c.DEFAULT_HEAD_TIMEOUT_SECONDS, 0.1, 600.0),
            body_timeout=self.number("body_timeout", c.DEFAULT_BODY_TIMEOUT_SECONDS, 0.1, 600.0),
            max_connections=self.integer(
                "max_connections", c.DEFAULT_MAX_CONNECTIONS, 1, 1_000_000
            ),
            log_level=log_level,
            workers=workers,
            outbox=outbox,
            amp=amp,
            trusted_proxies=self.trusted_proxies(),
            forwarder_metrics_port=self.optional_port(
                "forwarder_metrics_port", c.DEFAULT_FORWARDER_METRICS_PORT
            ),
            forwarder_metrics_host=self.bind_host(
                "forwarder_metrics_host", c.DEFAULT_FORWARDER_METRICS_HOST
            ),
            metrics_port=self.metrics_port(port),
            metrics_host=self.bind_host("metrics_host", host or c.DEFAULT_HOST),
            dev_write_key_setting=dev_write_key_setting,
        )
        if host is not None:
            self.problems.extend(settings.bind_problems(host))
        if self.problems:
            raise ConfigError(self.problems)
        return settings

    def outbox_settings(self, amp: AmpSettings | None, source_names: list[str]) -> OutboxSettings:
        """The outbox: the events' destinations, then one per AMP action (``amp``).
        ``source_names``: the configured sources, which a destination's ``sources`` name."""
        mode = self.choice("outbox", "on", OUTBOX_MODES)
        forwarder = self.choice("forwarder", "embedded", ("embedded", "off"))
        self.source_names = source_names
        events = mode != "actions"
        return OutboxSettings(
            mode=mode,
            destinations=tuple(self.destinations(action_destinations(amp), events)),
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

    def reclaim_after_sends(self, outbox: OutboxSettings) -> None:
        """A batch's entries are not kept claimed while it fills and while it is sent, and
        up to a keep-alive interval before: another forwarder reclaiming them sooner would
        take them over mid-send and send them a second time."""
        if not self.valid("reclaim_idle", "delivery_timeout", "batch_max_wait"):
            return
        unclaimed = outbox.delivery_timeout + outbox.batch_max_wait + c.MAINTAIN_EVERY_SECONDS
        if outbox.reclaim_idle > unclaimed:
            return
        self.problems.append(
            f"{self.named('reclaim_idle', f'{outbox.reclaim_idle:g}', like='delivery_timeout')}"
            " must be more than "
            f"{self.named('delivery_timeout', f'{outbox.delivery_timeout:g}', like='reclaim_idle')}"
            f" + {self.named('batch_max_wait', f'{outbox.batch_max_wait:g}', like='reclaim_idle')}"
            f" + {c.MAINTAIN_EVERY_SECONDS:g} s ({unclaimed:g} s): a batch's entries are not "
            "kept claimed while it fills and is sent, and another forwarder would take them "
            "over mid-send and send them a second time"
        )

    def amp_settings(self, source_names: list[str]) -> AmpSettings | None:
        """The ``[amp]`` table (``IDENTITY_AMP`` as JSON), or None when not configured."""
        raw = self.table("amp")
        if raw is None:
            return None
        return read_amp_settings(
            raw, where=self.where("amp"), source_names=source_names, problems=self.problems
        )

    def destinations(
        self, actions: list[Destination] | None = None, events: bool = True
    ) -> list[Destination]:
        """The events' destinations, then ``actions``, the AMP actions' webhook destinations;
        names checked across all. When none is configured and ``events`` are emitted:
        standard output on the embedded store (development: ``make serve`` shows its
        events), none on Redis, where standard output is the logs, which no identity may
        reach: the events wait in the outbox for a destination (the forwarders warn at
        start). Without ``events`` (``outbox`` ``actions``) an events destination configured
        is a problem: it would never receive anything."""
        found: list[Destination] = []
        configured: list[str] = []  # the events destinations' settings, as the user wrote them
        single = {key: self.raw(f"destination_{key}") for key in DESTINATION_KEYS}
        if any(value is not None for value in single.values()):
            written = {
                key: self.where(f"destination_{key}", like="destination_url")
                for key in DESTINATION_KEYS
            }
            found.extend(self._http_destination("default", single, written))
            configured.append(written["url"])
        table = self.table("destinations") or {}
        if not isinstance(table, dict):
            self.problems.append("destinations must be a table of destination name to settings")
            table = {}
        for name, spec in table.items():
            where = f"destinations.{name}"
            if not isinstance(spec, dict) or set(spec) - DESTINATION_KEYS:
                self.problems.append(
                    f"{where} must be a table with url, write_key and optionally "
                    "allow_insecure and sources"
                )
                continue
            written = {key: f"{where}.{key}" for key in DESTINATION_KEYS}
            found.extend(self._http_destination(str(name), spec, written))
            configured.append(where)
        events_file = self.text("events_file", None)
        if events_file is not None:
            configured.append(self.where("events_file"))
            if self.events_file_opens(Path(events_file)):
                found.append(Destination("file", "file", path=events_file))
        if configured and not events:
            outbox = self.where("outbox")
            self.problems.append(
                f"{outbox}=actions emits no events: {', '.join(configured)} would never "
                f"receive anything; remove {'it' if len(configured) == 1 else 'them'}, or set "
                f"{outbox}=on"
            )
        if not found and events and not self.given("redis_url"):
            found = [Destination("stdout", "stdout")]
        found += actions or []
        names = [d.name for d in found]
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.problems.append(f"destination name {name!r} is used twice")
        for destination in found:
            if not _is_name(destination.name):
                self.problems.append(
                    f"destination name {destination.name!r} must be letters, digits, '_' or '-'"
                )
        return found

    def events_file_opens(self, path: Path) -> bool:
        """Whether the file sink can open ``path`` to append to it, else a problem noted:
        every delivery to it would fail and be retried until dead-lettered."""
        try:
            if path.is_dir():
                problem = f"must be a file, not the directory {path}"
            elif not path.parent.is_dir():
                problem = (
                    f"must be a file in an existing directory: {path.parent} is not a directory"
                )
            else:
                return True
        except OSError as exc:  # a directory on its way this user may not search (EACCES)
            problem = f"cannot be reached ({path}): {exc.strerror}"
        self.problem("events_file", problem)
        return False

    def _http_destination(
        self, name: str, spec: Mapping[str, Any], names: Mapping[str, str]
    ) -> list[Destination]:
        """A destination from its ``url``, ``write_key`` and ``allow_insecure`` values;
        ``names`` holds each of those settings as the user wrote it."""
        url, write_key = spec.get("url"), spec.get("write_key")
        problems = len(self.problems)
        allow_insecure = self._flag(spec.get("allow_insecure"), names["allow_insecure"])
        sources = self._destination_sources(spec.get("sources"), names["sources"])
        parts = _http_url(url)
        host = (parts.hostname or "") if parts else ""
        if parts is None:
            self.problems.append(
                f"{names['url']} must be an http(s) URL of a Segment-compatible API"
            )
        elif not _is_base_url(str(url), parts):
            # Not quoted: user information may hold a password.
            self.problems.append(
                f"{names['url']} must be the base URL of a Segment-compatible API: a host, "
                "an optional port (1 to 65535) and path, without user information, query, "
                f"fragment or backslash before the path (the key goes in {names['write_key']})"
            )
        elif not fits_dns(host):
            self.problems.append(f"{names['url']} must name a host of {DNS_PROBLEM}")
        elif parts.scheme == "http" and allow_insecure is False and not is_loopback_host(host):
            self.problems.append(
                f"{names['url']} would send the write key in clear text to {host}: "
                f"use https, or set {names['allow_insecure']} to true"
            )
        if not isinstance(write_key, str) or not write_key:
            self.problems.append(f"{names['write_key']} is required with {names['url']}")
        if len(self.problems) > problems:
            return []
        return [Destination(name, "http", url=str(url), write_key=str(write_key), sources=sources)]

    def _destination_sources(self, value: Any, where: str) -> frozenset[str] | None:
        """A destination's ``sources``: a list of configured source names (a comma-separated
        string in a variable), or None when unset (every source's events)."""
        if value is None or value == "":
            return None
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self.problems.append(f"{where} must be a list of source names")
            return None
        names = [name.strip() for name in names]
        if not names or "" in names:
            self.problems.append(f"{where} must name at least one source, without empty names")
            return None
        unknown = sorted(set(names) - set(self.source_names))
        if unknown:
            known = ", ".join(sorted(self.source_names))
            self.problems.append(
                f"{where} names {', '.join(map(repr, unknown))}, not a configured source ({known})"
            )
            return None
        return frozenset(names)

    def _flag(self, value: Any, where: str) -> bool | None:
        """A true/false setting (unset: false), or None after noting that it is neither."""
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.problems.append(f"{where} must be true or false, not {value!r}")
        return None

    def trusted_proxies(self) -> TrustedProxies:
        """``trusted_proxies``: addresses and CIDR networks, comma-separated (a list in the
        file), or ``off`` for none; unset: ``DEFAULT_TRUSTED_PROXIES``."""
        name = "trusted_proxies"
        value = self.raw(name)
        if value is None:
            return DEFAULT_TRUSTED_PROXIES
        if value is False:  # YAML reads an unquoted off as false
            value = "off"
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
            self.problem(name, "must be addresses and CIDR networks, comma-separated, or off")
            return DEFAULT_TRUSTED_PROXIES
        proxies, problems = read_trusted_proxies(value)
        for problem in problems:
            self.problem(name, problem)
        return proxies or DEFAULT_TRUSTED_PROXIES

    def optional_port(self, name: str, default: int | None) -> int | None:
        """A TCP port, or None for ``0`` or ``off``; ``default`` when unset."""
        value = self.raw(name)
        if value is None:
            return default
        if _is_off(value) or value == 0 or (isinstance(value, str) and value.strip() == "0"):
            return None
        return self.integer(name, c.MIN_PORT, c.MIN_PORT, c.MAX_PORT)

    def metrics_port(self, api_port: int | None) -> int | None:
        """``serve``'s metrics port (None: /metrics on the API's port), which may not be the
        API's port ``api_port`` (None: not known here)."""
        port = self.optional_port("metrics_port", None)
        if port is not None and port == api_port and self.valid("metrics_port"):
            self.problem(
                "metrics_port",
                f"({port}) is the API's port (--port): give /metrics a port of its own, "
                "or unset it to serve /metrics on the API's port",
            )
        return port

    def bind_host(self, name: str, default: str) -> str:
        """An address or host name to listen on (empty: ``default``, taken as it is)."""
        host = self.text(name, None)
        if not host:
            return default
        if fits_dns(host):
            return host
        self.problem(name, f"must be an address or a host name of {DNS_PROBLEM}")
        return default

    def choice(self, name: str, default: Choice, allowed: tuple[Choice, ...]) -> Choice:
        """One of ``allowed`` (any case, spaces around); ``off``, when allowed, as
        :func:`_is_off` reads it."""
        raw = self.raw(name)
        if _is_off(raw):
            value = "off"
        elif raw is True:
            value = "on"  # YAML reads an unquoted on as true
        else:
            value = (self.text(name, default) or default).strip().lower()
        for option in allowed:
            if option == value:
                return option
        self.problem(name, f"must be one of {', '.join(allowed)}, not {value!r}")
        return default

    def redis_settings(self) -> RedisSettings | None:
        url = self.text("redis_url", None)
        timeout = self.number("redis_timeout", c.DEFAULT_REDIS_TIMEOUT_SECONDS, 0.01, 60.0)
        max_connections = self.integer(
            "redis_max_connections", c.DEFAULT_REDIS_MAX_CONNECTIONS, 1, 10_000
        )
        prefix = self.text("redis_key_prefix", c.DEFAULT_REDIS_KEY_PREFIX) or ""
        if "{" in prefix or "}" in prefix:
            self.problem("redis_key_prefix", "must not contain braces (they mark hash tags)")
        shards = self.integer("redis_shards", c.KEY_SHARDS, 1, c.MAX_KEY_SHARDS)
        wait = self.redis_wait()
        if wait is not None and "redis_timeout" not in self.invalid:
            wait = self.wait_below_timeout(wait, timeout)
        if url is None:
            return None
        try:
            return RedisSettings.from_dsn(
                url,
                key_prefix=prefix,
                timeout=timeout,
                max_connections=max_connections,
                shards=shards,
                wait=wait,
            )
        except ValueError as exc:
            self.invalid.add("redis_url")
            problems = exc.problems if isinstance(exc, RedisUrlError) else [str(exc)]
            self.problems.extend(f"{self.where('redis_url')}: {problem}" for problem in problems)
            return None

    def redis_wait(self) -> tuple[int, int] | None:
        """``redis_wait``: ``replicas,milliseconds`` (e.g. ``1,50``), or unset for no WAIT."""
        if _is_off(self.raw("redis_wait")):
            return None
        value = self.text("redis_wait", None)
        if value is None:
            return None
        replicas, _, milliseconds = value.partition(",")
        try:
            wait = int(replicas), int(milliseconds)
        except ValueError:
            wait = (0, 0)
        if not (1 <= wait[0] <= 16 and 1 <= wait[1] <= 10_000):
            self.problem(
                "redis_wait",
                "must be <replicas>,<milliseconds> (1 to 16 replicas, 1 to 10000 ms), "
                f"not {value!r}",
            )
            return None
        return wait

    def wait_below_timeout(self, wait: tuple[int, int], timeout: float) -> tuple[int, int] | None:
        """A WAIT holds its connection up to its milliseconds, and the client drops a
        connection that makes no progress for the Redis timeout, failing every request queued
        behind it: the WAIT gets at most half the timeout, the other half being left for the
        round trip and a busy event loop's lag in reading the reply."""
        if wait[1] * 2 <= timeout * 1000:
            return wait
        self.problem(
            "redis_wait",
            f"must wait at most half of {self.where('redis_timeout', like='redis_wait')} "
            f"({timeout:g} s: {int(timeout * 500)} ms), not {wait[1]} ms: a WAIT holds its "
            "connection, which is dropped with every request behind it when it makes no "
            "progress for the timeout",
        )
        return None

    def table(self, name: str) -> Any:
        """A table setting: JSON in the environment, else the file's table, else None."""
        text = self.variable(name)
        if text is None:
            return self.file_value(name)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            self.problems.append(f"{c.ENV_PREFIX + name.upper()} is not valid JSON: {exc.msg}")
            return None

    def sources(self) -> list[Source]:
        raw = self.table("sources")
        if raw is None:
            return []
        if not isinstance(raw, dict):
            self.problems.append("sources must be a table of source name to settings")
            return []
        if not raw:  # only unset sources mean the development source
            self.problems.append(
                f"{self.where('sources')} names no source: configure at least one, or leave "
                "it unset for the development source"
            )
            return []
        sources = [s for name, spec in raw.items() if (s := self._source(str(name), spec))]
        # A request is the source whose digest its key matches: of two with the same one,
        # only the last could ever authenticate.
        by_digest: dict[bytes, list[str]] = {}
        for source in sources:
            if source.write_key_digest:
                by_digest.setdefault(source.write_key_digest, []).append(source.name)
        for names in by_digest.values():
            if len(names) > 1:
                self.problems.append(
                    f"sources {', '.join(names)} have the same write_key_hash: each source "
                    "needs its own write key (identity-service new-key makes one)"
                )
        return sources

    def _source(self, name: str, spec: Any) -> Source | None:
        where = f"sources.{name}"
        if not isinstance(spec, dict):
            self.problems.append(f"{where} must be a table with write_key_hash and origins")
            return None
        unknown = set(spec) - {"write_key_hash", "origins"}
        if unknown:
            self.problems.append(f"{where}: unknown settings {_names(unknown)}")
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

    def where(self, name: str, like: str | None = None) -> str:
        """The setting as the user wrote it: its variable, else its file key. One not set at
        all is named as ``like`` was written, else as its variable."""
        if name in self.flags:
            return self.flags[name][0]
        env_name = c.ENV_PREFIX + name.upper()
        if self.variable(name) is not None:
            return env_name
        if self.file_value(name) is not None or (like is not None and self.where(like) == like):
            return name
        return env_name

    def named(self, name: str, value: object, like: str | None = None) -> str:
        """The setting and its value, for a problem across settings."""
        default = "" if self.given(name) else ", the default"
        return f"{self.where(name, like)} ({value}{default})"

    def given(self, name: str) -> bool:
        """Whether the user set ``name``, validly or not."""
        return self.raw(name) is not None

    def valid(self, *names: str) -> bool:
        """Whether none of ``names`` was reported invalid."""
        return self.invalid.isdisjoint(names)

    def problem(self, name: str, message: str) -> None:
        """Report setting ``name``: ``message`` follows its name as the user wrote it."""
        self.invalid.add(name)
        self.problems.append(f"{self.where(name)} {message}")

    def raw(self, name: str) -> Any:
        """The value the user set, unchecked: its flag's, else its variable's, else the
        file's; None if unset."""
        if name in self.flags:
            return self.flags[name][1]
        value = self.variable(name)
        return self.file_value(name) if value is None else value

    def variable(self, name: str) -> str | None:
        """The variable of setting ``name`` (``IDENTITY_NAME``); None if unset. An empty
        variable is unset (a compose file's ``${VAR}`` left empty): the file's value, if
        any, holds."""
        return self.environ.get(c.ENV_PREFIX + name.upper()) or None

    def file_value(self, name: str) -> Any:
        """The file's value of setting ``name``; None if unset, as an empty one is."""
        value = self.file.get(name)
        return None if value == "" else value

    def text(self, name: str, default: str | None) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            self.problem(name, "must be a string")
            return default
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self._ranged(name, default, low, high, _whole, "a whole number")

    def number(self, name: str, default: float, low: float, high: float) -> float:
        return self._ranged(name, default, low, high, float, "a number")

    def _ranged(
        self, name: str, default: T, low: T, high: T, kind: Callable[[Any], T], what: str
    ) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            parsed = kind(value)
        except (TypeError, ValueError, OverflowError):
            self.problem(name, f"must be {what}, not {value!r}")
            return default
        if not low <= parsed <= high:  # type: ignore[operator]
            self.problem(name, f"must be between {low} and {high}, not {parsed}")
            return default
        return parsed

    def _read_file(self, path: Path) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            self.problems.append(f"config file {path}: {exc.strerror}")
            return {}
        except UnicodeDecodeError as exc:
            self.problems.append(f"config file {path}: not UTF-8 (byte {exc.start + 1})")
            return {}
        try:
            if path.suffix == ".toml":
                data: Any = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                self.problems.append(f"config file {path}: must end in .toml, .yaml or .yml")
                return {}
        except tomllib.TOMLDecodeError as exc:  # its message quotes no value
            self.problems.append(f"config file {path}: {exc}")
            return {}
        except yaml.YAMLError as exc:
            self.problems.append(f"config file {path}: {_yaml_problem(exc)}")
            return {}
        if not isinstance(data, dict):
            self.problems.append(f"config file {path}: must hold a table of settings")
            return {}
        unknown = set(data) - SETTING_NAMES
        if unknown:
            self.problems.append(f"config file {path}: unknown settings {_names(unknown)}")
        return data


def _whole(value: Any) -> int:
    """A whole number, from its text (a variable) or an integer (a file). A float is
    refused, not cut (2.9 is not 2), as its text is in a variable."""
    if isinstance(value, float):
        raise ValueError(value)
    return int(value)


# A token parameter's or a destination's name: letters, digits, '_' or '-', in ASCII
# (``str.isalnum`` takes any script's), as the chart's schema and the SDKs check it.
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _is_name(text: str) -> bool:
    """Whether ``text`` is a name :data:`_NAME` matches whole (``_`` and ``-`` alone too)."""
    return _NAME.fullmatch(text) is not None


def _is_off(value: Any) -> bool:
    """Whether a setting that may be turned off is: ``off`` in any case, spaces around, or
    false, which is how YAML reads an unquoted off."""
    return value is False or (isinstance(value, str) and value.strip().lower() == "off")


def _names(keys: Iterable[object]) -> str:
    """Keys of a table, sorted, for a message: a YAML key may be a number."""
    return ", ".join(sorted(map(str, keys)))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the file's text: PyYAML's message quotes the line,
    which may hold a secret, and its problem may quote an alias, anchor or tag."""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "not valid YAML"
    problem = re.sub(r"'([^']*)'", _short_quote, problem)
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _short_quote(match: re.Match[str]) -> str:
    """A quoted character or token kind (``'\\t'``, ``'<block end>'``) as it is; any longer
    quote as ``'...'``."""
    quoted = match.group(1)
    keep = len(quoted) <= 1 or re.fullmatch(r"\\\w{1,5}|<[a-z ]+>", quoted)
    return match.group(0) if keep else "'...'"


def _http_url(url: Any) -> SplitResult | None:
    """``url`` split, if it is an http(s) URL with a host; else None."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    return parts if parts.scheme in ("http", "https") and parts.hostname else None


def _is_base_url(url: str, parts: SplitResult) -> bool:
    """Whether ``url`` (split as ``parts``) is one the forwarder can post batches to, at the
    host it names: user information made aiohttp raise at every send (the batch carries its
    own Authorization), a port out of range or a backslash failed every send, and a query
    or a fragment swallowed the ``/v1/batch`` added to the path."""
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        return False
    return (
        port != 0
        and not any(mark in parts.netloc for mark in "@\\")
        and not any(mark in url for mark in "?#")
    )


def _dev_source(write_key: str) -> Source:
    digest = bytes.fromhex(hash_write_key(write_key).removeprefix(WRITE_KEY_HASH_PREFIX))
    return Source(name=c.DEV_SOURCE_NAME, write_key_digest=digest, allow_localhost=True)
