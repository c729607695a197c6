"""A kept-alive connection the server closes as the next request goes out on it (the front
at its connection limit, nginx at its keepalive_timeout): both clients send that request
again, once, on a new connection, and nothing else is retried. Real loopback servers
(idle_close.py), both clients."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import DEV_WRITE_KEY, Service, start_service
from identity_client import (
    AsyncIdentityClient,
    Identity,
    IdentityClient,
    IdentityConnectionError,
    PreparedHandoff,
)
from idle_close import IdleCloser, idle_closer

KEY = "idle-close-write-key-0123456789"
DESTINATION = "https://b.example.com/cart"
PREPARE, EXCHANGE = "/v1/handoffs", "/v1/handoffs/exchange"

Result = Identity | PreparedHandoff
Calls = list[tuple[str, str]]  # ("prepare", anonymous id) or ("exchange", token), in order


def call(client: IdentityClient, name: str, value: str) -> Result:
    if name == "prepare":
        return client.prepare(value, destination=DESTINATION)
    return client.exchange(value, fallback=True)


async def acall(client: AsyncIdentityClient, name: str, value: str) -> Result:
    if name == "prepare":
        return await client.prepare(value, destination=DESTINATION)
    return await client.exchange(value, fallback=True)


def run(mode: str, url: str, calls: Calls) -> list[Result | IdentityConnectionError]:
    """``calls`` one after the other on one client (its pool: the connection kept alive),
    sync or async, with no retry of prepare's own (``max_retries=0``): each outcome, an
    ``IdentityConnectionError`` as a value."""
    settings: dict[str, Any] = {"base_url": url, "write_key": KEY, "max_retries": 0}
    out: list[Result | IdentityConnectionError] = []
    if mode == "sync":
        with IdentityClient(**settings) as client:
            for name, value in calls:
                try:
                    out.append(call(client, name, value))
                except IdentityConnectionError as error:
                    out.append(error)
        return out

    async def main() -> None:
        async with AsyncIdentityClient(**settings) as client:
            for name, value in calls:
                try:
                    out.append(await acall(client, name, value))
                except IdentityConnectionError as error:
                    out.append(error)

    asyncio.run(main())
    return out


MODES = ["sync", "async"]


def places(server: IdleCloser) -> list[tuple[int, int, str]]:
    """Each request the server got: its connection, its place on it, its path."""
    return [(r.connection, r.number, r.path) for r in server.requests]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", ["second", "arrival"])
def test_an_exchange_on_a_closed_kept_alive_connection_is_sent_again_once(
    mode: str, rule: str
) -> None:
    """The second request of the kept-alive connection, an exchange, is closed unanswered
    (read then a FIN; or a reset as it arrives): the client sends it again on a new
    connection and the visitor keeps the identity (no generated fallback)."""
    with idle_closer(rule) as server:
        prepared, identity = run(mode, server.url, [("prepare", "a"), ("exchange", "token-a")])
    assert isinstance(prepared, PreparedHandoff) and prepared.token == "token-a"
    assert isinstance(identity, Identity)
    assert identity.anonymous_id == "from-token-a" and identity.source == "handoff"
    assert places(server) == [(1, 1, PREPARE), (1, 2, EXCHANGE), (2, 1, EXCHANGE)]
    if rule == "second":  # the same bytes, again
        assert server.requests[2].body == server.requests[1].body
    assert server.connections == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", ["second", "arrival"])
def test_a_prepare_on_a_closed_kept_alive_connection_is_sent_again_once(
    mode: str, rule: str
) -> None:
    """The same for a prepare, with ``max_retries=0``: the retry is not prepare's own."""
    with idle_closer(rule) as server:
        first, second = run(mode, server.url, [("prepare", "a"), ("prepare", "b")])
    assert isinstance(first, PreparedHandoff) and isinstance(second, PreparedHandoff)
    assert second.token == "token-b"
    assert places(server) == [(1, 1, PREPARE), (1, 2, PREPARE), (2, 1, PREPARE)]


