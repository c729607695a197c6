"""Parsing and validation of request bodies into typed requests.

Each check adds a ``{"field", "message"}`` error; all of a body's errors are reported in
one ValidationFailed problem. Unknown fields are errors, so a misspelt ``anonymousID`` is
caught instead of silently dropped.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from identity_service.constants import (
    DEFAULT_TOKEN_PARAM,
    MAX_ID_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URL_LENGTH,
)
from identity_service.problems import MalformedJson, ValidationFailed
from identity_service.urls import UrlError, parse_destination

MAX_CONSENT_CATEGORIES = 64
MAX_CATEGORY_LENGTH = 64
# A problem names what the client sent only when it reads as a field name, and lists so
# many errors at most: a body of odd names must not come back larger, or as markup.
MAX_REPORTED_ERRORS = 20
_SHOWN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)

PREPARE_FIELDS = frozenset(
    {"anonymousId", "userId", "traits", "context", "consent", "destination", "ttl"}
)
EXCHANGE_FIELDS = frozenset({"token", "fallback", "event", "properties", "context"})
MAX_EVENT_NAME_LENGTH = 200
# orjson reads 1024 levels but writes only about 250; real traits or context nest a few.
MAX_JSON_DEPTH = 32


@dataclass(slots=True)  # not frozen: one a request, and frozen costs 3x the __init__
class PrepareRequest:
    anonymous_id: str | None
    user_id: str | None
    traits: dict[str, Any]
    context: dict[str, Any]
    consent: dict[str, bool]
    destination: str  # as browsers serialize it (WHATWG href): what the visitor will load
    origin: str
    ttl: int | None


@dataclass(slots=True)  # not frozen: one a request, and frozen costs 3x the __init__
class ExchangeRequest:
    token: str
    fallback: bool
    event: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)  # domain B's Segment context


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"the body could not be parsed: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise MalformedJson("the body must be a JSON object")
    # Fewer openers than the limit cannot nest deeper than it: the walk is rarely needed.
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and _nests_deeper(data):
        raise MalformedJson(f"the body nests objects and arrays over {MAX_JSON_DEPTH} deep")
    return data


def json_object_members(body: bytes) -> list[tuple[str, Any]]:
    """The members of a JSON object body in order, each repeat of a name kept.

    orjson keeps the last of repeated names and has no hook to see them; the standard
    library's parser has one, and reads the body here once ``parse_json_object`` accepted
    it, so the same limits hold (an object, nested at most ``MAX_JSON_DEPTH`` deep). It is
    slower: for bodies off the hot path. Nested objects are lists of members too.
    """
    parse_json_object(body)
    try:
        members: list[tuple[str, Any]] = json.loads(body.decode(), object_pairs_hook=list)
    except ValueError as exc:  # orjson read it: only where the two parsers differ
        raise MalformedJson("the body could not be parsed") from exc
    return members


def _nests_deeper(data: dict[str, Any], limit: int = MAX_JSON_DEPTH) -> bool:
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))
    return False


def shown_name(name: str) -> str:
    """``name`` as a problem may repeat it: itself if it reads as a field name."""
    return name if _SHOWN_NAME.fullmatch(name) else "(a name not shown)"


class _Checker:
    def __init__(self, data: dict[str, Any], allowed: frozenset[str]) -> None:
        self.data = data
        self.errors: list[dict[str, str]] = []
        for name in sorted(set(data) - allowed):
            self.fail(shown_name(name), "is not a known field")

    def fail(self, field: str, message: str) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"field": field, "message": message})
        elif len(self.errors) == MAX_REPORTED_ERRORS:
            self.errors.append({"field": "", "message": "more errors, not listed"})

    def string(self, field: str, max_length: int, required: bool = False) -> str | None:
        value = self.data.get(field)
        if value is None:
            if required:
                self.fail(field, "is required")
            return None
        if not isinstance(value, str):
            self.fail(field, "must be a string")
            return None
        if not value:
            self.fail(field, "must not be empty")
            return None
        if len(value) > max_length:
            self.fail(field, f"must be at most {max_length} characters")
            return None
        return value

    def obj(self, field: str) -> dict[str, Any]:
        value = self.data.get(field)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(field, "must be an object")
            return {}
        return value

    def raise_if_failed(self) -> None:
        if self.errors:
            raise ValidationFailed(self.errors)


def parse_prepare(
    data: dict[str, Any], max_ttl: int, token_param: str = DEFAULT_TOKEN_PARAM
) -> PrepareRequest:
    check = _Checker(data, PREPARE_FIELDS)
    anonymous_id = check.string("anonymousId", MAX_ID_LENGTH)
    user_id = check.string("userId", MAX_ID_LENGTH)
    if data.get("anonymousId") is None and data.get("userId") is None:
        check.fail("anonymousId", "is required unless userId is given")
    destination = check.string("destination", MAX_URL_LENGTH, required=True)
    origin = ""
    if destination is not None:
        try:
            url = parse_destination(destination, token_param=token_param)
            destination, origin = url.href, url.origin
        except UrlError as exc:
            check.fail("destination", str(exc))
    consent = check.obj("consent")
    if len(consent) > MAX_CONSENT_CATEGORIES:
        check.fail("consent", f"must have at most {MAX_CONSENT_CATEGORIES} categories")
    else:
        for category, allowed in consent.items():
            if len(category) > MAX_CATEGORY_LENGTH or not isinstance(allowed, bool):
                check.fail(
                    f"consent.{shown_name(category)}",
                    f"must be a true/false category of at most {MAX_CATEGORY_LENGTH} characters",
                )
    ttl = whole_number(data.get("ttl"))
    if ttl is False:
        check.fail("ttl", "must be a whole number of seconds")
        ttl = None
    elif ttl is not None and not 1 <= ttl <= max_ttl:
        check.fail("ttl", f"must be between 1 and {max_ttl} seconds")
        ttl = None
    request = PrepareRequest(
        anonymous_id=anonymous_id,
        user_id=user_id,
        traits=check.obj("traits"),
        context=check.obj("context"),
        consent=consent,
        destination=destination or "",
        origin=origin,
        ttl=ttl,
    )
    check.raise_if_failed()
    return request


def parse_exchange(data: dict[str, Any]) -> ExchangeRequest:
    check = _Checker(data, EXCHANGE_FIELDS)
    token = check.string("token", MAX_TOKEN_LENGTH, required=True)
    fallback = data.get("fallback", False)
    if not isinstance(fallback, bool):
        check.fail("fallback", "must be true or false")
    event = check.string("event", MAX_EVENT_NAME_LENGTH)
    properties = check.obj("properties")
    context = check.obj("context")
    check.raise_if_failed()
    return ExchangeRequest(
        token=token or "",
        fallback=fallback is True,
        event=event,
        properties=properties,
        context=context,
    )


def whole_number(value: Any) -> int | Literal[False] | None:
    """An integer as JSON Schema reads one (``1.0`` is 1), None if absent, False if not one."""
    if value is None:
        return None
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return False
