"""What the sync and async clients share: settings, request bodies, answers, retry policy."""

from __future__ import annotations

import base64
import os
import random
from datetime import datetime
from typing import Any, Literal

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
        if max_retries < 0:
            raise ConfigurationError("max_retries must be 0 or more")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # The middleware signs its carry cookie with it (identity_client._carry).
        self._carry_key = carry_key(write_key)
        credentials = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
        self._headers = {
            "Authorization": f"Basic {credentials}",
            "Accept": "application/json, application/problem+json",
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

    # Answers

    @classmethod
    def _prepared(cls, response: httpx.Response) -> PreparedHandoff:
        data = cls._json_or_raise(response, 201)
        return PreparedHandoff(
            token=data["token"],
            redirect_url=data["redirectUrl"],
            expires_at=datetime.fromisoformat(data["expiresAt"]),
            expires_in=int(data["expiresIn"]),
        )

    @classmethod
    def _identity(cls, response: httpx.Response) -> Identity:
        data = cls._json_or_raise(response, 200)
        source: Literal["handoff", "generated"] = (
            "generated" if data.get("source") == "generated" else "handoff"
        )
        prepared_at = data.get("preparedAt")
        return Identity(
            anonymous_id=data["anonymousId"],
            user_id=data.get("userId"),
            traits=data.get("traits") or {},
            context=data.get("context") or {},
            consent=data.get("consent") or {},
            source=source,
            prepared_by=data.get("preparedBy"),
            prepared_at=datetime.fromisoformat(prepared_at) if prepared_at else None,
            destination=data.get("destination"),
        )

    @classmethod
    def _json_or_raise(cls, response: httpx.Response, expected: int) -> dict[str, Any]:
        if response.status_code == expected:
            try:
                data = response.json()
            except ValueError:
                data = None
            if isinstance(data, dict):
                return data
            raise APIError("the service's answer is not a JSON object", status=response.status_code)
        raise cls._error(response)

    @staticmethod
    def _error(response: httpx.Response) -> IdentityError:
        status = response.status_code
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            problem = {}
        type_ = problem.get("type") if isinstance(problem.get("type"), str) else None
        slug = type_.removeprefix(PROBLEM_PREFIX) if type_ else None
        error_class = PROBLEM_CLASSES.get(slug or "") or STATUS_CLASSES.get(status, APIError)
        title = problem.get("title") if isinstance(problem.get("title"), str) else None
        detail = problem.get("detail")
        if not isinstance(detail, str):
            detail = title or f"HTTP {status} {response.reason_phrase}".strip()
        kw: dict[str, Any] = {"status": status, "type": type_, "title": title}
        if issubclass(error_class, InvalidRequest):
            raw = problem.get("errors")
            kw["errors"] = [
                FieldError(str(item.get("field", "")), str(item.get("message", "")))
                for item in (raw if isinstance(raw, list) else [])
                if isinstance(item, dict)
            ]
        if issubclass(error_class, ServiceUnavailable | RateLimited):
            kw["retry_after"] = retry_after(response)
        return error_class(detail, **kw)

    # Retries (prepare only)

    def _retry_delay(self, attempt: int, after: float | None) -> float:
        """Seconds before retry ``attempt`` (0-based): Retry-After if sent, else exponential
        backoff with full jitter; both capped at ``backoff_max``."""
        if after is not None:
            return min(after, self.backoff_max) + random.uniform(0, self.backoff_base)  # noqa: S311
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))  # noqa: S311

    def _prepare_retry(
        self, attempt: int, outcome: httpx.Response | httpx.TransportError
    ) -> float | None:
        """Seconds to wait before retrying a prepare after ``outcome``, or None to stop there.

        A connection error that is out of retries is raised here, as a connection error.
        """
        if isinstance(outcome, httpx.TransportError):
            if attempt >= self.max_retries:
                raise self._connection_error(outcome, PREPARE_PATH) from outcome
            return self._retry_delay(attempt, None)
        if outcome.status_code != 503 or attempt >= self.max_retries:
            return None
        return self._retry_delay(attempt, retry_after(outcome))

    @staticmethod
    def _connection_error(exc: httpx.TransportError, path: str) -> IdentityConnectionError:
        what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        return IdentityConnectionError(f"POST {path} {what}: {type(exc).__name__}: {exc}")


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 0.0)
