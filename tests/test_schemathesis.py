"""schemathesis against the live service: its /openapi.json is the contract it keeps.

``identity-service serve`` runs as a process on a free loopback port, on the memory store
and on a private Redis, and schemathesis talks real HTTP to it. For every operation of the
document the service serves, it generates requests, valid ones and invalid ones (both
generation modes; the examples, coverage and fuzzing phases), sends them authenticated
as a source, and runs every check on the answers: status codes, content types, headers
and bodies as documented, invalid data refused, valid data not refused, authentication
not ignored, unsupported methods answered 405... A bounded number of examples per
operation keeps the file well under a minute.

The stateful phase is not run: the API has no links (a link from prepare's token to the
exchange makes schemathesis 4.32's ensure_resource_availability report any 404 of an
exchange whose body did not take the linked token, since /v1/handoffs is a path prefix
of /v1/handoffs/exchange). test_openapi.py checks the exchanged identity's answer.
"""

import itertools
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import Case

from identity_service.openapi import openapi_dict, openapi_document
from tests.conftest import SECRET
from tests.redis_server import RedisServer
from tests.test_cli import Service, clean_env

# Examples per operation, for each of the coverage and fuzzing phases.
MAX_EXAMPLES = 100
# The development source: it may hand off to any http://*.localhost destination, which the
# document's pattern generates, so valid prepares reach the 201 answer, not only 403.
WRITE_KEY = "schemathesis-dev-write-key-3c9f"

_prefixes = itertools.count()

CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"basic": {"username": WRITE_KEY, "password": ""}},
        # A slow CI machine is not a contract failure; the other health checks stay on.
        "suppress-health-check": ["too_slow"],
        "checks": {"enabled": True},
        "generation": {
            "mode": "all",  # positive and negative cases
            "max-examples": MAX_EXAMPLES,
            "database": "none",  # no .hypothesis directory in the tree
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
        },
    }
)
# The document the service serves (test_the_live_service_serves_the_document_tested):
# schemathesis makes its tests when this module is collected, before any service runs.
# (Its loader from a fixture, schemathesis.pytest.from_fixture, fails under pytest 9.2:
# it sets request.node._nodeid, which pytest 9.2 no longer has.)
SCHEMA = schemathesis.openapi.from_dict(openapi_dict(), config=CONFIG)


@pytest.fixture(scope="module", params=["memory", "redis"])
def live_service(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
) -> Iterator[Service]:
    """``identity-service serve`` with the development source, on the parametrized store."""
    directory = tmp_path_factory.mktemp(f"schemathesis-{request.param}")
    env = clean_env(
        IDENTITY_DEV_WRITE_KEY=WRITE_KEY,
        IDENTITY_SECRET=SECRET,
        IDENTITY_EVENTS_FILE=str(directory / "events.jsonl"),
    )
    if request.param == "redis":
        env["IDENTITY_REDIS_URL"] = redis_server.url
        env["IDENTITY_REDIS_KEY_PREFIX"] = f"schemathesis{next(_prefixes)}:"
    service = Service(directory, env)
    yield service
    assert service.stop() == 0, service.stderr


def test_the_live_service_serves_the_document_tested(live_service: Service) -> None:
    with urllib.request.urlopen(f"{live_service.url}/openapi.json") as response:  # noqa: S310
        assert response.read() == openapi_document()


@SCHEMA.parametrize()
def test_the_live_service_keeps_its_openapi_contract(
    case: Case[Any], live_service: Service
) -> None:
    case.call_and_validate(base_url=live_service.url)
