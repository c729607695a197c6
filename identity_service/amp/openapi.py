"""The AMP endpoints in the OpenAPI document, when ``[amp]`` is configured (docs/amp.md).

Built once, with the rest of the document (openapi.py), from the ``[amp]`` settings: the
origins an ``Origin`` may be and ``Access-Control-Allow-Origin`` echoes, the configured
actions, the visitor cookie the answers set, collect's answer (``204``, or ``302`` to
``collect_redirect``) and where the origin hop leads. Every answer says ``Vary: Origin``;
every operation lists the front's refusals as the others do.
"""

import re
from collections.abc import Iterable
from typing import Any

from identity_service.amp import cookies, cors, links
from identity_service.amp.collect import CLIENT_ID, CONSENT, EVENT, MAX_VALUE_LENGTH, PAGE_FIELDS
from identity_service.amp.config import AmpSettings
from identity_service.amp.forms import MAX_NAME_LENGTH
from identity_service.amp.forms import MAX_VALUE_LENGTH as MAX_FIELD_LENGTH
from identity_service.openapi import (
    FRONT_RESPONSES,
    TOKEN_PATTERN,
    problem_answer,
    ref,
    with_front_refusals,
)
from identity_service.problems import FORM_BODY_TYPES, HIT_BODY_TYPES

_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"
_CORS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Expose-Headers",
)
# What an answer to a request from an allowed Origin carries; Vary on every answer.
_ALLOWED = ("Vary", *_CORS)
# The front's refusals on an AMP path say Vary: Origin too: their components' prefix.
_REFUSALS = "AmpPath"
_PREFLIGHT_HEADERS = (
    *_ALLOWED,
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Max-Age",
)


