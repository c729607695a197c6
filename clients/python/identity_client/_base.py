"""What the sync and async clients share: settings, request bodies, answers, retry policy."""

from __future__ import annotations

import base64
import email.utils
import json
import math
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, overload

import httpx

from identity_client._carry import carry_key
from identity_client.errors import (
    PROBLEM_CLASSES,
    PROBLEM_PREFIX,
    STATUS_CLASSES,
    APIError,
    ConfigurationError,
    FieldError,
    IdentityConnectionError,
    IdentityError,
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
)
from identity_client.models import Identity, PreparedHandoff

__version__ = "0.1.0"

PREPARE_PATH = "/v1/handoffs"
EXCHANGE_PATH = "/v1/handoffs/exchange"
DEFAULT_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
# A secret shorter than this is scrubbed only where it stands alone (not inside a word), so
# that a short test token such as "-" does not mangle every hyphen of an error's text.
_SHORT_SECRET = 8
_WORD_CHARS = "A-Za-z0-9_-"


def attempt_seconds(timeout: float | httpx.Timeout) -> float | None:
    """The most one attempt (connect, send, read the whole answer) may take: the number
    given, or the largest of an ``httpx.Timeout``'s limits; None when it sets none.

    httpx's own limits bound each phase and each read, so an answer trickling in one byte at
    a time would never trip them; this bounds the attempt as a whole."""
    if isinstance(timeout, httpx.Timeout):
        limits = [
            value
            for value in (timeout.connect, timeout.read, timeout.write, timeout.pool)
            if value is not None
        ]
        return max(limits) if limits else None
    return float(timeout)


