"""The ``identity-service`` command: serve, forward the outbox, inspect or repair it, and
make and hash write keys."""

import argparse
import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from identity_service import __version__
from identity_service.constants import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEV_SOURCE_NAME,
    MAX_PORT,
    MIN_PORT,
)
from identity_service.settings import ConfigError, Settings, load_settings
from identity_service.sources import can_be_sent, hash_write_key
from identity_service.urls import host_port

if TYPE_CHECKING:
    from identity_service.outbox_admin import DestinationStatus

# How many of the newest dead letters `outbox dead` shows, by default and at most.
DEAD_LETTERS_SHOWN = 20
MAX_DEAD_LETTERS_SHOWN = 1000


# The exit status of a command stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP before it
# handles the signal itself (serve and forward, once started, stop gracefully and exit 0),
# as a shell says it.
INTERRUPTED = 128 + signal.SIGINT
TERMINATED = 128 + signal.SIGTERM
HUNG_UP = 128 + signal.SIGHUP
# What is said of each, in one line on standard error.
_STOPPED = {signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


class Terminated(BaseException):
    """SIGTERM or SIGHUP (``signum``) before the command handles it. A BaseException, as
    KeyboardInterrupt: no ``except Exception`` takes it for a failure to retry or report."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM's default action would end the command too, but not as a container's first
    # process, the image's entry point: the kernel drops a signal it has no handler for, and
    # a stop asked while start-up waits for Redis was lost (the service then started).
    # SIGHUP (the terminal closed) is a stop like SIGTERM: its default action ended the
    # process at once, dropping the requests in flight.
    previous = {signum: signal.signal(signum, _terminate) for signum in _STOPPED}
    try:
        if sys.stdout is None:
            # Closed before the start (`serve >&-`): the logs, the stdout destination's
            # events and every command's answer would go nowhere, the logging crashed in a
            # traceback, and a file opened later could take its descriptor.
            print(
                "identity-service: standard output is closed; the logs and the command's "
                "output go there (redirect it, to /dev/null if need be)",
                file=sys.stderr,
            )
            return 2
        status = _command(argv)
        sys.stdout.flush()  # here, where a reader gone is caught, rather than at exit
        return status
    except KeyboardInterrupt:
        print("identity-service: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Terminated as exc:
        print(f"identity-service: {_STOPPED[signal.Signals(exc.signum)]}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:
        # The reader of standard output went away (`| head`): nothing more can be said to
        # it, and nothing went wrong to report. Whatever is still buffered goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _command(argv: Sequence[str] | None) -> int:
    parser = command_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port, args.config, args.workers)
    if args.command == "forward":
        return forward(args.config)
    if args.command == "outbox":
        return outbox(args.config, args.action, args.json, args.destination, args.limit)
    if args.command == "hash-key":
        return hash_key()
    if args.command == "new-key":
        write_key = secrets.token_urlsafe(32)
        print(f"write key (give it to the source's backend): {write_key}")
        print(f"write_key_hash (put it in the configuration): {hash_write_key(write_key)}")
        return 0
    parser.print_help()
    return 2


def hash_key() -> int:
    """Print the hash of the write key on standard input's first line."""
    # Its bytes, not text decoded as the locale says: other bytes than ASCII would be a
    # UnicodeDecodeError under a strict UTF-8 (a key in another encoding), and a closed
    # standard input is None.
    line = sys.stdin.buffer.readline() if sys.stdin is not None else b""
    write_key = line.decode("ascii", "replace").strip()
    if not write_key or not can_be_sent(write_key):
        print(
            "hash-key: give the write key (printable ASCII, without ':') on standard input",
            file=sys.stderr,
        )
        return 2
    print(hash_write_key(write_key))
    return 0


COMMANDS = {
    "serve": "run the HTTP service",
    "forward": "deliver the Redis outbox to the destinations, without the API: /metrics and "
    "/healthz on IDENTITY_FORWARDER_METRICS_PORT (9464; 0 or off: none)",
    "outbox": "inspect or repair the Redis outbox",
    "hash-key": "print the write_key_hash of a write key read from stdin",
    "new-key": "make a new write key and print it with its hash",
}
OUTBOX_ACTIONS = {
    "status": "per destination: pending, in-flight, dead letters, oldest age",
    "dead": "the newest dead letters: when, sends, reason (never their events)",
    "replay-dead": "re-queue the dead letters, each to its destination only",
    "retire": "stop keeping events for a destination removed from the settings",
}


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="identity-service",
        description="Keeps one visitor one person across domains: serve, deliver the "
        "outbox, inspect or repair it, make and hash write keys.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command")
    # A command's help, in the list of commands and atop its own --help.
    subparsers = {
        name: commands.add_parser(name, help=text, description=text)
        for name, text in COMMANDS.items()
    }
    serve_cmd = subparsers["serve"]
    serve_cmd.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve_cmd.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    serve_cmd.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    serve_cmd.add_argument(
        "--workers", type=int, help="worker processes (default: IDENTITY_WORKERS, else 1)"
    )
    subparsers["forward"].add_argument("--config", type=Path, help="a TOML or YAML settings file")
    outbox_cmd = subparsers["outbox"]
    outbox_cmd.add_argument(
        "action",
        choices=list(OUTBOX_ACTIONS),
        help="; ".join(f"{name}: {text}" for name, text in OUTBOX_ACTIONS.items()),
    )
    outbox_cmd.add_argument(
        "destination",
        nargs="?",
        help="retire: the destination no longer configured; dead: one destination (default: all)",
    )
    outbox_cmd.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    outbox_cmd.add_argument("--json", action="store_true", help="print JSON (status, dead)")
    outbox_cmd.add_argument(
        "--limit",
        type=_dead_limit,
        default=DEAD_LETTERS_SHOWN,
        help=f"dead: how many of the newest dead letters (1-{MAX_DEAD_LETTERS_SHOWN}, "
        f"default {DEAD_LETTERS_SHOWN})",
    )
    return parser


