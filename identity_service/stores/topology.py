"""Redis Cluster and Redis Sentinel for the lean client of the request path and the feeds.

:class:`ClusterClient` keeps one pipelined :class:`RespClient` per node and the slot map
(``CLUSTER SLOTS``); each command goes to the node of its key's slot, computed here from
the hash tag, so a request still makes one round trip and the commands of one loop
iteration still leave in one write per node. Redis answers a command sent to the wrong
node with a redirection instead of running it, so following one never runs a command
twice: ``MOVED`` (the slot moved for good) refreshes the map and re-sends to the named
node, ``ASK`` (the slot is moving) re-sends there once after ``ASKING``, ``TRYAGAIN`` (a
script's keys are split by a moving slot) re-sends after a short pause. A broken
connection fails the command (no retry: see resp.py) and the next command refreshes the
map first, so a Cluster failover heals by itself. A command's ``sent`` (resp.py) is told
of the connection of each node it is sent to, so its caller learns which node ran it: the
``WAIT`` after a redirected script goes there (replication.py).

:class:`SentinelClient` is a :class:`RespClient` that asks the sentinels where the master
is before each connection, checks that the node it reaches is a master (``ROLE``), and
drops its connection on a ``READONLY`` reply (the master became a replica), so the next
command finds the new master. A master that the sentinels replaced while it stayed up
(``SENTINEL FAILOVER``, or a partition that healed) still takes writes until they make it
a replica, about ten seconds later, and what it takes then is lost when it resyncs: so
the client also asks the sentinels every second, in the background (requests keep their
one round trip), and drops its connection when they name another node. Commands in
flight during the switch fail: the requests answer 503 with Retry-After.

:func:`lean_client` picks the client a topology needs.
"""

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from redis.crc import key_slot

from identity_service.constants import CLUSTER_SLOTS
from identity_service.settings import RedisSettings
from identity_service.stores.resp import (
    Arg,
    Connection,
    Reply,
    ReplyError,
    RespClient,
    Script,
    Sent,
    pack_command,
)

logger = structlog.get_logger(__name__)

# The hosts a Cluster node announces for a node it cannot name: nil (or "" before Redis 7)
# with cluster-preferred-endpoint-type unknown-endpoint, "?" with hostname and no
# cluster-announce-hostname. Either means the host the client reached the answering node on.
UNNAMED_HOSTS = frozenset({"", "?"})

MAX_REDIRECTS = 5
# The answers that mean "not run here": re-sending is safe.
REDIRECTIONS = frozenset({"MOVED", "ASK", "TRYAGAIN"})
TRYAGAIN_PAUSE_SECONDS = 0.02
# How often a Sentinel client asks the sentinels where the master is: the most a replaced
# master that stayed up keeps receiving its writes, once the sentinels have switched.
WATCH_SECONDS = 1.0
# Turns after a switch on which ``switched`` is told again: the sentinels spread a new
# master within about two seconds, and until they all have, a reconnection that asks one
# of them may still be sent to the old master.
SETTLING_TURNS = 5


class Commands(Protocol):
    """What the store and the feeds send commands through, whatever the topology."""

    async def execute(self, *args: Arg) -> Reply:
        """A command without keys (PING): on a Cluster, on every master."""

    def call(self, key: str, *args: Arg, sent: Sent | None = None) -> Awaitable[Reply]:
        """A command whose keys share ``key``'s slot; ``sent`` is told of the connection
        of each node it is sent to (resp.py), the last one the node that answered."""

    async def run_script(
        self, script: Script, keys: list[str], args: list[Arg], sent: Sent | None = None
    ) -> Reply: ...

    def disconnect(self) -> None: ...

    async def close(self) -> None: ...


def announced_host(announced: str | bytes | None, asked: str) -> str:
    """The host of a node as a Cluster node that ``asked`` names announced it: ``asked``
    itself for a node it cannot name (UNNAMED_HOSTS)."""
    if isinstance(announced, bytes):
        announced = announced.decode()
    if announced is None or announced in UNNAMED_HOSTS:
        return asked
    return announced


def lean_client(settings: RedisSettings, timeout: float) -> Commands:
    """The pipelined client for ``settings``' topology."""
    if settings.topology == "cluster":
        return ClusterClient(settings, timeout)
    if settings.topology == "sentinel":
        return SentinelClient(settings, timeout)
    return RespClient(settings.url, timeout)