class Attempt:
    """What one attempt's connection did, as httpcore reports it through the request's
    ``trace`` extension (``note``; ``anote`` for the async client, whose trace is awaited),
    and whether its answer's head arrived (``answered``, set by the client)."""

    __slots__ = ("answered", "opened")

    def __init__(self) -> None:
        self.opened = False  # a connection was opened for it: not one kept alive
        self.answered = False

    def note(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace: ``connection.connect_tcp.started`` (or ``connect_unix_socket``)
        comes only when the pool opens a connection for this request."""
        if event.startswith("connection.connect_"):
            self.opened = True

    async def anote(self, event: str, info: dict[str, Any]) -> None:
        """``note``, awaited (httpcore's async pool awaits its trace)."""
        self.note(event, info)


# httpcore's text when the connection ended while h11 still awaited the answer's status line.
_UNANSWERED = "without sending a response"


class BaseClient:
    """Settings and the request/answer logic of both clients (no I/O here)."""

    def __init__(
        self,
        base_url: str | None,
        write_key: str | None,
        *,
        timeout: float | httpx.Timeout,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
    ) -> None:
        base_url = base_url or os.environ.get("IDENTITY_URL")
        if not base_url:
            raise ConfigurationError(
                "no service URL: pass base_url= or set IDENTITY_URL (e.g. https://identity.internal)"
            )
        write_key = write_key or os.environ.get("IDENTITY_WRITE_KEY")
        if not write_key:
            raise ConfigurationError("no write key: pass write_key= or set IDENTITY_WRITE_KEY")
        # The service's rule (its sources.can_be_sent): HTTP Basic ends the user name at a
        # ':', and only printable ASCII keys are read. The key itself is not shown.
        if not (write_key.isascii() and write_key.isprintable() and ":" not in write_key):
            raise ConfigurationError(
                "the write key is not one the service can read: printable ASCII without ':'"
            )
        _check_retry_settings(max_retries, backoff_base, backoff_max)
        _check_timeout(timeout)
        _check_base_url(base_url)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._attempt_seconds = attempt_seconds(timeout)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # The middleware signs its carry cookie with it (identity_client._carry).
        self._carry_key = carry_key(write_key)
        credentials = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
        # What an upstream could echo of the key (the key, its Basic credentials, with or
        # without the colon): scrubbed from every error's text (_scrub).
        self._secrets = _variants(write_key, f"{write_key}:")
        self._headers = {
            "Authorization": f"Basic {credentials}",
            "Accept": "application/json, application/problem+json",
            "Content-Type": "application/json",
            "User-Agent": f"identity-service-client-python/{__version__}",
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # Requests

    @staticmethod
    def _prepare_body(
        *,
        anonymous_id: str | None,
        user_id: str | None,
        destination: str,
        traits: dict[str, Any] | None,
        context: dict[str, Any] | None,
        consent: dict[str, bool] | None,
        ttl: int | None,
    ) -> dict[str, Any]:
        if anonymous_id is None and user_id is None:
            raise InvalidRequest(
                "prepare needs anonymous_id or user_id",
                errors=[FieldError("anonymousId", "anonymous_id or user_id is required")],
            )
        fields = {
            "anonymousId": anonymous_id,
            "userId": user_id,
            "destination": destination,
            "traits": traits,
            "context": context,
            "consent": consent,
            "ttl": ttl,
        }
        return {name: value for name, value in fields.items() if value is not None}

    @staticmethod
    def _exchange_body(
        token: str,
        *,
        fallback: bool,
        event: str | None,
        properties: dict[str, Any] | None,
        context: dict[str, Any] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"token": token, "fallback": fallback}
        for name, value in (("event", event), ("properties", properties), ("context", context)):
            if value is not None:
                body[name] = value
        return body

    @staticmethod
    def _encoded(body: dict[str, Any]) -> bytes:
        """``body`` as the JSON sent, UTF-8 (as httpx's ``json=`` sends it). A string that
        is not UTF-8 (a lone surrogate, which ``json.loads`` gives for ``"\\ud800"``) is
        sent escaped, as Node's ``JSON.stringify`` sends it, and the service refuses it; a
        number JSON cannot hold (NaN, infinity) or a value that is no JSON (a datetime, a
        set) is an ``InvalidRequest``. httpx's ``json=`` raised a raw
        ``UnicodeEncodeError``, ``ValueError`` or ``TypeError`` for these."""
        try:
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (ValueError, TypeError) as exc:  # their text names the type, never a value
            raise InvalidRequest(f"the request cannot be sent as JSON: {exc}") from None
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(body, separators=(",", ":")).encode("ascii")

    # Attempts

    def _deadline(self) -> float | None:
        """When the attempt starting now must have its whole answer (``time.monotonic``)."""
        seconds = self._attempt_seconds
        return None if seconds is None else time.monotonic() + seconds

    def _check_deadline(self, deadline: float | None, request: httpx.Request) -> None:
        """Raise httpx's timeout (a transport error) once the attempt is over its time."""
        if deadline is not None and time.monotonic() >= deadline:
            raise self._timed_out(request)

    def _timed_out(self, request: httpx.Request) -> httpx.TimeoutException:
        return httpx.TimeoutException(
            f"no whole answer within {self._attempt_seconds:g} s", request=request
        )

    def _within(
        self, chunks: Iterable[bytes], deadline: float | None, request: httpx.Request
    ) -> Iterator[bytes]:
        """``chunks`` (an answer's body, read as it comes), stopped with httpx's timeout as
        soon as the attempt is over its time: checked between reads."""
        self._check_deadline(deadline, request)
        for chunk in chunks:
            self._check_deadline(deadline, request)
            yield chunk

    def _request(
        self, http: httpx.Client | httpx.AsyncClient, path: str, content: bytes, seen: Attempt
    ) -> httpx.Request:
        """The POST of ``content`` to ``path``, traced into ``seen`` (``Attempt``)."""
        trace = seen.anote if isinstance(http, httpx.AsyncClient) else seen.note
        return http.build_request(
            "POST",
            self.base_url + path,
            content=content,
            headers=self._headers,
            extensions={"trace": trace},
        )

    @staticmethod
    def _closed_unanswered(exc: httpx.TransportError, seen: Attempt) -> bool:
        """Whether the attempt ``seen`` failed with ``exc`` because the server closed (or
        reset) the kept-alive connection it was sent on before any of the answer came: the
        one failure both clients' ``_post`` retry, once, at once, prepare and exchange alike.

        A server may close a connection kept alive between requests at any time (RFC 9112
        9.5); the service's front does so at its connection limit, for a new connection,
        and nginx at its keepalive_timeout. httpcore checks that a pooled connection is not
        readable (no FIN waiting) before it reuses it, but a FIN that comes after that check,
        while the request is written, still fails the request: "Server disconnected without
        sending a response", or a read error (ECONNRESET) when the request's bytes came in
        as the server closed. httpx's own ``HTTPTransport(retries=...)`` does not cover it:
        httpcore retries only ``ConnectError``/``ConnectTimeout`` while opening a connection.
        So, as browsers do for a request that failed on a reused connection before any byte
        of its answer, it is sent again, on another connection:

        - a server closes a kept-alive connection only when it has read nothing of a next
          request (the front, nginx), so the request was not processed, and a retry does it
          once;
        - were it processed anyway (a server that crashed after applying it), a retried
          exchange answers ``token-not-found``, the same fallback or error as giving up, and
          a retried prepare at worst leaves one more unused token, which expires (300 s at
          most): the retry can never make things worse.

        Not retried: a connection opened for this very request (nothing was kept alive: the
        server refused the request itself, which prepare's ``max_retries`` covers, and an
        exchange never retries), a timeout, an answer begun (its head came: a body cut
        short) or any HTTP status, nor anything httpx's parser refused in the answer. httpx
        cannot tell a status line cut short from none: both are "disconnected without
        sending a response", and a server that wrote part of one and died is taken as one
        that wrote nothing (the retry is harmless either way, above). With an http_client
        whose transport reports no trace (not httpcore's), any connection is taken as kept
        alive: a disconnect before the answer's head is retried once.
        """
        if seen.opened or seen.answered:
            return False
        if isinstance(exc, httpx.RemoteProtocolError):
            return _UNANSWERED in str(exc)
        return isinstance(exc, httpx.ReadError | httpx.WriteError)

    @staticmethod
    def _answer(response: httpx.Response, raw: Iterable[bytes]) -> httpx.Response:
        """The answer as read (``raw``: its body's bytes as sent), decoded: a body that does
        not decode as its Content-Encoding says is a malformed answer."""
        try:
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                content=b"".join(raw),
                request=response.request,
            )
        except httpx.DecodingError as exc:
            raise APIError(
                "the service's answer could not be decoded (Content-Encoding)",
                status=response.status_code,
                title="Malformed answer",
            ) from exc

    # Answers

    def _prepared(self, response: httpx.Response, *secrets: str | None) -> PreparedHandoff:
        """The prepared handoff, or the typed error; ``secrets`` (the visitor's ids) are
        scrubbed from its text as the write key is."""
        data = self._json_or_raise(response, 201, secrets)
        token = _field(data, "token", str, response)
        redirect_url = _field(data, "redirectUrl", str, response)
        expires_in = _field(data, "expiresIn", int, response)
        expires_at = _time(data, "expiresAt", response)
        if not token or not redirect_url or expires_at is None:
            raise _malformed(response, "token, redirectUrl or expiresAt")
        return PreparedHandoff(
            token=token, redirect_url=redirect_url, expires_at=expires_at, expires_in=expires_in
        )

    def _identity(self, response: httpx.Response, token: str) -> Identity:
        data = self._json_or_raise(response, 200, (token,))
        anonymous_id = _field(data, "anonymousId", str, response, optional=True)
        user_id = _field(data, "userId", str, response, optional=True)
        # A handoff prepared with a userId alone has no anonymousId; none of either is not
        # an identity.
        if not (anonymous_id or (anonymous_id is None and user_id)):
            raise _malformed(response, "anonymousId")
        source: Literal["handoff", "generated"] = (
            "generated" if data.get("source") == "generated" else "handoff"
        )
        return Identity(
            anonymous_id=anonymous_id,
            user_id=user_id,
            traits=_field(data, "traits", dict, response, optional=True) or {},
            context=_field(data, "context", dict, response, optional=True) or {},
            consent=_field(data, "consent", dict, response, optional=True) or {},
            source=source,
            prepared_by=_field(data, "preparedBy", str, response, optional=True),
            prepared_at=_time(data, "preparedAt", response),
            destination=_field(data, "destination", str, response, optional=True),
        )

    def _json_or_raise(
        self, response: httpx.Response, expected: int, secrets: tuple[str | None, ...] = ()
    ) -> dict[str, Any]:
        if response.status_code == expected:
            data = _json(response)
            if isinstance(data, dict):
                return data
            raise APIError(
                "the service's answer is not a JSON object",
                status=response.status_code,
                title="Malformed answer",
            )
        raise self._error(response, secrets)

    def _error(
        self, response: httpx.Response, secrets: tuple[str | None, ...] = ()
    ) -> IdentityError:
        """The typed error of a refusal, its text scrubbed of the write key and ``secrets``
        (the token, the ids sent: an upstream proxy or gateway may echo the request's
        headers or body)."""
        status = response.status_code
        problem = _json(response)
        if not isinstance(problem, dict):
            problem = {}
        hidden = self._secrets + _variants(*secrets)
        type_ = problem.get("type") if isinstance(problem.get("type"), str) else None
        slug = type_.removeprefix(PROBLEM_PREFIX) if type_ else None
        error_class = PROBLEM_CLASSES.get(slug or "") or STATUS_CLASSES.get(status, APIError)
        title = problem.get("title") if isinstance(problem.get("title"), str) else None
        detail = problem.get("detail")
        if not isinstance(detail, str):
            detail = title or f"HTTP {status} {response.reason_phrase}".strip()
        kw: dict[str, Any] = {
            "status": status,
            "type": _scrub(type_, hidden),
            "title": _scrub(title, hidden),
        }
        if issubclass(error_class, InvalidRequest):
            raw = problem.get("errors")
            kw["errors"] = [
                FieldError(
                    _scrub(str(item.get("field", "")), hidden),
                    _scrub(str(item.get("message", "")), hidden),
                )
                for item in (raw if isinstance(raw, list) else [])
                if isinstance(item, dict)
            ]
        if issubclass(error_class, ServiceUnavailable | RateLimited):
            kw["retry_after"] = retry_after(response)
        return error_class(_scrub(detail, hidden), **kw)

    # Retries (prepare only)

    def _backoff(self, attempt: int) -> float:
        """``backoff_base · 2^attempt``, capped at ``backoff_max``, for any ``attempt``: the
        exponent is capped where the product passes ``backoff_max`` (by their binary
        exponents, so however small ``backoff_base`` is), since ``2**attempt`` is past any
        float from 1024 on (``OverflowError``)."""
        base, cap = self.backoff_base, self.backoff_max
        doublings = max(0, math.frexp(cap)[1] - math.frexp(base)[1] + 1)
        return min(cap, math.ldexp(base, min(attempt, doublings)))

    def _retry_delay(self, attempt: int, after: float | None) -> float:
        """Seconds before retry ``attempt`` (0-based): exponential backoff with full jitter,
        or the longer of it and the Retry-After sent; never over ``backoff_max`` (as the
        Node SDK waits)."""
        jittered = random.uniform(0, self._backoff(attempt))  # noqa: S311
        return jittered if after is None else min(self.backoff_max, max(after, jittered))

    def _prepare_retry(
        self,
        attempt: int,
        outcome: httpx.Response | httpx.TransportError,
        *secrets: str | None,
    ) -> float | None:
        """Seconds to wait before retrying a prepare after ``outcome``, or None to stop there.

        A connection error that is out of retries is raised here, as a connection error,
        its text scrubbed of ``secrets`` (the visitor's ids).
        """
        if isinstance(outcome, httpx.TransportError):
            if attempt >= self.max_retries:
                # from None: the raw error, shown in a traceback, may quote an echo unscrubbed
                raise self._connection_error(outcome, PREPARE_PATH, *secrets) from None
            return self._retry_delay(attempt, None)
        if outcome.status_code != 503 or attempt >= self.max_retries:
            return None
        return self._retry_delay(attempt, retry_after(outcome))

    def _connection_error(
        self, exc: httpx.TransportError, path: str, *secrets: str | None
    ) -> IdentityConnectionError:
        """The connection error of ``exc``, its text scrubbed of the write key and
        ``secrets`` (the token, the ids sent): httpx's text quotes what its parser refused,
        which may echo the request."""
        what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        text = f"POST {path} {what}: {type(exc).__name__}: {exc}"
        return IdentityConnectionError(_scrub(text, self._secrets + _variants(*secrets)))

    @staticmethod
    @contextmanager
    def _unchained() -> Iterator[None]:
        """Around a call: the error it raises chains no other exception. ``raise ... from
        None`` only hides the raw exception from a printed traceback: it stays the error's
        ``__context__``, where a debugger or an error tracker reaches it, and httpx's errors
        hold the request (its ``Authorization`` header, the write key; its body, the token
        and the visitor's ids). The error's text already says what failed, scrubbed."""
        try:
            yield
        except IdentityError as error:
            error.__cause__ = error.__context__ = None
            raise

    @contextmanager
    def _unexpected(self) -> Iterator[None]:
        """Around an attempt: httpx's errors other than a transport error's (which the
        callers retry or raise as connection errors) become an ``APIError``; never a raw
        one."""
        try:
            yield
        except httpx.TransportError:
            raise
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise APIError(
                _scrub(f"the request failed: {type(exc).__name__}: {exc}", self._secrets),
                title="Request failed",
            ) from None  # the raw error's text is in the message, scrubbed


# The longest wait a setting may ask (about 24.9 days): the Node SDK's (2^31 - 1 ms, the
# longest a timer waits). Far longer, a socket's timeout or a sleep raises OverflowError.
MAX_SECONDS = (2**31 - 1) / 1000


def _seconds(value: object, *, positive: bool = False) -> bool:
    """Whether ``value`` is a number of seconds from 0 (over 0 when ``positive``) to
    ``MAX_SECONDS``: not a bool (an int to Python, True would be 1 s; Node refuses it)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    if not value <= MAX_SECONDS:  # NaN is not either
        return False
    return value > 0 if positive else value >= 0


def _check_retry_settings(max_retries: object, backoff_base: object, backoff_max: object) -> None:
    """Refuse, when the client is made, what would fail or misbehave only at a prepare's
    retry: a negative or NaN delay (``time.sleep`` raises ``ValueError``, ``asyncio.sleep``
    waits no time), an infinite or huge one (a wait without end, or ``OverflowError``), a
    count that is not a whole number (a bool is none here)."""
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise ConfigurationError("max_retries must be a whole number, 0 or more")
    for name, seconds in (("backoff_base", backoff_base), ("backoff_max", backoff_max)):
        if not _seconds(seconds):
            raise ConfigurationError(f"{name} must be a number of seconds from 0 to {MAX_SECONDS}")


def _check_base_url(base_url: str) -> None:
    """Refuse, when the client is made, a service URL the calls cannot be made under: not
    http(s) with a host; with user info (httpx would send it as the Basic credentials in
    place of the write key); with a query or a fragment (each call's path is appended to
    the URL, so it would go into them). The URL itself is not shown: it may hold
    credentials."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError("the service URL is not an http:// or https:// URL")
    if url.userinfo:
        raise ConfigurationError(
            "the service URL holds user info (user:password@): the write key is the credential"
        )
    # Neither can stand unescaped in a path: either is a query or a fragment, empty or not.
    if "?" in base_url or "#" in base_url:
        raise ConfigurationError(
            "the service URL has a query or a fragment: give the base URL alone "
            "(e.g. https://identity.internal or https://example.com/identity)"
        )


def _check_timeout(timeout: object) -> None:
    """Refuse, when the client is made, a timeout that would fail every call as an
    ``IdentityConnectionError`` (an outage, to whoever reads it) or a raw ``OverflowError``:
    a number, or each limit an ``httpx.Timeout`` sets, that is not a number of seconds over
    0 and at most ``MAX_SECONDS`` (0 or less times out at once, NaN fails every socket
    call, infinity the attempt's deadline, 1e10 overflows the socket's timeout). An
    ``httpx.Timeout`` limit of None (no limit) is httpx's own, and kept."""
    if isinstance(timeout, httpx.Timeout):
        limits = (timeout.connect, timeout.read, timeout.write, timeout.pool)
        if all(limit is None or _seconds(limit, positive=True) for limit in limits):
            return
    elif _seconds(timeout, positive=True):
        return
    raise ConfigurationError(
        f"timeout must be a number of seconds over 0 and at most {MAX_SECONDS}, or an "
        "httpx.Timeout whose limits are (or None)"
    )


# RFC 9110 10.2.3: Retry-After is delay-seconds (1*DIGIT) or an HTTP-date, read by the
# standard library's date parser in each of its three forms (IMF-fixdate, RFC 850,
# asctime), all in UTC.
_DELAY_SECONDS = re.compile(r"[0-9]+")


def retry_after(response: httpx.Response) -> float | None:
    """The seconds the answer's Retry-After asks to wait (until its date: whole seconds, 0
    once past), or None: absent, neither delay-seconds nor a date (``1.5``, ``-3``,
    ``nan``, an ISO date), or too large to be a finite number."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip(" \t")
    if _DELAY_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # no date, or no real one (31 Feb, 25:00)
        return None
    if moment.tzinfo is None:  # asctime's form has no zone: an HTTP-date's is UTC
        moment = moment.replace(tzinfo=UTC)
    return float(max(0, math.ceil(moment.timestamp() - time.time())))


def _json(response: httpx.Response) -> Any:
    """The answer's JSON, or None when it is not JSON (or nested too deep to read)."""
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


def _malformed(response: httpx.Response, what: str) -> APIError:
    # Names the field, never its value (it may be a token or an id).
    return APIError(
        f"the service's answer is malformed: {what} missing or of the wrong type",
        status=response.status_code,
        title="Malformed answer",
    )


def _field(
    data: dict[str, Any],
    name: str,
    kind: type[Any],
    response: httpx.Response,
    *,
    optional: bool = False,
) -> Any:
    """``data[name]`` if it is a ``kind`` (None allowed when ``optional``; a bool is not an
    int), else the malformed answer's APIError."""
    value = data.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(response, name)
    return value


def _time(data: dict[str, Any], name: str, response: httpx.Response) -> datetime | None:
    """``data[name]`` as an aware datetime, None when absent or null."""
    value = _field(data, name, str, response, optional=True)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _malformed(response, name) from None
    if moment.tzinfo is None:
        raise _malformed(response, name)
    return moment


def _variants(*secrets: str | None) -> tuple[str, ...]:
    """Each secret as sent or echoed: as is, base64 (standard and URL-safe), and as the
    JSON body carries it (``_encoded``), as is or as a bytes repr quotes it: a connection
    error's text quotes what the HTTP parser refused as ``bytearray(b'...')``, where a
    non-ASCII character is its UTF-8 bytes' escapes and a quote is JSON's ``\\"``."""
    found: list[str] = []
    for secret in secrets:
        if not secret:
            continue
        # surrogatepass: a secret that is not UTF-8 (a lone surrogate) is still scrubbed
        raw = secret.encode("utf-8", "surrogatepass")
        encoded = base64.b64encode(raw).decode("ascii")
        found += [secret, encoded, encoded.rstrip("="), encoded.replace("+", "-").replace("/", "_")]
        found.append(_bytes_repr(raw))
        # The body is UTF-8, or all ASCII escapes when some string in it is not UTF-8.
        for sent in (json.dumps(secret, ensure_ascii=False)[1:-1], json.dumps(secret)[1:-1]):
            found += [sent, _bytes_repr(sent.encode("utf-8", "surrogatepass"))]
    return tuple(dict.fromkeys(value for value in found if value))


def _bytes_repr(data: bytes) -> str:
    """``data`` as a bytes repr shows it between single quotes (``'`` escaped, as in a text
    that holds a ``"`` too, as a JSON body does)."""
    return repr(data + b'"')[2:-2]


@overload
def _scrub(text: str, secrets: tuple[str, ...]) -> str: ...
@overload
def _scrub(text: None, secrets: tuple[str, ...]) -> None: ...
@overload
def _scrub(text: str | None, secrets: tuple[str, ...]) -> str | None: ...
def _scrub(text: str | None, secrets: tuple[str, ...]) -> str | None:
    """``text`` with each secret replaced by ``***`` (a short one only where it stands
    alone); None stays None."""
    if text is None:
        return None
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _SHORT_SECRET:
            text = text.replace(secret, "***")
        else:
            alone = rf"(?<![{_WORD_CHARS}]){re.escape(secret)}(?![{_WORD_CHARS}])"
            text = re.sub(alone, "***", text)
    return text
