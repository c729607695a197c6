"""The image's HEALTHCHECK: ``GET /healthz`` of the ``identity-service`` command the
container runs, where that command listens.

``serve`` answers on its ``--host`` and ``--port`` (the image's CMD: every address, 8080);
``forward`` on ``IDENTITY_FORWARDER_METRICS_HOST`` and ``_PORT`` (9464 by default) as its
settings give them, or nowhere when the port is ``off``; the other commands serve nothing
and are healthy while they run. The command is read from the container's first process
(``/proc/1/cmdline``: the service, or Docker's ``--init`` running it); without one, the
image's own CMD is assumed. Standard library only beside the service's own modules: the
image has no curl or wget.

    python -m identity_service.healthcheck [PID]

Exits 0 when healthy, 1 when not (Docker's meanings).
"""

import sys
import urllib.request
from collections.abc import Mapping, Sequence
from os import environ as os_environ
from pathlib import Path

from identity_service.cli import command_parser
from identity_service.constants import DEFAULT_PORT
from identity_service.settings import ConfigError, load_settings
from identity_service.urls import host_port

TIMEOUT_SECONDS = 2
# The service is asked directly: an HTTP proxy of the container's environment (its way
# out) cannot reach the container's loopback address.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Where a server bound to every address is reached from inside the container.
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def service_args(cmdline: Sequence[str]) -> list[str] | None:
    """The arguments of ``identity-service`` (or ``python -m identity_service``) in a
    process's command line, or None when it runs neither."""
    for index, part in enumerate(cmdline):
        if Path(part).name == "identity-service":
            return list(cmdline[index + 1 :])
        if part == "-m" and cmdline[index + 1 : index + 2] == ["identity_service"]:
            return list(cmdline[index + 2 :])
    return None


def health_url(cmdline: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The ``/healthz`` URL of the command ``cmdline`` runs with ``environ``; None when it
    serves none. Raises ConfigError or SystemExit (argparse) for a command that cannot run."""
    args = service_args(cmdline)
    if args is None:
        args = ["serve", "--host", "0.0.0.0", "--port", str(DEFAULT_PORT)]  # noqa: S104
    parsed, _ = command_parser().parse_known_args(args)
    if parsed.command == "serve":
        host, port = parsed.host, parsed.port
    elif parsed.command == "forward":
        settings = load_settings(environ, parsed.config)
        if settings.forwarder_metrics_port is None:
            return None
        host, port = settings.forwarder_metrics_host, settings.forwarder_metrics_port
    else:
        return None
    return f"http://{host_port(WILDCARDS.get(host, host), port)}/healthz"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pid = args[0] if args else "1"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")
    except OSError:
        raw = b""  # no /proc: the image's own CMD is assumed, as for another program
    cmdline = [part.decode(errors="surrogateescape") for part in raw.split(b"\0") if part]
    try:
        url = health_url(cmdline, os_environ)
    except (ConfigError, SystemExit) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    if url is None:
        return 0
    try:
        with _OPENER.open(url, timeout=TIMEOUT_SECONDS) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
