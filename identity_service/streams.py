"""Small typed helpers for Redis stream replies, shared by the forwarder and the admin commands."""

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
