"""Fixtures: private Redis servers, settings with test sources, and app clients per store.

Every test is audited for secrets in its logs (tests/secrets_audit.py).
"""

import base64
import io
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from identity_service import app_keys, log_config
from identity_service.app import create_app
from identity_service.front import FrontRunner
from identity_service.log_config import configure_logging
from identity_service.settings import RedisSettings, Settings, load_settings
from identity_service.sources import hash_write_key
from identity_service.stores.memory import MemoryStore
from identity_service.stores.redis import AdminClient, RedisStore, connect
from tests.collector import WRITE_KEY as COLLECTOR_WRITE_KEY
from tests.redis_server import RedisServer
from tests.redis_topologies import Cluster, Sentinels
from tests.secrets_audit import AUDIT, audited
from tests.webhook_receiver import WEBHOOK_SECRET, WebhookReceiver

pytest_plugins = ["pytester"]

SECRET = "test-server-secret-0123456789abcdef"
WRITE_KEYS = {
    "shop": "shop-write-key-8b1f0c",
    "checkout": "checkout-write-key-2d9e7a",
    "partner": "partner-write-key-55c0e1",
}
ORIGINS = {
    "shop": ["https://checkout.example-pay.com"],
    "checkout": ["https://checkout.example-pay.com", "https://www.example.com"],
    "partner": ["https://partner.example.org"],
}
CHECKOUT_URL = "https://checkout.example-pay.com/cart?step=1#summary"

AppClient = TestClient[Any, Any]


class FrontTestServer(TestServer):
    """A test server that listens through the HTTP front, as ``identity-service serve`` does."""

    async def _make_runner(self, **kwargs: Any) -> FrontRunner:
        return FrontRunner(self.app, **kwargs)


ClientFactory = Callable[..., Awaitable[AppClient]]

_prefixes = itertools.count()


def auth(source: str) -> dict[str, str]:
    """Headers authenticating as ``source``: HTTP Basic with the write key as user name."""
    credentials = base64.b64encode(f"{WRITE_KEYS[source]}:".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


def sources_env() -> str:
    return json.dumps(
        {
            name: {"write_key_hash": hash_write_key(WRITE_KEYS[name]), "origins": ORIGINS[name]}
            for name in WRITE_KEYS
        }
    )


def make_settings(redis_url: str | None = None, **env: str) -> Settings:
    environ = {"IDENTITY_SOURCES": sources_env(), "IDENTITY_SECRET": SECRET}
    if redis_url is not None:
        environ["IDENTITY_REDIS_URL"] = redis_url
        environ["IDENTITY_REDIS_KEY_PREFIX"] = f"test{next(_prefixes)}:"
    environ.update({f"IDENTITY_{name.upper()}": value for name, value in env.items()})
    return load_settings(environ)


@pytest.fixture(autouse=True)
def secrets_audit(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if its logs show a write key, the secret, a token or an identity."""
    yield from audited(
        request,
        write_keys={**WRITE_KEYS, "the collector": COLLECTOR_WRITE_KEY},
        secrets={SECRET: "server secret"},
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the session's tests; each test uses its own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and start."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


Topology = TypeVar("Topology", Cluster, Sentinels)


def running(topology: Topology) -> Iterator[Topology]:
    """Start ``topology``, hand it out, stop it however the tests went."""
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-master Redis Cluster shared by the session's tests (each with its own prefix)."""
    yield from running(Cluster(tmp_path_factory.mktemp("cluster")))


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sentinels]:
    """A master, a replica and three sentinels, shared by the session's tests."""
    yield from running(Sentinels(tmp_path_factory.mktemp("sentinel")))


Server = RedisServer | Cluster


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.topology)])
def outbox_redis(request: pytest.FixtureRequest) -> Server:
    """One node, or (`make topology`) the session's Cluster: for the outbox's tests, which
    run shard by shard, on each shard's node."""
    server: Server = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster"
    )
    return server


