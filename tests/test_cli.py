"""The ``identity-service`` command as a real process: serve, logs, shutdown, refusals."""

import asyncio
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from identity_service.cli import INTERRUPTED, command_parser
from identity_service.constants import outbox_key
from identity_service.sources import hash_write_key
from identity_service.stores.redis import AdminClient
from tests.collector import WRITE_KEY as COLLECTOR_WRITE_KEY
from tests.collector import Answer, Collector, running_collector
from tests.conftest import CHECKOUT_URL, SECRET, WRITE_KEYS, Server, sources_env
from tests.redis_server import RedisServer, free_port
from tests.test_docs import code_and_prose

COMMAND = str(Path(sys.executable).parent / "identity-service")
DEV_KEY = "dev-key-for-the-cli-test-4b7e"
DESTINATION = "http://checkout.localhost:3000/cart?step=2"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENTITY_")}
    return {**env, **extra}


def redis_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    """The environment of a service with the test sources on ``redis``."""
    return redis_env_for(redis.url, **extra)


def events_file(directory: Path) -> dict[str, str]:
    """A destination (a file in ``directory``, named ``file``) for a service on Redis, which
    without one keeps its events in the outbox and runs no forwarder."""
    return {"IDENTITY_EVENTS_FILE": str(directory / "events.jsonl")}


def redis_env_for(url: str, **extra: str) -> dict[str, str]:
    """The environment of a service with the test sources on the Redis of ``url``."""
    return clean_env(
        IDENTITY_SOURCES=sources_env(), IDENTITY_SECRET=SECRET, IDENTITY_REDIS_URL=url, **extra
    )


