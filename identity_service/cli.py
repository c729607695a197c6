"""The ``identity-service`` command: serve, and helpers to make and hash write keys."""

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from identity_service import __version__
from identity_service.constants import DEFAULT_HOST, DEFAULT_PORT, DEV_SOURCE_NAME
from identity_service.settings import ConfigError, Settings, load_settings
from identity_service.sources import hash_write_key


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port, args.config)
    if args.command == "hash-key":
        write_key = sys.stdin.readline().strip()
        if not write_key:
            print("hash-key: give the write key on standard input", file=sys.stderr)
            return 2
        print(hash_write_key(write_key))
        return 0
    if args.command == "new-key":
        write_key = secrets.token_urlsafe(32)
        print(f"write key (give it to the source's backend): {write_key}")
        print(f"write_key_hash (put it in the configuration): {hash_write_key(write_key)}")
        return 0
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="identity-service", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command")
    serve_cmd = commands.add_parser("serve", help="run the HTTP service")
    serve_cmd.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve_cmd.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    serve_cmd.add_argument("--config", type=Path, help="a TOML or YAML settings file")
    commands.add_parser("hash-key", help="print the write_key_hash of a write key read from stdin")
    commands.add_parser("new-key", help="make a new write key and print it with its hash")
    return parser


def serve(host: str, port: int, config: Path | None) -> int:
    try:
        settings = load_settings(os.environ, config)
        settings.check_bind(host)
    except ConfigError as exc:
        print(f"identity-service: {exc}", file=sys.stderr)
        return 2
    # Imported after the settings check so a configuration error answers fast.
    from identity_service.app import create_app
    from identity_service.log_config import configure_logging

    configure_logging(settings.log_level)
    _announce(settings, host, port)
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        access_log=None,
        print=None,
        shutdown_timeout=settings.shutdown_timeout,
        loop=_new_event_loop(),
    )
    return 0


def _announce(settings: Settings, host: str, port: int) -> None:
    store = "redis" if settings.redis else "memory (this process only; not for production)"
    lines = [f"identity-service {__version__} on http://{host}:{port}, store: {store}"]
    if settings.dev_write_key is not None:
        if os.environ.get("IDENTITY_DEV_WRITE_KEY"):
            key_text = "the value of IDENTITY_DEV_WRITE_KEY"
        else:
            key_text = settings.dev_write_key
        lines.append(
            f"development source {DEV_SOURCE_NAME!r} (destinations on http(s)://localhost "
            f"and *.localhost), write key: {key_text}"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
