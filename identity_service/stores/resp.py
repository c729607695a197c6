"""A lean, pipelined Redis client for the request hot path.

Every prepare and exchange makes exactly one Redis call (an EVALSHA). redis-py's asyncio
client spends most of a request's Redis time in its own machinery (a pool checkout, a
retry wrapper, a timeout context and a socket write per call). This client keeps one
connection per process, writes all the commands issued in one event-loop iteration with
one system call, and matches replies to callers in order, which is how Redis answers.

It never retries: an exchange whose reply was lost may have run, and running it again
would answer "unknown token" for a token that was just consumed. When Redis makes no
progress for ``timeout`` seconds or the connection breaks, every command waiting on it
fails with an ``OSError`` and the next call connects afresh, so the service recovers by
itself when Redis returns.
"""

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

Reply = Any
Arg = bytes | str | int | float


class ReplyError(Exception):
    """Redis answered a command with an error reply."""


class Script:
    """A Lua script called by its SHA1, sent in full only when Redis does not know it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


# Told of the connection a command was just queued on, before the write leaves: a caller
# may queue more behind it in the same write (replication.py's WAIT). A command sent again
# (a Cluster's redirection, NOSCRIPT) tells it again: the last connection it is told of is
# the one whose reply the caller gets.
Sent = Callable[["Connection"], None]


class Connection(asyncio.Protocol):
    """One connection: commands written once per loop iteration, replies matched in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Reply]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._last_progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        self._arm_watchdog()

    def send(self, command: bytes) -> "asyncio.Future[Reply]":
        if self.closed:
            raise ConnectionError("redis connection closed")
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        if not self._waiting:
            self._last_progress = self._loop.time()
        self._outgoing.append(command)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._waiting.append(future)
        return future

    def _flush(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.writelines(self._outgoing)
        self._outgoing = []

    def data_received(self, data: bytes) -> None:
        self._last_progress = self._loop.time()
        reader = self._reader
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not False:
                future = self._waiting.popleft()
                if not future.done():
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(ReplyError(str(reply)))
                    else:
                        future.set_result(reply)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:
            self.abort(ConnectionError(f"redis protocol error: {type(exc).__name__}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionError("redis connection lost"))

    def abort(self, exc: OSError) -> None:
        self._fail_all(exc)
        if self._transport is not None:
            self._transport.abort()

    def _fail_all(self, exc: OSError) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        waiting, self._waiting = self._waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(exc)

    def _arm_watchdog(self) -> None:
        self._watchdog = self._loop.call_later(self._timeout / 4, self._check_progress)

    def _check_progress(self) -> None:
        if self._waiting and self._loop.time() - self._last_progress >= self._timeout:
            self.abort(TimeoutError(f"redis did not answer within {self._timeout} s"))
            return
        self._arm_watchdog()


class RespClient:
    """Pipelined commands over one lazily opened connection, for one event loop."""

    def __init__(self, url: str, timeout: float, **overrides: Any) -> None:
        """``overrides`` replace what the URL says (``host`` and ``port`` of a Cluster node)."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._options = {**options, **overrides}
        self._timeout = timeout
        self._connection: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._closed = False

    async def execute(self, *args: Arg, sent: Sent | None = None) -> Reply:
        """The command's reply; ``sent`` is told of the connection it went on."""
        connection = await self._live_connection()
        reply = connection.send(pack_command(args))
        if sent is not None:
            sent(connection)
        return await reply

    def call(self, key: str, *args: Arg, sent: Sent | None = None) -> Awaitable[Reply]:
        """A command on ``key`` (one node has every key: ``key`` only routes on a Cluster)."""
        return self.execute(*args, sent=sent)

    async def execute_asking(self, *args: Arg, sent: Sent | None = None) -> Reply:
        """``ASKING`` then the command, adjacent on the connection (a Cluster's ASK)."""
        connection = await self._live_connection()
        asking = connection.send(pack_command(("ASKING",)))
        reply = connection.send(pack_command(args))
        if sent is not None:
            sent(connection)
        # Both awaited: when the connection breaks, the command's error is retrieved too
        # (asyncio logs an error for each one never retrieved).
        _, answer = await asyncio.gather(asking, reply)
        return answer

    async def run_script(
        self, script: Script, keys: list[str], args: list[Arg], sent: Sent | None = None
    ) -> Reply:
        """The script's reply; ``sent`` is told of each connection it is sent on."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args, sent=sent)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # The script did not run; EVAL runs it and puts it in Redis's script cache.
            return await self.execute("EVAL", script.source, len(keys), *keys, *args, sent=sent)

    def disconnect(self) -> None:
        """Drop the connection (Redis ends what it was running for it); the next call
        connects afresh. For a blocking command whose caller gave up on it."""
        if self._connection is not None:
            self._connection.abort(ConnectionError("redis connection dropped"))
            self._connection = None

    async def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.abort(ConnectionError("redis client closed"))
            self._connection = None

    async def _live_connection(self) -> Connection:
        """The connection, opened if there is none or it broke."""
        if self._closed:
            raise ConnectionError("redis client closed")
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return connection

    async def _connect(self) -> Connection:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: "asyncio.Future[Connection]") -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            if self._closed:  # closed while connecting: nothing may keep this connection
                attempt.result().abort(ConnectionError("redis client closed"))
            else:
                self._connection = attempt.result()

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        options = self._options
        connection = Connection(loop, self._timeout)
        unix = options.get("connection_class") is UnixDomainSocketConnection
        # Outside the connection's timeout: a Sentinel's client asks each sentinel within
        # a timeout of its own, and one that hangs must leave time to ask the next.
        endpoint = None if unix else await self._endpoint()
        async with asyncio.timeout(self._timeout):
            if endpoint is None:
                await loop.create_unix_connection(lambda: connection, options["path"])
            else:
                tls = (
                    tls_context(options)
                    if options.get("connection_class") is SSLConnection
                    else None
                )
                host, port = endpoint
                await loop.create_connection(lambda: connection, host, port, ssl=tls)
            handshake = []
            if options.get("password") is not None:
                credentials = [options["username"]] if options.get("username") else []
                handshake.append(
                    connection.send(pack_command(("AUTH", *credentials, options["password"])))
                )
            if options.get("db"):
                handshake.append(connection.send(pack_command(("SELECT", options["db"]))))
            try:
                await asyncio.gather(*handshake)
                await self._check(connection)
            except BaseException:
                connection.abort(ConnectionError("redis handshake failed"))
                raise
        return connection

    async def _endpoint(self) -> tuple[str, int]:
        """Where to connect; a Sentinel's client asks the sentinels (each within the
        timeout: a hung one costs it once, then the one that answered is asked first)."""
        return self._options.get("host", "localhost"), self._options.get("port", 6379)

    async def _check(self, connection: Connection) -> None:
        """Checks a new connection before use; a Sentinel's client checks the node's role."""


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """TLS as a ``rediss://`` URL's parameters ask, as redis-py reads them: ``ssl_ca_certs``,
    ``ssl_cert_reqs`` (none, optional, required), ``ssl_check_hostname``, ``ssl_certfile``
    and ``ssl_keyfile`` for a client certificate."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    verify = _CERT_REQS[options.get("ssl_cert_reqs", "required")]  # checked by the settings
    context.check_hostname = verify != ssl.CERT_NONE and options.get("ssl_check_hostname", True)
    context.verify_mode = verify
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


def pack_command(args: tuple[Arg, ...]) -> bytes:
    # hiredis's stubs type the argument as a 1-tuple; any tuple of these types works.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed
