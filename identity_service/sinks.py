"""Where batches of events are delivered: a Segment-compatible HTTP API, a file or stdout;
and where an AMP action's queued webhook calls are: its webhook (:class:`WebhookSink`).

Events arrive as JSON documents, encoded once when they were written. A sink answers each
batch with a :class:`Delivery`: delivered, retry (with the delay the destination asked
for, if any), or rejected for good. The forwarder decides what to do.
"""

import asyncio
import base64
import gzip
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Literal, Protocol

import aiohttp

from identity_service import __version__
from identity_service.amp.webhooks import signed_headers
from identity_service.answers import drain_answer
from identity_service.clock import iso_time
from identity_service.lines import write_lines
from identity_service.settings import Destination, OutboxSettings


@dataclass(frozen=True, slots=True)
class Delivery:
    outcome: Literal["delivered", "retry", "rejected"]
    reason: str = ""
    retry_after: float | None = None
    throttled: bool = False  # a 429: retried without counting as a failed attempt
    status: int | None = None  # the destination's HTTP status, when it answered

    @property
    def refused_for_content(self) -> bool:
        """A 400 or 422: the destination refused what the batch holds, maybe one event of
        it; a 413: the batch is too large for it. The forwarder splits the batch, to find
        which events, or to send less at once (forwarder.py)."""
        return self.outcome == "rejected" and self.status in _REFUSED_FOR_CONTENT


# The refusals a smaller batch may not get (see Delivery.refused_for_content).
_REFUSED_FOR_CONTENT = frozenset(
    (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.UNPROCESSABLE_ENTITY)
)


DELIVERED = Delivery("delivered")
USER_AGENT = f"identity-service/{__version__}"
MAX_RETRY_AFTER_SECONDS = 3600.0


class Sink(Protocol):
    async def send(self, events: list[bytes]) -> Delivery: ...

    async def close(self) -> None: ...


def open_sink(destination: Destination, settings: OutboxSettings) -> Sink:
    if destination.kind == "http":
        return HttpSink(destination, settings.delivery_timeout)
    if destination.kind == "webhook":
        return WebhookSink(destination, settings.delivery_timeout)
    if destination.kind == "file":
        return FileSink(Path(destination.path))
    return StdoutSink()


def stamped(events: list[bytes]) -> list[bytes]:
    """The events (JSON objects) with ``sentAt``, the time of this delivery attempt.

    Added as the object's last member, without parsing it again; no event has one yet.
    """
    sent_at = iso_time(time.time()).encode()
    members = b',"sentAt":"' + sent_at + b'"}'
    return [event[:-1] + (members if event != b"{}" else members[1:]) for event in events]


def batch_body(events: list[bytes]) -> bytes:
    """The JSON a batch API receives: the events, stamped, in ``{"batch": [...]}``."""
    return b'{"batch":[' + b",".join(stamped(events)) + b"]}"


class HttpSink:
    """POSTs ``{"batch": [...]}`` gzipped to the destination's /v1/batch with Basic auth."""

    def __init__(self, destination: Destination, timeout: float) -> None:
        self._url = destination.batch_url
        credentials = base64.b64encode(f"{destination.write_key}:".encode()).decode()
        self._headers = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": USER_AGENT,
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, events: list[bytes]) -> Delivery:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = gzip.compress(batch_body(events), compresslevel=1)
        return await post(self._session, self._url, body, self._headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class WebhookSink:
    """POSTs each queued body to an AMP action's webhook, as its own signed call.

    Each body is sent as it was queued (no gzip, no batch wrapper, no ``sentAt``, whatever
    its size: the batch API's sizes are not a webhook's, ``Destination.batched``), signed
    as amp/webhooks.py signs the calls it makes in the request (a fresh ``t`` per attempt),
    and answers are classified as :class:`HttpSink`'s. A batch of several bodies is sent in
    order and stops at the first that is not delivered; the whole batch is then retried
    (or dead-lettered), so a body already applied may be sent again: the receiver
    deduplicates on the body's ``id``, which is the same on every attempt.
    """

    def __init__(self, destination: Destination, timeout: float) -> None:
        self._url = destination.url
        self._secret = destination.secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, events: list[bytes]) -> Delivery:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for body in events:
            headers = {**signed_headers(self._secret, body), "User-Agent": USER_AGENT}
            delivery = await post(self._session, self._url, body, headers)
            if delivery.outcome != "delivered":
                return delivery
        return DELIVERED

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> Delivery:
    """POST ``body`` (redirects not followed) and classify the answer, or the failure.

    The status line and headers are the answer: a 2xx is delivered whatever its body does
    next (too long, sent slowly or never ended), not a timeout that sends the batch again
    and again until it is dead-lettered; a body is never held whole in memory."""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as answer:
            delivery = classify(answer.status, answer.headers.get("Retry-After"))
            await drain_answer(answer)
            return delivery
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Delivery("retry", reason=type(exc).__name__)


def classify(status: int, retry_after: str | None) -> Delivery:
    if 200 <= status < 300:
        return DELIVERED
    if status == 429 or status == 408 or status >= 500:
        delay = parse_retry_after(retry_after)
        return Delivery(
            "retry", f"http {status}", retry_after=delay, throttled=status == 429, status=status
        )
    # Other 4xx, and 3xx: a POST must not follow a redirect (it would turn into a GET).
    return Delivery("rejected", reason=f"http {status}", status=status)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110 10.2.3): delay-seconds (digits only) or
    an HTTP-date, in UTC whatever its form; None when it is neither."""
    value = (value or "").strip(" \t")
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:  # asctime's form has no zone: an HTTP-date's is UTC
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


class StdoutSink:
    """Writes each event as a JSON line on standard output (the embedded default), in
    whole lines, so workers sharing it (and their logs) never interleave mid-line."""

    async def send(self, events: list[bytes]) -> Delivery:
        try:
            write_lines(sys.stdout.buffer, [event + b"\n" for event in stamped(events)])
        except OSError as exc:  # its reader gone (EPIPE), a full disk: retried, as a file's
            return Delivery("retry", reason=f"stdout: {exc.strerror}")
        return DELIVERED

    async def close(self) -> None:
        return None


class FileSink:
    """Appends each event as a JSON line to a file, flushed to disk per batch."""

    def __init__(self, path: Path) -> None:
        self._path = path

    async def send(self, events: list[bytes]) -> Delivery:
        lines = b"".join(event + b"\n" for event in stamped(events))
        try:
            await asyncio.to_thread(self._append, lines)
        except OSError as exc:
            return Delivery("retry", reason=f"file: {exc.strerror}")
        return DELIVERED

    def _append(self, lines: bytes) -> None:
        with self._path.open("ab") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())

    async def close(self) -> None:
        return None
