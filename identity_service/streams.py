"""Small typed helpers for Redis stream replies, shared by the forwarder and the admin commands."""

from collections.abc import AsyncIterator
from typing import Any

from identity_service.stores.redis import AdminClient

StreamEntry = tuple[bytes, dict[bytes, bytes]]


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence)."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


async def entries(redis: "AdminClient", stream: str, **options: Any) -> list[StreamEntry]:
    """XRANGE with its reply typed; ``options`` are redis-py's xrange arguments."""
    reply: Any = await redis.xrange(stream, **options)
    return [(entry_id, fields) for entry_id, fields in reply or [] if fields is not None]


async def entry_pages(
    redis: "AdminClient", stream: str, after: str, size: int
) -> AsyncIterator[list[StreamEntry]]:
    """``stream``'s entries from ``after`` (an XRANGE start: ``-``, or ``(id`` for those
    after ``id``) up to the newest one when it starts, ``size`` at a time: an entry added
    meanwhile is left for the next reader, and no reply holds the whole range (Redis builds
    a reply whole in its memory, then the client in its own). The pages' entries may be
    deleted between pages."""
    newest: Any = await redis.xrevrange(stream, count=1)
    if not newest:
        return
    end = text(newest[0][0])
    while True:
        page = await entries(redis, stream, min=after, max=end, count=size)
        if page:
            yield page
        if len(page) < size:
            return
        after = f"({text(page[-1][0])}"
