"""``WAIT`` for replicas after prepare and exchange (``IDENTITY_REDIS_WAIT``), batched.

Redis blocks a connection while a ``WAIT`` waits: every command behind it on that
connection waits too. A ``WAIT`` per request would line a process's requests up behind
each other's replica acknowledgements, and with no replica answering hold each for the
whole timeout: 20 requests a second at 50 ms, during exactly the failover WAIT is for.

So each connection has at most one ``WAIT`` in flight. A request that finds none sends its
``WAIT`` in the same write as its script: one round trip. One that finds one in flight
awaits its script's reply, then joins the next ``WAIT``, sent as soon as the one in flight
returns. A ``WAIT`` covers every write its connection made before it, so one answers for
all the requests that joined it, however many arrived meanwhile.

A ``WAIT`` that fails (the connection broke) after the script ran counts as no replica
acknowledging: the write was made, and the caller decides what a shortfall means.
"""

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field

from identity_service.stores.resp import Reply, ReplyError
from identity_service.stores.topology import Commands


@dataclass(slots=True, eq=False)
class _Line:
    """One connection's WAITs: whether one is in flight, and the next one's joiners."""

    node: Commands
    key: str
    busy: bool = False
    next: "asyncio.Future[int] | None" = field(default=None)


class Waits:
    """Sends the WAITs of one store: ``replicas`` within ``milliseconds``."""

    def __init__(self, replicas: int, milliseconds: int) -> None:
        self.replicas = replicas
        self._milliseconds = milliseconds
        self._lines: dict[Commands, _Line] = {}

    async def after(
        self, commands: Commands, key: str, call: Awaitable[Reply]
    ) -> tuple[Reply, int]:
        """Run ``call`` (a script on ``key``), then a WAIT that covers it: its reply and how
        many replicas acknowledged."""
        node = commands.node_for(key)
        if node is None:  # a Cluster that does not know the slot's node yet
            return await call, await self._wait(commands, key)
        line = self._lines.get(node)
        if line is None:
            line = self._lines[node] = _Line(node, key)
        if line.busy:
            reply = await call
            return reply, await self._join(line)
        line.busy = True
        script = asyncio.ensure_future(call)
        waited = asyncio.ensure_future(self._wait(node, key))
        # Replies come in order: the script's task finishes before the WAIT's, unless the
        # node did not know the script and it went again as EVAL, after this WAIT.
        finished: list[object] = []
        script.add_done_callback(finished.append)
        waited.add_done_callback(finished.append)
        waited.add_done_callback(lambda _: self._returned(line))
        reply, acknowledged = await asyncio.gather(script, waited)
        if finished[0] is waited:
            acknowledged = await self._join(line)
        return reply, acknowledged

    async def _join(self, line: _Line) -> int:
        """The acknowledgements of a WAIT sent after this call: now if none is in flight."""
        if not line.busy:
            line.busy = True
            waited = asyncio.ensure_future(self._wait(line.node, line.key))
            waited.add_done_callback(lambda _: self._returned(line))
            return await waited
        if line.next is None:
            line.next = asyncio.get_running_loop().create_future()
        return await asyncio.shield(line.next)

    def _returned(self, line: _Line) -> None:
        """The WAIT in flight returned: send the next one for those who joined it."""
        joined, line.next = line.next, None
        if joined is None:
            line.busy = False
            return
        waited = asyncio.ensure_future(self._wait(line.node, line.key))
        waited.add_done_callback(lambda done: joined.set_result(done.result()))
        waited.add_done_callback(lambda _: self._returned(line))

    async def _wait(self, node: Commands, key: str) -> int:
        try:
            acknowledged: int = await node.call(key, "WAIT", self.replicas, self._milliseconds)
        except (ReplyError, OSError):
            return 0
        return acknowledged
