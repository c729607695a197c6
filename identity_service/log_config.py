"""structlog set up for one JSON line per event, rendered with orjson, to standard output.

Lines are buffered and written at most 50 ms after they were logged (or once 64 KiB
have gathered), in writes of whole lines of at most PIPE_BUF bytes, so a busy service
makes a few writes a second instead of one per request. ``flush`` writes what is left;
the server calls it when it stops, and it runs at exit.
"""

import asyncio
import atexit
import logging
import select
import sys
import time
from typing import BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from identity_service.clock import iso_time

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
        # Writes of at most PIPE_BUF bytes to a pipe are atomic, so the lines of several
        # worker processes sharing standard output never interleave mid-line.
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if size + len(line) > select.PIPE_BUF and chunk:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._write(chunk)

    def _write(self, lines: list[bytes]) -> None:
        self._file.write(b"".join(lines))
        self._file.flush()


_output = BufferedBytesLogger(sys.stdout.buffer)
atexit.register(_output.flush)


def flush() -> None:
    _output.flush()


def _logger_factory(*_args: object) -> BufferedBytesLogger:
    return _output


def add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """An ISO 8601 UTC timestamp in milliseconds; the date part is formatted once a second."""
    event_dict["timestamp"] = iso_time(time.time())
    return event_dict


def configure_logging(level: str) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
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
