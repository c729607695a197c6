"""Timestamps as Segment and the logs write them, cheaply enough for every request."""

import time

_seconds_formatted: dict[int, str] = {}


def iso_time(epoch_seconds: float) -> str:
    """``epoch_seconds`` in UTC as ``2026-11-22T04:18:04.912Z`` (milliseconds, truncated).

    The part up to the second is formatted once per second and kept.
    """
    # Rounded to microseconds first, as datetime.fromtimestamp does.
    seconds, micros = divmod(round(epoch_seconds * 1_000_000), 1_000_000)
    prefix = _seconds_formatted.get(seconds)
    if prefix is None:
        if len(_seconds_formatted) > 16:
            _seconds_formatted.clear()
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _seconds_formatted[seconds] = prefix
    return f"{prefix}.{micros // 1000:03d}Z"
