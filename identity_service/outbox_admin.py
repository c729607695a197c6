"""The `outbox status`, `dead`, `replay-dead` and `retire` commands: the outbox as operators
see it."""

import heapq
import itertools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import ResponseError

from identity_service.constants import KEY_SHARDS, dead_letter_key, outbox_key
from identity_service.feeds import legacy_dead_letters, legacy_outbox_streams, oldest_pending
from identity_service.stores.redis import AdminClient
from identity_service.streams import entries, entry_pages, parse_id, text

PAYLOAD_FIELDS = (b"j", b"e", b"t", b"p")
# Dead letters read at a time by `outbox dead` (each holds its events, up to 32 KB a letter).
DEAD_LETTER_PAGE = 50
# Unread entries counted at a time by `outbox status` where Redis cannot say a group's lag.
STATUS_PAGE = 100
# Dead letters moved at a time by `outbox replay-dead`, in one transaction.
REPLAY_PAGE = 50
# A failed_at past this (year 9999) is not a time: the entry id's is taken instead.
MAX_TIME_MS = 253_402_300_799_000


@dataclass(slots=True)
class DestinationStatus:
    destination: str
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    oldest_age_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "pending": self.pending,
            "inFlight": self.in_flight,
            "deadLetters": self.dead,
            "oldestAgeSeconds": (
                None if self.oldest_age_seconds is None else round(self.oldest_age_seconds, 3)
            ),
        }


async def outbox_status(
    redis: AdminClient, prefix: str, destinations: list[str], shards: int = KEY_SHARDS
) -> list[DestinationStatus]:
    """Per destination: entries not yet read, read but unacknowledged, dead, oldest age;
    0.3.0's streams, which the forwarders still deliver, counted with today's.

    Shard by shard, each shard's commands on the node that holds it (on a Cluster)."""
    report = [DestinationStatus(name) for name in destinations]
    now_ms = time.time() * 1000
    # Each shard's stream, with 0.3.0's streams whose dead letters go to the same keys.
    shard_streams = [[outbox_key(prefix, shard, shards)] for shard in range(shards)]
    for stream, shard in legacy_outbox_streams(redis, prefix, shards):
        shard_streams[shard].append(stream)
    for shard, streams in enumerate(shard_streams):
        # One transaction: a dead-lettering (XADD dead + XACK) lands wholly before or
        # after it, so an entry is never counted both in flight and dead.
        async with redis.pipeline(transaction=True) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            for status in report:
                pipe.xlen(dead_letter_key(prefix, shard, status.destination, shards))
            replies = await pipe.execute(raise_on_error=False)
        for status, dead in zip(report, replies[len(streams) :], strict=True):
            status.dead += dead
        for stream, group_reply in zip(streams, replies[: len(streams)], strict=True):
            if isinstance(group_reply, ResponseError):  # no stream (yet, or any more)
                continue
            groups = {text(g["name"]): g for g in group_reply}
            for status in report:
                group = groups.get(status.destination)
                oldest = await _shard_status(redis, stream, group, status)
                if oldest is not None:
                    age = max(0.0, (now_ms - oldest) / 1000)
                    status.oldest_age_seconds = max(status.oldest_age_seconds or 0.0, age)
    for status in report:
        for _, dead in legacy_dead_letters(redis, prefix, status.destination, shards):
            status.dead += await redis.xlen(dead)
    return report


async def _shard_status(
    redis: AdminClient, stream: str, group: dict[str, Any] | None, status: DestinationStatus
) -> int | None:
    """Add one stream's counts to ``status``; return the oldest unacknowledged entry's ms."""
    if group is None:  # no forwarder has run for this destination yet: all is pending
        status.pending += await redis.xlen(stream)
        first = await entries(redis, stream, count=1)
        return parse_id(first[0][0])[0] if first else None
    last = text(group["last-delivered-id"])
    unread = await entries(redis, stream, min=f"({last}", count=1)
    lag = group.get("lag")
    if lag is None:  # before Redis 7, or entries deleted past the group's last read
        lag = await _count_after(redis, stream, last)
    status.pending += lag
    status.in_flight += group["pending"]
    candidates = [parse_id(unread[0][0])[0]] if unread else []
    oldest = await oldest_pending(redis, stream, group) if group["pending"] else None
    if oldest is not None:
        candidates.append(parse_id(oldest)[0])
    return min(candidates) if candidates else None


async def _count_after(redis: AdminClient, stream: str, last: str) -> int:
    """The entries after ``last`` up to the newest one now, read ``STATUS_PAGE`` at a
    time: in one read, Redis built a reply of the whole backlog in its memory (the command
    is run when the backlog is long), and the command held it in its own."""
    return sum([len(page) async for page in entry_pages(redis, stream, f"({last}", STATUS_PAGE)])


@dataclass(slots=True)
class DeadLetter:
    """Why and when one dead letter failed, without its events, ids or write keys."""

    destination: str
    failed_at_ms: int
    reason: str
    # Sends before giving up (0: never sent); None for letters written by 0.4.0 and earlier.
    attempts: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "failedAt": _iso(self.failed_at_ms),
            "reason": self.reason,
            "attempts": self.attempts,
        }


