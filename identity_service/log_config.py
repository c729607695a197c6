"""structlog set up for one JSON line per event, rendered with orjson, to standard output.

A request's fields (its id, the source, the token's short hash) live in one context
variable, set when the request starts and added to every line logged while it runs. The
request's own canonical line is rendered here directly (``log_request_line``): it is
written for every request, and structlog's processor chain would cost more than the
rest of its logging.

Lines are buffered and written at most 50 ms after they were logged (or once 64 KiB
have gathered), in writes of whole lines of at most PIPE_BUF bytes, so a busy service
makes a few writes a second instead of one per request. ``flush`` writes what is left;
the server calls it when it stops, and it runs at exit. Lines that cannot be written (the
terminal closed) are dropped, said once on standard error if it takes it.
"""

import asyncio
import atexit
import contextlib
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from identity_service.clock import iso_time
from identity_service.lines import write_lines

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR
FLUSH_DELAY_SECONDS = 0.05
FLUSH_BYTES = 64 * 1024


class BufferedBytesLogger:
    """A structlog logger that gathers rendered lines and writes them in batches."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._size = 0
        self._flush_pending = False
        self._failed = False

    def msg(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        self._size += len(message) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_pending = True
            loop.call_later(FLUSH_DELAY_SECONDS, self.flush)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def flush(self) -> None:
        self._flush_pending = False
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        try:
            write_lines(self._file, lines)
        except OSError as exc:
            # Nowhere to write: the reader gone (EPIPE), the terminal closed (EIO, with the
            # SIGHUP that stops the service), the disk full. The lines are dropped, said once
            # on standard error when it still takes it: a request, or the stop, goes on.
            if not self._failed:
                self._failed = True
                with contextlib.suppress(OSError, ValueError):
                    print(f"identity-service: log lines dropped: {exc.strerror}", file=sys.stderr)


_output = BufferedBytesLogger(sys.stdout.buffer)


def flush() -> None:
    _output.flush()


atexit.register(flush)


_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)
# Where request lines go once configure_logging ran: the buffered output, or nowhere
# when the level is above info. Before that (a library user, a test), through structlog.
_request_output: "BufferedBytesLogger | None" = None
_configured = False


def start_request_fields(request_id: str) -> None:
    """Begin a request's log fields in the current context (one per request task)."""
    _request_fields.set({"request_id": request_id})


def bind_request(**fields: Any) -> None:
    """Add fields to every line logged for the current request from here on."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


def merge_request_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    current = _request_fields.get()
    if current:
        for name, value in current.items():
            event_dict.setdefault(name, value)
    return event_dict


def log_request_line(fields: dict[str, Any]) -> None:
    """The request's canonical line: ``fields``, the request's fields, level and time."""
    if _request_output is None and _configured:
        return
    current = _request_fields.get()
    if current:
        for name, value in current.items():
            fields.setdefault(name, value)
    if _request_output is None:
        structlog.get_logger("identity_service.request").info("request", **fields)
        return
    fields["event"] = "request"
    fields["level"] = "info"
    fields["timestamp"] = iso_time(time.time())
    _request_output.msg(orjson.dumps(fields, default=repr))


def _logger_factory(*_args: object) -> BufferedBytesLogger:
    return _output


def add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """An ISO 8601 UTC timestamp in milliseconds; the date part is formatted once a second."""
    event_dict["timestamp"] = iso_time(time.time())
    return event_dict


def configure_logging(level: str, file: BinaryIO | None = None) -> None:
    """Log at ``level`` and above, as JSON lines to ``file`` (standard output by default)."""
    global _output, _request_output, _configured
    if file is not None:
        _output.flush()
        _output = BufferedBytesLogger(file)
    _request_output = _output if _LEVELS[level] <= logging.INFO else None
    _configured = True
    structlog.configure(
        processors=[
            merge_request_fields,
            structlog.processors.add_log_level,
            add_timestamp,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_logger_factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio report through the standard library; keep only their warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
