"""Writing whole lines to a stream that other processes share (standard output).

Writes of at most PIPE_BUF bytes to a pipe are atomic, so lines written this way by
several worker processes never interleave mid-line. A line longer than that is written
alone.
"""

import select
from typing import BinaryIO


def write_lines(file: BinaryIO, lines: list[bytes]) -> None:
    """Write ``lines`` (each ending in a newline) in as few atomic writes as fit."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if size + len(line) > select.PIPE_BUF and chunk:
            _write(file, chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        _write(file, chunk)


def _write(file: BinaryIO, lines: list[bytes]) -> None:
    file.write(b"".join(lines))
    file.flush()
