"""Whole lines in atomic writes, for the logs and the stdout sink that share one stream."""

import io
import select

from identity_service.lines import write_lines


class RecordingFile(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


def test_lines_are_written_whole_in_writes_a_pipe_keeps_atomic() -> None:
    file = RecordingFile()
    short = [b"x" * 99 + b"\n" for _ in range(100)]  # 10,000 bytes
    long = b"y" * (2 * select.PIPE_BUF) + b"\n"
    write_lines(file, [*short[:50], long, *short[50:]])

    assert file.getvalue() == b"".join([*short[:50], long, *short[50:]])
    assert long in file.writes  # alone: it cannot be atomic anyway
    for write in file.writes:
        assert write.endswith(b"\n")
        assert write == long or len(write) <= select.PIPE_BUF
    assert len(file.writes) <= 6  # grouped, not a write a line


def test_nothing_to_write_writes_nothing() -> None:
    file = RecordingFile()
    write_lines(file, [])
    assert file.writes == []