@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_connection_closed_unanswered_is_not_retried(mode: str) -> None:
    """Closed on the request it was opened for, nothing was kept alive: the server refused
    the request itself. No retry (prepare's own ``max_retries`` covers a prepare): the
    usual connection error; the next call goes on as ever."""
    with idle_closer("first") as server:
        exchanged, prepared = run(mode, server.url, [("exchange", "t"), ("prepare", "b")])
    assert isinstance(exchanged, IdentityConnectionError)
    assert "without sending a response" in str(exchanged) and KEY not in str(exchanged)
    assert isinstance(prepared, PreparedHandoff)
    assert places(server) == [(1, 1, EXCHANGE), (2, 1, PREPARE)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", ["prepare", "exchange"])
def test_a_server_that_closes_every_time_gets_one_retry_then_the_usual_error(
    mode: str, operation: str
) -> None:
    """The kept-alive connection closed, then the retry's new one too: one retry, no loop,
    then the usual ``IdentityConnectionError`` (which chains nothing: httpx's error holds
    the request)."""
    path = PREPARE if operation == "prepare" else EXCHANGE
    with idle_closer("after-first") as server:
        first, failed = run(mode, server.url, [("prepare", "a"), (operation, "token-a")])
    assert isinstance(first, PreparedHandoff)
    assert isinstance(failed, IdentityConnectionError)
    assert failed.__cause__ is None and failed.__context__ is None
    assert places(server) == [(1, 1, PREPARE), (1, 2, path), (2, 1, path)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("operation", ["prepare", "exchange"])
def test_an_answer_cut_short_is_not_retried(mode: str, operation: str) -> None:
    """The answer's head came, then half its body and the close: the request was
    processed. Not sent again: the usual connection error."""
    path = PREPARE if operation == "prepare" else EXCHANGE
    with idle_closer("partial") as server:
        first, failed = run(mode, server.url, [("prepare", "a"), (operation, "token-a")])
    assert isinstance(first, PreparedHandoff)
    assert isinstance(failed, IdentityConnectionError)
    assert places(server) == [(1, 1, PREPARE), (1, 2, path)]


@pytest.fixture(scope="module")
def crowded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real service holding one connection at most: a new one closes the one kept alive."""
    yield from start_service(
        tmp_path_factory.mktemp("crowded"),
        "crowded",
        IDENTITY_DEV_WRITE_KEY=DEV_WRITE_KEY,
        IDENTITY_MAX_CONNECTIONS="1",
    )


async def crowd(port: int) -> asyncio.StreamWriter:
    """Another client of the service: a connection, one ``GET /healthz`` answered, kept."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: crowd\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    return writer


def test_the_service_closing_a_pooled_connection_for_a_new_one_keeps_the_identity(
    crowded_service: Service,
) -> None:
    """End to end: the service at its connection limit (``IDENTITY_MAX_CONNECTIONS=1``)
    closes the client's kept-alive connection for another client's, just as the client's
    exchange goes out on it. A loopback TCP proxy between the client and the service only
    sets the timing: it holds that exchange's bytes while the other client connects (so the
    service has read nothing of it when it closes the connection), then passes the
    service's close on. The exchange is sent again on a new connection and restores the
    visitor's identity; without the retry, an ``IdentityConnectionError`` (the middleware's
    generated fallback: the identity lost)."""
    port = int(crowded_service.url.rsplit(":", 1)[1])
    connections: list[int] = []
    others: list[asyncio.StreamWriter] = []
    crowded = asyncio.Event()  # made in main()'s loop: asyncio.Event binds on first use

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        number = len(connections)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

        async def back() -> None:  # the service's bytes, then its close, to the client
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            if number == 1:  # the close, once the other client was served (else the
                await crowded.wait()  # retry could come first, and meet the limit: a 503)
            writer.close()

        answering = asyncio.create_task(back())
        posts = 0
        while data := await reader.read(65536):
            posts += data.startswith(b"POST ")
            if number == 1 and posts == 2:  # the exchange on the kept-alive connection
                if not others:
                    others.append(await crowd(port))
                    crowded.set()
                continue  # held: the service closes this connection having read nothing
            up_writer.write(data)
            await up_writer.drain()
        up_writer.close()
        await answering

    async def main() -> tuple[str, Identity]:
        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        try:
            async with AsyncIdentityClient(url, DEV_WRITE_KEY, max_retries=0) as client:
                prepared = await client.prepare("kept-e2e", destination="http://b.localhost/x")
                return prepared.token, await client.exchange(prepared.token, fallback=True)
        finally:
            for writer in others:
                writer.close()
            proxy.close()

    _, identity = asyncio.run(main())
    assert identity.anonymous_id == "kept-e2e" and identity.source == "handoff"
    assert connections == [1, 2]  # the exchange again, on a new connection
