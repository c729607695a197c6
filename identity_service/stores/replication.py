"""``WAIT`` for replicas after prepare and exchange (``IDENTITY_REDIS_WAIT``), batched.

Redis blocks a connection while a ``WAIT`` waits: every command behind it on that
connection waits too. A ``WAIT`` per request would line a process's requests up behind
each other's replica acknowledgements, and with no replica answering hold each for the
whole timeout: 20 requests a second at 50 ms, during exactly the failover WAIT is for.

So each connection has at most one ``WAIT`` in flight. A request whose script is queued
on a connection with none sends its ``WAIT`` right behind the script, in the same write:
one round trip. One whose script is queued behind a ``WAIT`` in flight gets its reply once
that ``WAIT`` returned; then it sends the next ``WAIT``, or shares the one another such
request sent first. A ``WAIT`` covers every write its connection made before it, so one
answers for all the requests that share it, however many arrived meanwhile.

A ``WAIT`` counts the replicas of the connection it is sent on, and only the writes made on
that connection: so it goes on the connection that ran the script, never on the client's
next one. The lean clients tell which connection each send of the script went on
(``sent``, resp.py): a script redirected by ``MOVED`` or ``ASK`` (topology.py), or sent again
as ``EVAL``, is told again, and the last connection told of is the one that answered.
The lines are kept by connection, not by client: a request whose connection was replaced
(the Sentinel client's switch to a new master, a broken connection) cannot have its
``WAIT`` sent there and counts no replica, rather than the replicas of a node that never
had its write.

A ``WAIT`` that fails (the connection broke) after the script ran counts as no replica
acknowledging: the write was made, and the caller decides what a shortfall means.
"""

import asyncio

from identity_service.stores.resp import Arg, Connection, Reply, ReplyError, Script, pack_command
from identity_service.stores.topology import Commands


class _Line:
    """One connection's WAITs: the one in flight, and the future of those who share it.
    Called back when the one in flight returns."""

    __slots__ = ("connection", "shared", "waited")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.waited: asyncio.Future[Reply] | None = None
        self.shared: asyncio.Future[Reply] | None = None

    def send(self, command: bytes) -> "asyncio.Future[Reply] | None":
        """A WAIT now, behind whatever the connection was sent last (None: it is closed)."""
        try:
            waited = self.connection.send(command)
        except OSError:
            return None
        self.waited = waited
        waited.add_done_callback(self)
        return waited

    def share(self) -> "asyncio.Future[Reply]":
        """The count of the WAIT in flight, for a request whose reply came before it."""
        if self.shared is None:
            self.shared = asyncio.get_running_loop().create_future()
        return self.shared

    def __call__(self, waited: "asyncio.Future[Reply]") -> None:
        """The WAIT in flight returned (or failed, or its sender was cancelled)."""
        count = _count(waited)
        self.waited = None
        shared, self.shared = self.shared, None
        if shared is not None:
            shared.set_result(count)


class _Sent:
    """One request's script: told of each connection it is sent on (resp.py's ``sent``), it
    sends a WAIT behind it when that connection has none in flight."""

    __slots__ = ("connection", "waited", "waits")

    def __init__(self, waits: "Waits") -> None:
        self.waits = waits
        self.connection: Connection | None = None
        self.waited: asyncio.Future[Reply] | None = None  # the WAIT right behind the script

    def __call__(self, connection: Connection) -> None:
        self.connection = connection
        line = self.waits.line(connection)
        # Sent again (redirected, or as EVAL): a WAIT sent behind an earlier send does not
        # cover this one.
        self.waited = line.send(self.waits.command) if line.waited is None else None


class Waits:
    """Sends the WAITs of one store: ``replicas`` within ``milliseconds``."""

    def __init__(self, replicas: int, milliseconds: int) -> None:
        self.replicas = replicas
        self.command = pack_command(("WAIT", replicas, milliseconds))
        self._lines: dict[Connection, _Line] = {}

    async def after(
        self, commands: Commands, script: Script, keys: list[str], args: list[Arg]
    ) -> tuple[Reply, int]:
        """Run ``script``, then a WAIT on the connection that ran it: its reply and how many
        replicas acknowledged."""
        sent = _Sent(self)
        reply = await commands.run_script(script, keys, args, sent)
        waited = sent.waited or self._covering(sent.connection)
        if waited is None:
            return reply, 0
        try:
            # Shielded: the WAIT is the connection's, shared by the requests behind it; a
            # cancelled request must not cancel it for them (they would count 0 replicas).
            acknowledged: int = await asyncio.shield(waited)
        except (ReplyError, OSError):  # the connection broke, or a replica now: -READONLY
            acknowledged = 0
        return reply, acknowledged

    def line(self, connection: Connection) -> _Line:
        """The WAITs of ``connection``, kept from its first script on."""
        line = self._lines.get(connection)
        if line is None:
            # A new connection: forget the closed ones (their WAITs failed, or will).
            for closed in [known for known in self._lines if known.closed]:
                del self._lines[closed]
            line = self._lines[connection] = _Line(connection)
        return line

    def _covering(self, connection: Connection | None) -> "asyncio.Future[Reply] | None":
        """A WAIT on ``connection`` sent after a script whose reply is in: the one in flight,
        or a new one if none is; None if there can be none (the connection closed and was
        forgotten, or the client did not say where it sent the script)."""
        line = self._lines.get(connection) if connection is not None else None
        if line is None:
            return None
        if line.waited is None:
            return line.send(self.command)
        # Replies come in order: a WAIT sent before the script would have returned before
        # its reply came (and been called back first), so the one in flight was sent after.
        return line.share()


def _count(waited: "asyncio.Future[Reply]") -> int:
    """A returned WAIT's count, 0 if it failed or was cancelled (its error retrieved: a
    failed WAIT counts no replica, nothing to report)."""
    if waited.cancelled() or waited.exception() is not None:
        return 0
    count: int = waited.result()
    return count
