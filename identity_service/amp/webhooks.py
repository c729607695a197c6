"""Signed calls to an action's webhook, retried within a bounded wait.

The publisher's backend applies an action when the service POSTs it a JSON document::

    {"id": "<hop id>", "action": "<name>", "anonymousId": "<visitor id>",
     "fields": {...}, "clientId": "<AMP clientId, when the form carried one>",
     "context": "origin" | "cache_with_cookie" | "origin_hop", "sentAt": "<ISO 8601>"}

signed the way payment providers sign theirs (Stripe's scheme)::

    Identity-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

The receiver recomputes the HMAC over the exact bytes received, compares in constant time,
and refuses a ``t`` older than a few minutes (replays). ``id`` is the same on every attempt
for one submission or hop, so a receiver that saw an attempt time out after it applied the
action can tell the retry apart: it is the idempotency key.

A 2xx answer means applied. 5xx, 408, 429, timeouts and connection errors are retried with
exponential backoff and full jitter, at most ``webhook_attempts`` attempts, each within
``webhook_timeout``, all within :func:`wait_bound`. Any other answer (a 3xx is not followed)
is a refusal, not retried.

A call that still failed for a transient reason is not lost: actions.py queues the same
body (same ``id``) in the outbox for the action's destination (``amp-action-<name>``),
whose forwarder retries it like event delivery through ``sinks.WebhookSink``, signing
each attempt with :func:`signed_headers`.
"""

import asyncio
import hashlib
import hmac
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from identity_service.amp.config import ActionSettings, AmpSettings
from identity_service.answers import drain_answer
from identity_service.clock import iso_time

logger = structlog.get_logger(__name__)

SIGNATURE_HEADER = "Identity-Signature"
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 1.0
_RETRIED_STATUSES = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a webhook call: applied (a 2xx) or not, and why not.

    ``refused``: the webhook answered a refusal (a 4xx other than 408 and 429, or a 3xx),
    which no retry changes; otherwise a call not applied failed for a transient reason.
    """

    applied: bool
    attempts: int
    reason: str = ""
    refused: bool = False


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Identity-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def signed_headers(secret: bytes, body: bytes) -> dict[str, str]:
    """The headers of one attempt to POST ``body``: signed now (a fresh ``t`` each time)."""
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, int(time.time()), body),
    }


def wait_bound(amp: AmpSettings) -> float:
    """The longest a visitor waits for a webhook: every attempt and every backoff."""
    return (
        amp.webhook_attempts * amp.webhook_timeout
        + (amp.webhook_attempts - 1) * BACKOFF_MAX_SECONDS
    )


def payload(
    *,
    hop_id: str,
    action: ActionSettings,
    anonymous_id: str,
    fields: dict[str, str],
    client_id: str | None,
    context: str,
) -> dict[str, Any]:
    """The JSON document the webhook receives (``orjson.dumps`` gives the body sent)."""
    document: dict[str, Any] = {
        "id": hop_id,
        "action": action.name,
        "anonymousId": anonymous_id,
        "fields": fields,
        "context": context,
        "sentAt": iso_time(time.time()),
    }
    if client_id is not None:
        document["clientId"] = client_id
    return document


async def call(
    http: aiohttp.ClientSession, amp: AmpSettings, action: ActionSettings, body: bytes
) -> Outcome:
    """POST ``body`` to the action's webhook until a 2xx, a refusal, or the attempts run out."""
    log = logger.bind(action=action.name)
    deadline = time.monotonic() + wait_bound(amp)
    reason = "no attempt"
    for attempt in range(1, amp.webhook_attempts + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        retry, reason = await _attempt(http, action, body, min(amp.webhook_timeout, remaining))
        if not reason:
            return Outcome(applied=True, attempts=attempt)
        if not retry or attempt == amp.webhook_attempts:
            log.warning("webhook_failed", reason=reason, attempts=attempt)
            return Outcome(applied=False, attempts=attempt, reason=reason, refused=not retry)
        delay = _backoff(attempt)
        log.info("webhook_retry", reason=reason, attempt=attempt, delay_s=round(delay, 3))
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
    log.warning("webhook_failed", reason=reason, attempts=amp.webhook_attempts)
    return Outcome(applied=False, attempts=amp.webhook_attempts, reason=reason)


async def _attempt(
    http: aiohttp.ClientSession, action: ActionSettings, body: bytes, seconds: float
) -> tuple[bool, str]:
    """One signed POST: ``(retry, "")`` when applied, else whether to retry and why not."""
    try:
        async with http.post(
            action.webhook,
            data=body,
            headers=signed_headers(action.secret, body),
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=seconds),
        ) as response:
            # The status is the answer: a 2xx whose body then hangs was applied, not a
            # timeout to retry (and queue, applied again); the body is never held whole.
            status = response.status
            await drain_answer(response)
    except TimeoutError:
        return True, "timeout"
    except aiohttp.ClientError as exc:
        return True, type(exc).__name__
    if 200 <= status < 300:
        return False, ""
    return status >= 500 or status in _RETRIED_STATUSES, f"status {status}"


def _backoff(attempt: int) -> float:
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret
