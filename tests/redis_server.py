"""Starts and stops private ``redis-server`` processes on free loopback ports for tests."""

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on, outside the kernel's ephemeral range.

    A port the kernel hands out (``bind`` to 0) is in the ephemeral range, where any
    outgoing connection of the suite (to a Redis, a collector...) may take it before the
    test's server binds it: "address already in use". Ports below that range are only
    ever taken by listeners.
    """
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(_FIRST_PORT, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def free_port_pair(offset: int) -> int:
    """A free port whose ``port + offset`` is free too, both below the ephemeral range (a
    Cluster node listens on its port and on its bus port, 10000 above)."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = free_port()
        if port + offset < low:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free pair of loopback ports {offset} apart")


_FIRST_PORT = 20000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return max(int(low), _FIRST_PORT + 1000), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server in its own directory; ``stop`` and ``start`` keep its port."""

    def __init__(self, directory: Path, port: int | None = None, **options: str) -> None:
        """``options`` are more redis-server settings (``tls_port="…"`` for --tls-port)."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.directory = directory
        self.port = port or free_port()
        self._options = {name.replace("_", "-"): value for name, value in options.items()}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """The address the helpers reach it on: the first it binds (127.0.0.1 by default)."""
        return self._options.get("bind", "127.0.0.1").split()[0]

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.directory / 'redis.sock'}?db=0"

    def start(self) -> None:
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "unixsocket": str(self.directory / "redis.sock"),
            "save": "",
            "appendonly": "no",
            "enable-debug-command": "local",
            "dir": str(self.directory),
            "logfile": str(self.directory / "redis.log"),
            **self._options,
        }
        args = [part for name, value in options.items() for part in (f"--{name}", value)]
        self._process = subprocess.Popen(
            ["redis-server", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers_ping(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)

    def extra_options(self, **options: str) -> None:
        """More redis-server settings for the next ``start``."""
        self._options.update({name.replace("_", "-"): value for name, value in options.items()})

    def kill(self) -> None:
        """SIGKILL: the node dies as a crashed machine would, saying goodbye to nobody."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
