"""Tokens, lookup ids and record sealing."""

import pytest

from identity_service.crypto import SealError, Token, TokenSealer

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
