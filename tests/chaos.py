"""What the chaos suite (tests/test_chaos.py) drives and counts: load, a ledger, figures.

The load is a few client tasks each running handoff flows against a real
``identity-service serve``: a prepare, then two exchanges of the token at once (one may
win), then a replay of it. Every request carries its own ``X-Request-ID``, so what the
clients saw can be matched with the service's log lines.

The ledger follows each flow's handoff. An answer the client never got (a 503 or a broken
connection) leaves the outcome uncertain: the store may have done the work before the
failure. A refused connection is certain: nothing reached the service. After the chaos,
``settle`` exchanges every token that never answered 200 or 404 until it does, and the
events each handoff must have produced follow from what was answered:

- a prepare answered 201: its ``started`` track;
- a token exchanged with 200, or answering 404 after an uncertain exchange (the lost
  answer consumed it, and the completion was written in the same script): the completion
  track, and an identify when the handoff has a userId.

A token that answers 404 with no uncertain exchange before is a lost handoff.

A delivered event outside these must belong to an uncertain prepare (its started track);
anything else is unexplained.
"""

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from identity_service.constants import DEFAULT_COMPLETED_EVENT, DEFAULT_STARTED_EVENT
from identity_service.crypto import Token, TokenSealer
from identity_service.events import message_id
from tests.collector import Collector
from tests.conftest import CHECKOUT_URL, SECRET, auth
from tests.redis_server import RedisServer
from tests.secrets_audit import AUDIT

CONCURRENCY = 6
FLOW_PAUSE_SECONDS = 0.01
RETRY_PAUSE_SECONDS = 0.1
REQUEST_TIMEOUT_SECONDS = 15
SETTLE_ATTEMPTS = 50
REFUSED = -1
SEALER = TokenSealer(SECRET.encode())


@dataclass
class Request:
    """One request as the client saw it: ``status`` None when no answer came."""

    request_id: str
    sent: float
    answered: float = 0.0
    status: int | None = None
    error: str | None = None


@dataclass
class Flow:
    """One handoff: what its prepare and exchanges answered."""

    anonymous_id: str
    user_id: str | None
    token: str | None = None
    uncertain_prepare: bool = False
    exchanged: int = 0  # exchanges answered 200
    missed: bool = False  # an exchange answered 404
    uncertain_exchange: bool = False  # an exchange went unanswered, or answered 503

    @property
    def consumed_unseen(self) -> bool:
        """Never answered 200, yet gone: an exchange whose answer was lost took it."""
        return not self.exchanged and self.missed and self.uncertain_exchange

    @property
    def lost(self) -> bool:
        """Prepared (201), then 404 although no exchange could have taken it."""
        certain = not self.uncertain_exchange
        return self.token is not None and not self.exchanged and self.missed and certain

    @property
    def unsettled(self) -> bool:
        """Prepared, and no exchange ever answered 200 or 404."""
        return self.token is not None and not self.exchanged and not self.missed

    def expected_events(self) -> dict[str, tuple[str, str]]:
        """messageId to (anonymousId, kind) of the events this handoff must have produced."""
        if self.token is None:
            return {}
        token = Token.parse(self.token)
        assert token is not None
        lookup_id = SEALER.lookup_id(token)
        steps = ["started"]
        if self.exchanged or self.consumed_unseen:
            steps.append("completed")
            if self.user_id is not None:
                steps.append("identify")
        return {message_id(lookup_id, step): (self.anonymous_id, step) for step in steps}


def event_kind(event: dict[str, Any]) -> str:
    if event["type"] == "identify":
        return "identify"
    return {DEFAULT_STARTED_EVENT: "started", DEFAULT_COMPLETED_EVENT: "completed"}.get(
        event.get("event", ""), "other"
    )