def amp_paths(amp: AmpSettings) -> dict[str, Any]:
    """The ``/v1/amp/*`` operations of a service whose ``[amp]`` settings are ``amp``."""
    collect_answer = (
        {"302": _answer("Recorded; on to collect_redirect", (*_ALLOWED, "Set-Cookie", "Location"))}
        if amp.collect_redirect
        else {"204": _answer("Recorded", (*_ALLOWED, "Set-Cookie"))}
    )
    collect = {
        "parameters": [*_ORIGIN_PARAMETERS, _cookie_parameter(amp), *_HIT_PARAMETERS],
        "responses": {
            **collect_answer,
            "400": _problem(
                "malformed-json (a JSON body), or validation-failed: an event or a page field "
                f"over {MAX_VALUE_LENGTH} characters or with control characters"
            ),
            "413": _problem(
                "payload-too-large: the query or the body over max_form_bytes, or over "
                "max_form_fields parameters; or event-too-large: the event would be over 32 KB"
            ),
            "415": _problem(
                "unsupported-media-type: a body neither a form nor JSON (Accept-Post names "
                "those taken)",
                ("Vary", "Accept-Post"),
                {"Accept-Post": "AcceptPostHit"},
            ),
            **_refusals(("Vary",)),
        },
    }
    action = {"$ref": "#/components/parameters/ActionName"}
    paths: dict[str, Any] = {
        "/v1/amp/collect": {
            "options": _preflight("collect"),
            "get": {
                **collect,
                "operationId": "ampCollect",
                "summary": "An amp-analytics hit as an image or a GET beacon",
                "description": _COLLECT_DESCRIPTION,
            },
            "post": {
                **collect,
                "operationId": "ampCollectPost",
                "summary": "An amp-analytics hit as a beacon or xhrpost",
                "description": _COLLECT_DESCRIPTION
                + " The body's parameters win over the query's.",
                "requestBody": {
                    "required": False,
                    "content": {
                        _FORM: {"schema": _HIT_FORM},
                        _JSON: {"schema": _HIT_JSON},
                        # A JSON object, as sendBeacon sends a string.
                        "text/plain": {
                            "schema": {
                                "type": "string",
                                "contentMediaType": _JSON,
                                "contentSchema": _HIT_JSON,
                            }
                        },
                    },
                },
            },
        },
        "/v1/amp/actions/{name}": {
            "parameters": [action],
            # An unknown name's preflight is its POST's 404.
            "options": _preflight("actions", {"404": _UNKNOWN_ACTION}),
            "post": {
                "operationId": "ampSubmitAction",
                "summary": "An amp-form action-xhr submission",
                "description": (
                    "From a publisher origin, or with the visitor cookie, the action is applied "
                    "through its webhook (applied), or queued for the outbox when the webhook "
                    "failed for a transient reason (queued, 202). From a cache without the "
                    "cookie, the fields are kept under a one-time token and the answer sends "
                    "the top window to the complete URL on the publisher's origin "
                    "(redirecting, with AMP-Redirect-To)."
                ),
                "parameters": [
                    *_ORIGIN_PARAMETERS,
                    _cookie_parameter(amp),
                    _SOURCE_ORIGIN,
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        # A multipart body has one part at least (RFC 2046, 5.1.1).
                        _MULTIPART: {"schema": {**_form_schema(amp), "minProperties": 1}},
                        _FORM: {"schema": _form_schema(amp)},
                        _JSON: {"schema": _form_schema(amp)},
                    },
                },
                "responses": {
                    "200": _answer(
                        "applied; or redirecting, with AMP-Redirect-To (a cache page without "
                        "the cookie)",
                        (*_ALLOWED, "Set-Cookie", "AMP-Redirect-To"),
                        ref("AmpActionStatus"),
                    ),
                    "202": _answer(
                        "queued: the webhook failed for a transient reason within the bounded "
                        "wait; the outbox retries the same call",
                        (*_ALLOWED, "Set-Cookie"),
                        ref("AmpActionStatus"),
                    ),
                    "400": _problem(
                        "malformed-form: a form two readers could read apart, a file, a field "
                        "name twice, a multipart head over the parse bounds (docs/amp.md); "
                        "or malformed-json",
                        _ALLOWED,
                    ),
                    "404": _UNKNOWN_ACTION,
                    "413": _problem(
                        "payload-too-large: the form over max_form_bytes or max_form_fields",
                        _ALLOWED,
                    ),
                    "415": _problem(
                        "unsupported-form-type: the body is not a form (Accept-Post names "
                        "those taken)",
                        (*_ALLOWED, "Accept-Post"),
                        {"Accept-Post": "AcceptPostForm"},
                    ),
                    "502": _problem(
                        "action-not-applied: the webhook refused the action (or the outbox is off)",
                        _ALLOWED,
                    ),
                    **_refusals(_ALLOWED),
                },
            },
        },
        "/v1/amp/actions/{name}/complete": {
            "parameters": [action],
            "get": {
                "operationId": "ampCompleteAction",
                "summary": "The origin hop's landing: a top-level navigation to the publisher",
                "description": (
                    "Takes the token once and applies its action (or queues it), then 303 to "
                    "the action's done_url. A used, expired, unknown or foreign token, and a "
                    "request that is no top-level navigation (Sec-Fetch-Dest other than "
                    "document), land there with nothing applied. One landing of a hop at a "
                    "time calls the webhook: another landing at the same moment waits for its "
                    "outcome (at most as long as its lease has left), then lands on done_url "
                    "with nothing applied, or applies the action itself if that landing failed "
                    "and left the token usable."
                ),
                "parameters": [
                    _cookie_parameter(amp),
                    {
                        "name": "token",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "The one-time token of AMP-Redirect-To; without it, as "
                        "with any token that opens nothing, the visitor lands on done_url with "
                        "nothing applied.",
                    },
                    *(
                        {"name": name, "in": "header", "schema": {"type": "string"}}
                        for name in ("Sec-Fetch-Dest", "Sec-Fetch-Mode")
                    ),
                ],
                "responses": {
                    "303": _answer("To the action's done_url", ("Vary", "Set-Cookie", "Location")),
                    "404": _problem("unknown-action: no action of that name", ("Vary",)),
                    "429": _problem(_RATE_LIMITED, ("Vary", "Retry-After")),
                    "502": _problem(
                        "action-not-applied: the webhook refused the action (the token is used up)",
                        ("Vary", "Set-Cookie"),
                    ),
                    "503": _problem(
                        f"{_STORE_DOWN}; or action-in-progress: another landing of this hop "
                        "still holds its lease after this one waited for it",
                        ("Vary", "Set-Cookie", "Retry-After"),
                    ),
                },
            },
        },
    }
    return {
        path: {
            method: (
                {**operation, "responses": with_front_refusals(operation["responses"], _REFUSALS)}
                if method != "parameters"  # what a path's operations share
                else operation
            )
            for method, operation in item.items()
        }
        for path, item in paths.items()
    }


