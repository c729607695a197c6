"""Prepare and exchange: the handoff of one visitor's identity from domain A to domain B.

This module knows the rules (audience binding, single use, fallback, which events are
due) and nothing of HTTP; the handlers translate requests into these calls and the results
into answers.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from identity_service import events as ev
from identity_service.clock import iso_time
from identity_service.crypto import SealError, Token, TokenSealer
from identity_service.log_config import bind_request
from identity_service.metrics import Inc, Metrics
from identity_service.problems import (
    AudienceMismatch,
    DestinationNotAllowed,
    OversizedEvent,
    TokenNotFound,
)
from identity_service.settings import Settings
from identity_service.sources import Source
from identity_service.stores import HandoffStore, PrepareEvents
from identity_service.urls import with_query_param
from identity_service.validation import ExchangeRequest, PrepareRequest

logger = structlog.get_logger(__name__)


@dataclass(slots=True)  # not frozen: one a request, and frozen costs 3x the __init__
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
        self._outbox = settings.outbox
        # Bound once: a request's counting is a dict lookup and a call.
        names = [source.name for source in settings.sources]

        def per_source(name: str) -> dict[str, Inc]:
            return {n: metrics.counter(name, source=n) for n in names}

        self._prepared = per_source("identity_handoffs_prepared_total")
        self._exchanged = per_source("identity_handoffs_exchanged_total")
        self._fallbacks = per_source("identity_handoff_fallbacks_total")
        self._misses = {
            (n, reason): metrics.counter("identity_handoff_misses_total", source=n, reason=reason)
            for n in names
            for reason in ("not_found", "audience")
        }
        self._from_handoff = metrics.counter("identity_identities_total", id_source="handoff")
        self._generated = metrics.counter("identity_identities_total", id_source="generated")
        self._skipped = metrics.counter("identity_events_skipped_total", reason="consent")

    async def prepare(self, source: Source, request: PrepareRequest) -> PreparedHandoff:
        origin = request.origin
        if not source.may_use(origin):
            # The origin is not named: it is the request's (a problem repeats no request text).
            raise DestinationNotAllowed(
                f"the destination's origin is not one that source {source.name!r} may hand off to"
            )
        ttl = request.ttl or self._default_ttl
        now = time.time()
        prepared_at = iso_time(now)
        record = {
            "anonymousId": request.anonymous_id,
            "userId": request.user_id,
            "traits": request.traits,
            "context": request.context,
            "consent": request.consent,
            "destination": request.destination,
            "origin": origin,
            "preparedBy": source.name,
            "preparedAt": prepared_at,
        }
        token = Token.generate()
        lookup_id = self._sealer.lookup_id(token)
        bind_request(token_id=lookup_id.hex()[:12])
        events = self._prepare_events(lookup_id, request, source, prepared_at)
        sealed = self._sealer.seal(token, lookup_id, orjson.dumps(record))
        await self._store.put(lookup_id, sealed, ttl, events)
        if events is not None and not ev.analytics_allowed(request.consent):
            self._skipped()  # the started track, held back for the consent
        self._prepared[source.name]()
        return PreparedHandoff(
            token=token.text,
            expires_in=ttl,
            expires_at=iso_time(now + ttl),
            redirect_url=with_query_param(request.destination, self._token_param, token.text),
        )

    async def exchange(self, source: Source, request: ExchangeRequest) -> dict[str, Any]:
        facts = self._exchange_facts(source, request)
        token = Token.parse(request.token)
        record = await self._take(token, facts) if token is not None else None
        if record is None:
            self._count_miss(source, "not_found")
            if request.fallback:
                return await self._fallback(source, facts)
            raise TokenNotFound("the token is unknown, expired or already used")
        if not source.may_use(record["origin"]):
            self._count_miss(source, "audience")
            logger.warning("handoff_audience_mismatch", origin=record["origin"])
            # The origin is not named: it is the handoff's, for the sources allowed it.
            raise AudienceMismatch(
                f"the handoff was prepared for an origin that source {source.name!r} may not "
                "receive; the token is now used up"
            )
        if facts is not None and not ev.analytics_allowed(record["consent"]):
            held_back = ev.completion_count(record["userId"])
            self._skipped(held_back)
        self._exchanged[source.name]()
        self._from_handoff()
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

    def _count_miss(self, source: Source, reason: str) -> None:
        self._misses[source.name, reason]()

    def _prepare_events(
        self, lookup_id: bytes, request: PrepareRequest, source: Source, prepared_at: str
    ) -> PrepareEvents | None:
        if not self._outbox.emits_events:
            return None
        if not ev.analytics_allowed(request.consent):
            # Counted by prepare once stored: the started track (the exchange counts domain
            # B's events).
            return PrepareEvents(started=[], completion=None, source=source.name)
        identity = {"anonymous_id": request.anonymous_id, "user_id": request.user_id}
        started = ev.started_event(
            handoff_id=lookup_id,
            name=self._outbox.started_event,
            context=request.context,
            destination_origin=request.origin,
            source=source.name,
            timestamp=prepared_at,
            **identity,
        )
        template = ev.completion_template(
            handoff_id=lookup_id,
            traits=request.traits,
            source=source.name,
            destination_origin=request.origin,
            **identity,
        )
        try:
            ev.check_prepare_sizes([started], template)
        except ev.EventTooLarge as exc:
            raise OversizedEvent(f"{exc}; send a smaller context or fewer traits") from exc
        return PrepareEvents(started=[started], completion=template, source=source.name)

    def _exchange_facts(self, source: Source, request: ExchangeRequest) -> dict[str, Any] | None:
        if not self._outbox.emits_events:
            return None
        facts = ev.exchange_facts(
            event=request.event or self._outbox.completed_event,
            properties=request.properties,
            context=request.context,
            receiver=source,
            timestamp=iso_time(time.time()),
        )
        try:
            ev.check_exchange_sizes(facts)
        except ev.EventTooLarge as exc:
            raise OversizedEvent(f"{exc}; send fewer properties or a smaller context") from exc
        return facts

    async def _take(self, token: Token, facts: dict[str, Any] | None) -> dict[str, Any] | None:
        lookup_id = self._sealer.lookup_id(token)
        bind_request(token_id=lookup_id.hex()[:12])
        sealed = await self._store.take(lookup_id, facts)
        if sealed is None:
            return None
        try:
            record: dict[str, Any] = orjson.loads(self._sealer.open(token, lookup_id, sealed))
        except SealError:
            # Only a changed server secret or a tampered store gets here.
            logger.warning("handoff_record_unreadable")
            return None
        return record

    async def _fallback(self, source: Source, facts: dict[str, Any] | None) -> dict[str, Any]:
        anonymous_id = uuid.uuid4()
        identity = generated_identity(str(anonymous_id))
        if facts is not None:
            event = ev.fallback_event(anonymous_id=anonymous_id, facts=facts)
            await self._store.emit(anonymous_id.bytes, [event], source=source.name)
        # Counted once answered: an emit that fails is a 503, no generated id.
        self._fallbacks[source.name]()
        self._generated()
        return identity


def generated_identity(anonymous_id: str) -> dict[str, Any]:
    return {
        "anonymousId": anonymous_id,
        "userId": None,
        "traits": {},
        "context": {},
        "consent": {},
        "source": "generated",
        "preparedBy": None,
        "preparedAt": None,
        "destination": None,
    }
