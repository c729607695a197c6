"""``IdentityClient`` (sync) and ``AsyncIdentityClient`` (async)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from types import TracebackType
from typing import Any, Self

import httpx

from identity_client._base import (
    DEFAULT_TIMEOUT,
    EXCHANGE_PATH,
    PREPARE_PATH,
    Attempt,
    BaseClient,
)
from identity_client.errors import ConfigurationError
from identity_client.models import Identity, PreparedHandoff

_EXCHANGE_DOC = """Exchange a handoff token for the identity it carries, exactly once.

        With ``fallback=True`` a token that is unknown, expired or already used answers a
        generated identity (a new anonymousId, ``source="generated"``) instead of raising
        ``TokenNotFound``. ``event``, ``properties`` and ``context`` (domain B's Segment
        context: page, ip, userAgent...) go into domain B's completion event.

        An exchange is NEVER retried, whatever ``max_retries`` says: a token works once, so
        an exchange whose answer was lost (timeout, reset connection, 503 after the store
        applied it) may already have consumed the token, and a retry would answer
        ``TokenNotFound`` for a visitor whose identity was in fact handed off. On
        ``IdentityConnectionError`` or ``ServiceUnavailable`` the caller does not retry
        either: it goes on without the handoff (keeps or generates the visitor's own id),
        and the normal way to ask is ``fallback=True``, which never fails for a missing
        token. The middleware does exactly this.

        One failure alone is sent again, once, at once, as for a prepare: the connection
        kept alive between requests was closed (or reset) by the server before any of the
        answer came, which a server does only when it has read nothing of the request (see
        ``BaseClient._closed_unanswered``); were it processed anyway, the retry answers
        ``TokenNotFound`` or the fallback, as giving up would.
        """


class IdentityClient(BaseClient):
    """Synchronous client (Flask, Django). One connection pool per client: create it once,
    share it, and ``close()`` it (or use it as a context manager).

    ``base_url`` and ``write_key`` default to ``IDENTITY_URL`` and ``IDENTITY_WRITE_KEY``.
    ``prepare`` is retried up to ``max_retries`` times on 503 (honouring Retry-After, capped
    at ``backoff_max``) and on connection errors, with exponential backoff and jitter;
    ``exchange`` never is (see its docstring). Both are sent again once, at once, when the
    kept-alive connection they went on was closed by the server before any of the answer.
    """

    def __init__(
        self,
        base_url: str | None = None,
        write_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url,
            write_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        )
        self._http = http_client or httpx.Client(timeout=timeout)

    def prepare(
        self,
        anonymous_id: str | None = None,
        user_id: str | None = None,
        *,
        destination: str,
        traits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        consent: dict[str, bool] | None = None,
        ttl: int | None = None,
    ) -> PreparedHandoff:
        """Prepare a handoff to ``destination``; redirect the visitor to ``redirect_url``."""
        with self._unchained():
            body = self._prepare_body(
                anonymous_id=anonymous_id,
                user_id=user_id,
                destination=destination,
                traits=traits,
                context=context,
                consent=consent,
                ttl=ttl,
            )
            content = self._encoded(body)  # once: every attempt sends these bytes
            attempt = 0
            while True:
                outcome: httpx.Response | httpx.TransportError
                try:
                    outcome = self._post(PREPARE_PATH, content)
                except httpx.TransportError as exc:
                    outcome = exc
                delay = self._prepare_retry(attempt, outcome, anonymous_id, user_id)
                if delay is None:
                    assert isinstance(outcome, httpx.Response)
                    return self._prepared(outcome, anonymous_id, user_id)
                time.sleep(delay)
                attempt += 1

    def exchange(
        self,
        token: str,
        *,
        fallback: bool = False,
        event: str | None = None,
        properties: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> Identity:
        with self._unchained():
            body = self._exchange_body(
                token, fallback=fallback, event=event, properties=properties, context=context
            )
            try:
                response = self._post(EXCHANGE_PATH, self._encoded(body))
            except httpx.TransportError as exc:
                raise self._connection_error(exc, EXCHANGE_PATH, token) from None
            return self._identity(response, token)

    exchange.__doc__ = _EXCHANGE_DOC

    def _post(self, path: str, content: bytes) -> httpx.Response:
        """Send ``content`` (the encoded body) to ``path``: once, and once more at once
        when the kept-alive connection it went on was closed before any of the answer came
        (``BaseClient._closed_unanswered`` says why that is safe for an exchange too)."""
        seen = Attempt()
        try:
            return self._attempt(path, content, seen)
        except httpx.TransportError as exc:
            if not self._closed_unanswered(exc, seen):
                raise
        return self._attempt(path, content, Attempt())  # outside the except: unchained

    def _attempt(self, path: str, content: bytes, seen: Attempt) -> httpx.Response:
        """One attempt, traced into ``seen``, its whole answer read within the attempt's
        time (checked between the answer's reads: httpx's own limits bound each read, not
        the answer)."""
        deadline = self._deadline()
        with self._unexpected():
            request = self._request(self._http, path, content, seen)
            # Never followed, whatever the http_client's follow_redirects: a 307 or 308 would
            # send the body (the token, the visitor's ids) again, to wherever it points.
            response = self._http.send(request, stream=True, follow_redirects=False)
            seen.answered = True
            try:
                return self._answer(response, self._within(response.iter_raw(), deadline, request))
            finally:
                response.close()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncIdentityClient(BaseClient):
    """Asynchronous client (FastAPI, Starlette, aiohttp, Django ASGI): the same API as
    ``IdentityClient``, awaited. Use it as an async context manager or ``await aclose()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        write_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url,
            write_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
        )
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        # The pool's connections belong to the event loop they were opened in (_pool).
        self._owns_http = http_client is None
        self._http_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._loop_lock = threading.Lock()

    def _pool(self) -> httpx.AsyncClient:
        """The connection pool for the running event loop. A pool is bound to the loop it
        was first used in; once that loop is closed (one ``asyncio.run`` after another),
        the client's own pool is made anew in the new one (its connections died with the
        old loop). Used from a loop while the pool's is still open, or with your own
        ``http_client`` after its loop closed, it is a ``ConfigurationError``: a
        connection cannot be shared between loops."""
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            bound = self._http_loop() if self._http_loop is not None else None
            if bound is loop:
                return self._http
            if self._http_loop is None:
                self._http_loop = weakref.ref(loop)
                return self._http
            if (bound is None or bound.is_closed()) and self._owns_http:
                if not self._http.is_closed:
                    self._http = httpx.AsyncClient(timeout=self.timeout)
                    self._http_loop = weakref.ref(loop)
                return self._http  # a closed client stays closed (httpx says so)
        raise ConfigurationError(
            "this AsyncIdentityClient's connections belong to another event loop"
            + (" (its http_client's, now closed)" if not self._owns_http else "")
            + ": make one AsyncIdentityClient per event loop (e.g. in the app's startup), "
            "or use IdentityClient from synchronous code"
        )

    async def prepare(
        self,
        anonymous_id: str | None = None,
        user_id: str | None = None,
        *,
        destination: str,
        traits: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        consent: dict[str, bool] | None = None,
        ttl: int | None = None,
    ) -> PreparedHandoff:
        """Prepare a handoff to ``destination``; redirect the visitor to ``redirect_url``."""
        with self._unchained():
            body = self._prepare_body(
                anonymous_id=anonymous_id,
                user_id=user_id,
                destination=destination,
                traits=traits,
                context=context,
                consent=consent,
                ttl=ttl,
            )
            content = self._encoded(body)  # once: every attempt sends these bytes
            attempt = 0
            while True:
                outcome: httpx.Response | httpx.TransportError
                try:
                    outcome = await self._post(PREPARE_PATH, content)
                except httpx.TransportError as exc:
                    outcome = exc
                delay = self._prepare_retry(attempt, outcome, anonymous_id, user_id)
                if delay is None:
                    assert isinstance(outcome, httpx.Response)
                    return self._prepared(outcome, anonymous_id, user_id)
                await asyncio.sleep(delay)
                attempt += 1

    async def exchange(
        self,
        token: str,
        *,
        fallback: bool = False,
        event: str | None = None,
        properties: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
    ) -> Identity:
        with self._unchained():
            body = self._exchange_body(
                token, fallback=fallback, event=event, properties=properties, context=context
            )
            try:
                response = await self._post(EXCHANGE_PATH, self._encoded(body))
            except httpx.TransportError as exc:
                raise self._connection_error(exc, EXCHANGE_PATH, token) from None
            return self._identity(response, token)

    exchange.__doc__ = _EXCHANGE_DOC

    async def _post(self, path: str, content: bytes) -> httpx.Response:
        """Send ``content`` (the encoded body) to ``path``: once, and once more at once
        when the kept-alive connection it went on was closed before any of the answer came
        (see the sync client's ``_post``)."""
        seen = Attempt()
        try:
            return await self._attempt(path, content, seen)
        except httpx.TransportError as exc:
            if not self._closed_unanswered(exc, seen):
                raise
        return await self._attempt(path, content, Attempt())  # outside the except: unchained

    async def _attempt(self, path: str, content: bytes, seen: Attempt) -> httpx.Response:
        """One attempt, traced into ``seen``, the whole of it (connect, send, the answer's
        headers and body) within the attempt's time."""
        with self._unexpected():
            http = self._pool()
            request = self._request(http, path, content, seen)
            try:
                async with asyncio.timeout(self._attempt_seconds):
                    # Never followed (see the sync client's _attempt).
                    response = await http.send(request, stream=True, follow_redirects=False)
                    seen.answered = True
                    try:
                        raw = [chunk async for chunk in response.aiter_raw()]
                    finally:
                        await response.aclose()
            except TimeoutError as exc:
                raise self._timed_out(request) from exc
            return self._answer(response, raw)

    async def aclose(self) -> None:
        """Close the connection pool. From another loop than the one it was used in: once
        that loop is closed, the pool is only marked closed (its connections died with
        their loop); while it is open, a ``ConfigurationError`` (close it there)."""
        with self._loop_lock:
            bound = self._http_loop() if self._http_loop is not None else None
            gone = self._http_loop is not None and (bound is None or bound.is_closed())
        if gone:
            with contextlib.suppress(RuntimeError):  # marked closed, then fails on the dead loop
                await self._http.aclose()
            return
        if bound is not None and bound is not asyncio.get_running_loop():
            raise ConfigurationError(
                "this AsyncIdentityClient's connections belong to another event loop, "
                "still open: aclose() it there"
            )
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