def amp_components(amp: AmpSettings) -> dict[str, dict[str, Any]]:
    """The components the AMP operations refer to, by section (schemas, headers...)."""
    example = cookies.set_cookie("\0", amp.cookie)
    before, _, after = example.partition("\0")
    actions = sorted(amp.actions)
    locations = sorted(
        {action.done_url for action in amp.actions.values()}
        | ({amp.collect_redirect} if amp.collect_redirect else set())
    )
    return {
        "responses": {
            f"{_REFUSALS}{name}": {
                **answer,
                "headers": {**answer.get("headers", {}), **_header_refs(("Vary",))},
            }
            for name, answer in FRONT_RESPONSES.items()
        },
        "schemas": {
            "AmpAllowedOrigin": {
                "enum": sorted(amp.allowed_origins),
                "description": "The publisher origins and their AMP cache origins.",
            },
            "AmpPublisherOrigin": {"enum": sorted(amp.publisher_origins)},
            "AmpActionStatus": {
                "type": "object",
                "additionalProperties": False,
                "required": ["status"],
                "properties": {"status": {"enum": ["applied", "redirecting", "queued"]}},
            },
        },
        "parameters": {
            "ActionName": {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": actions} if actions else {"type": "string"},
                "description": "A configured action ([amp.actions]).",
            }
        },
        "headers": {
            "Vary": {
                "description": "Origin, on every AMP answer (a preflight's names its "
                "Access-Control-Request-* too).",
                "schema": {"type": "string", "pattern": "^Origin(, |$)"},
            },
            "Access-Control-Allow-Origin": {
                "description": "The request's Origin when it is allowed (never *); absent "
                "without an Origin.",
                "schema": ref("AmpAllowedOrigin"),
            },
            "Access-Control-Allow-Credentials": {"schema": {"const": "true"}},
            "Access-Control-Expose-Headers": {"schema": {"const": "AMP-Redirect-To"}},
            "Access-Control-Allow-Methods": {"schema": {"const": ", ".join(cors.ALLOWED_METHODS)}},
            "Access-Control-Allow-Headers": {
                "description": "The requested headers among those allowed.",
                "schema": {
                    "type": "string",
                    "pattern": f"^({_names(cors.ALLOWED_REQUEST_HEADERS)})"
                    f"(, ({_names(cors.ALLOWED_REQUEST_HEADERS)}))*$",
                },
            },
            "Access-Control-Max-Age": {
                "schema": {"type": "integer", "const": cors.PREFLIGHT_MAX_AGE}
            },
            "Set-Cookie": {
                "description": f"A new visitor id in the {amp.cookie.name} cookie, only when "
                "the request carried none it could use (never an id the request sent).",
                "schema": {
                    "type": "string",
                    "pattern": f"^{re.escape(before)}[0-9a-f-]{{36}}{re.escape(after)}$",
                },
            },
            "AMP-Redirect-To": {
                "description": "The complete URL of the origin hop, under public_url.",
                "schema": {
                    "type": "string",
                    "pattern": f"^{re.escape(amp.public_url)}/v1/amp/actions/"
                    f"({_names(actions)})/complete\\?token={TOKEN_PATTERN}$",
                },
            },
            "Location": {
                "description": "An action's done_url, or collect_redirect.",
                "schema": {"enum": locations} if locations else {"type": "string"},
            },
            "AcceptPostHit": {
                "description": "With unsupported-media-type: the media types a hit takes.",
                "schema": {"const": HIT_BODY_TYPES},
            },
            "AcceptPostForm": {
                "description": "With unsupported-form-type: the media types a form takes.",
                "schema": {"const": FORM_BODY_TYPES},
            },
        },
    }


def _names(names: Iterable[str]) -> str:
    """An alternation of ``names`` for a pattern."""
    return "|".join(re.escape(name) for name in sorted(names))


def _answer(
    description: str, headers: tuple[str, ...], schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "headers": _header_refs(headers)}
    if schema is not None:
        answer["content"] = {_JSON: {"schema": schema}}
    return answer


def _problem(
    description: str, headers: tuple[str, ...] = ("Vary",), named: dict[str, str] | None = None
) -> dict[str, Any]:
    """A problem answer with ``headers``; ``named`` maps a header to its component when
    the two names differ (the AMP 415s' Accept-Post)."""
    return {**problem_answer(description), "headers": _header_refs(headers, named)}


