"""Defaults, limits and the Redis key layout, kept in one place.

Every Redis key the service writes is built here. Keys carry a hash tag (the part in
braces) so that a handoff's key and anything written with it atomically land in the
same Redis Cluster slot. The tag is a shard number derived from the token's lookup id,
which spreads handoffs over ``KEY_SHARDS`` slots.
"""

from typing import Final

ENV_PREFIX: Final = "IDENTITY_"

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080

DEFAULT_TTL_SECONDS: Final = 300
DEFAULT_MAX_TTL_SECONDS: Final = 600
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024
DEFAULT_TOKEN_PARAM: Final = "handoff_token"  # noqa: S105 - a parameter name
DEFAULT_RETRY_AFTER_SECONDS: Final = 1
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: Final = 10.0

DEFAULT_REDIS_KEY_PREFIX: Final = "idsvc:"
DEFAULT_REDIS_TIMEOUT_SECONDS: Final = 1.0
DEFAULT_REDIS_MAX_CONNECTIONS: Final = 64

TOKEN_BYTES: Final = 32
MIN_SECRET_LENGTH: Final = 32
MAX_ID_LENGTH: Final = 255
MAX_URL_LENGTH: Final = 2048
MAX_TOKEN_LENGTH: Final = 128

DEV_SOURCE_NAME: Final = "dev"

KEY_SHARDS: Final = 16


def handoff_key(prefix: str, lookup_id: bytes) -> str:
    """The Redis key of one handoff: prefix, a Cluster hash tag, then the lookup id."""
    return f"{prefix}{{{lookup_id[0] % KEY_SHARDS}}}:handoff:{lookup_id.hex()}"