class Service:
    """A running ``identity-service serve`` whose output is collected in files."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.terminating = False
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path, self.stderr_path = tmp_path / "stdout", tmp_path / "stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [COMMAND, "serve", "--port", str(self.port), *args],
                env=env,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 15
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"service did not start: {self.stderr}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        """Send SIGTERM (or another stop signal) once; a second one would cut the graceful
        shutdown short."""
        if self.process.poll() is None and not self.terminating:
            self.terminating = True
            self.process.send_signal(signum)

    def stop(self) -> int:
        self.terminate()
        return self.process.wait(timeout=20)


@pytest.fixture
def dev_service(tmp_path: Path) -> Iterator[Service]:
    service = Service(tmp_path, clean_env(IDENTITY_DEV_WRITE_KEY=DEV_KEY))
    yield service
    service.stop()


async def post(url: str, body: dict[str, Any], write_key: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"Authorization": f"Bearer {write_key}"}) as answer,
    ):
        return answer.status, await answer.json(content_type=None)


async def test_walkthrough_on_the_embedded_default_logs_no_secrets(dev_service: Service) -> None:
    base = dev_service.url
    status, prepared = await post(
        f"{base}/v1/handoffs",
        {"anonymousId": "anon-cli-91c3", "userId": "user-cli-77", "destination": DESTINATION},
        DEV_KEY,
    )
    assert status == 201
    token = prepared["token"]
    assert prepared["redirectUrl"] == f"{DESTINATION}&handoff_token={token}"

    status, identity = await post(f"{base}/v1/handoffs/exchange", {"token": token}, DEV_KEY)
    assert (status, identity["anonymousId"], identity["preparedBy"]) == (
        200,
        "anon-cli-91c3",
        "dev",
    )
    status, _ = await post(f"{base}/v1/handoffs/exchange", {"token": token}, DEV_KEY)
    assert status == 404
    status, _ = await post(f"{base}/v1/handoffs/exchange", {"token": token}, "wrong-key")
    assert status == 401

    assert dev_service.stop() == 0
    lines = [orjson.loads(line) for line in dev_service.stdout.splitlines()]
    # The embedded default delivers events as JSON lines on stdout, beside the logs.
    events = [line for line in lines if "messageId" in line]
    assert sorted(e["type"] for e in events) == ["identify", "track", "track"]
    logs = [line for line in lines if "messageId" not in line]
    log_text = orjson.dumps(logs).decode() + dev_service.stderr
    for secret in (token, DEV_KEY, "anon-cli-91c3", "user-cli-77", "handoff_token="):
        assert secret not in log_text
    for secret in (token, DEV_KEY):
        assert secret not in orjson.dumps(events).decode()
    requests = [line for line in logs if line["event"] == "request"]
    assert [r["status"] for r in requests] == [201, 200, 404, 401]
    assert all(r["request_id"] and r["path"].startswith("/v1/handoffs") for r in requests)
    assert requests[0]["token_id"] == requests[1]["token_id"] == requests[2]["token_id"]
    assert requests[0]["source"] == "dev"
    assert "store: memory" in dev_service.stderr


async def test_a_generated_dev_write_key_is_printed_at_start(tmp_path: Path) -> None:
    service = Service(tmp_path, clean_env())
    try:
        match = re.search(r"write key: (\S+)", service.stderr)
        assert match is not None, service.stderr
        status, _ = await post(
            f"{service.url}/v1/handoffs",
            {"anonymousId": "a", "destination": "https://shop.localhost/"},
            match.group(1),
        )
        assert status == 201
    finally:
        assert service.stop() == 0


def test_non_loopback_bind_without_sources_and_secret_is_refused() -> None:
    result = subprocess.run(
        [COMMAND, "serve", "--host", "0.0.0.0", "--port", str(free_port())],  # noqa: S104
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "IDENTITY_SOURCES" in result.stderr and "IDENTITY_SECRET" in result.stderr


def test_invalid_configuration_exits_with_every_problem() -> None:
    result = subprocess.run(
        [COMMAND, "serve", "--port", str(free_port())],
        env=clean_env(IDENTITY_MAX_TTL="ten", IDENTITY_REDIS_URL="http://x"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "IDENTITY_MAX_TTL must be a whole number" in result.stderr
    assert "IDENTITY_REDIS_URL: scheme must be one of" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_sigterm_and_sighup_finish_the_request_in_flight(
    tmp_path: Path, private_redis: RedisServer, signum: signal.Signals, workers: str
) -> None:
    """SIGHUP (the terminal running `make serve` closed) ended the process at once, the
    request in flight unanswered; it is now a graceful stop as SIGTERM is, the parent of
    several workers passing it on."""
    service = Service(
        tmp_path, redis_env(private_redis, IDENTITY_REDIS_TIMEOUT="5"), "--workers", workers
    )

    blocker = socket.create_connection(("127.0.0.1", private_redis.port))
    try:
        blocker.sendall(b"DEBUG SLEEP 1.5\r\n")
        in_flight = asyncio.create_task(
            post(
                f"{service.url}/v1/handoffs",
                {"anonymousId": "a", "destination": CHECKOUT_URL},
                WRITE_KEYS["shop"],
            )
        )
        await asyncio.sleep(0.5)
        assert not in_flight.done()
        service.terminate(signum)
        status, prepared = await in_flight
        assert status == 201 and prepared["token"]
    finally:
        blocker.close()
    assert await asyncio.to_thread(service.stop) == 0
    assert "Traceback" not in service.stderr and "failed" not in service.stderr


async def test_on_redis_without_a_destination_events_wait_in_the_outbox_unprinted(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """On Redis no destination means no standard output (the logs there, which no identity
    may reach; it printed the events, ids and all): one warning at start, naming no id,
    and the events kept in the outbox until a destination is configured, which then
    receives them."""
    (tmp_path / "first").mkdir()
    service = await asyncio.to_thread(Service, tmp_path / "first", redis_env(private_redis))
    ids = ("anon-kept-5e1d", "user-kept-90a2")
    try:
        status, prepared = await post(
            f"{service.url}/v1/handoffs",
            {"anonymousId": ids[0], "userId": ids[1], "destination": CHECKOUT_URL},
            WRITE_KEYS["shop"],
        )
        assert status == 201
        status, _ = await post(
            f"{service.url}/v1/handoffs/exchange",
            {"token": prepared["token"]},
            WRITE_KEYS["checkout"],
        )
        assert status == 200
        await asyncio.sleep(1.5)  # a forwarder would have delivered them by now
    finally:
        assert await asyncio.to_thread(service.stop) == 0
    output = service.stdout + service.stderr
    assert not any(identity in output for identity in ids)
    assert "messageId" not in output
    warnings = [line for line in service.stderr.splitlines() if "no events destination" in line]
    assert len(warnings) == 1, service.stderr
    logged = [line for line in service.stdout.splitlines() if "outbox_no_destination" in line]
    assert len(logged) == 1, service.stdout
    # `outbox status` shows them waiting, as /metrics does: destination (none).
    status_env = redis_env(private_redis)
    shown = await asyncio.to_thread(
        subprocess.run,
        [COMMAND, "outbox", "status", "--json"],
        env=status_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert [(s["destination"], s["pending"]) for s in orjson.loads(shown.stdout)] == [("(none)", 2)]

    async with running_collector() as collector:
        (tmp_path / "second").mkdir()
        env = redis_env(
            private_redis,
            IDENTITY_DESTINATION_URL=collector.url,
            IDENTITY_DESTINATION_WRITE_KEY=COLLECTOR_WRITE_KEY,
        )
        service = await asyncio.to_thread(Service, tmp_path / "second", env)
        try:
            await collector.wait_for(3, seconds=20)
        finally:
            assert await asyncio.to_thread(service.stop) == 0
    assert sorted(event["type"] for event in collector.events) == ["identify", "track", "track"]
    assert {event.get("userId") for event in collector.events} >= {ids[1]}
    assert "no events destination" not in service.stderr


def test_hash_key_reads_the_key_from_stdin() -> None:
    result = subprocess.run(
        [COMMAND, "hash-key"], input="my-write-key\n", capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == hash_write_key("my-write-key")
    refused = subprocess.run([COMMAND, "hash-key"], input="clé\n", capture_output=True, text=True)
    assert refused.returncode == 2 and "ASCII" in refused.stderr


@pytest.mark.parametrize("key", ["shop:key", "shop\x7fkey", "shop\x01key"])
def test_hash_key_refuses_a_key_no_request_can_carry(key: str) -> None:
    """A header cannot hold control characters (the front refuses the request), and HTTP
    Basic (what Segment's libraries send) ends the user name at the first ':': the hash of
    such a key was printed, and the source it was configured for could not authenticate
    (with a ':', not with Basic)."""
    refused = subprocess.run(
        [COMMAND, "hash-key"], input=f"{key}\n", capture_output=True, text=True
    )
    assert refused.returncode == 2, refused.stdout
    assert refused.stdout == ""
    assert refused.stderr == (
        "hash-key: give the write key (printable ASCII, without ':') on standard input\n"
    )


@pytest.mark.parametrize("stdin", [b"cl\xe9-latin-1\n", b"\xff\xfe\n", None], ids=str)
def test_hash_key_refuses_what_is_no_text_of_the_locale_in_one_line(stdin: bytes | None) -> None:
    """Standard input decoded strictly (a UTF-8 locale, PYTHONIOENCODING) made a key in
    another encoding a UnicodeDecodeError traceback, and a closed standard input an
    AttributeError one; both are now refused as any key no request can carry."""
    refused = subprocess.run(
        [COMMAND, "hash-key"],
        input=stdin,
        env=clean_env(PYTHONIOENCODING="utf-8"),
        capture_output=True,
        # None: the command starts without a standard input.
        preexec_fn=(lambda: os.close(0)) if stdin is None else None,
    )
    assert (refused.returncode, refused.stdout) == (2, b"")
    assert refused.stderr == (
        b"hash-key: give the write key (printable ASCII, without ':') on standard input\n"
    )


def test_new_key_prints_a_key_and_its_hash() -> None:
    result = subprocess.run([COMMAND, "new-key"], capture_output=True, text=True, check=True)
    key = re.search(r"write key .*: (\S+)", result.stdout)
    digest = re.search(r"write_key_hash .*: (\S+)", result.stdout)
    assert key and digest
    assert hash_write_key(key.group(1)) == digest.group(1)


async def test_workers_share_one_port_and_the_store(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    service = Service(tmp_path, redis_env(private_redis), "--workers", "2")
    try:
        workers = await asyncio.to_thread(_children_of, service.process.pid)
        assert len(workers) == 2
        for _ in range(20):  # fresh connections, spread over the workers by the kernel
            status, prepared = await post(
                f"{service.url}/v1/handoffs",
                {"anonymousId": "w", "destination": CHECKOUT_URL},
                WRITE_KEYS["shop"],
            )
            assert status == 201
            status, identity = await post(
                f"{service.url}/v1/handoffs/exchange",
                {"token": prepared["token"]},
                WRITE_KEYS["checkout"],
            )
            assert (status, identity["anonymousId"]) == (200, "w")
    finally:
        assert await asyncio.to_thread(service.stop) == 0
    assert "2 workers" in service.stderr


def test_serve_refuses_workers_without_redis() -> None:
    result = subprocess.run(
        [COMMAND, "serve", "--workers", "2"], env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 2 and "needs Redis" in result.stderr


def run_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``identity-service <args>`` in ``env``, run to its end (30 s at most)."""
    return subprocess.run([COMMAND, *args], env=env, capture_output=True, text=True, timeout=30)


def refusal_at_start(url: str, said: str, *command: str) -> str:
    """The one line in which ``command`` (default: ``serve``) on ``url`` refuses to start
    (exit 2), saying ``said``: all it prints (no banner before it, no traceback)."""
    result = run_command(redis_env_for(url), *(command or ("serve", "--port", str(free_port()))))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("identity-service: IDENTITY_REDIS_URL: ") and said in line, line
    assert result.stdout == ""
    return line


def test_a_password_for_a_redis_without_one_is_refused_at_start(
    redis_server: RedisServer,
) -> None:
    """Found in review: Redis answers a password it has none for with "ERR AUTH <password>
    called without any password configured", which was taken for a Redis that did not
    answer yet: serve started and answered 503 for ever, as for a wrong password."""
    url = f"redis://:not-it@127.0.0.1:{redis_server.port}/0"
    line = refusal_at_start(url, "refused the credentials (no password configured)")
    assert "not-it" not in line


def test_a_cluster_url_on_a_node_without_cluster_mode_is_refused(
    redis_server: RedisServer,
) -> None:
    url = f"redis+cluster://127.0.0.1:{redis_server.port}"
    assert url in refusal_at_start(url, "without Cluster mode")


def test_a_sentinel_url_on_a_redis_that_is_no_sentinel_is_refused(tmp_path: Path) -> None:
    """It would start and answer 503 for ever. Over IPv6 too: the node URL built from an
    unbracketed ``::1`` made serve exit with a traceback."""
    redis = RedisServer(tmp_path, bind="127.0.0.1 ::1")
    redis.start()
    try:
        url = f"redis+sentinel://[::1]:{redis.port}/svc"
        line = refusal_at_start(url, "is not a sentinel")
        assert f"[::1]:{redis.port} is not a sentinel" in line
        assert refusal_at_start(url, "is not a sentinel", "outbox", "status") == line
    finally:
        redis.stop()


async def test_a_sentinel_url_whose_sentinels_do_not_answer_starts_with_a_warning(
    tmp_path: Path,
) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()}/svc"  # nothing listens there
    service = Service(
        tmp_path, redis_env_for(url, IDENTITY_REDIS_TIMEOUT="0.5", **events_file(tmp_path))
    )
    try:
        (warning,) = [line for line in service.stderr.splitlines() if "warning" in line]
        assert warning.startswith(f"identity-service: warning: redis at {url} (")
        assert warning.endswith("does not answer; requests answer 503 until it does")
        assert await readyz(service.url) == 503
    finally:
        assert await asyncio.to_thread(service.stop) == 0


