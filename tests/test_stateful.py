"""Prepare, exchange, expiry and replay, checked against a model under a clock the test drives.

A hypothesis state machine prepares handoffs with random TTLs, exchanges known, used and
unknown tokens (with and without fallback, one at a time and several at once, by the
receiving source and by one the handoff is not for), and moves the clock on. The model
says what each answer must be: a token exchanges once, only before its expiry, for the
identity that was prepared; afterwards it answers 404, or a generated identity with
fallback. Calls go through the handoff API (credentials, validation, sealing, store), on
both stores.

The clock: the memory store counts TTLs on a clock the test owns. Redis counts them on
its own, so moving the clock on by d lowers every handoff key's remaining time by d (keys
with nothing left are deleted): what Redis would see after d seconds. Real time passes
too, so on Redis the model's time is the real time elapsed plus what was added, and an
exchange whose window of real time straddles a key's expiry may go either way; the model
accepts either and follows what happened.
"""

import asyncio
import itertools
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from identity_service.crypto import OutboxSealer, Token, TokenSealer
from identity_service.handoff import HandoffService
from identity_service.handoff_api import Call, HandoffApi
from identity_service.metrics import Metrics
from identity_service.problems import Problem
from identity_service.settings import Settings
from identity_service.sources import SourceRegistry
from identity_service.stores.memory import MemoryStore
from identity_service.stores.redis import RedisStore
from tests.conftest import CHECKOUT_URL, auth, make_settings
from tests.redis_server import RedisServer
from tests.secrets_audit import AUDIT

MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MAX_TTL = 600
# Redis keeps expiries in milliseconds, and its clock is not the test's.
REDIS_SLACK_SECONDS = 0.02

T = TypeVar("T")

# Lowers the remaining time of every key matching ARGV[1] by ARGV[2] milliseconds. A key
# whose PTTL is 0 still lives (for the rest of this millisecond): it is moved on too.
SHIFT_EXPIRIES = """
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
  local left = redis.call('PTTL', key)
  if left >= 0 then
    if left <= tonumber(ARGV[2]) then
      redis.call('DEL', key)
    else
      redis.call('PEXPIRE', key, left - tonumber(ARGV[2]))
    end
  end
end
return 0
"""


class MemoryClock:
    """The memory store under a clock of the test's: nothing moves unless told to."""

    slack = 0.0

    def __init__(self) -> None:
        self.seconds = 0.0
        self.store = MemoryStore(clock=lambda: self.seconds)

    def now(self) -> float:
        return self.seconds

    async def advance(self, seconds: float) -> None:
        self.seconds += seconds

    async def close(self) -> None:
        await self.store.close()


class RedisClock:
    """The Redis store, its keys' expiries moved on to make time pass."""

    slack = REDIS_SLACK_SECONDS

    def __init__(self, settings: Settings) -> None:
        assert settings.redis is not None
        self._prefix = settings.redis.key_prefix
        self._admin = Redis.from_url(settings.redis.url)
        self.store = RedisStore(settings.redis, OutboxSealer(settings.secret))
        self._started = time.monotonic()
        self._added = 0.0

    def now(self) -> float:
        return time.monotonic() - self._started + self._added

    async def advance(self, seconds: float) -> None:
        # Redis counts milliseconds: the model adds what Redis was told, not a drifting float.
        milliseconds = round(seconds * 1000)
        pattern = f"{self._prefix}*:handoff:*"
        await self._admin.eval(SHIFT_EXPIRIES, 0, pattern, milliseconds)
        self._added += milliseconds / 1000

    async def close(self) -> None:
        await self.store.close()
        keys = [key async for key in self._admin.scan_iter(match=f"{self._prefix}*")]
        if keys:
            await self._admin.delete(*keys)
        await self._admin.aclose()


Clock = MemoryClock | RedisClock


@dataclass
class Handoff:
    """What the model knows of one prepared handoff."""

    token: str
    anonymous_id: str
    user_id: str | None
    traits: dict[str, Any]
    # The earliest and latest time its expiry can be at (the prepare took a while).
    expires_from: float
    expires_by: float
    gone: bool = False  # exchanged, burned, or seen expired
    exchanged: int = 0  # successful exchanges


