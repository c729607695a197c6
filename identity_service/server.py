"""Running the service: one process on an event loop, or several worker processes.

A worker serves the application through the HTTP front (front.py) until SIGTERM, SIGINT
or SIGHUP (the terminal closed), then stops accepting, finishes the requests in flight
(up to the shutdown timeout) and closes the store. With more than one worker the parent
forks them after the settings are read (so they share the server secret) and they listen
on one port with SO_REUSEPORT, the kernel spreading connections over them. The parent
forwards SIGTERM, SIGINT and SIGHUP to the workers; if one of them ends before that (it
died, or was signalled alone), it stops the others and exits non-zero, so the supervisor
(systemd, Kubernetes) restarts the whole set. The workers count their metrics in files of
a directory the parent makes before forking (metrics.py), so a scrape reads every
worker's counts whichever worker answers it. With ``IDENTITY_METRICS_PORT``, /metrics is
served there instead, by one listener: the one process's, or worker 0's of several (the
port is not shared), whose scrapes read those files too.
"""

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from identity_service import log_config, metrics
from identity_service.app import create_app
from identity_service.front import BindError, FrontRunner, listen
from identity_service.lines import write_lines
from identity_service.settings import Settings


def check_address(host: str, port: int, reuse_port: bool, what: str = "") -> None:
    """Bind, without listening, what the worker(s) will listen on; raise BindError (``what``:
    which port) if taken.

    Lets a taken port be said once, before start-up is announced or workers are forked.
    """
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                # As the event loop's create_server sets them.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise BindError(host, port, exc, what) from exc


def run(settings: Settings, host: str, port: int, metrics_directory: str | None = None) -> int:
    """Serve until told to stop; the exit status of the process. BindError if the address
    cannot be listened on (one worker; with several, each says so and the parent exits 1).

    ``metrics_directory``: with several workers, ``PROMETHEUS_MULTIPROC_DIR`` as
    ``metrics.given_directory()`` made it ready at start; None: a private one.

    With ``IDENTITY_METRICS_PORT``, one process listens there: the only one, or worker 0 of
    several, whose scrapes read every worker's counts (metrics.py)."""
    if settings.workers == 1:
        _run_worker(settings, host, port, reuse_port=False, metrics_listener=True)
        return 0
    return _supervise(settings, host, port, metrics_directory)


def _run_worker(
    settings: Settings,
    host: str,
    port: int,
    reuse_port: bool,
    metrics_listener: bool,
    stop_asked: Sequence[int] = (),
) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP; ``metrics_listener``: this process listens on
    the metrics port, if there is one; ``stop_asked``: the signals noted before the loop
    handles them, honoured once it does."""
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(settings, host, port, reuse_port, metrics_listener, stop_asked))
    finally:
        log_config.flush()


async def _serve(
    settings: Settings,
    host: str,
    port: int,
    reuse_port: bool,
    metrics_listener: bool,
    stop_asked: Sequence[int],
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Held back while the loop takes the signals over: one that came in between would reach
    # neither the handler before nor the loop (whose wakeup is not set yet), and be lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if stop_asked:
        stop.set()
    runner = FrontRunner(
        create_app(settings, metrics_listener=metrics_listener),
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
    )
    # The app's cleanup_ctx opens the store, then the metrics port if it has one.
    await runner.setup()
    try:
        await listen(runner, host, port, reuse_port=reuse_port)
        # What start-up made lives as long as the process: out of the collector's sight,
        # full collections do not walk it again and again under load (shorter p99 pauses).
        gc.freeze()
        # A request allocates a few hundred objects, nearly all freed by reference
        # counting; at the default threshold a young collection would run every few
        # requests for almost nothing.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        await stop.wait()
    finally:
        await runner.cleanup()


def _supervise(settings: Settings, host: str, port: int, given: str | None) -> int:
    # Made before the fork: the workers count in its files, and a scrape sums them all.
    with metrics.multiprocess_directory(given) as directory:
        return _fork_workers(settings, host, port, directory)


def _say(message: str) -> None:
    """``message`` as one line on standard error, in one write: the workers share the
    stream, and a line written in parts can interleave with another worker's."""
    sys.stderr.flush()
    write_lines(sys.stderr.buffer, [f"identity-service: {message}\n".encode()])


def _fork_workers(settings: Settings, host: str, port: int, metrics_directory: str) -> int:
    children: list[int] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            _signal(child, signum)

    # The stop signals (Ctrl-C's SIGINT and a closed terminal's SIGHUP reach the whole
    # process group) are held back until each process has its own handler: at a fork, a
    # worker took them with the parent's, and a KeyboardInterrupt raised in a fork hook,
    # which ignores it, left a worker that never stopped; elsewhere it was a traceback.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for index in range(settings.workers):
            pid = os.fork()
            if pid == 0:
                # One listener owns the metrics port (no SO_REUSEPORT there): worker 0's.
                _worker(settings, host, port, metrics_listener=index == 0)
            children.append(pid)
        for signum in STOP_SIGNALS:
            signal.signal(signum, forward)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    status = 0
    while children:
        pid, code = os.wait()
        children.remove(pid)
        metrics.mark_dead(pid, metrics_directory)
        failed = os.waitstatus_to_exitcode(code) != 0
        # A worker that ends before the set is told to stop is gone for good, even when it
        # ended cleanly (a SIGTERM sent to it alone): the set is short of it.
        if status == 0 and (failed or not stopping):
            _say(f"worker {pid} {'failed' if failed else 'exited'}; stopping")
            status = 1
            for child in children:
                _signal(child, signal.SIGTERM)
    return status


def _worker(settings: Settings, host: str, port: int, metrics_listener: bool) -> NoReturn:
    """A forked worker's life: serve until told to stop, then exit."""
    status = 0
    try:
        # A stop asked before the loop handles the signals is noted, and honoured once it runs.
        asked = _note_stop_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        _die_with_parent()
        _run_worker(settings, host, port, True, metrics_listener, stop_asked=asked)
    except BindError as exc:
        status = 1
        _say(str(exc))
    except BaseException:
        status = 1
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


def _note_stop_signals() -> list[int]:
    """The stop signals received from now on, until a loop handles them."""
    asked: list[int] = []

    def note(signum: int, _frame: object) -> None:
        asked.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, note)
    return asked


def _die_with_parent() -> None:
    """Have the kernel send this worker SIGTERM when the parent dies (Linux).

    Otherwise workers of a killed parent would go on serving, and with SO_REUSEPORT share
    the port with the set that replaces them.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
# What stops the service gracefully: SIGHUP too, sent when the terminal closes (the one
# running `make serve`), whose default action would end the process mid-request.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GC_YOUNG_THRESHOLD = 20_000


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