def _dead_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_DEAD_LETTERS_SHOWN:
        raise argparse.ArgumentTypeError(f"a number from 1 to {MAX_DEAD_LETTERS_SHOWN}")
    return int(value)


def _settings(
    config: Path | None,
    needs_redis: bool = False,
    flags: Mapping[str, tuple[str, object]] | None = None,
    problems: Sequence[str] = (),
    host: str | None = None,
    port: int | None = None,
) -> Settings | None:
    """The settings, or None after printing why there are none. ``flags``: the settings
    given as options, ``problems`` the options' own and ``host`` and ``port`` the address
    to serve on (see load_settings): all are reported at once."""
    try:
        settings = load_settings(os.environ, config, flags, problems=problems, host=host, port=port)
    except ConfigError as exc:
        print(f"identity-service: {exc}", file=sys.stderr)
        return None
    if needs_redis and settings.redis is None:
        print(
            "identity-service: the outbox lives in Redis; set IDENTITY_REDIS_URL", file=sys.stderr
        )
        return None
    return settings


def forward(config: Path | None) -> int:
    settings = _settings(config, needs_redis=True)
    if settings is None:
        return 2
    from identity_service.front import BindError
    from identity_service.log_config import configure_logging
    from identity_service.metrics import Metrics
    from identity_service.metrics_app import serving_metrics
    from identity_service.outbox import running_forwarders
    from identity_service.server import STOP_SIGNALS, new_event_loop

    refused, unreachable = _reach_redis(settings)
    if refused:
        return 2
    configure_logging(settings.log_level)
    _warn_unreachable(unreachable, "the forwarders retry until it does")
    _warn_no_destination(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
        metrics = Metrics()
        async with serving_metrics(settings, metrics), running_forwarders(settings, metrics):
            await stop.wait()

    runner = asyncio.Runner(loop_factory=new_event_loop)
    try:
        with runner:
            runner.run(run())
    except BindError as exc:  # it names the metrics port
        print(f"identity-service: {exc}", file=sys.stderr)
        return 1
    return 0


def outbox(
    config: Path | None,
    action: str,
    as_json: bool,
    named: str | None = None,
    limit: int = DEAD_LETTERS_SHOWN,
) -> int:
    settings = _settings(config, needs_redis=True)
    if settings is None or settings.redis is None:
        return 2
    redis_settings = settings.redis
    destinations = [d.name for d in settings.outbox.destinations]
    if named is not None and action not in ("retire", "dead"):
        print("identity-service: name a destination with retire or dead only", file=sys.stderr)
        return 2
    if action == "retire" and named is None:
        print("identity-service: name the destination to retire", file=sys.stderr)
        return 2
    retired = named if action == "retire" else None
    if action == "dead" and named is not None:
        # A retired destination keeps its dead letters: any name may be read.
        destinations = [named]
    if retired in destinations:
        # Its forwarder would make the group again and deliver the whole stream once more.
        print(
            f"identity-service: {retired!r} is still configured; remove it first", file=sys.stderr
        )
        return 2
    if _reach_redis(settings)[0]:
        return 2
    from identity_service.outbox_admin import (
        newest_dead_letters,
        outbox_status,
        replay_dead,
        retire_destination,
    )
    from identity_service.scrape import backlog_destinations
    from identity_service.stores.redis import STORE_ERRORS, connect

    async def run() -> tuple[int, str]:
        """The exit status, and what to say: on standard output when it is 0, else on
        standard error. Said once Redis is done with, so that no failure to write it
        (a reader gone) is taken for one of Redis."""
        redis = connect(redis_settings)
        try:
            if retired is not None:
                shards = await retire_destination(
                    redis, redis_settings.key_prefix, retired, redis_settings.shards
                )
                if not shards:
                    return 1, (
                        f"identity-service: no such destination {retired!r}: no outbox stream "
                        "has its group"
                    )
                return 0, f"retired {retired!r}: removed its group from {shards} outbox streams"
            if action == "replay-dead":
                moved = await replay_dead(
                    redis, redis_settings.key_prefix, destinations, redis_settings.shards
                )
                return 0, f"re-queued {moved} dead letters"
            if action == "dead":
                letters = await newest_dead_letters(
                    redis, redis_settings.key_prefix, destinations, limit, redis_settings.shards
                )
                return 0, _dead_letters_text([letter.as_json() for letter in letters], as_json)
            # The events waiting for a destination too, as /metrics shows them.
            waiting = backlog_destinations(settings.outbox)
            report = await outbox_status(
                redis, redis_settings.key_prefix, waiting, redis_settings.shards
            )
        finally:
            await redis.aclose()
        return 0, _status_text(report, as_json)

    try:
        status, text = asyncio.run(run())
    except STORE_ERRORS as exc:
        print(f"identity-service: Redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(text, file=sys.stderr if status else sys.stdout)
    return status


def _status_text(report: "list[DestinationStatus]", as_json: bool) -> str:
    if as_json:
        return orjson.dumps([status.as_json() for status in report]).decode()
    # Wide enough for the longest name (an AMP action's amp-action-<name>).
    width = max([20, *(len(status.destination) for status in report)])  # none on Redis alone
    header = f"{'destination':<{width}} {'pending':>8} {'in-flight':>10} {'dead':>8}"
    lines = [f"{header} {'oldest':>10}"]
    for s in report:
        age = "-" if s.oldest_age_seconds is None else f"{s.oldest_age_seconds:.1f}s"
        lines.append(
            f"{s.destination:<{width}} {s.pending:>8} {s.in_flight:>10} {s.dead:>8} {age:>10}"
        )
    return "\n".join(lines)


def _dead_letters_text(letters: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return orjson.dumps(letters).decode()
    if not letters:
        return "no dead letters"
    width = max([20, *(len(letter["destination"]) for letter in letters)])
    lines = [f"{'failed at':<24} {'destination':<{width}} {'attempts':>8} reason"]
    for letter in letters:
        attempts = "-" if letter["attempts"] is None else str(letter["attempts"])
        lines.append(
            f"{letter['failedAt']:<24} {letter['destination']:<{width}} {attempts:>8} "
            f"{letter['reason']}"
        )
    return "\n".join(lines)


def serve(host: str, port: int, config: Path | None, workers: int | None = None) -> int:
    problems = []
    if not MIN_PORT <= port <= MAX_PORT:
        problems.append(f"--port must be between {MIN_PORT} and {MAX_PORT}, not {port}")
    flags = {"workers": ("--workers", workers)} if workers is not None else None
    # The port's, the settings' and the address's problems, all in one report.
    settings = _settings(config, flags=flags, problems=problems, host=host, port=port)
    if settings is None:
        return 2
    # Imported after the settings check so a configuration error answers fast.
    from identity_service.front import BindError
    from identity_service.log_config import configure_logging
    from identity_service.metrics import DirectoryError, given_directory
    from identity_service.metrics_app import PORT_NAME
    from identity_service.server import check_address, run

    try:
        # Before anything is announced or forked: a taken port is then said once.
        check_address(host, port, reuse_port=settings.workers > 1)
        if settings.metrics_port is not None:  # one process listens there
            check_address(settings.metrics_host, settings.metrics_port, False, PORT_NAME)
        # The workers' metrics files, made ready once, here: a problem is said before the
        # banner, not in a traceback after it.
        directory = given_directory() if settings.workers > 1 else None
        refused, unreachable = _reach_redis(settings)
        if refused:
            return 2
        configure_logging(settings.log_level)
        _announce(settings, host, port)
        _warn_unreachable(unreachable, "requests answer 503 until it does")
        if settings.outbox.forwarder_in_serve:
            _warn_no_destination(settings)
        return run(settings, host, port, metrics_directory=directory)
    except BindError as exc:
        print(f"identity-service: {exc}", file=sys.stderr)
        return 1
    except DirectoryError as exc:
        print(f"identity-service: {exc}", file=sys.stderr)
        return 2


def _reach_redis(settings: Settings) -> tuple[bool, Exception | None]:
    """Reach Redis once at start, before anything is announced: (True, None) after one
    line saying why, when the URL's form does not fit what it reaches (a Cluster node or a
    sentinel behind a one-node URL, a Sentinel URL naming a node that is no sentinel...) or
    Redis refuses its credentials; else (False, why Redis did not answer, if it did not)."""
    if settings.redis is None:
        return False, None
    from identity_service.problems import StoreUnavailable
    from identity_service.stores.redis import UnusableRedis, check_reachable

    try:
        asyncio.run(check_reachable(settings.redis))
    except UnusableRedis as exc:
        print(f"identity-service: IDENTITY_REDIS_URL: {exc}", file=sys.stderr, flush=True)
        return True, None
    except StoreUnavailable as exc:
        return False, exc
    return False, None


def _warn_unreachable(unreachable: Exception | None, meanwhile: str) -> None:
    """Say once, naming the address, that Redis did not answer at start. The process
    starts all the same, and recovers by itself when Redis answers."""
    if unreachable is None:
        return
    import structlog

    structlog.get_logger(__name__).warning("store_unreachable", reason=str(unreachable))
    print(
        f"identity-service: warning: {unreachable} does not answer; {meanwhile}",
        file=sys.stderr,
        flush=True,
    )


def _warn_no_destination(settings: Settings) -> None:
    """Say once, in one line, at start, that on Redis no destination takes the events: they
    are kept in the outbox, and never printed on standard output, where the logs go (they
    carry ids). It names the setting that emits none: ``actions`` when AMP actions are
    configured (``off`` would drop their queued webhook calls too), else ``off``."""
    if settings.redis is None or not settings.outbox.events_wait:
        return
    import structlog

    structlog.get_logger(__name__).warning("outbox_no_destination")
    if settings.amp is not None and settings.amp.actions:
        none = "IDENTITY_OUTBOX=actions emits none and keeps the AMP actions' webhook retries"
    else:
        none = "IDENTITY_OUTBOX=off emits none"
    print(
        "identity-service: warning: no events destination: the events are kept in the Redis "
        "outbox until one is configured (IDENTITY_DESTINATION_URL, [destinations] or "
        f"IDENTITY_EVENTS_FILE); {none}",
        file=sys.stderr,
        flush=True,
    )


def _announce(settings: Settings, host: str, port: int) -> None:
    if settings.redis:
        store = f"redis at {settings.redis.address}"
    else:
        store = "memory (this process only; not for production)"
    workers = f", {settings.workers} workers" if settings.workers > 1 else ""
    address = host_port(host, port)
    lines = [f"identity-service {__version__} on http://{address}, store: {store}{workers}"]
    if settings.metrics_port is not None:
        metrics_address = host_port(settings.metrics_host, settings.metrics_port)
        lines.append(f"/metrics and /healthz on http://{metrics_address} (not on {address})")
    if settings.dev_write_key is not None:
        if settings.dev_write_key_setting:  # configured: not repeated, as no secret is
            key_text = f"the value of {settings.dev_write_key_setting}"
        else:
            key_text = settings.dev_write_key
        lines.append(
            f"development source {DEV_SOURCE_NAME!r} (destinations on http(s)://localhost "
            f"and *.localhost), write key: {key_text}"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)
