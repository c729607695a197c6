"""The secrets audit catches what it is for: the scan itself, and the fixture failing tests.

The fixture is proven on an inner pytest run (pytester, in a subprocess of its own) whose
tests leak on purpose through each channel the audit reads, next to tests that must pass.
"""

import base64
import json
from pathlib import Path

import pytest

from tests.conftest import SECRET, WRITE_KEYS
from tests.secrets_audit import Audit, is_event_document

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "q3VkZXJfdG9rZW5fZm9yX3RoZV9hdWRpdF90ZXN0XzA"


@pytest.fixture
def audit() -> Audit:
    audit = Audit()
    audit.reset({"shop": WRITE_KEYS["shop"]}, {SECRET: "server secret"})
    audit.token(TOKEN)
    audit.identity("visitor-1", "anonymousId")
    audit.identity("user-with-traits", "userId")
    return audit


def test_a_clean_log_has_no_leaks(audit: Audit) -> None:
    text = "2026-11-22 [info] request status=201 token_id=0123456789ab source=shop\n"
    assert audit.leaks("stdout", text) == []


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (f"[info] request authorization=Bearer {WRITE_KEYS['shop']}", "write key of shop"),
        (
            "headers={'Authorization': 'Basic "
            + base64.b64encode(f"{WRITE_KEYS['shop']}:".encode()).decode()
            + "'}",
            "Basic credentials of shop",
        ),
        (f"settings secret={SECRET!r}", "server secret"),
        (f"redirect to https://b.example/cart?handoff_token={TOKEN}", "token"),
        ("[warning] odd handoff anonymousId=visitor-1", "anonymousId"),
        ('{"event": "request", "userId": "user-with-traits"}', "userId"),
    ],
    ids=["write key", "basic credentials", "server secret", "token", "anonymousId", "userId"],
)
def test_each_kind_of_value_is_found_and_masked(audit: Audit, line: str, what: str) -> None:
    (leak,) = audit.leaks("stdout", f"first line\n{line}\nlast line")
    assert (leak.where, leak.what) == ("stdout", what)
    # The report names the value and never repeats it.
    assert f"<{what}>" in leak.line
    for value in (WRITE_KEYS["shop"], SECRET, TOKEN, "visitor-1", "user-with-traits"):
        assert value not in str(leak)


def test_identities_may_be_in_event_documents_but_secrets_may_not(audit: Audit) -> None:
    event = {"type": "track", "messageId": "m-1", "anonymousId": "visitor-1", "userId": None}
    assert is_event_document(json.dumps(event))
    assert audit.leaks("stdout", json.dumps(event)) == []

    leaky = {**event, "properties": {"token": TOKEN}}
    assert [leak.what for leak in audit.leaks("stdout", json.dumps(leaky))] == ["token"]


def test_an_id_is_not_found_inside_a_longer_one(audit: Audit) -> None:
    assert audit.leaks("stdout", "anonymousId=visitor-10 and visitor-1x") == []


def test_short_values_are_not_registered(audit: Audit) -> None:
    audit.identity("a", "anonymousId")
    audit.token("abc")
    assert "a" not in audit.identities and "abc" not in audit.secrets


INNER_TESTS = f"""
import logging
import subprocess
import sys

import pytest
import structlog

from identity_service.crypto import Token
from tests.conftest import SECRET, WRITE_KEYS, secrets_audit
from tests.secrets_audit import AUDIT

EVENT = '{{"type": "track", "messageId": "m-1", "anonymousId": "anon-inner-1234"}}'


def test_clean():
    structlog.get_logger("inner").info("request", status=201, token_id="0123456789ab")


def test_leak_structlog_write_key():
    structlog.get_logger("inner").info("request", key=WRITE_KEYS["shop"])


def test_leak_logging_generated_token():
    logging.getLogger("aiohttp.access").info("GET /?t=%s", Token.generate().text)


def test_leak_exception_traceback():
    try:
        raise ValueError(SECRET)
    except ValueError:
        logging.getLogger("inner").exception("failed")


def test_leak_print_identity():
    AUDIT.identity("anon-inner-1234", "anonymousId")
    print("visitor anon-inner-1234 arrived")


def test_identity_in_an_event_document_is_fine():
    AUDIT.identity("anon-inner-1234", "anonymousId")
    print(EVENT)


def test_leak_subprocess_on_the_same_descriptors():
    subprocess.run([sys.executable, "-c", "print({SECRET!r})"], check=True)


def test_leak_in_a_log_read_from_elsewhere():
    AUDIT.log("service stdout", "handoff_token=" + Token.generate().text)


def test_leak_with_capsys(capsys):
    print(WRITE_KEYS["partner"])


@pytest.mark.allow_secrets_in_logs
def test_opted_out():
    print(SECRET)
"""


# The inner run's report shows the output of its leaking tests, and pytester echoes it.
@pytest.mark.allow_secrets_in_logs
def test_the_fixture_fails_each_test_that_leaks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini("[pytest]\nmarkers =\n    allow_secrets_in_logs: prints secrets on purpose\n")
    pytester.makepyfile(test_inner=INNER_TESTS)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    # A leak fails the test at teardown: its call passed, its teardown is an error.
    result.assert_outcomes(passed=10, errors=7)
    errors = [line for line in result.stdout.lines if line.startswith("ERROR test_inner.py::")]
    assert sorted(line.split("::")[1].split(" ")[0] for line in errors) == [
        "test_leak_exception_traceback",
        "test_leak_in_a_log_read_from_elsewhere",
        "test_leak_logging_generated_token",
        "test_leak_print_identity",
        "test_leak_structlog_write_key",
        "test_leak_subprocess_on_the_same_descriptors",
        "test_leak_with_capsys",
    ]
    found = reported_leaks(result.stdout.lines)
    assert sorted(line.split(":")[0] for line in found) == [
        "anonymousId in standard output",
        "server secret in log records",
        "server secret in standard output",
        "token in log records",
        "token in service stdout",
        "write key of partner in standard output",
        "write key of shop in standard output",
    ]
    # The failures name what leaked without showing it again.
    for value in (WRITE_KEYS["shop"], WRITE_KEYS["partner"], SECRET, "anon-inner-1234"):
        assert all(value not in line for line in found)


def reported_leaks(lines: list[str]) -> list[str]:
    """The leak lines of the audit's failure messages in a pytest report."""
    found, inside = [], False
    for line in lines:
        if line.startswith("the test's logs show what must stay secret"):
            inside = True
        elif inside and line.startswith("  "):
            found.append(line.strip())
        else:
            inside = False
    return found
