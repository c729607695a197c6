"""Prepare and exchange: the handoff of one visitor's identity from domain A to domain B.

This module knows the rules (audience binding, single use, fallback) and nothing of HTTP;
the handlers translate requests into these calls and the results into answers.
"""

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, unquote_plus, urlunsplit

import orjson
import structlog

from identity_service.crypto import SealError, Token, TokenSealer
from identity_service.metrics import Metrics
from identity_service.problems import AudienceMismatch, DestinationNotAllowed, TokenNotFound
from identity_service.settings import Settings
from identity_service.sources import Source
from identity_service.stores import HandoffStore
from identity_service.validation import ExchangeRequest, PrepareRequest

logger = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PreparedHandoff:
    token: str
    expires_in: int
    expires_at: str
    redirect_url: str

    def as_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "expiresIn": self.expires_in,
            "expiresAt": self.expires_at,
            "redirectUrl": self.redirect_url,
        }


class HandoffService:
    def __init__(
        self, store: HandoffStore, sealer: TokenSealer, settings: Settings, metrics: Metrics
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._default_ttl = settings.default_ttl
        self._token_param = settings.token_param
        self._metrics = metrics

    async def prepare(self, source: Source, request: PrepareRequest) -> PreparedHandoff:
        origin = request.origin
        if not source.may_use(origin):
            raise DestinationNotAllowed(
                f"source {source.name!r} may not hand off to {origin}",
            )
        ttl = request.ttl or self._default_ttl
        now = time.time()
        record = {
            "anonymousId": request.anonymous_id,
            "userId": request.user_id,
            "traits": request.traits,
            "context": request.context,
            "consent": request.consent,
            "destination": request.destination,
            "origin": origin,
            "preparedBy": source.name,
            "preparedAt": iso_time(now),
        }
        token = Token.generate()
        lookup_id = self._sealer.lookup_id(token)
        structlog.contextvars.bind_contextvars(token_id=lookup_id.hex()[:12])
        sealed = self._sealer.seal(token, lookup_id, orjson.dumps(record))
        await self._store.put(lookup_id, sealed, ttl)
        self._metrics.inc("identity_handoffs_prepared_total", source=source.name)
        return PreparedHandoff(
            token=token.text,
            expires_in=ttl,
            expires_at=iso_time(now + ttl),
            redirect_url=with_query_param(request.destination_url, self._token_param, token.text),
        )

    async def exchange(self, source: Source, request: ExchangeRequest) -> dict[str, Any]:
        record = await self._take(request.token)
        if record is None:
            self._metrics.inc(
                "identity_handoff_misses_total", source=source.name, reason="not_found"
            )
            if request.fallback:
                self._metrics.inc("identity_handoff_fallbacks_total", source=source.name)
                return generated_identity()
            raise TokenNotFound("the token is unknown, expired or already used")
        if not source.may_use(record["origin"]):
            self._metrics.inc(
                "identity_handoff_misses_total", source=source.name, reason="audience"
            )
            logger.warning("handoff_audience_mismatch", origin=record["origin"])
            raise AudienceMismatch(
                f"the handoff was prepared for {record['origin']}, which source "
                f"{source.name!r} may not receive; the token is now used up"
            )
        self._metrics.inc("identity_handoffs_exchanged_total", source=source.name)
        return {
            "anonymousId": record["anonymousId"],
            "userId": record["userId"],
            "traits": record["traits"],
            "context": record["context"],
            "consent": record["consent"],
            "source": "handoff",
            "preparedBy": record["preparedBy"],
            "preparedAt": record["preparedAt"],
            "destination": record["destination"],
        }

    async def _take(self, token_text: str) -> dict[str, Any] | None:
        token = Token.parse(token_text)
        if token is None:
            return None
        lookup_id = self._sealer.lookup_id(token)
        structlog.contextvars.bind_contextvars(token_id=lookup_id.hex()[:12])
        sealed = await self._store.take(lookup_id)
        if sealed is None:
            return None
        try:
            record: dict[str, Any] = orjson.loads(self._sealer.open(token, lookup_id, sealed))
        except SealError:
            # Only a changed server secret or a tampered store gets here.
            logger.warning("handoff_record_unreadable")
            return None
        return record


def generated_identity() -> dict[str, Any]:
    return {
        "anonymousId": str(uuid.uuid4()),
        "userId": None,
        "traits": {},
        "context": {},
        "consent": {},
        "source": "generated",
        "preparedBy": None,
        "preparedAt": None,
        "destination": None,
    }


def iso_time(epoch_seconds: float) -> str:
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def with_query_param(url: SplitResult, name: str, value: str) -> str:
    """``url`` with ``name=value`` in its query, other parameters and the fragment untouched."""
    kept = [
        part
        for part in url.query.split("&")
        if part and unquote_plus(part.partition("=")[0]) != name
    ]
    kept.append(f"{name}={value}")
    return urlunsplit(url._replace(query="&".join(kept)))