class Load:
    """Client tasks running flows against ``url`` (which may change: a restarted service)."""

    def __init__(self, name: str, url: str, concurrency: int = CONCURRENCY) -> None:
        self.name = name
        self.url = url
        self.concurrency = concurrency
        self.requests: list[Request] = []
        self.flows: list[Flow] = []
        self.parked: list[Flow] = []
        self.outstanding = 0
        self.seconds = 0.0
        self._ids = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        )

    async def close(self) -> None:
        await self.stop()
        await self._session.close()

    def start(self) -> None:
        self._stop.clear()
        self._started = time.monotonic()
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.concurrency)]

    async def stop(self) -> None:
        if not self._tasks:
            return
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []
        self.seconds += time.monotonic() - self._started

    async def run_for(self, seconds: float) -> None:
        self.start()
        await asyncio.sleep(seconds)
        await self.stop()

    async def _worker(self, worker: int) -> None:
        for number in itertools.count():
            if self._stop.is_set():
                return
            flow = await self.prepare(f"{worker}-{number:05d}")
            if flow.token is not None:
                await self.exchange_racing(flow)
            # A refused prepare waits a little longer, as a client honouring Retry-After.
            await asyncio.sleep(FLOW_PAUSE_SECONDS if flow.token else RETRY_PAUSE_SECONDS)

    async def post(self, path: str, body: dict[str, Any], source: str) -> tuple[int | None, Any]:
        """POST through the load's session: the status and the JSON answer.

        Without an answer, the status is None, or ``REFUSED`` when the connection was
        refused (nothing was sent: the service cannot have done anything).
        """
        request = Request(f"{self.name}-{next(self._ids)}", time.monotonic())
        self.requests.append(request)
        headers = {**auth(source), "X-Request-ID": request.request_id}
        self.outstanding += 1
        answer: Any = None
        try:
            async with self._session.post(self.url + path, json=body, headers=headers) as got:
                answer = await got.json(content_type=None)
                request.status = got.status
        except aiohttp.ClientConnectorError:
            request.error = "refused"
        except (aiohttp.ClientError, TimeoutError) as exc:
            request.error = "timeout" if isinstance(exc, TimeoutError) else "disconnected"
        finally:
            self.outstanding -= 1
            request.answered = time.monotonic()
        return (REFUSED if request.error == "refused" else request.status), answer

    async def prepare(self, label: str) -> Flow:
        """Prepare one handoff; every other flow has a userId (so an identify is due)."""
        anonymous_id = f"chaos-{self.name}-{label}"
        user_id = f"user-{self.name}-{label}" if len(self.flows) % 2 else None
        flow = Flow(anonymous_id, user_id)
        self.flows.append(flow)
        AUDIT.identity(anonymous_id, "anonymousId")
        AUDIT.identity(user_id, "userId")
        body = {"anonymousId": anonymous_id, "userId": user_id, "destination": CHECKOUT_URL}
        status, answer = await self.post("/v1/handoffs", body, "shop")
        if status == 201:
            flow.token = answer["token"]
            AUDIT.token(answer["token"])
        elif status is None or status == 503:
            flow.uncertain_prepare = True
        return flow

    async def exchange(self, flow: Flow) -> int | None:
        """Exchange the flow's token once and note the outcome; the status."""
        assert flow.token is not None
        status, answer = await self.post("/v1/handoffs/exchange", {"token": flow.token}, "checkout")
        if status == 200:
            flow.exchanged += 1
            assert answer["anonymousId"] == flow.anonymous_id, answer
        elif status == 404:
            flow.missed = True
        elif status is None or status == 503:  # done by the store, or not
            flow.uncertain_exchange = True
        return status

    async def exchange_racing(self, flow: Flow) -> None:
        """Two exchanges at once, then a replay of the token."""
        await asyncio.gather(self.exchange(flow), self.exchange(flow))
        await self.exchange(flow)

    async def park(self, count: int) -> None:
        """Prepare ``count`` handoffs now, to be exchanged after the chaos (must all be 201)."""
        for number in range(count):
            flow = await self.prepare(f"parked-{number:03d}")
            assert flow.token is not None, "a handoff to park was refused"
            self.parked.append(flow)

    async def exchange_parked(self) -> list[int | None]:
        return [await self.exchange(flow) for flow in self.parked]

    async def settle(self) -> None:
        """Exchange every handoff whose exchanges all went unanswered (or never reached
        the service), until it answers 200 or 404."""
        for flow in self.flows:
            for _ in range(SETTLE_ATTEMPTS):
                if not flow.unsettled or await self.exchange(flow) in (200, 404):
                    break
                await asyncio.sleep(0.2)

    def expected_events(self) -> dict[str, tuple[str, str]]:
        return {
            message: what for flow in self.flows for message, what in flow.expected_events().items()
        }

    def answered_with(self) -> dict[str, int]:
        """Request id to the status the client received."""
        return {r.request_id: r.status for r in self.requests if r.status is not None}


