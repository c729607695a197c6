"""schemathesis against the live service: its /openapi.json is the contract it keeps.

``identity-service serve`` runs as a process on a free loopback port, on the memory store
and on a private Redis, and schemathesis talks real HTTP to it. For every operation of the
document the service serves, it generates requests, valid ones and invalid ones (both
generation modes; the examples, coverage and fuzzing phases), sends them authenticated
as a source, and runs every check on the answers: status codes, content types, headers
and bodies as documented, invalid data refused, valid data not refused, authentication
not ignored, unsupported methods answered 405... A bounded number of examples per
operation keeps the file well under a minute.

The service runs with ``[amp]``, so the document has the AMP endpoints too. Their
operations are held to the conformance checks only (status codes, content types, headers,
bodies, no server error), not to schemathesis's acceptance checks: what they accept hangs
on more than any one value, which a schema cannot say (collect takes a hit without Origin
or AMP-Same-Origin, as an image pixel, but a submission refuses it; with an Origin,
AMP-Same-Origin is not read; a hit's body parameters win over its query's; a query within
every field's length can make the head longer than the front takes; a preflight answers
for any action name). test_openapi.py provokes each of their documented answers.

The stateful phase is not run: the API has no links (a link from prepare's token to the
exchange makes schemathesis 4.32's ensure_resource_availability report any 404 of an
exchange whose body did not take the linked token, since /v1/handoffs is a path prefix
of /v1/handoffs/exchange). test_openapi.py checks the exchanged identity's answer.
"""

import itertools
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis import Case

from identity_service.openapi import openapi_dict, openapi_document
from identity_service.settings import load_settings
from tests.conftest import SECRET
from tests.redis_server import RedisServer, free_port
from tests.test_cli import Service, clean_env

# Examples per operation, for each of the coverage and fuzzing phases.
MAX_EXAMPLES = 100
# The development source: it may hand off to any http://*.localhost destination, which the
# document's pattern generates, so valid prepares reach the 201 answer, not only 403.
WRITE_KEY = "schemathesis-dev-write-key-3c9f"

_prefixes = itertools.count()
# The AMP endpoints, their one action's webhook at a port nothing listens on (each call fails
# at once, and is queued for the outbox), the rate limits out of reach.
AMP = {
    "public_url": "http://shop.localhost:8080/identity",
    "publisher_origins": ["http://shop.localhost:8080", "https://www.example.com"],
    "source": "dev",
    "actions": {
        "add-to-cart": {
            "webhook": f"http://127.0.0.1:{free_port()}/apply",
            "secret": SECRET,
            "done_url": "https://www.example.com/cart",
        }
    },
    "limit_per_ip": {"requests": 1_000_000, "window_seconds": 1},
    "limit_per_client": {"requests": 1_000_000, "window_seconds": 1},
    "webhook_attempts": 1,
}
SETTINGS = load_settings({"IDENTITY_SECRET": SECRET, "IDENTITY_AMP": json.dumps(AMP)})

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
        "operations": [
            {
                "include-path-regex": "^/v1/amp/",
                # See the module's docstring.
                "checks": {
                    "positive_data_acceptance": {"enabled": False},
                    "negative_data_rejection": {"enabled": False},
                },
            }
        ],
    }
)
# The document the service serves (test_the_live_service_serves_the_document_tested):
# schemathesis makes its tests when this module is collected, before any service runs.
# (Its loader from a fixture, schemathesis.pytest.from_fixture, fails under pytest 9.2:
# it sets request.node._nodeid, which pytest 9.2 no longer has.)
SCHEMA = schemathesis.openapi.from_dict(openapi_dict(amp=SETTINGS.amp), config=CONFIG)


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
        IDENTITY_AMP=json.dumps(AMP),
    )
    if request.param == "redis":
        env["IDENTITY_REDIS_URL"] = redis_server.url
        env["IDENTITY_REDIS_KEY_PREFIX"] = f"schemathesis{next(_prefixes)}:"
    service = Service(directory, env)
    yield service
    assert service.stop() == 0, service.stderr


def test_the_live_service_serves_the_document_tested(live_service: Service) -> None:
    with urllib.request.urlopen(f"{live_service.url}/openapi.json") as response:  # noqa: S310
        assert response.read() == openapi_document(amp=SETTINGS.amp)


@SCHEMA.parametrize()
def test_the_live_service_keeps_its_openapi_contract(
    case: Case[Any], live_service: Service
) -> None:
    case.call_and_validate(base_url=live_service.url)
