"""A kept-alive connection the server closes as the next request goes out on it (the front
at its connection limit, nginx at its keepalive_timeout): both clients send that request
again, once, on a new connection, and nothing else is retried. Real loopback servers
(idle_close.py), both clients."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
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
