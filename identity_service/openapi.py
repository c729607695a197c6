"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Every operation lists the front's refusals (front.py), which any request may get before it
is routed, as the shared responses of the components where it has no answer of their
status of its own.

tests/test_openapi.py checks real answers against it, and that it and the validation agree;
tests/test_schemathesis.py runs schemathesis with every check against the live service.
"""

from typing import TYPE_CHECKING, Any

import orjson

from identity_service import __version__
from identity_service.constants import (
    DEFAULT_MAX_TTL_SECONDS,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_ID_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URL_LENGTH,
)
from identity_service.problems import (
    ACCEPTED_BODY_TYPE,
    ACCEPTED_CONTENT_CODINGS,
    ExpectationFailed,
    HeadTooLarge,
    MalformedRequest,
    PayloadTooLarge,
    Problem,
    RequestTimeout,
    ServiceUnavailable,
    TransferCodingNotImplemented,
    UnsupportedContentEncoding,
)
from identity_service.validation import (
    MAX_CATEGORY_LENGTH,
    MAX_CONSENT_CATEGORIES,
    MAX_EVENT_NAME_LENGTH,
)

if TYPE_CHECKING:
    from identity_service.amp.config import AmpSettings

_JSON = "application/json"
_PROBLEM = "application/problem+json"
# A token as the service hands it out (crypto.Token.text): 32 bytes in unpadded base64url.
TOKEN_PATTERN = "[A-Za-z0-9_-]{43}"  # noqa: S105 - a pattern, no secret


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def problem_answer(description: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {_PROBLEM: {"schema": ref("Problem")}},
    }
    if headers:
        answer["headers"] = {h: {"$ref": f"#/components/headers/{h}"} for h in headers}
    return answer


def _handoff_problems(too_large: str) -> dict[str, Any]:
    """The problems both handoff endpoints answer besides the front's refusals;
    ``too_large`` says what their own 413 means."""
    return {
        "400": problem_answer("malformed-json, or validation-failed with one error a field"),
        "401": problem_answer(
            "unauthorized: no, malformed or unknown write key", ("WWW-Authenticate",)
        ),
        "413": problem_answer(too_large),
        "415": problem_answer(
            "unsupported-media-type: the body is not application/json (Accept-Post names it)",
            ("Accept-Post",),
        ),
        "503": problem_answer(
            "service-unavailable: the store is down or too slow", ("Retry-After",)
        ),
    }


# The front's refusals (front.py): answered before any route is found, so answers of every
# operation. Component name, problem, when, headers; one problem a status.
_FRONT_REFUSALS: tuple[tuple[str, type[Problem], str, tuple[str, ...]], ...] = (
    (
        "MalformedRequest",
        MalformedRequest,
        "the request is not valid HTTP/1.1 as llhttp reads it in its strict mode, or its "
        "body not valid in its content coding (docs/api.md lists the rules)",
        (),
    ),
    (
        "RequestTimeout",
        RequestTimeout,
        "the head did not arrive within IDENTITY_HEAD_TIMEOUT, or the body within "
        "IDENTITY_BODY_TIMEOUT, of its first byte",
        (),
    ),
    (
        "PayloadTooLarge",
        PayloadTooLarge,
        "the body is over IDENTITY_MAX_BODY_BYTES, as sent or once decoded",
        (),
    ),
    (
        "UnsupportedContentEncoding",
        UnsupportedContentEncoding,
        "the Content-Encoding is none of gzip, x-gzip, deflate and identity "
        "(Accept-Encoding names those taken)",
        ("Accept-Encoding",),
    ),
    ("ExpectationFailed", ExpectationFailed, "an Expect other than 100-continue", ()),
    (
        "HeadTooLarge",
        HeadTooLarge,
        f"a head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields",
        (),
    ),
    (
        "TransferCodingNotImplemented",
        TransferCodingNotImplemented,
        "a transfer coding before chunked, the only one served",
        (),
    ),
    (
        "TooManyConnections",
        ServiceUnavailable,
        "the process holds IDENTITY_MAX_CONNECTIONS connections; answered before the "
        "request is read",
        ("Retry-After",),
    ),
)
FRONT_RESPONSES: dict[str, Any] = {
    name: problem_answer(f"{problem.slug}: {when}; the connection closes", headers)
    for name, problem, when, headers in _FRONT_REFUSALS
}


def with_front_refusals(responses: dict[str, Any], variant: str = "") -> dict[str, Any]:
    """An operation's ``responses`` and the front's refusals: shared (a reference) where it
    has no answer of their status, else joined to its own (a reference cannot be).
    ``variant``: the prefix of the shared refusals' names, for paths whose refusals carry
    more headers (AMP's, amp/openapi.py)."""
    joined = dict(responses)
    for name, problem, _, _ in _FRONT_REFUSALS:
        status, refusal = str(problem.status), FRONT_RESPONSES[name]
        own = joined.get(status)
        if own is None:
            joined[status] = {"$ref": f"#/components/responses/{variant}{name}"}
            continue
        own = {**own, "description": f"{own['description']}; or {refusal['description']}"}
        headers = {**own.get("headers", {}), **refusal.get("headers", {})}
        joined[status] = {**own, "headers": headers} if headers else own
    return dict(sorted(joined.items()))


_IDENTITY_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}
# A field sent as null counts as absent (Segment libraries send "userId": null).
_NULLABLE_OBJECT = {"type": ["object", "null"]}
_CONTEXT_DESCRIPTION = "A Segment context object (page, ip, userAgent, locale...)."

