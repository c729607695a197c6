"""The OpenAPI 3.1 description of the HTTP API. tests/test_openapi.py checks real answers."""

import functools
from typing import Any

import orjson

from identity_service import __version__
from identity_service.constants import (
    DEFAULT_MAX_TTL_SECONDS,
    MAX_ID_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URL_LENGTH,
)

_JSON = "application/json"
_PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, headers: tuple[str, ...] = ()) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {_PROBLEM: {"schema": _ref("Problem")}},
    }
    if headers:
        answer["headers"] = {h: {"$ref": f"#/components/headers/{h}"} for h in headers}
    return answer


_COMMON_PROBLEMS = {
    "400": _problem("Malformed JSON or a body that failed validation"),
    "401": _problem("Missing or wrong write key", ("WWW-Authenticate",)),
    "413": _problem("Body over the size limit, or an event over 32 KB"),
    "415": _problem("Body is not application/json"),
    "503": _problem("The store is unavailable", ("Retry-After",)),
}

_IDENTITY_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}

_SCHEMAS: dict[str, Any] = {
    "PrepareRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["destination"],
        "properties": {
            "anonymousId": {**_IDENTITY_STRING, "description": "Required unless userId is given."},
            "userId": _IDENTITY_STRING,
            "traits": {"type": "object"},
            "context": {"type": "object", "description": "A Segment context object."},
            "consent": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "destination": {
                "type": "string",
                "format": "uri",
                "maxLength": MAX_URL_LENGTH,
                "description": "Absolute https URL on domain B; its origin must be allowed.",
            },
            "ttl": {
                "type": "integer",
                "minimum": 1,
                "maximum": DEFAULT_MAX_TTL_SECONDS,
                "description": "Seconds; the maximum is configurable (IDENTITY_MAX_TTL).",
            },
        },
    },
    "PreparedHandoff": {
        "type": "object",
        "additionalProperties": False,
        "required": ["token", "expiresIn", "expiresAt", "redirectUrl"],
        "properties": {
            "token": {"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"},
            "expiresIn": {"type": "integer", "minimum": 1},
            "expiresAt": {"type": "string", "format": "date-time"},
            "redirectUrl": {"type": "string", "format": "uri"},
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
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "Name of domain B's completion track (default configurable).",
            },
            "properties": {"type": "object", "description": "Added to that track."},
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
            "destination": {"type": ["string", "null"]},
        },
    },
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail", "instance"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
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
    return {"required": True, "content": {_JSON: {"schema": _ref(schema)}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


_PATHS: dict[str, Any] = {
    "/v1/handoffs": {
        "post": {
            "operationId": "prepareHandoff",
            "summary": "Keep an identity under a one-time token (domain A's backend)",
            "security": [{"writeKeyBasic": []}, {"writeKeyBearer": []}],
            "requestBody": _json_body("PrepareRequest"),
            "responses": {
                "201": _ok("The token and the redirect URL", "PreparedHandoff"),
                "403": _problem("The destination's origin is not allowed for this source"),
                **_COMMON_PROBLEMS,
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
                "403": _problem("The handoff was bound to an origin this source may not receive"),
                "404": _problem("The token is unknown, expired or already used"),
                **_COMMON_PROBLEMS,
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
                "503": _problem("The store is unreachable", ("Retry-After",)),
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

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "identity-service",
        "version": __version__,
        "description": "One-time handoff tokens that carry a visitor's identity across domains.",
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "headers": {
            "WWW-Authenticate": {"schema": {"type": "string"}},
            "Retry-After": {"schema": {"type": "integer"}},
        },
        "securitySchemes": {
            "writeKeyBasic": {
                "type": "http",
                "scheme": "basic",
                "description": "The source's write key as the user name, empty password.",
            },
            "writeKeyBearer": {"type": "http", "scheme": "bearer"},
        },
    },
}


@functools.cache
def openapi_document() -> bytes:
    return orjson.dumps(_DOCUMENT)


def openapi_dict() -> dict[str, Any]:
    return _DOCUMENT