class SentinelClient(RespClient):
    """A :class:`RespClient` whose node is the master the sentinels name."""

    def __init__(
        self, settings: RedisSettings, timeout: float, watch_seconds: float = WATCH_SECONDS
    ) -> None:
        super().__init__(settings.node_url, timeout)
        self._service = settings.service
        self._sentinels = sentinel_clients(settings, timeout)
        self.master: tuple[str, int] | None = None
        self._watch_seconds = watch_seconds
        self._watch: asyncio.Task[None] | None = None
        # Called, with True the first time, on each of the SETTLING_TURNS turns after the
        # sentinels name another master: the forwarder's redis-py client drops its
        # connections too (see outbox.py), again while sentinels that have not switched yet
        # may send its new connections back to the old master.
        self.switched: list[Callable[[bool], Awaitable[None]]] = []
        self._told: tuple[str, int] | None = None  # the master switched was last told of

    async def execute(self, *args: Arg, sent: Sent | None = None) -> Reply:
        try:
            return await super().execute(*args, sent=sent)
        except ReplyError as exc:
            if str(exc).startswith("READONLY"):
                self.disconnect()  # a demoted master: find the new one
            raise

    async def close(self) -> None:
        await super().close()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        for sentinel in self._sentinels:
            await sentinel.close()

    async def _endpoint(self) -> tuple[str, int]:
        self.master = await master_address(self._sentinels, self._service)
        if self._told is None:
            self._told = self.master
        if self._watch is None and not self._closed:
            self._watch = asyncio.ensure_future(self._follow())
        return self.master

    async def _check(self, connection: Connection) -> None:
        role = await connection.send(pack_command(("ROLE",)))
        if not role or role[0] != b"master":
            raise ConnectionError(f"the node named master of {self._service!r} is not a master")

    async def _follow(self) -> None:
        """Every ``watch_seconds``, ask the sentinels where the master is; when they name
        another node than the one connected to, drop the connection (the next command
        connects to theirs), and tell ``switched`` on this turn and the next few.
        Sentinels that do not answer change nothing: the connection stays where it is."""
        settling = 0
        while True:
            await asyncio.sleep(self._watch_seconds)
            try:
                named = await master_address(self._sentinels, self._service)
            except OSError:
                continue
            if self.master is not None and named != self.master:
                # Also when a connection to the old master opened meanwhile: the next turn
                # drops it, the master it asked for being still the old one.
                self.disconnect()
            if named != self._told:
                self._told, settling = named, SETTLING_TURNS
            if settling:
                settling -= 1
                await self._tell_switched(first=settling == SETTLING_TURNS - 1)

    async def _tell_switched(self, first: bool) -> None:
        for callback in self.switched:
            try:
                await callback(first)
            except Exception as exc:  # a failed drop must not end the watch
                logger.warning("sentinel_switch_not_followed", error=type(exc).__name__)


def sentinel_clients(settings: RedisSettings, timeout: float) -> list[RespClient]:
    """A client of each sentinel the URL names, with the sentinels' credentials."""
    username, password = settings.sentinel_auth
    return [
        RespClient(
            settings.node_url, timeout, host=host, port=port, username=username,
            password=password, db=0,
        )
        for host, port in settings.nodes
    ]  # fmt: skip


async def master_address(sentinels: list[RespClient], service: str) -> tuple[str, int]:
    """The master's address as the first sentinel that knows it says (then asked first)."""
    for index, sentinel in enumerate(sentinels):
        try:
            reply = await sentinel.execute("SENTINEL", "get-master-addr-by-name", service)
        except (ReplyError, OSError):
            continue
        if reply:
            sentinels.insert(0, sentinels.pop(index))
            return reply[0].decode(), int(reply[1])
    raise ConnectionError(f"no sentinel names a master for {service!r}")