@pytest.fixture
async def outbox_client(outbox_redis: Server) -> AsyncIterator[AdminClient]:
    """The admin commands' client of ``outbox_redis`` (a RedisCluster on the Cluster)."""
    client = connect(RedisSettings.from_dsn(outbox_redis.url))
    yield client
    await client.aclose()


# The store kinds a module may add to memory and redis with its own ``store_kind`` fixture:
# real topologies, slow to start, run by `make topology`.
TOPOLOGY_KINDS = [
    pytest.param("cluster", marks=pytest.mark.topology),
    pytest.param("sentinel", marks=pytest.mark.topology),
]


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def store_url(kind: str, request: pytest.FixtureRequest) -> str | None:
    """The Redis URL of a store kind (memory: None); starts its servers on first use."""
    if kind == "memory":
        return None
    server = request.getfixturevalue("redis_server" if kind == "redis" else f"redis_{kind}")
    url: str = server.url
    return url


@pytest.fixture
def settings_for(store_kind: str, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    """Settings on the parametrized store, with extra ``IDENTITY_*`` values as keywords."""
    url = store_url(store_kind, request)

    def build(**env: str) -> Settings:
        return make_settings(url, **env)

    return build


@pytest.fixture
def make_client(
    aiohttp_client: Callable[..., Awaitable[AppClient]],
    settings_for: Callable[..., Settings],
) -> ClientFactory:
    async def build(**env: str) -> AppClient:
        return await aiohttp_client(FrontTestServer(create_app(settings_for(**env))))

    return build


@pytest.fixture
async def client(make_client: ClientFactory) -> AppClient:
    return await make_client()


async def stored_count(client: AppClient) -> int:
    """How many handoff records the client's app has in its store right now."""
    store = client.app[app_keys.STORE]
    if isinstance(store, MemoryStore):
        return len(store)
    assert isinstance(store, RedisStore)
    redis_settings = client.app[app_keys.SETTINGS].redis
    assert redis_settings is not None
    pattern = f"{redis_settings.key_prefix}*:handoff:*"
    async with connect(redis_settings) as redis:
        return len([key async for key in redis.scan_iter(match=pattern)])


async def prepare(client: AppClient, source: str = "shop", **fields: Any) -> dict[str, Any]:
    """Prepare a handoff (201 expected) and return the answer's body."""
    body = {"anonymousId": "anon-7f3a", "destination": CHECKOUT_URL, **fields}
    AUDIT.identity(body.get("anonymousId"), "anonymousId")
    AUDIT.identity(body.get("userId"), "userId")
    response = await client.post("/v1/handoffs", json=body, headers=auth(source))
    assert response.status == 201, await response.text()
    answer: dict[str, Any] = await response.json()
    AUDIT.token(answer["token"])
    return answer


async def exchange(
    client: AppClient, token: str, source: str = "checkout", **fields: Any
) -> tuple[int, dict[str, Any]]:
    AUDIT.token(token)
    response = await client.post(
        "/v1/handoffs/exchange", json={"token": token, **fields}, headers=auth(source)
    )
    body: dict[str, Any] = await response.json(content_type=None)
    return response.status, body


@pytest.fixture
def log_buffer(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.BytesIO]:
    """A buffer for the service's log lines; the logging set-up is restored afterwards."""
    for name in ("_output", "_request_output", "_configured"):
        monkeypatch.setattr(log_config, name, getattr(log_config, name))
    saved = structlog.get_config()
    buffer = io.BytesIO()
    try:
        yield buffer
    finally:
        log_config.flush()
        structlog.configure(**saved)


@pytest.fixture
def json_log(log_buffer: io.BytesIO) -> io.BytesIO:
    """The service's log lines, as the deployed service writes them (JSON), in a buffer."""
    configure_logging("info", log_buffer)
    return log_buffer


def log_lines(buffer: io.BytesIO) -> list[dict[str, Any]]:
    """The JSON lines logged into ``buffer`` so far."""
    log_config.flush()
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """A webhook receiver that checks every call's signature (AMP actions' webhooks)."""
    server = WebhookReceiver(WEBHOOK_SECRET.encode())
    await server.start()
    yield server
    await server.stop()
    assert server.bad_signatures == 0