def _children_of(pid: int) -> list[int]:
    deadline = time.monotonic() + 10
    while True:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(found) >= 2 or time.monotonic() > deadline:
            return [int(child) for child in found]
        time.sleep(0.05)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_said_in_one_line(private_redis: RedisServer, workers: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [COMMAND, "serve", "--workers", workers, "--port", str(port)],
            env=redis_env(private_redis),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"identity-service: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


# server.run without the command's check of the address first: a port taken between that
# check and the workers' own bind.
RUN_WITHOUT_CHECK = """
import os, sys
from identity_service.front import BindError
from identity_service.server import run
from identity_service.settings import load_settings
try:
    sys.exit(run(load_settings(os.environ), "127.0.0.1", int(sys.argv[1])))
except BindError as exc:
    print(f"raised: {exc}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_taken_after_the_check_is_said_without_a_traceback(
    private_redis: RedisServer, workers: str
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-c", RUN_WITHOUT_CHECK, str(port)],
            env=redis_env(private_redis, IDENTITY_WORKERS=workers),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        taken.close()
    assert result.returncode == 1
    said = f"cannot listen on 127.0.0.1:{port}: Address already in use"
    lines = result.stderr.splitlines()
    if workers == "1":  # raised to the command, which says it
        assert lines == [f"raised: {said}"]
    else:  # each worker that got that far says it; the parent stops the set
        assert f"identity-service: {said}" in lines
        assert all(
            line == f"identity-service: {said}"
            or re.fullmatch(r".* worker \d+ failed; stopping", line)
            for line in lines
        ), lines


def test_serve_refuses_a_metrics_port_that_is_its_api_port() -> None:
    port = str(free_port())
    result = run_command(clean_env(IDENTITY_METRICS_PORT=port), "serve", "--port", port)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "identity-service: invalid configuration:",
        f"  - IDENTITY_METRICS_PORT ({port}) is the API's port (--port): give /metrics a port "
        "of its own, or unset it to serve /metrics on the API's port",
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_metrics_port_is_said_in_one_line(private_redis: RedisServer, workers: str) -> None:
    """Said before the banner, as a taken API port is, naming the metrics port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = redis_env(private_redis, IDENTITY_METRICS_PORT=str(port))
        result = run_command(env, "serve", "--workers", workers, "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"identity-service: metrics port: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1"])
def test_serve_refuses_a_port_out_of_range(port: str) -> None:
    result = subprocess.run(
        [COMMAND, "serve", "--port", port],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "identity-service: invalid configuration:",
        f"  - --port must be between 1 and 65535, not {port}",
    ]


def test_serve_reports_the_port_the_settings_and_the_address_at_once() -> None:
    """A port out of range was reported alone, then the settings' problems, then the
    address's (a non-loopback host without sources and secret): three starts to learn
    what one could have said."""
    env = clean_env(IDENTITY_MAX_TTL="ten")
    result = run_command(env, "serve", "--host", "0.0.0.0", "--port", "70000")  # noqa: S104
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "identity-service: invalid configuration:",
        "  - --port must be between 1 and 65535, not 70000",
        "  - IDENTITY_MAX_TTL must be a whole number, not 'ten'",
        "  - binding 0.0.0.0 needs configured sources (IDENTITY_SOURCES)",
        "  - binding 0.0.0.0 needs a server secret (IDENTITY_SECRET)",
    ]


def test_serve_refuses_a_destination_that_would_get_its_write_key_in_clear_text() -> None:
    env = clean_env(
        IDENTITY_DESTINATION_URL="http://collector.example.com",
        IDENTITY_DESTINATION_WRITE_KEY="wk-clear-7c1d",
    )
    result = run_command(env, "serve", "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "identity-service: invalid configuration:",
        "  - IDENTITY_DESTINATION_URL would send the write key in clear text to "
        "collector.example.com: use https, or set IDENTITY_DESTINATION_ALLOW_INSECURE to true",
    ]


def outbox_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``identity-service outbox <args>`` in ``env``, run to its end."""
    return run_command(env, "outbox", *args)


async def test_outbox_retire_removes_a_destination_no_longer_configured(
    outbox_redis: Server, outbox_client: AdminClient, tmp_path: Path
) -> None:
    redis_client = outbox_client
    prefix = f"retire-{os.getpid()}:"
    stream = outbox_key(prefix, 5)
    await redis_client.xadd(stream, {"j": b"x"})
    await redis_client.xgroup_create(stream, "old-warehouse", id="0")
    env = redis_env_for(outbox_redis.url, IDENTITY_REDIS_KEY_PREFIX=prefix, **events_file(tmp_path))

    def outbox(*args: str) -> subprocess.CompletedProcess[str]:
        return outbox_command(env, *args)

    still_configured = await asyncio.to_thread(outbox, "retire", "file")
    assert still_configured.returncode == 2
    assert "still configured" in still_configured.stderr
    assert (await asyncio.to_thread(outbox, "retire")).returncode == 2  # no name
    assert (await asyncio.to_thread(outbox, "status", "old-warehouse")).returncode == 2
    assert len(await redis_client.xinfo_groups(stream)) == 1

    retired = await asyncio.to_thread(outbox, "retire", "old-warehouse")
    assert retired.returncode == 0, retired.stderr
    assert "from 1 outbox streams" in retired.stdout
    assert await redis_client.xinfo_groups(stream) == []

    for name in ("old-warehouse", "never-there"):  # retired already; never had a group
        unknown = await asyncio.to_thread(outbox, "retire", name)
        assert unknown.returncode == 1
        assert unknown.stderr.splitlines() == [
            f"identity-service: no such destination {name!r}: no outbox stream has its group"
        ]
        assert unknown.stdout == ""
    await redis_client.delete(stream)


def test_outbox_commands_say_when_redis_cannot_be_reached() -> None:
    env = clean_env(
        IDENTITY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        IDENTITY_SECRET=SECRET,
        IDENTITY_SOURCES=sources_env(),
    )
    result = subprocess.run(
        [COMMAND, "outbox", "status"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.startswith("identity-service: Redis: ConnectionError")
    assert "Traceback" not in result.stderr


def wait_for_lines(path: Path, event: str, count: int = 1) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` in ``path`` once there are ``count`` of them."""
    deadline = time.monotonic() + 30  # generous: a loaded machine starts Python slowly
    while True:
        lines = [orjson.loads(line) for line in path.read_text().splitlines() if line]
        found = [line for line in lines if line.get("event") == event]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


async def readyz(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as answer:
        return answer.status


async def test_serve_names_an_unreachable_redis_and_recovers_when_it_answers(
    tmp_path: Path,
) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")  # not started yet: nothing listens on its port
    service = Service(
        tmp_path, redis_env(redis, IDENTITY_REDIS_TIMEOUT="0.5", **events_file(tmp_path))
    )
    try:
        assert (
            f"identity-service: warning: redis at {redis.url} (ConnectionRefusedError) does not "
            "answer; requests answer 503 until it does"
        ) in service.stderr.splitlines()
        assert f"store: redis at {redis.url}" in service.stderr
        assert await readyz(service.url) == 503
        errors = await asyncio.to_thread(
            wait_for_lines, service.stdout_path, "forwarder_store_error", 2
        )
        assert len(errors) >= 2 and all(line["store"] == redis.url for line in errors)
        unavailable = await asyncio.to_thread(
            wait_for_lines, service.stdout_path, "store_unavailable"
        )
        assert unavailable[0]["reason"] == f"redis at {redis.url} (ConnectionRefusedError)"

        await asyncio.to_thread(redis.start)
        deadline = time.monotonic() + 10
        while await readyz(service.url) != 200:
            assert time.monotonic() < deadline, "the service did not recover"
            await asyncio.sleep(0.1)
        status, _ = await post(
            f"{service.url}/v1/handoffs",
            {"anonymousId": "a", "destination": CHECKOUT_URL},
            WRITE_KEYS["shop"],
        )
        assert status == 201
    finally:
        assert await asyncio.to_thread(service.stop) == 0
        redis.stop()


def test_forward_names_an_unreachable_redis_without_its_password(tmp_path: Path) -> None:
    password = "hunter2-0b3a9c"
    port = free_port()  # nothing listens there
    url = f"redis://ops:{password}@127.0.0.1:{port}/0?password={password}"
    shown = f"redis://ops:***@127.0.0.1:{port}/0?password=***"
    stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [COMMAND, "forward"],
            env=clean_env(
                IDENTITY_SOURCES=sources_env(),
                IDENTITY_SECRET=SECRET,
                IDENTITY_REDIS_URL=url,
                **events_file(tmp_path),
            ),
            stdout=out,
            stderr=err,
        )
    try:
        errors = wait_for_lines(stdout_path, "forwarder_store_error", count=2)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert len(errors) >= 2 and all(line["store"] == shown for line in errors)
    assert stderr_path.read_text().splitlines() == [
        f"identity-service: warning: redis at {shown} (ConnectionRefusedError) does not answer; "
        "the forwarders retry until it does"
    ]
    (unreachable,) = wait_for_lines(stdout_path, "store_unreachable")
    assert unreachable["reason"] == f"redis at {shown} (ConnectionRefusedError)"
    assert password not in stdout_path.read_text() + stderr_path.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_forward_stops_gracefully_on_sigterm_and_sighup(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGHUP (its terminal closed) ended ``forward`` at once (exit -1), as if killed; it
    now stops as on SIGTERM: the forwarders stopped, exit 0."""
    stdout_path = tmp_path / "stdout"
    with stdout_path.open("wb") as out:
        process = subprocess.Popen(
            [COMMAND, "forward"],
            env=clean_env(
                IDENTITY_SOURCES=sources_env(),
                IDENTITY_SECRET=SECRET,
                IDENTITY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
                IDENTITY_FORWARDER_METRICS_PORT="0",
                **events_file(tmp_path),
            ),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        wait_for_lines(stdout_path, "forwarder_started")
    finally:
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert wait_for_lines(stdout_path, "forwarder_stopped")


def test_forward_warns_of_a_source_whose_events_no_destination_takes(tmp_path: Path) -> None:
    destinations = {"a": {"url": "https://api.segment.io", "write_key": "wk", "sources": ["shop"]}}
    stdout_path = tmp_path / "stdout"
    with stdout_path.open("wb") as out:
        process = subprocess.Popen(
            [COMMAND, "forward"],
            env=clean_env(
                IDENTITY_SOURCES=sources_env(),
                IDENTITY_SECRET=SECRET,
                IDENTITY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
                IDENTITY_DESTINATIONS=json.dumps(destinations),
                IDENTITY_FORWARDER_METRICS_PORT="0",
            ),
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        (warning,) = wait_for_lines(stdout_path, "outbox_sources_routed_nowhere")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert warning["level"] == "warning"
    assert warning["sources"] == [name for name in WRITE_KEYS if name != "shop"]


@pytest.mark.parametrize(
    "command", [("serve", "--port", "0"), ("forward",), ("outbox", "status")], ids=str
)
@pytest.mark.parametrize(
    "url",
    [
        "redis://:topsecret/PASSTAIL@127.0.0.1:1/0",
        "redis://:topsecret@127.0.0.1:99999/0",
        "redis://:topsecret@127.0.0.1:1/0?ssl_cert_reqs=none",
    ],
)
def test_a_bad_redis_url_is_refused_in_one_line_without_its_password(
    url: str, command: tuple[str, ...]
) -> None:
    """An unencoded / in the password made a traceback quoting the rest of it."""
    if command[0] == "serve":
        command = ("serve", "--port", str(free_port()))
    result = run_command(redis_env_for(url), *command)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    heading, problem = result.stderr.splitlines()
    assert heading == "identity-service: invalid configuration:"
    assert problem.startswith("  - IDENTITY_REDIS_URL: ")
    assert "topsecret" not in result.stderr and "PASSTAIL" not in result.stderr


def test_serve_names_the_workers_option_it_refuses() -> None:
    result = run_command(
        clean_env(IDENTITY_WORKERS="2"), "serve", "--port", str(free_port()), "--workers", "-3"
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "identity-service: invalid configuration:",
        "  - --workers must be between 1 and 64, not -3",
    ]


def test_a_metrics_directory_that_cannot_be_made_is_said_in_one_line(tmp_path: Path) -> None:
    """It was a NotADirectoryError traceback, after the start banner."""
    (tmp_path / "file").write_text("")
    directory = tmp_path / "file" / "metrics"
    env = {
        **redis_env_for(f"redis://127.0.0.1:{free_port()}/0"),
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    result = run_command(env, "serve", "--port", str(free_port()), "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"identity-service: PROMETHEUS_MULTIPROC_DIR {directory}: Not a directory"
    ]


def test_serve_with_workers_empties_the_metrics_directory_once(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """PROMETHEUS_MULTIPROC_DIR is emptied of an earlier run's files once, before the
    banner. It was emptied again when the workers' directory was made, after Redis was
    reached: what was written there in between was deleted (here written while a stopped
    Redis holds the start's check of Redis for IDENTITY_REDIS_TIMEOUT)."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    earlier = directory / "counter_1.db"
    earlier.write_bytes(b"an earlier run's counts")
    between = directory / "counter_424242.db"  # another process's counts, as it writes them

    def write_once_emptied() -> None:
        deadline = time.monotonic() + 15
        while earlier.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        counts = MmapedDict(str(between))  # type: ignore[no-untyped-call]
        key = mmap_key("test_between", "test_between_total", [], [], "Written in between.")
        counts.write_value(key, 1.0, 0.0)  # type: ignore[no-untyped-call]
        counts.close()  # type: ignore[no-untyped-call]

    env = redis_env(
        private_redis, IDENTITY_REDIS_TIMEOUT="2", PROMETHEUS_MULTIPROC_DIR=str(directory)
    )
    writer = threading.Thread(target=write_once_emptied)
    os.kill(private_redis.pid, signal.SIGSTOP)  # takes connections, answers nothing
    writer.start()
    try:
        service = Service(tmp_path, env, "--workers", "2")  # returns once a worker listens
    finally:
        os.kill(private_redis.pid, signal.SIGCONT)
        writer.join()
    try:
        assert "does not answer; requests answer 503" in service.stderr  # the check waited
        assert not earlier.exists()
        assert between.exists()
        values = MmapedDict.read_all_values_from_file(str(between))  # type: ignore[no-untyped-call]
        assert [value for _, value, _, _ in values] == [1.0]
    finally:
        service.stop()


async def test_a_dev_write_key_from_the_config_file_is_not_printed(tmp_path: Path) -> None:
    """Start-up printed the development write key unless it came from IDENTITY_DEV_WRITE_KEY:
    one set in the config file was written out in clear on standard error."""
    config = tmp_path / "identity.toml"
    config.write_text(f'dev_write_key = "{DEV_KEY}"\n')
    service = Service(tmp_path, clean_env(), "--config", str(config))
    try:
        status, _ = await post(
            f"{service.url}/v1/handoffs",
            {"anonymousId": "a", "destination": "https://shop.localhost/"},
            DEV_KEY,
        )
        assert status == 201
        assert "write key: the value of dev_write_key" in service.stderr, service.stderr
    finally:
        assert service.stop() == 0
    assert DEV_KEY not in service.stderr + service.stdout


@pytest.mark.parametrize("action", ["status", "dead", "replay-dead", "retire"])
def test_outbox_commands_say_when_a_cluster_cannot_be_reached(action: str, tmp_path: Path) -> None:
    """No node of a Cluster answers: redis-py raises RedisClusterException, which is no
    RedisError; the command says so in one line all the same, not in a traceback."""
    env = clean_env(
        IDENTITY_REDIS_URL=f"redis+cluster://127.0.0.1:{free_port()}",  # nothing listens there
        IDENTITY_SECRET=SECRET,
        IDENTITY_SOURCES=sources_env(),
        **events_file(tmp_path),
    )
    args = [action, "gone"] if action == "retire" else [action]
    result = outbox_command(env, *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("identity-service: Redis: RedisClusterException")
    assert result.stdout == ""


# A command line in the docs' code: at the start of a line or a code span, or after a pipe,
# kubectl's `--` or a directory (.venv/bin/identity-service).
DOCUMENTED_COMMAND = re.compile(r"(?:^|-- |\| |/)identity-service ([a-z][^`#|\n]*)")
# What the docs write for an argument, and a value the command takes in its place.
PLACEHOLDERS = {"NAME": "segment", "N": "5", "FILE": "identity.toml"}


def documented_commands() -> set[str]:
    """The ``identity-service`` command lines in code in the README, docs/ and the chart:
    code blocks' lines and inline code spans."""
    root = Path(__file__).resolve().parent.parent
    chart = root / "helm" / "identity-service"
    found: set[str] = set()
    for path in [
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
        chart / "values.yaml",
        chart / "templates" / "NOTES.txt",
    ]:
        code, _ = code_and_prose(path)
        found.update(m.strip() for c in code for m in DOCUMENTED_COMMAND.findall(c.strip()))
    return found


def test_every_command_line_the_docs_write_is_one_the_command_takes() -> None:
    """Each command, outbox action and option the docs write in code parses as written
    (placeholders such as ``[NAME]`` and ``N`` given a value)."""
    commands = documented_commands()
    assert {c.split()[0] for c in commands} >= {"serve", "forward", "outbox", "new-key"}
    refused = []
    for command in sorted(commands):
        words = [PLACEHOLDERS.get(w.strip("[]"), w.strip("[]")) for w in command.split()]
        try:
            command_parser().parse_args(words)
        except SystemExit:
            refused.append(command)
    assert refused == []


def _connected_to(port: int) -> bool:
    """Whether a loopback TCP connection to ``port`` is established (/proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


@pytest.mark.parametrize(
    "command", [("serve",), ("serve", "--workers", "2"), ("forward",), ("outbox", "status")]
)
@pytest.mark.parametrize(
    ("signum", "said"),
    [
        (signal.SIGINT, "interrupted"),
        (signal.SIGTERM, "terminated"),
        (signal.SIGHUP, "hung up"),
    ],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_ctrl_c_while_redis_is_reached_at_start_is_said_in_one_line(
    private_redis: RedisServer, command: tuple[str, ...], signum: signal.Signals, said: str
) -> None:
    """SIGINT (Ctrl-C) while the start's check of Redis waits for an answer: it was two
    chained tracebacks (CancelledError, then KeyboardInterrupt), and exit -2. SIGHUP (the
    terminal closed) ended it without a word (exit -1): each is now said in one line, exit
    128 + the signal's number, as a shell says it."""
    args = [*command, "--port", str(free_port())] if command[0] == "serve" else command
    env = redis_env(
        private_redis, IDENTITY_REDIS_TIMEOUT="20", IDENTITY_FORWARDER_METRICS_PORT="off"
    )
    os.kill(private_redis.pid, signal.SIGSTOP)  # takes connections, answers nothing
    try:
        process = subprocess.Popen(
            [COMMAND, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 15
        while not _connected_to(private_redis.port):
            assert process.poll() is None and time.monotonic() < deadline, "never reached Redis"
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        os.kill(private_redis.pid, signal.SIGCONT)
    assert (process.returncode, stdout) == (128 + signum, ""), stderr
    assert stderr.splitlines() == [f"identity-service: {said}"]


def test_a_worker_that_stops_alone_stops_the_set(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """A worker sent SIGTERM alone ends cleanly (exit 0): the parent went on with one
    worker fewer, for good, and would have exited 0 once the last was gone. Like a worker
    that dies, it now stops the others, and the parent exits 1 for its supervisor."""
    service = Service(tmp_path, redis_env(private_redis), "--workers", "2")
    try:
        worker, _ = _children_of(service.process.pid)
        os.kill(worker, signal.SIGTERM)
        assert service.process.wait(timeout=20) == 1
    finally:
        service.stop()
    assert f"identity-service: worker {worker} exited; stopping" in service.stderr.splitlines()


@pytest.mark.parametrize("args", [("outbox", "status"), ("outbox", "dead"), ("new-key",)])
def test_a_reader_gone_from_standard_output_is_not_blamed_on_redis(
    redis_server: RedisServer, args: tuple[str, ...]
) -> None:
    """``identity-service outbox status | head``: the reader gone before the table was
    written, the command said ``identity-service: Redis: BrokenPipeError`` (Redis was
    fine), and ``new-key`` printed a traceback. It now ends quietly, exit 1."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        result = subprocess.run(
            [COMMAND, *args],
            env=redis_env(redis_server),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")


@pytest.mark.parametrize("args", [("serve",), ("forward",), ("new-key",), ("--version",)], ids=str)
def test_a_closed_standard_output_is_said_in_one_line(args: tuple[str, ...]) -> None:
    """``identity-service serve >&-``: the logging's set-up crashed in a traceback (its
    stream None), and ``new-key`` too, once it had printed its key to nowhere. A closed
    standard output is now refused at once, in one line, exit 2: the logs, the stdout
    destination's events and the commands' answers all go there."""
    port = free_port()
    if args == ("serve",):
        args = ("serve", "--port", str(port))
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', COMMAND, *args],
        env=clean_env(IDENTITY_DEV_WRITE_KEY=DEV_KEY),
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "identity-service: standard output is closed; the logs and the command's output go "
        "there (redirect it, to /dev/null if need be)"
    ]
    with pytest.raises(ConnectionRefusedError):  # nothing was left listening
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def _as_first_process(args: list[str]) -> list[str] | None:
    """``args`` run as the first process of a PID namespace of their own, as a container
    runs the image's entry point; None where no namespace can be made here."""
    unshare = ["unshare", "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    try:
        subprocess.run([*unshare, "true"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return [*unshare, *args]


@pytest.mark.parametrize("command", [("serve",), ("serve", "--workers", "2"), ("forward",)])
def test_sigterm_while_redis_is_reached_at_start_stops_a_containers_first_process(
    private_redis: RedisServer, command: tuple[str, ...]
) -> None:
    """The kernel drops a signal the first process of a PID namespace (the image's entry
    point) has no handler for: a SIGTERM while start-up waited for Redis (a pod deleted as
    it starts, a ``docker stop``) was lost, and the service started and served until
    SIGKILL. It now ends the command as Ctrl-C does, exit 143."""
    args = [*command, "--port", str(free_port())] if command[0] == "serve" else command
    first = _as_first_process([COMMAND, *args])
    if first is None:
        pytest.skip("no PID namespace can be made here (unshare)")
    env = redis_env(
        private_redis, IDENTITY_REDIS_TIMEOUT="20", IDENTITY_FORWARDER_METRICS_PORT="off"
    )
    os.kill(private_redis.pid, signal.SIGSTOP)  # takes connections, answers nothing
    try:
        process = subprocess.Popen(
            first, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 15
        while not _connected_to(private_redis.port):
            assert process.poll() is None and time.monotonic() < deadline, "never reached Redis"
            time.sleep(0.05)
        (service,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(service), signal.SIGTERM)
        time.sleep(0.5)
    finally:
        os.kill(private_redis.pid, signal.SIGCONT)  # the check ends: the service would start
    try:
        _, stderr = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "identity-service: terminated" in stderr.splitlines()
    assert "identity-service 0" not in stderr  # no banner: it did not start


def test_each_commands_help_says_what_it_does() -> None:
    """``forward`` was said to run "without serving HTTP" (it serves /metrics and /healthz
    on its metrics port), the outbox actions were listed without what each does, and a
    command's own --help said nothing of it."""
    assert "IDENTITY_FORWARDER_METRICS_PORT" in run_command(clean_env(), "--help").stdout
    forward = " ".join(run_command(clean_env(), "forward", "--help").stdout.split())
    assert "without serving HTTP" not in forward
    assert "/metrics and /healthz" in forward and "IDENTITY_FORWARDER_METRICS_PORT" in forward
    outbox = " ".join(run_command(clean_env(), "outbox", "--help").stdout.split())
    for said in ("status: per destination", "dead: the newest", "replay-dead: re-queue"):
        assert said in outbox
    assert "retire: stop keeping events for a destination removed" in outbox
    for command in ("serve", "hash-key", "new-key"):
        result = run_command(clean_env(), command, "--help")
        assert result.returncode == 0
        assert result.stdout.split("\n\n")[1].strip(), f"{command} --help says nothing of it"


def test_ctrl_c_as_workers_start_stops_them_without_a_traceback(
    private_redis: RedisServer,
) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) just after the banner, before a
    worker's loop handled the signal: the worker printed a KeyboardInterrupt traceback and
    the parent said it failed (exit 1). At any moment it is now a stop: exit 0 once the
    workers run, 130 when the parent had not forked them all yet, in one line."""
    for attempt in range(8):
        process = subprocess.Popen(
            [COMMAND, "serve", "--port", str(free_port()), "--workers", "2"],
            env=redis_env(private_redis),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, as a terminal's job
        )
        assert process.stderr is not None
        banner = process.stderr.readline()
        time.sleep(0.005 * attempt)  # into the workers' start, at a different moment each time
        os.killpg(process.pid, signal.SIGINT)
        stderr = (banner + process.stderr.read()).decode()
        returncode = process.wait(timeout=20)
        assert "Traceback" not in stderr and "failed" not in stderr, stderr
        assert returncode in (0, INTERRUPTED), stderr


@pytest.mark.parametrize("credentials", ["", ":not-it@", "someone:not-it@"])
def test_credentials_redis_refuses_are_refused_at_start(tmp_path: Path, credentials: str) -> None:
    """A wrong or missing password (WRONGPASS, NOAUTH) was taken for a Redis that did not
    answer yet: serve started, said "does not answer" and answered 503 for ever, since the
    credentials never change in a running process. It is a setting to mend: one line, exit
    2, the password masked."""
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        subprocess.run(
            ["redis-cli", "-p", str(redis.port), "config", "set", "requirepass", "the-right-one"],
            check=True,
            capture_output=True,
        )
        url = f"redis://{credentials}127.0.0.1:{redis.port}/0"
        line = refusal_at_start(url, "refused the credentials")
        assert "not-it" not in line and "the-right-one" not in line
    finally:
        redis.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_terminal_closing_stops_serve_gracefully(
    private_redis: RedisServer, workers: str, tmp_path: Path
) -> None:
    """The terminal running ``make serve`` closes: the kernel sends its processes SIGHUP,
    and their output fails (EIO) from then on. The service died at once, the request in
    flight unanswered; with SIGHUP a stop, the log lines that could not be written then
    ended it in tracebacks, exit 1. It now finishes the request and exits 0, the lines it
    could not write said once on standard error."""
    port = free_port()
    stderr_path = tmp_path / "stderr"
    pid, terminal = pty.fork()  # the child: a session of its own, the terminal its own
    if pid == 0:  # pragma: no cover - the child process
        try:
            os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT, 0o600), 2)
            env = redis_env(private_redis, IDENTITY_REDIS_TIMEOUT="5")
            args = [COMMAND, "serve", "--port", str(port), "--workers", workers]
            os.execve(COMMAND, args, env)  # noqa: S606 - the terminal's child becomes the service
        finally:
            os._exit(127)
    try:
        deadline = time.monotonic() + 15
        while not _accepts(port):
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        body = orjson.dumps({"anonymousId": "anon-hup-7e1a", "destination": CHECKOUT_URL})
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                b"POST /v1/handoffs HTTP/1.1\r\nHost: identity\r\n"
                + f"Authorization: Bearer {WRITE_KEYS['shop']}\r\n".encode()
                + b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:5]
            )
            time.sleep(0.3)
            os.close(terminal)  # the terminal closes: SIGHUP to its foreground group
            terminal = -1
            time.sleep(0.3)
            client.sendall(body[5:])
            answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if terminal >= 0:
            os.close(terminal)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    stderr = stderr_path.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    assert "Traceback" not in stderr and "failed" not in stderr, stderr
    assert stderr.count("identity-service: log lines dropped: Input/output error") <= int(workers)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def memory_outbox_env(collector: Collector, shutdown_timeout: float) -> dict[str, str]:
    """A service on the memory store delivering to ``collector``, a failed batch retried
    only after far longer than the test lasts."""
    return clean_env(
        IDENTITY_SOURCES=sources_env(),
        IDENTITY_SECRET=SECRET,
        IDENTITY_DESTINATION_URL=collector.url,
        IDENTITY_DESTINATION_WRITE_KEY=COLLECTOR_WRITE_KEY,
        IDENTITY_BATCH_MAX_WAIT="0.01",
        IDENTITY_BACKOFF_BASE="30",
        IDENTITY_BACKOFF_MAX="60",
        IDENTITY_DELIVERY_TIMEOUT="5",
        IDENTITY_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
    )


async def prepare_handoffs(service: Service, count: int) -> None:
    for index in range(count):
        body = {"anonymousId": f"anon-outbox-{index}-5d2c", "destination": CHECKOUT_URL}
        status, _ = await post(f"{service.url}/v1/handoffs", body, WRITE_KEYS["shop"])
        assert status == 201, service.stderr


async def first_batch(service: Service, collector: Collector) -> int:
    """How many events the collector's first request carried, once it came."""
    deadline = time.monotonic() + 10
    while not collector.requests:
        assert time.monotonic() < deadline, service.stderr
        await asyncio.sleep(0.02)
    return len(collector.requests[0].events)


def undelivered_lines(service: Service) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in service.stdout.splitlines() if line]
    return [line for line in lines if line.get("event") == "outbox_events_undelivered"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_the_memory_outbox_tries_once_more_at_the_stop_and_counts_what_it_drops(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """The memory store's events still queued at SIGTERM (or SIGHUP) were dropped without
    a word. The stop gives them one more attempt, then says in one warning line how many
    could not be delivered: the count, never the events or their ids."""
    async with running_collector() as collector:
        collector.plan = [Answer(status=503)] * 10  # refuses every batch
        service = Service(tmp_path, memory_outbox_env(collector, shutdown_timeout=5))
        try:
            await prepare_handoffs(service, 1)
            per_handoff = await first_batch(service, collector)  # refused: retried in 30 s+
            await prepare_handoffs(service, 3)
            await asyncio.sleep(0.2)  # queued behind the refused batch
            assert len(collector.requests) == 1
            service.terminate(signum)
            assert await asyncio.to_thread(service.process.wait, 20) == 0
        finally:
            service.stop()
    # The last attempt: the refused batch and those queued since, refused again.
    assert len(collector.requests) == 2, service.stderr
    assert len(collector.requests[1].events) == 4 * per_handoff
    assert collector.events == []
    (warning,) = undelivered_lines(service)
    assert warning["level"] == "warning"
    assert (warning["events"], warning["destinations"]) == (
        4 * per_handoff,
        {"default": 4 * per_handoff},
    )
    assert set(warning) == {"event", "level", "timestamp", "events", "destinations"}


async def test_the_memory_outbox_stops_within_the_shutdown_timeout(tmp_path: Path) -> None:
    """The forwarders' stop waited up to the shutdown timeout for a batch in flight, then
    gave the memory queues as long again, each destination in turn, past the grace period
    (docs/operations.md): their whole stop now takes at most the timeout once, and what
    it could not deliver is counted."""
    timeout = 2.0
    async with running_collector() as collector:
        collector.plan = [Answer(hold=60)] * 10  # holds every batch, never answers
        service = Service(tmp_path, memory_outbox_env(collector, shutdown_timeout=timeout))
        try:
            await prepare_handoffs(service, 1)
            per_handoff = await first_batch(service, collector)
            await prepare_handoffs(service, 3)  # queued behind the batch held
            started = time.monotonic()
            service.terminate()
            assert await asyncio.to_thread(service.process.wait, 20) == 0
            stopped = time.monotonic() - started
        finally:
            service.stop()
    assert timeout <= stopped < timeout + 1.5, service.stderr
    (warning,) = undelivered_lines(service)
    assert warning["events"] == 4 * per_handoff