class ClusterClient:
    """One :class:`RespClient` per Cluster node, commands routed by their key's slot."""

    def __init__(self, settings: RedisSettings, timeout: float) -> None:
        self._url = settings.node_url
        self._timeout = timeout
        self._seeds = list(settings.nodes)
        self._nodes: dict[tuple[str, int], RespClient] = {}
        self._hosts: dict[RespClient, str] = {}  # each node's host, for a redirection
        self._slots: list[RespClient | None] = [None] * CLUSTER_SLOTS
        self._masters: list[RespClient] = []
        self._stale = True
        self._refreshing: asyncio.Future[None] | None = None
        # The nodes that did not answer CLUSTER SLOTS last time they were asked: asked last,
        # so that a dead or hung node (each try costs up to the timeout) does not hold up
        # every refresh while the others answer.
        self._failed: dict[tuple[str, int], None] = {}
        # Redirections followed, by kind (MOVED, ASK, TRYAGAIN): how often slots moved.
        self.redirects: Counter[str] = Counter()

    async def execute(self, *args: Arg) -> Reply:
        if self._stale:
            await self.refresh()
        if not self._masters:  # a map that names no node: find another next time
            self._stale = True
            raise ConnectionError("no Cluster node serves any slot")
        try:
            replies = await asyncio.gather(*(node.execute(*args) for node in self._masters))
        except OSError:
            self._stale = True
            raise
        return replies[-1]

    async def call(self, key: str, *args: Arg, sent: Sent | None = None) -> Reply:
        if self._stale:
            await self.refresh()
        node = self._slots[key_slot(key.encode())]
        if node is None:  # a partial map (a node that left, a slot being given): ask again
            self._stale = True
            raise ConnectionError(f"no Cluster node serves the slot of {key!r}")
        asking = False
        for _ in range(MAX_REDIRECTS):
            try:
                if asking:
                    return await node.execute_asking(*args, sent=sent)
                return await node.execute(*args, sent=sent)
            except ReplyError as exc:
                kind, _, where = str(exc).partition(" ")
                if kind not in REDIRECTIONS:
                    raise
                self.redirects[kind] += 1
                if kind == "MOVED":
                    self._stale = True
                    node, asking = self._node_at(where, node), False
                elif kind == "ASK":
                    node, asking = self._node_at(where, node), True
                else:
                    await asyncio.sleep(TRYAGAIN_PAUSE_SECONDS)
            except OSError:
                self._stale = True
                raise
        raise ConnectionError(f"still redirected after {MAX_REDIRECTS} tries")

    async def run_script(
        self, script: Script, keys: list[str], args: list[Arg], sent: Sent | None = None
    ) -> Reply:
        key, sha = keys[0], script.sha
        try:
            return await self.call(key, "EVALSHA", sha, len(keys), *keys, *args, sent=sent)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Each node has its own script cache: EVAL runs it and caches it there.
            source = script.source
            return await self.call(key, "EVAL", source, len(keys), *keys, *args, sent=sent)

    async def refresh(self) -> None:
        """Load the slot map; concurrent callers share one load."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._load())
            self._refreshing.add_done_callback(self._loaded)
        await asyncio.shield(self._refreshing)

    def _loaded(self, attempt: "asyncio.Future[None]") -> None:
        self._refreshing = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved: the callers that awaited it raised it

    async def _load(self) -> None:
        """The slot map of the first node whose map covers every slot. A node that left the
        Cluster (``--cluster del-node`` resets it and it keeps running) answers an empty map,
        and one that has not heard of every slot's owner a partial one: such a node is asked
        last next time, and the next node is asked. If none has a full map, the fullest is
        used (a command on a slot it lacks fails and asks again); if none names a slot, the
        load fails."""
        failure: BaseException | None = None
        best: tuple[int, list[RespClient | None], list[RespClient]] | None = None
        known = dict.fromkeys([*self._nodes, *self._seeds])
        for address in [*(a for a in known if a not in self._failed), *self._failed]:
            try:
                reply: Any = await self._node(address).execute("CLUSTER", "SLOTS")
            except (ReplyError, OSError) as exc:
                failure = exc
                self._failed[address] = None
                continue
            covered, slots, masters = self._slot_map(address, reply)
            if covered == CLUSTER_SLOTS:
                self._failed.pop(address, None)
                self._slots, self._masters, self._stale = slots, masters, False
                return
            self._failed[address] = None
            if covered and (best is None or covered > best[0]):
                best = covered, slots, masters
        if best is None:
            raise ConnectionError("no Cluster node answered CLUSTER SLOTS with a slot") from failure
        _, self._slots, self._masters = best
        self._stale = False
        logger.warning("cluster_slot_map_partial", slots=best[0])

    def _slot_map(
        self, address: tuple[str, int], reply: Any
    ) -> tuple[int, list[RespClient | None], list[RespClient]]:
        """How many slots ``address``'s CLUSTER SLOTS reply covers, its map and masters."""
        slots: list[RespClient | None] = [None] * CLUSTER_SLOTS
        masters: dict[RespClient, None] = {}
        for start, end, master, *_replicas in reply:
            # No host: the node asked's, on another port maybe (UNNAMED_HOSTS).
            host = announced_host(master[0], address[0])
            node = self._node((host, int(master[1])))
            masters[node] = None
            slots[start : end + 1] = [node] * (end + 1 - start)
        covered = CLUSTER_SLOTS - slots.count(None)
        return covered, slots, list(masters)

    def _node_at(self, where: str, asked: RespClient) -> RespClient:
        """The node of a redirection's ``<slot> <host>:<port>`` that ``asked`` answered; no
        host (``:<port>`` or ``?:<port>``: UNNAMED_HOSTS) is ``asked``'s."""
        host, _, port = where.split(" ")[-1].rpartition(":")
        return self._node((announced_host(host, self._hosts[asked]), int(port)))

    def _node(self, address: tuple[str, int]) -> RespClient:
        node = self._nodes.get(address)
        if node is None:
            host, port = address
            node = self._nodes[address] = RespClient(self._url, self._timeout, host=host, port=port)
            self._hosts[node] = host
        return node

    def disconnect(self) -> None:
        for node in self._nodes.values():
            node.disconnect()

    async def close(self) -> None:
        for node in self._nodes.values():
            await node.close()
