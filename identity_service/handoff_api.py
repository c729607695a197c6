"""The two handoff endpoints, independent of the HTTP server that carries them.

A call is what these endpoints read from a request (credentials, the body's media type
and the body); the answer is a status and a JSON body. The aiohttp handlers and the HTTP
front (front.py) both call these functions, so the rules live in one place.
"""

from dataclasses import dataclass
from typing import Any

from identity_service.handoff import HandoffService
from identity_service.log_config import bind_request
from identity_service.problems import Unauthorized, UnsupportedMediaType
from identity_service.settings import Settings
from identity_service.sources import Source, SourceRegistry
from identity_service.validation import parse_exchange, parse_json_object, parse_prepare


@dataclass(slots=True)  # not frozen: one a request, and frozen costs 3x the __init__
class Call:
    """What the handoff endpoints need of a request. ``media_type`` has no parameters."""

    authorization: str | None
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class HandoffApi:
    settings: Settings
    sources: SourceRegistry
    handoffs: HandoffService

    async def prepare(self, call: Call) -> tuple[int, dict[str, Any]]:
        source = self._authenticate(call)
        request = parse_prepare(
            _json_object(call), self.settings.max_ttl, self.settings.token_param
        )
        prepared = await self.handoffs.prepare(source, request)
        return 201, prepared.as_json()

    async def exchange(self, call: Call) -> tuple[int, dict[str, Any]]:
        source = self._authenticate(call)
        identity = await self.handoffs.exchange(source, parse_exchange(_json_object(call)))
        return 200, identity

    def _authenticate(self, call: Call) -> Source:
        source = self.sources.authenticate(call.authorization)
        if source is None:
            raise Unauthorized(
                "send the source's write key with HTTP Basic (as the user name) or as a Bearer "
                "token"
            )
        bind_request(source=source.name)
        return source


def _json_object(call: Call) -> dict[str, Any]:
    if call.media_type != "application/json":
        # The media type sent is not repeated: it is the client's text.
        raise UnsupportedMediaType("send the body as application/json")
    return parse_json_object(call.body)