def _header_refs(
    headers: tuple[str, ...], named: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    components = named or {}
    return {h: {"$ref": f"#/components/headers/{components.get(h, h)}"} for h in headers}


def _cookie_parameter(amp: AmpSettings) -> dict[str, Any]:
    return {
        "name": amp.cookie.name,
        "in": "cookie",
        "schema": {"type": "string"},
        "description": "The visitor cookie (analytics.js's anonymousId): the visitor's id.",
    }


def _preflight(endpoint: str, refusals: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preflight of ``endpoint``; ``refusals``: its answers beyond the origin's 403."""
    return {
        "operationId": f"ampPreflight{endpoint.title()}",
        "summary": "CORS preflight, answered for the allowed origins only",
        "parameters": [
            {
                "name": "Origin",
                "in": "header",
                "required": True,
                "schema": ref("AmpAllowedOrigin"),
                "description": "A publisher origin or one of its AMP cache origins; any "
                "other is refused (403).",
            },
            {"name": "Access-Control-Request-Method", "in": "header", "schema": {"type": "string"}},
            {
                "name": "Access-Control-Request-Headers",
                "in": "header",
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "204": _answer("Allowed", _PREFLIGHT_HEADERS),
            "403": _problem(_ORIGIN_REFUSED),
            **(refusals or {}),
        },
    }


def _form_schema(amp: AmpSettings) -> dict[str, Any]:
    return {
        "type": "object",
        "maxProperties": amp.max_form_fields,
        "propertyNames": {"minLength": 1, "maxLength": MAX_NAME_LENGTH},
        "additionalProperties": {"type": "string", "maxLength": MAX_FIELD_LENGTH},
        "properties": {
            "clientId": {
                "type": "string",
                "description": "AMP's clientId (CLIENT_ID(<cookie name>)): linked to the "
                "visitor, not passed to the webhook.",
            },
            "consent": {
                "type": "string",
                "description": "amp-consent's CONSENT_STATE: insufficient records no link "
                "(the action is still applied); not passed to the webhook.",
            },
        },
        "description": "The form's fields, strings, each name once; no file.",
    }


_ORIGIN_REFUSED = (
    "amp-origin-not-allowed: an Origin that is neither a publisher origin nor one of its "
    "cache origins, neither Origin nor AMP-Same-Origin: true (but collect's image pixel), "
    "or an __amp_source_origin that is no publisher origin or repeats"
)
# An unknown name's answer to a POST or a preflight from an allowed Origin.
_UNKNOWN_ACTION = _problem("unknown-action: no action of that name", _ALLOWED)
_RATE_LIMITED = "rate-limited: too many requests from the client address or AMP clientId"
_STORE_DOWN = "service-unavailable: the store is down or too slow"


def _refusals(headers: tuple[str, ...]) -> dict[str, Any]:
    """The 403 (before any CORS header is earned: Vary alone), 429 and 503 of collect and
    a submission; ``headers``: those of their answers once the origin is allowed."""
    return {
        "403": _problem(_ORIGIN_REFUSED),
        "429": _problem(_RATE_LIMITED, (*headers, "Retry-After")),
        "503": _problem(_STORE_DOWN, (*headers, "Retry-After")),
    }


_SOURCE_ORIGIN = {
    "name": cors.SOURCE_ORIGIN_PARAM,
    "in": "query",
    "schema": ref("AmpPublisherOrigin"),
    "description": "Added by the AMP runtime; when present, once, a publisher origin (else 403).",
}
_ORIGIN_PARAMETERS = [
    {
        "name": "Origin",
        "in": "header",
        "schema": ref("AmpAllowedOrigin"),
        "description": "Sent by browsers on a cross-origin request: a publisher origin or one "
        "of its AMP cache origins (any other is refused), echoed in "
        "Access-Control-Allow-Origin.",
    },
    {
        "name": cors.SAME_ORIGIN_HEADER,
        "in": "header",
        "schema": {"const": "true"},
        "description": "Sent by the AMP runtime on the publisher's own page (no Origin).",
    },
]
# An event name or a page field: no control characters (C0, DEL, C1), as collect reads them.
_TEXT = {"type": "string", "maxLength": MAX_VALUE_LENGTH, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}
_HIT_FIELDS: dict[str, Any] = {
    CLIENT_ID: {
        "type": "string",
        "description": "${clientId(<cookie name>)}: AMP's clientId (1 to "
        f"{links.MAX_CLIENT_ID_LENGTH} visible ASCII characters; any other is none).",
    },
    EVENT: {**_TEXT, "description": "A track call's name; without it, a page call."},
    CONSENT: {
        "type": "string",
        "description": "${CONSENT_STATE}: insufficient emits nothing, sets no cookie, links "
        "nothing.",
    },
    **{name: {**_TEXT, "description": "A page field."} for name in PAGE_FIELDS},
    cors.SOURCE_ORIGIN_PARAM: _SOURCE_ORIGIN["schema"],
}
_HIT_PARAMETERS = [
    {"name": name, "in": "query", "schema": schema} for name, schema in _HIT_FIELDS.items()
]
_HIT_FORM = {
    "type": "object",
    "properties": _HIT_FIELDS,
    "additionalProperties": {"type": "string"},
}
_HIT_JSON = {"type": "object", "properties": _HIT_FIELDS}
_COLLECT_DESCRIPTION = (
    "Records a page call (a track call with event) for the visitor: the cookie's id, the "
    "visitor a cache clientId is linked to, the clientId itself, or a new id offered in "
    "Set-Cookie. Any other parameter is an event property."
)
