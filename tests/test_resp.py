"""The pipelined RESP client against a real redis-server."""

import asyncio
import datetime
import gc
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.asyncio import Redis

from identity_service.stores.resp import ReplyError, RespClient, Script
from tests.redis_server import RedisServer, free_port


async def test_concurrent_commands_get_their_own_replies(private_redis: RedisServer) -> None:
    client = RespClient(private_redis.url, timeout=5)
    try:
        replies = await asyncio.gather(
            *(client.execute("SET", f"k{n}", f"v{n}") for n in range(300)),
            *(client.execute("GET", f"k{n}") for n in range(300)),
        )
        assert replies[:300] == [b"OK"] * 300
        assert replies[300:] == [f"v{n}".encode() for n in range(300)]
        with pytest.raises(ReplyError, match="WRONGTYPE"):
            await asyncio.gather(client.execute("SET", "s", "x"), client.execute("LPUSH", "s", "y"))
        assert await client.execute("GET", "s") == b"x"  # the connection is still in step
    finally:
        await client.close()


async def test_scripts_run_after_redis_forgot_them(private_redis: RedisServer) -> None:
    client = RespClient(private_redis.url, timeout=5)
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    try:
        assert await client.run_script(script, ["n"], [2]) == 2
        assert await client.execute("SCRIPT", "FLUSH") == b"OK"
        assert await client.run_script(script, ["n"], [3]) == 5
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
    finally:
        await client.close()


async def test_a_stalled_redis_fails_waiting_commands_then_recovers(
    private_redis: RedisServer,
) -> None:
    client = RespClient(private_redis.url, timeout=0.3)
    blocker = socket.create_connection(("127.0.0.1", private_redis.port))
    try:
        await client.execute("PING")
        blocker.sendall(b"DEBUG SLEEP 1\r\n")
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.gather(client.execute("PING"), client.execute("PING"))
        await asyncio.sleep(1)
        assert await client.execute("PING") == b"PONG"
    finally:
        blocker.close()
        await client.close()


async def test_redis_down_is_a_connection_error_and_its_return_is_noticed(
    private_redis: RedisServer,
) -> None:
    client = RespClient(private_redis.url, timeout=1)
    try:
        await client.execute("PING")
        private_redis.stop()
        with pytest.raises(ConnectionError):
            await client.execute("PING")
        with pytest.raises(ConnectionError):
            await client.execute("PING")
        private_redis.start()
        assert await client.execute("PING") == b"PONG"
    finally:
        await client.close()
    with pytest.raises(ConnectionError):
        await RespClient(f"redis://127.0.0.1:{free_port()}/0", timeout=1).execute("PING")


async def test_password_and_database_from_the_url(private_redis: RedisServer) -> None:
    admin = Redis.from_url(private_redis.url)
    await admin.config_set("requirepass", "s3cret")
    admin = Redis.from_url(f"redis://:s3cret@127.0.0.1:{private_redis.port}/3")
    try:
        client = RespClient(f"redis://:s3cret@127.0.0.1:{private_redis.port}/3", timeout=2)
        assert await client.execute("SET", "in-db-3", "yes") == b"OK"
        await client.close()
        assert await admin.get("in-db-3") == b"yes"
        wrong = RespClient(f"redis://:wrong@127.0.0.1:{private_redis.port}/0", timeout=2)
        with pytest.raises(ReplyError):
            await wrong.execute("PING")
        await wrong.close()
        unix = RespClient(private_redis.unix_url.replace("unix://", "unix://:s3cret@"), timeout=2)
        assert await unix.execute("PING") == b"PONG"
        await unix.close()
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def test_a_cancelled_caller_leaves_the_replies_in_step(private_redis: RedisServer) -> None:
    client = RespClient(private_redis.url, timeout=5)
    try:
        await client.execute("SET", "x", "1")
        slow = asyncio.create_task(client.execute("BLPOP", "empty-list", "0.2"))
        after = asyncio.create_task(client.execute("GET", "x"))
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await after == b"1"  # not BLPOP's nil
        assert await client.execute("INCR", "x") == 2
    finally:
        await client.close()


async def test_closing_while_connecting_keeps_no_connection(private_redis: RedisServer) -> None:
    client = RespClient(private_redis.url, timeout=5)
    connecting = asyncio.create_task(client.execute("PING"))
    await asyncio.sleep(0)
    await client.close()
    with pytest.raises(ConnectionError):
        await connecting
    with pytest.raises(ConnectionError, match="closed"):
        await client.execute("PING")


async def test_a_broken_asking_leaves_no_unretrieved_error() -> None:
    """A Cluster's ASK: ASKING and the command go together; when the connection breaks,
    both fail, and the command's error was left unretrieved (asyncio logged it)."""

    async def breaking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.transport.abort()

    server = await asyncio.start_server(breaking, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    logged: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: logged.append(context["message"])
    )
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout=2)
    failed = False
    try:
        await client.execute_asking("GET", "k")
    except ConnectionError:  # not pytest.raises: its traceback would keep the futures alive
        failed = True
    finally:
        await client.close()
        server.close()
    await asyncio.sleep(0.05)  # the connection lost, the client's close done
    gc.collect()
    assert failed
    assert logged == []


def write_tls_files(directory: Path) -> None:
    """A CA, and a certificate for 127.0.0.1 that it signed: ca.pem, server.pem, server.key."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([address]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate("test CA", ca_key, ca_name, ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


async def test_rediss_urls_verify_as_their_parameters_say(tmp_path: Path) -> None:
    write_tls_files(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        tmp_path,
        tls_port=str(tls_port),
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
        tls_ca_cert_file=str(tmp_path / "ca.pem"),
        tls_auth_clients="no",
    )
    server.start()
    base = f"rediss://127.0.0.1:{tls_port}/0"
    try:
        for url in (f"{base}?ssl_ca_certs={tmp_path / 'ca.pem'}", f"{base}?ssl_cert_reqs=none"):
            client = RespClient(url, timeout=5)
            try:
                assert await client.execute("PING") == b"PONG", url
            finally:
                await client.close()
        unknown_ca = RespClient(base, timeout=5)  # the system's CAs do not know this one
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await unknown_ca.execute("PING")
        finally:
            await unknown_ca.close()
    finally:
        server.stop()
