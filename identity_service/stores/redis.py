"""The Redis store: one command per call (SET with EX, GETDEL), keys with Cluster hash tags.

Commands are not retried by the client: a GETDEL whose reply was lost may have run, and
running it again would answer "unknown token" for a token that was just consumed. A
failure surfaces as StoreUnavailable (503 with Retry-After) and the next request uses a
fresh connection, so the service recovers by itself when Redis returns.
"""

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from identity_service.constants import handoff_key
from identity_service.problems import StoreUnavailable
from identity_service.settings import RedisSettings


class RedisStore:
    """Keeps records in Redis with their TTL set in the same command as the value."""

    def __init__(self, settings: RedisSettings) -> None:
        self._prefix = settings.key_prefix
        # A blocking pool makes a burst of requests wait (up to the timeout) for a
        # connection instead of failing once max_connections are in use.
        pool = BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.timeout,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._redis: Redis = Redis.from_pool(pool)

    @property
    def client(self) -> Redis:
        return self._redis

    async def put(self, lookup_id: bytes, record: bytes, ttl_seconds: int) -> None:
        try:
            await self._redis.set(handoff_key(self._prefix, lookup_id), record, ex=ttl_seconds)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    async def take(self, lookup_id: bytes) -> bytes | None:
        try:
            record = await self._redis.getdel(handoff_key(self._prefix, lookup_id))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        assert not isinstance(record, str)  # the client does not decode responses
        return record

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    async def close(self) -> None:
        await self._redis.aclose()


def _describe(exc: BaseException) -> str:
    return f"redis: {type(exc).__name__}"