class HandoffMachine(RuleBasedStateMachine):
    """The machine; ``machine_for`` makes the one of a store."""

    redis_url: str | None = None  # None: the memory store

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        settings = make_settings(self.redis_url)
        self.clock: Clock = MemoryClock() if self.redis_url is None else RedisClock(settings)
        handoffs = HandoffService(
            self.clock.store, TokenSealer(settings.secret), settings, Metrics()
        )
        self.api = HandoffApi(settings, SourceRegistry(settings.sources), handoffs)
        self.handoffs: list[Handoff] = []
        self.prepared_ids: set[str] = set()
        self.numbers = itertools.count()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.clock.close())
        self.loop.close()

    async def call(
        self, endpoint: str, source: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Status and body, as the HTTP front would answer (a problem is its status)."""
        call = Call(auth(source)["Authorization"], "application/json", orjson.dumps(body))
        try:
            if endpoint == "prepare":
                return await self.api.prepare(call)
            return await self.api.exchange(call)
        except Problem as problem:
            return problem.status, problem.body(instance=endpoint)

    @rule(ttl=st.integers(1, MAX_TTL), with_user=st.booleans())
    def prepare(self, ttl: int, with_user: bool) -> None:
        number = next(self.numbers)
        anonymous_id = f"visitor-{number:04d}"
        user_id = f"user-{number:04d}" if with_user else None
        AUDIT.identity(anonymous_id, "anonymousId")
        AUDIT.identity(user_id, "userId")
        traits = {"number": number}
        body = {
            "anonymousId": anonymous_id,
            "userId": user_id,
            "traits": traits,
            "destination": CHECKOUT_URL,
            "ttl": ttl,
        }
        before = self.clock.now()
        status, answer = self.run(self.call("prepare", "shop", body))
        after = self.clock.now()
        assert (status, answer["expiresIn"]) == (201, ttl), answer
        self.handoffs.append(
            Handoff(answer["token"], anonymous_id, user_id, traits, before + ttl, after + ttl)
        )
        self.prepared_ids.add(anonymous_id)

    @precondition(lambda self: self.handoffs)
    @rule(data=st.data(), fallback=st.booleans())
    def exchange(self, data: st.DataObject, fallback: bool) -> None:
        self.exchange_once(data.draw(st.sampled_from(self.handoffs)), fallback)

    @precondition(lambda self: any(handoff.gone for handoff in self.handoffs))
    @rule(data=st.data(), fallback=st.booleans())
    def replay(self, data: st.DataObject, fallback: bool) -> None:
        """A token exchanged, burned or seen expired before: a miss from now on."""
        handoff = data.draw(st.sampled_from([h for h in self.handoffs if h.gone]))
        assert self.exchange_once(handoff, fallback) == "miss"

    @precondition(lambda self: self.handoffs)
    @rule(data=st.data(), copies=st.integers(2, 6))
    def exchange_at_once(self, data: st.DataObject, copies: int) -> None:
        """Several exchanges of one token at the same time: one of them at most succeeds."""
        handoff = data.draw(st.sampled_from(self.handoffs))
        before = self.clock.now()
        answers = self.run(
            gather(
                self.call("exchange", "checkout", {"token": handoff.token}) for _ in range(copies)
            )
        )
        after = self.clock.now()
        succeeded = [answer for status, answer in answers if status == 200]
        assert all(status in (200, 404) for status, _ in answers), answers
        assert len(succeeded) <= 1, answers
        allowed = self.allowed(handoff, before, after)
        assert ("ok" if succeeded else "miss") in allowed, f"{answers} at {before}: {handoff}"
        for identity in succeeded:
            self.check_identity(handoff, identity)
        handoff.exchanged += len(succeeded)
        handoff.gone = True

    @precondition(lambda self: self.handoffs)
    @rule(data=st.data())
    def exchange_by_a_stranger(self, data: st.DataObject) -> None:
        """A source not allowed the handoff's origin: 403, and the token is burned."""
        handoff = data.draw(st.sampled_from(self.handoffs))
        before = self.clock.now()
        status, answer = self.run(self.call("exchange", "partner", {"token": handoff.token}))
        allowed = self.allowed(handoff, before, self.clock.now())
        assert {403: "ok", 404: "miss"}[status] in allowed, f"{answer} at {before}: {handoff}"
        handoff.gone = True

    @rule(
        token=st.one_of(
            st.binary(min_size=32, max_size=32).map(lambda raw: Token(raw).text),
            st.text(min_size=1, max_size=60),
        ),
        fallback=st.booleans(),
    )
    def exchange_unknown(self, token: str, fallback: bool) -> None:
        status, answer = self.run(
            self.call("exchange", "checkout", {"token": token, "fallback": fallback})
        )
        self.check_miss(status, answer, fallback)

    @rule(seconds=st.integers(1, MAX_TTL + 100))
    def advance(self, seconds: int) -> None:
        self.run(self.clock.advance(seconds))

    @precondition(lambda self: any(not handoff.gone for handoff in self.handoffs))
    @rule(data=st.data(), offset=st.sampled_from([-1, 0, 1]))
    def advance_to_an_expiry(self, data: st.DataObject, offset: int) -> None:
        """Move the clock to a second before, at, or a second after a handoff's expiry."""
        handoff = data.draw(st.sampled_from([h for h in self.handoffs if not h.gone]))
        seconds = handoff.expires_from + offset - self.clock.now()
        if seconds > 0:
            self.run(self.clock.advance(seconds))

    @invariant()
    def a_token_exchanges_at_most_once(self) -> None:
        assert all(handoff.exchanged <= 1 for handoff in self.handoffs)

    def exchange_once(self, handoff: Handoff, fallback: bool) -> str:
        """Exchange ``handoff``'s token, check the answer against the model, and return
        what it was: "ok" or "miss"."""
        before = self.clock.now()
        status, answer = self.run(
            self.call("exchange", "checkout", {"token": handoff.token, "fallback": fallback})
        )
        allowed = self.allowed(handoff, before, self.clock.now())
        if status == 200 and answer["source"] == "handoff":
            assert "ok" in allowed, f"exchanged at {before}: {handoff}"
            self.check_identity(handoff, answer)
            handoff.exchanged += 1
            outcome = "ok"
        else:
            assert "miss" in allowed, f"missed at {before}: {handoff}"
            self.check_miss(status, answer, fallback)
            outcome = "miss"
        handoff.gone = True
        return outcome

    def allowed(self, handoff: Handoff, before: float, after: float) -> set[str]:
        """What an exchange between ``before`` and ``after`` may answer for ``handoff``."""
        slack = self.clock.slack
        if handoff.gone or before - slack >= handoff.expires_by:
            return {"miss"}
        if after + slack < handoff.expires_from:
            return {"ok"}
        return {"ok", "miss"}

    def check_identity(self, handoff: Handoff, identity: dict[str, Any]) -> None:
        expected = {
            "anonymousId": handoff.anonymous_id,
            "userId": handoff.user_id,
            "traits": handoff.traits,
            "source": "handoff",
            "preparedBy": "shop",
            "destination": CHECKOUT_URL,
        }
        assert {name: identity[name] for name in expected} == expected

    def check_miss(self, status: int, answer: dict[str, Any], fallback: bool) -> None:
        if not fallback:
            assert status == 404, answer
            return
        assert (status, answer["source"], answer["userId"]) == (200, "generated", None)
        assert uuid.UUID(answer["anonymousId"]).version == 4
        assert answer["anonymousId"] not in self.prepared_ids


async def gather(calls: Any) -> list[tuple[int, dict[str, Any]]]:
    return list(await asyncio.gather(*calls))


def machine_for(store_kind: str, redis: RedisServer) -> type[HandoffMachine]:
    class Machine(HandoffMachine):
        redis_url = redis.url if store_kind == "redis" else None

    return Machine


@pytest.mark.timeout(120)
def test_handoffs_follow_the_model(store_kind: str, redis_server: RedisServer) -> None:
    run_state_machine_as_test(machine_for(store_kind, redis_server), settings=MACHINE_SETTINGS)
