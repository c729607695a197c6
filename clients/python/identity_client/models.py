"""The typed results of prepare and exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal


@dataclass(frozen=True)
class PreparedHandoff:
    """A prepared handoff: redirect the visitor to ``redirect_url`` before ``expires_at``."""

    token: str = field(repr=False)
    redirect_url: str = field(repr=False)
    expires_at: datetime
    expires_in: int


@dataclass(frozen=True)
class Identity:
    """The identity a token carried, or a generated one (``source="generated"``).

    ``source`` is ``"handoff"`` (the token's identity) or ``"generated"`` (``fallback=True``
    and the token was unknown, used or expired: a new anonymousId, the rest empty). The
    middleware also builds ``source="cookie"`` identities from the visitor cookie on later
    requests; those carry only ``anonymous_id``. ``anonymous_id`` is None only for a handoff
    prepared with a ``user_id`` alone (then ``user_id`` is set).
    """

    anonymous_id: str | None
    user_id: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    consent: dict[str, bool] = field(default_factory=dict)
    source: Literal["handoff", "generated", "cookie"] = "handoff"
    prepared_by: str | None = None
    prepared_at: datetime | None = None
    destination: str | None = None