async def wait_until(condition: Callable[[], bool], seconds: float) -> float:
    """Poll ``condition`` for up to ``seconds``; the seconds it took (``seconds`` if never)."""
    started = time.monotonic()
    while True:
        if condition() or time.monotonic() - started >= seconds:
            break
        await asyncio.sleep(0.1)
    return time.monotonic() - started


@dataclass
class EventCheck:
    """The events a collector accepted, against what the ledger says is due."""

    expected: int = 0
    delivered: int = 0  # unique messageIds
    copies: int = 0  # events accepted, re-deliveries included
    missing: list[str] = field(default_factory=list)
    extra: int = 0  # the started tracks of uncertain prepares
    unexplained: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # wrong visitor or kind for its id
    differing_copies: list[str] = field(default_factory=list)


def check_events(load: Load, collector: Collector) -> EventCheck:
    expected = load.expected_events()
    uncertain = {flow.anonymous_id for flow in load.flows if flow.uncertain_prepare}
    accepted = collector.events
    copies: dict[str, list[dict[str, Any]]] = {}
    for event in accepted:
        copies.setdefault(event["messageId"], []).append(
            {k: v for k, v in event.items() if k != "sentAt"}
        )
    check = EventCheck(len(expected), len(copies), len(accepted))
    check.missing = sorted(set(expected) - set(copies))
    for message, same in copies.items():
        event = same[0]
        if any(copy != event for copy in same):
            check.differing_copies.append(message)
        what = (event.get("anonymousId", ""), event_kind(event))
        if message in expected:
            if expected[message] != what:
                check.mismatched.append(message)
        elif what[1] == "started" and what[0] in uncertain:
            check.extra += 1
        else:
            check.unexplained.append(message)
    return check


@dataclass
class Figures:
    """What a scenario prints, and what its assertions read."""

    title: str
    durations: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def show(self, load: Load, events: EventCheck) -> None:
        statuses: Counter[str] = Counter()
        for request in load.requests:
            if request.status is None:
                statuses[request.error or "no answer"] += 1
            else:
                statuses[f"{request.status // 100}xx"] += 1
                if request.status >= 500:
                    statuses[str(request.status)] += 1
        lines = [
            f"chaos: {self.title}",
            f"  requests sent        {len(load.requests)} in {load.seconds:.1f} s of load "
            f"({len(load.flows)} handoffs)",
            "  statuses             " + ", ".join(f"{k}={v}" for k, v in sorted(statuses.items())),
            f"  500s                 {statuses['500']}",
            f"  double redemptions   {sum(flow.exchanged > 1 for flow in load.flows)}",
            f"  handoffs lost        {sum(flow.lost for flow in load.flows)}",
            f"  answers lost         {sum(f.uncertain_prepare for f in load.flows)} prepares, "
            f"{sum(f.uncertain_exchange for f in load.flows)} exchanges (of which "
            f"{sum(f.consumed_unseen for f in load.flows)} had consumed their token)",
            f"  events               expected {events.expected}, delivered "
            f"{events.delivered} unique ({events.copies} with re-deliveries), missing "
            f"{len(events.missing)}, extra {events.extra} (prepares whose answer was "
            f"lost), unexplained {len(events.unexplained)}",
        ]
        lines += [f"  {name:<20} {value}" for name, value in self.notes.items()]
        lines.append(
            "  durations            "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.durations.items())
        )
        print("\n" + "\n".join(lines), flush=True)


def assert_invariants(
    load: Load, events: EventCheck, statuses: Iterable[int], connection_errors: bool
) -> None:
    """No 500, no double redemption, no lost handoff or event, only the expected answers."""
    allowed = set(statuses)
    answered = [r.status for r in load.requests if r.status is not None]
    assert 500 not in answered
    assert set(answered) <= allowed, Counter(answered)
    if not connection_errors:
        assert [r.error for r in load.requests if r.status is None] == []
    assert [f.anonymous_id for f in load.flows if f.exchanged > 1] == []
    assert [f.anonymous_id for f in load.flows if f.lost] == []
    assert [f.anonymous_id for f in load.flows if f.unsettled] == []
    assert events.missing == []
    assert events.unexplained == []
    assert events.mismatched == []
    assert events.differing_copies == []


class CollectorSite:
    """tests/collector.py's collector, which can go down and come back on the same port."""

    def __init__(self) -> None:
        self.collector = Collector()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/batch", self.collector.handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.collector.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class KillableRedis(RedisServer):
    """A private redis-server that can also die without a word (SIGKILL)."""

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