# Destinations the service accepts, as far as a regular expression can say it: https (http
# for localhost), a host name of at most three labels (the last one starting with a letter,
# so that no browser reads an IP address; no "--", so no xn-- label), an optional port,
# then a path of characters that browsers do not re-encode (RFC 3986's but "'"): what
# browsers serialize is never longer than what was sent (without a path they add a "/",
# which could take a 2048-character destination over the limit). The service accepts
# more (urls.py); what this admits, it accepts. The path is one flat character class:
# nested repetitions there make schemathesis take seconds per generated case.
_LABEL = "[A-Za-z0-9]{1,20}(-[A-Za-z0-9]{1,20}){0,2}"
_TOP_LABEL = "[A-Za-z][A-Za-z0-9]{0,19}(-[A-Za-z0-9]{1,20}){0,2}"
_PORT = "(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
DESTINATION_PATTERN = (
    f"^(https://({_LABEL}[.]){{0,2}}{_TOP_LABEL}|http://({_LABEL}[.]){{0,2}}localhost){_PORT}"
    "(/[-A-Za-z0-9._~!$&()*+,;=:@/?#%]*)?$"
)


def _prepare_request(max_ttl: int) -> dict[str, Any]:
    """The prepare body's schema; ``max_ttl``: the service's IDENTITY_MAX_TTL."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["destination"],
        "anyOf": [
            {"required": ["anonymousId"], "properties": {"anonymousId": {"type": "string"}}},
            {"required": ["userId"], "properties": {"userId": {"type": "string"}}},
        ],
        "properties": {
            "anonymousId": {
                **_IDENTITY_STRING,
                "type": ["string", "null"],
                "description": "Required unless userId is given.",
            },
            "userId": {**_IDENTITY_STRING, "type": ["string", "null"]},
            "traits": {**_NULLABLE_OBJECT, "description": "Sent in the identify, with a userId."},
            "context": {
                **_NULLABLE_OBJECT,
                "description": f"{_CONTEXT_DESCRIPTION} Domain A's: the started event's.",
            },
            "consent": {
                **_NULLABLE_OBJECT,
                "maxProperties": MAX_CONSENT_CATEGORIES,
                "propertyNames": {"maxLength": MAX_CATEGORY_LENGTH},
                "additionalProperties": {"type": "boolean"},
                "description": "Category to true or false; analytics: false emits no events.",
            },
            "destination": {
                "type": "string",
                "maxLength": MAX_URL_LENGTH,
                "pattern": DESTINATION_PATTERN,
                "description": (
                    "Absolute https URL on domain B (http for localhost), without the token "
                    "parameter; its origin must be one of the source's. The pattern is a "
                    "safe subset: docs/api.md has the whole rule."
                ),
            },
            "ttl": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": max_ttl,
                "description": (
                    "Seconds, at most this service's IDENTITY_MAX_TTL; absent or null: its "
                    "IDENTITY_DEFAULT_TTL."
                ),
            },
        },
    }


_SCHEMAS: dict[str, Any] = {
    "PreparedHandoff": {
        "type": "object",
        "additionalProperties": False,
        "required": ["token", "expiresIn", "expiresAt", "redirectUrl"],
        "properties": {
            "token": {"type": "string", "pattern": f"^{TOKEN_PATTERN}$"},
            "expiresIn": {"type": "integer", "minimum": 1},
            "expiresAt": {"type": "string", "format": "date-time"},
            "redirectUrl": {
                "type": "string",
                "description": (
                    "The destination as browsers serialize it (a WHATWG URL, which may keep "
                    "what RFC 3986 would escape, such as a lone %), with the token parameter "
                    "added to its query."
                ),
            },
        },
    },
    "ExchangeRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["token"],
        "properties": {
            "token": {"type": "string", "minLength": 1, "maxLength": MAX_TOKEN_LENGTH},
            "fallback": {
                "type": "boolean",
                "default": False,
                "description": "Answer a generated anonymousId instead of 404 on a miss.",
            },
            "event": {
                "type": ["string", "null"],
                "minLength": 1,
                "maxLength": MAX_EVENT_NAME_LENGTH,
                "description": "Name of domain B's completion track (default configurable).",
            },
            "properties": {**_NULLABLE_OBJECT, "description": "Added to that track."},
            "context": {
                **_NULLABLE_OBJECT,
                "description": (
                    f"{_CONTEXT_DESCRIPTION} Domain B's: the completion and identify events'."
                ),
            },
        },
    },
    "Identity": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "anonymousId",
            "userId",
            "traits",
            "context",
            "consent",
            "source",
            "preparedBy",
            "preparedAt",
            "destination",
        ],
        "properties": {
            "anonymousId": {"type": ["string", "null"]},
            "userId": {"type": ["string", "null"]},
            "traits": {"type": "object"},
            "context": {"type": "object"},
            "consent": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "source": {
                "enum": ["handoff", "generated"],
                "description": "generated: the token could not be exchanged (fallback).",
            },
            "preparedBy": {"type": ["string", "null"]},
            "preparedAt": {"type": ["string", "null"], "format": "date-time"},
            "destination": {
                "type": ["string", "null"],
                "description": "The destination as browsers serialize it (WHATWG URL).",
            },
        },
    },
    "Problem": {
        "type": "object",
        # No instance in the HTTP front's refusals (malformed-request, ...), which repeat
        # nothing of the request (docs/api.md).
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {
                "type": "string",
                "description": "The path of the route the request was sent to, when it is "
                "a fixed path, as the service spells it (never the path as sent); absent "
                "when no route serves the path (404), from an AMP action's answers (its "
                "path holds the name the client chose) and from the answers to requests "
                "that break HTTP/1.1 or the front's limits.",
            },
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}


def _json_body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": ref(schema)}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": ref(schema)}}}


_OPERATIONS: dict[str, Any] = {
    "/v1/handoffs": {
        "post": {
            "operationId": "prepareHandoff",
            "summary": "Keep an identity under a one-time token (domain A's backend)",
            "security": [{"writeKeyBasic": []}, {"writeKeyBearer": []}],
            "requestBody": _json_body("PrepareRequest"),
            "responses": {
                "201": _ok("The token and the redirect URL", "PreparedHandoff"),
                "403": problem_answer(
                    "destination-not-allowed: the destination's origin is not the source's"
                ),
                **_handoff_problems(
                    "event-too-large: the started track, or the identify with the traits, "
                    "would be over 32 KB as sent; nothing is stored"
                ),
            },
        }
    },
    "/v1/handoffs/exchange": {
        "post": {
            "operationId": "exchangeHandoff",
            "summary": "Exchange a token for the identity, once (domain B's backend)",
            "security": [{"writeKeyBasic": []}, {"writeKeyBearer": []}],
            "requestBody": _json_body("ExchangeRequest"),
            "responses": {
                "200": _ok("The identity (or a generated one, with fallback)", "Identity"),
                "403": problem_answer(
                    "audience-mismatch: the handoff was bound to an origin this source may "
                    "not receive; the token is used up"
                ),
                "404": problem_answer(
                    "token-not-found: the token is unknown, expired or already used"
                ),
                **_handoff_problems(
                    "event-too-large: the properties or the context would take domain B's "
                    "completion track or identify over 32 KB as sent; the token stays unused"
                ),
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "The process is alive",
            "responses": {"200": _ok("Alive", "Status")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "ready",
            "summary": "The store is reachable",
            "responses": {
                "200": _ok("Ready", "Status"),
                "503": problem_answer("The store is unreachable", ("Retry-After",)),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Counters in the Prometheus text format",
            "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {}}}}
            },
        }
    },
    "/v1/identity.js": {
        "get": {
            "operationId": "browserHelper",
            "summary": "The browser helper script (docs/sdk.md): links out on domain A, lands on B",
            "description": (
                "Static, versioned and cacheable (Cache-Control: public, max-age=3600) with a "
                "strong ETag; If-None-Match with the current tag answers 304. A `v` query "
                "parameter (the version the page expects) is ignored."
            ),
            "responses": {
                "200": {
                    "description": "The script",
                    "headers": {"ETag": {"$ref": "#/components/headers/ETag"}},
                    "content": {"text/javascript": {"schema": {"type": "string"}}},
                },
                "304": {
                    "description": "Not modified: If-None-Match names the current tag",
                    "headers": {"ETag": {"$ref": "#/components/headers/ETag"}},
                },
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {}}}}
            },
        }
    },
}

_PATHS: dict[str, Any] = {
    path: {
        method: {**operation, "responses": with_front_refusals(operation["responses"])}
        for method, operation in item.items()
    }
    for path, item in _OPERATIONS.items()
}
_HEADERS: dict[str, Any] = {
    "WWW-Authenticate": {"schema": {"type": "string"}},
    "Retry-After": {"schema": {"type": "integer"}},
    "Accept-Post": {
        "description": "With unsupported-media-type: the media type the endpoint takes.",
        "schema": {"const": ACCEPTED_BODY_TYPE},
    },
    "Accept-Encoding": {
        "description": (
            "With unsupported-content-encoding (RFC 9110, 12.5.3): the content codings a "
            "request body may be sent in."
        ),
        "schema": {"const": ACCEPTED_CONTENT_CODINGS},
    },
    "ETag": {"schema": {"type": "string"}},
}
_SECURITY_SCHEMES: dict[str, Any] = {
    "writeKeyBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "The source's write key as the user name, empty password.",
    },
    "writeKeyBearer": {"type": "http", "scheme": "bearer"},
}
_COMPONENTS: dict[str, dict[str, Any]] = {
    "schemas": _SCHEMAS,
    "responses": FRONT_RESPONSES,
    "headers": _HEADERS,
    "securitySchemes": _SECURITY_SCHEMES,
}


def openapi_dict(
    max_ttl: int = DEFAULT_MAX_TTL_SECONDS,
    amp: "AmpSettings | None" = None,
    metrics: bool = True,
) -> dict[str, Any]:
    """The document of a service whose IDENTITY_MAX_TTL is ``max_ttl``, with the AMP
    endpoints when ``amp`` (its ``[amp]`` settings) is given, and /metrics when ``metrics``
    (false: IDENTITY_METRICS_PORT serves it, on a port this document does not describe)."""
    paths = _PATHS if metrics else {p: item for p, item in _PATHS.items() if p != "/metrics"}
    components = _COMPONENTS
    if amp is not None:
        # Imported here, as app.py does, so a service without [amp] does not load it.
        from identity_service.amp.openapi import amp_components, amp_paths

        paths = {**paths, **amp_paths(amp)}
        added = amp_components(amp)
        components = {
            section: {**components.get(section, {}), **added.get(section, {})}
            for section in [*components, *(name for name in added if name not in components)]
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "identity-service",
            "version": __version__,
            "description": (
                "One-time handoff tokens that carry a visitor's identity across domains."
            ),
        },
        "paths": paths,
        "components": {
            **components,
            "schemas": {"PrepareRequest": _prepare_request(max_ttl), **components["schemas"]},
        },
    }


def openapi_document(
    max_ttl: int = DEFAULT_MAX_TTL_SECONDS, amp: "AmpSettings | None" = None, metrics: bool = True
) -> bytes:
    """:func:`openapi_dict` as served; built once, when the app is (app.py)."""
    return orjson.dumps(openapi_dict(max_ttl, amp, metrics))
