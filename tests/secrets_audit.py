"""The secrets audit: a test fails when its logs show a credential, a token or an identity.

docs/security.md promises that tokens, write keys and identities never reach a log line.
The autouse fixture in tests/conftest.py holds every test to that: after the test it scans

- what the test wrote to standard output and error (structlog's lines in tests, prints,
  subprocesses sharing the file descriptors), read through the capture fixture;
- the standard library's log records (aiohttp, asyncio, redis-py), at INFO and above;
- logs the test read from elsewhere and handed over with :meth:`Audit.log` (the output of
  an ``identity-service`` process).

It looks for *secrets*, which may appear nowhere (the tests' write keys, also as HTTP Basic
credentials, the server secret, and every token generated or handed out), and for
*identities* (anonymousIds and userIds the test prepared), which may appear only in event
documents: the stdout sink prints events, and events carry the visitor's ids by design.

A test that prints a secret on purpose opts out with ``@pytest.mark.allow_secrets_in_logs``.
"""

import base64
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from identity_service.crypto import Token

OPT_OUT_MARKER = "allow_secrets_in_logs"
# Shorter values ("a", "w") would match ordinary words: tests use such ids for other reasons.
MIN_LENGTH = 8
CAPTURE_FIXTURES = ("capsys", "capsysbinary", "capfd", "capfdbinary")
# Tokens and most ids are runs of these characters; such a value leaks when a run of the
# text equals it ("visitor-1" is not found in "visitor-10").
_RUN = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_LINE_CHARS = 300


@dataclass(frozen=True, slots=True)
class Leak:
    """One registered value found where it must not be; ``line`` has it masked."""

    where: str
    what: str
    line: str

    def __str__(self) -> str:
        return f"{self.what} in {self.where}: {self.line}"


@dataclass
class Audit:
    """What one test must not log, and the logs it collected from elsewhere."""

    secrets: dict[str, str] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)
    logs: list[tuple[str, str]] = field(default_factory=list)
    # Values searched as plain substrings (the fixed credentials, few and precious).
    _anywhere: set[str] = field(default_factory=set)

    def reset(self, write_keys: dict[str, str], secrets: dict[str, str]) -> None:
        """Start a test with the fixed credentials only: write keys by owner, and other
        secrets with what they are. These are searched as substrings, anywhere."""
        self.secrets.clear()
        self.identities.clear()
        self.logs.clear()
        self._anywhere.clear()
        for owner, key in write_keys.items():
            self.write_key(key, owner)
        for value, what in secrets.items():
            self.secret(value, what)
            self._anywhere.add(value)

    def secret(self, value: str | None, what: str) -> None:
        """``value`` may appear in no output at all."""
        if value is not None and len(value) >= MIN_LENGTH:
            self.secrets.setdefault(value, what)

    def write_key(self, key: str, owner: str) -> None:
        """A write key, as it is and as the HTTP Basic credentials that carry it."""
        self.secret(key, f"write key of {owner}")
        basic = base64.b64encode(f"{key}:".encode()).decode()
        self.secret(basic, f"Basic credentials of {owner}")
        self._anywhere.update((key, basic))

    def token(self, token: str) -> None:
        self.secret(token, "token")

    def identity(self, value: Any, what: str = "identity") -> None:
        """``value`` may appear in event documents only, not in log lines."""
        if isinstance(value, str) and len(value) >= MIN_LENGTH:
            self.identities.setdefault(value, what)

    def log(self, where: str, text: str) -> None:
        """Logs the test read from elsewhere (a subprocess's output), scanned after it."""
        self.logs.append((where, text))

    def leaks(self, where: str, text: str) -> list[Leak]:
        """The registered values ``text`` shows where it must not (identities in events
        are fine)."""
        if not text:
            return []
        lines = text.splitlines()
        log_lines = [line for line in lines if not is_event_document(line)]
        found = self._found(where, lines, self.secrets)
        found += self._found(where, log_lines, self.identities)
        return found

    def _found(self, where: str, lines: list[str], values: dict[str, str]) -> list[Leak]:
        if not lines or not values:
            return []
        text = "\n".join(lines)
        runs = set(_RUN.findall(text))
        leaks = []
        for value, what in values.items():
            if (value in runs) if self._by_run(value) else (value in text):
                line = next(line for line in lines if value in line)
                leaks.append(Leak(where, what, self._masked(line)))
        return leaks

    def _by_run(self, value: str) -> bool:
        return value not in self._anywhere and _RUN.fullmatch(value) is not None

    def _masked(self, line: str) -> str:
        """The line with every registered value replaced by what it is, shortened."""
        for value, what in (self.secrets | self.identities).items():
            if value in line:
                line = line.replace(value, f"<{what}>")
        if len(line) > _SHOWN_LINE_CHARS:
            line = line[:_SHOWN_LINE_CHARS] + "…"
        return line


AUDIT = Audit()


def is_event_document(line: str) -> bool:
    """An event as the stdout sink prints it: a JSON object with a type and a messageId."""
    line = line.strip()
    if not line.startswith("{") or '"messageId"' not in line:
        return False
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and "messageId" in document and "type" in document


def format_records(records: Iterable[logging.LogRecord]) -> str:
    """Log records as text, with their exceptions and stacks."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in records)


def audited(
    request: pytest.FixtureRequest, write_keys: dict[str, str], secrets: dict[str, str]
) -> Iterator[None]:
    """The body of the autouse fixture: set up, run the test, then scan and judge."""
    AUDIT.reset(write_keys, secrets)
    # The test's own capture fixture if it has one: two cannot run at once.
    capture_name = next((n for n in CAPTURE_FIXTURES if n in request.fixturenames), "capfd")
    capture: pytest.CaptureFixture[Any] = request.getfixturevalue(capture_name)
    caplog: pytest.LogCaptureFixture = request.getfixturevalue("caplog")
    caplog.set_level(logging.INFO)
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    generate = Token.generate

    def recorded() -> Token:
        token = generate()
        AUDIT.token(token.text)
        return token

    monkeypatch.setattr(Token, "generate", staticmethod(recorded))

    yield

    # The setup's and the call's output already went on to pytest's report (or to the
    # terminal with -s) at the end of their phase; only what other fixtures printed while
    # tearing down before this one is read here without being shown again.
    out, err = capture.readouterr()
    if request.node.get_closest_marker(OPT_OUT_MARKER) is not None:
        return
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    texts = [
        ("standard output", _text(out)),
        ("standard error", _text(err)),
        ("log records", format_records(records)),
        *AUDIT.logs,
    ]
    leaks = [leak for where, text in texts for leak in AUDIT.leaks(where, text)]
    if leaks:
        shown = "\n".join(f"  {leak}" for leak in dict.fromkeys(leaks))
        pytest.fail(
            f"the test's logs show what must stay secret (tests/secrets_audit.py):\n{shown}\n"
            f"(mark a test that prints secrets on purpose with @pytest.mark.{OPT_OUT_MARKER})",
            pytrace=False,
        )


def _text(captured: str | bytes) -> str:
    return captured.decode(errors="replace") if isinstance(captured, bytes) else captured