async def newest_dead_letters(
    redis: AdminClient,
    prefix: str,
    destinations: list[str],
    limit: int,
    shards: int = KEY_SHARDS,
) -> list[DeadLetter]:
    """The ``limit`` newest dead letters of ``destinations``, newest first.

    Keeps only the letters' ``reason``, ``failed_at`` and ``attempts``, never their events
    (Redis sends whole entries: they are read a page at a time, and a key's older pages
    only while they may still hold one of the ``limit`` newest)."""
    newest: list[tuple[int, int, DeadLetter]] = []  # a heap: the oldest kept comes first
    order = itertools.count()  # ties of failed_at never compare the letters
    for destination in destinations:
        keys = [dead_letter_key(prefix, shard, destination, shards) for shard in range(shards)]
        keys += [dead for _, dead in legacy_dead_letters(redis, prefix, destination, shards)]
        for dead in keys:
            before = "+"
            while True:
                page: Any = await redis.xrevrange(dead, max=before, count=DEAD_LETTER_PAGE)
                for entry_id, fields in page:
                    letter = _dead_letter(destination, entry_id, fields)
                    kept = (letter.failed_at_ms, next(order), letter)
                    if len(newest) < limit:
                        heapq.heappush(newest, kept)
                    elif kept[0] > newest[0][0]:
                        heapq.heapreplace(newest, kept)
                full = len(newest) == limit
                if len(page) < DEAD_LETTER_PAGE or (full and _entry_ms(page[-1][0]) < newest[0][0]):
                    break
                before = f"({text(page[-1][0])}"
    return [letter for _, _, letter in sorted(newest, key=lambda kept: kept[0], reverse=True)]


def _entry_ms(entry_id: bytes) -> int:
    return parse_id(entry_id)[0]


def _dead_letter(destination: str, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    """One letter's facts; a field that does not read (a hand-made or damaged entry) falls
    back to what the entry id says, or to unknown."""
    failed_at = fields.get(b"failed_at", b"")
    attempts = fields.get(b"attempts", b"")
    failed_at_ms = int(failed_at) if failed_at.isdigit() else _entry_ms(entry_id)
    if failed_at_ms > MAX_TIME_MS:
        failed_at_ms = _entry_ms(entry_id)
    return DeadLetter(
        destination,
        failed_at_ms,
        # Not UTF-8 (a damaged letter): what reads, the rest replaced, not a traceback.
        fields.get(b"reason", b"unknown").decode(errors="replace"),
        int(attempts) if attempts.isdigit() else None,
    )


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def replay_dead(
    redis: AdminClient, prefix: str, destinations: list[str], shards: int = KEY_SHARDS
) -> int:
    """Move dead letters back into their outbox stream, addressed to their destination only."""
    moved = 0
    for destination in destinations:
        for stream, dead in [
            *(
                (
                    outbox_key(prefix, shard, shards),
                    dead_letter_key(prefix, shard, destination, shards),
                )
                for shard in range(shards)
            ),
            *legacy_dead_letters(redis, prefix, destination, shards),
        ]:
            moved += await _replay(redis, stream, dead, destination.encode())
    return moved


async def _replay(redis: AdminClient, stream: str, dead: str, only: bytes) -> int:
    """Move ``dead``'s letters to ``stream`` a page at a time, up to the newest there when
    it starts: a letter dead-lettered again meanwhile waits for the next replay (reading to
    the end would move it again and again while the destination refuses it), and no reply
    holds the whole stream (each letter is up to a batch's events; Redis builds a reply
    whole in its memory, then the command's in its own)."""
    moved = 0
    async for page in entry_pages(redis, dead, "-", REPLAY_PAGE):
        # One transaction a page: each letter is in the outbox or dead, never both.
        async with redis.pipeline(transaction=True) as pipe:
            for entry_id, fields in page:
                payload = {k: v for k, v in fields.items() if k in PAYLOAD_FIELDS}
                payload[b"only"] = only
                pipe.xadd(stream, payload)  # type: ignore[arg-type]
                pipe.xdel(dead, entry_id)
            await pipe.execute()
        moved += len(page)
    return moved


async def retire_destination(
    redis: AdminClient, prefix: str, destination: str, shards: int = KEY_SHARDS
) -> int:
    """Remove a destination's consumer groups, so the outbox no longer keeps its events.

    Its dead letters stay. Returns the number of streams where it had a group: the shards',
    and 0.3.0's (tags ``{0}``…``{15}``), which the forwarders still read and trim.
    """
    removed = 0
    streams = [outbox_key(prefix, shard, shards) for shard in range(shards)]
    streams += [stream for stream, _ in legacy_outbox_streams(redis, prefix, shards)]
    for stream in streams:
        if await redis.exists(stream):
            removed += await redis.xgroup_destroy(stream, destination)
    return removed
