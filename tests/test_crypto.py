"""Tokens, lookup ids and record sealing."""

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from identity_service.crypto import OutboxSealer, SealError, Token, TokenSealer, hkdf_sha256

SEALER = TokenSealer(b"s" * 32)


def test_tokens_are_32_random_bytes_in_base64url() -> None:
    tokens = [Token.generate() for _ in range(100)]
    assert len({t.raw for t in tokens}) == 100
    for token in tokens:
        assert len(token.raw) == 32
        assert len(token.text) == 43
        assert set(token.text) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )
        assert Token.parse(token.text) == token


@pytest.mark.parametrize(
    "text",
    ["", "short", "A" * 42, "A" * 44, "+" * 43, "A" * 42 + "=", "A" * 42 + "B"],
)
def test_parse_rejects_what_cannot_be_a_token(text: str) -> None:
    # "A"*42 + "B" decodes, but has non-zero padding bits: not a canonical encoding.
    assert Token.parse(text) is None


@given(st.text(alphabet="AEIMQUYcgkosw048Bb9-_+/=. \n\u00e9", min_size=41, max_size=45))
def test_a_token_has_one_text(text: str) -> None:
    # What parses is exactly the canonical text of its bytes: nothing else is accepted.
    token = Token.parse(text)
    assert token is None or token.text == text


def test_lookup_id_depends_on_the_server_secret() -> None:
    token = Token.generate()
    assert SEALER.lookup_id(token) == TokenSealer(b"s" * 32).lookup_id(token)
    assert SEALER.lookup_id(token) != TokenSealer(b"t" * 32).lookup_id(token)
    assert token.raw not in SEALER.lookup_id(token)


def test_seal_and_open_round_trip() -> None:
    token = Token.generate()
    lookup_id = SEALER.lookup_id(token)
    sealed = SEALER.seal(token, lookup_id, b'{"anonymousId": "a"}')
    assert b"anonymousId" not in sealed
    assert SEALER.open(token, lookup_id, sealed) == b'{"anonymousId": "a"}'


def test_sealing_twice_gives_different_bytes() -> None:
    token = Token.generate()
    lookup_id = SEALER.lookup_id(token)
    assert SEALER.seal(token, lookup_id, b"x") != SEALER.seal(token, lookup_id, b"x")


def test_a_record_opens_only_with_its_token_and_under_its_key() -> None:
    token, other = Token.generate(), Token.generate()
    lookup_id = SEALER.lookup_id(token)
    sealed = SEALER.seal(token, lookup_id, b"identity")
    with pytest.raises(SealError):
        SEALER.open(other, lookup_id, sealed)
    with pytest.raises(SealError):
        SEALER.open(token, SEALER.lookup_id(other), sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealError):
        SEALER.open(token, lookup_id, tampered)
    with pytest.raises(SealError):
        SEALER.open(token, lookup_id, b"\x02" + sealed[1:])
    with pytest.raises(SealError):
        SEALER.open(token, lookup_id, sealed[:10])


def test_lookup_id_is_hmac_sha256_of_the_token_under_the_secret() -> None:
    # The store's keys: the same bytes as before the keyed state was made once, so a
    # handoff prepared by the previous version is found by this one.
    for _ in range(3):
        token = Token.generate()
        expected = hmac.digest(b"s" * 32, token.raw, "sha256")
        assert SEALER.lookup_id(token) == expected
        assert SEALER.lookup_id(token) == expected  # the keyed state is not consumed


def test_records_are_sealed_under_hkdf_of_the_token() -> None:
    # A record sealed as the previous version sealed it (HKDF through cryptography) opens.
    token = Token.generate()
    lookup_id = SEALER.lookup_id(token)
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"identity-service",
        info=b"identity-service handoff record v1",
    ).derive(token.raw)
    nonce = os.urandom(12)
    sealed = b"\x01" + nonce + AESGCM(key).encrypt(nonce, b"record", lookup_id)
    assert SEALER.open(token, lookup_id, sealed) == b"record"
    ours = SEALER.seal(token, lookup_id, b"record")
    assert AESGCM(key).decrypt(ours[1:13], ours[13:], lookup_id) == b"record"


def test_hkdf_matches_cryptography() -> None:
    for key_material, salt, info in [(b"k" * 32, b"salt", b"info"), (os.urandom(32), b"", b"")]:
        expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(
            key_material
        )
        assert hkdf_sha256(key_material, salt=salt, info=info) == expected


def test_outbox_entries_open_in_any_process_with_the_secret() -> None:
    writer, reader = OutboxSealer(b"s" * 32), OutboxSealer(b"s" * 32)
    entries = [writer.seal(b"entry %d" % n) for n in range(3)]
    assert len({entry[17:29] for entry in entries}) == 3  # distinct counter nonces
    assert [reader.open(entry) for entry in entries] == [b"entry 0", b"entry 1", b"entry 2"]
    with pytest.raises(SealError):
        OutboxSealer(b"t" * 32).open(entries[0])
    with pytest.raises(SealError):
        reader.open(entries[0][:-1] + bytes([entries[0][-1] ^ 1]))
    with pytest.raises(SealError):
        reader.open(b"\x03" + entries[0][1:])


def test_outbox_entries_of_version_1_still_open() -> None:
    secret = hashlib.sha256(b"identity-service outbox v1" + b"s" * 32).digest()
    salt = os.urandom(16)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"outbox entry").derive(secret)
    entry = b"\x01" + salt + AESGCM(key).encrypt(bytes(12), b"old entry", None)
    assert OutboxSealer(b"s" * 32).open(entry) == b"old entry"


def test_a_forked_child_seals_under_its_own_key() -> None:
    sealer = OutboxSealer(b"s" * 32)
    parent_entry = sealer.seal(b"parent")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: seal once, report the entry, exit without pytest's teardown
        os.write(write_end, sealer.seal(b"child"))
        os._exit(0)
    os.close(write_end)
    child_entry = os.read(read_end, 4096)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child_entry[1:17] != parent_entry[1:17]  # another salt, so another key
    assert sealer.open(child_entry) == b"child"
