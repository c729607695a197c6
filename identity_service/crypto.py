"""Handoff tokens and the sealing of handoff records.

A token is 32 random bytes, sent as base64url without padding. The store never sees it:
- the record's key is HMAC-SHA256(server secret, token), the *lookup id*;
- the record is sealed with AES-256-GCM under HKDF-SHA256(token), with the lookup id as
  associated data, so a record cannot be moved to another key.
A dump of the store therefore holds neither redeemable tokens nor readable identities.
docs/security.md explains the design.
"""

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from identity_service.constants import TOKEN_BYTES

_RECORD_VERSION = b"\x01"
_NONCE_BYTES = 12
_HKDF_INFO = b"identity-service handoff record v1"
_HKDF_SALT = b"identity-service"


class SealError(Exception):
    """A sealed record could not be opened: wrong token, wrong key or tampered bytes."""


@dataclass(frozen=True, slots=True)
class Token:
    """A handoff token: its raw bytes and the text form handed to callers."""

    raw: bytes

    @classmethod
    def generate(cls) -> "Token":
        return cls(secrets.token_bytes(TOKEN_BYTES))

    @classmethod
    def parse(cls, text: str) -> "Token | None":
        """The token for ``text``, or None when it cannot be one of ours."""
        if len(text) != 43:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=")
        except (binascii.Error, ValueError):
            return None
        if len(raw) != TOKEN_BYTES or cls(raw).text != text:
            return None
        return cls(raw)

    @property
    def text(self) -> str:
        return base64.urlsafe_b64encode(self.raw).rstrip(b"=").decode("ascii")


class TokenSealer:
    """Derives lookup ids and seals/opens records for tokens, under one server secret."""

    def __init__(self, server_secret: bytes) -> None:
        self._secret = server_secret

    def lookup_id(self, token: Token) -> bytes:
        return hmac.new(self._secret, token.raw, hashlib.sha256).digest()

    def miss_id(self, token_text: str) -> bytes:
        """A keyed id for any token text, so the events of a miss get a stable messageId."""
        return hmac.new(self._secret, b"miss:" + token_text.encode(), hashlib.sha256).digest()

    def seal(self, token: Token, lookup_id: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = _aead(token).encrypt(nonce, plaintext, lookup_id)
        return _RECORD_VERSION + nonce + sealed

    def open(self, token: Token, lookup_id: bytes, record: bytes) -> bytes:
        if record[:1] != _RECORD_VERSION or len(record) < 1 + _NONCE_BYTES + 16:
            raise SealError("unknown record format")
        nonce = record[1 : 1 + _NONCE_BYTES]
        try:
            return _aead(token).decrypt(nonce, record[1 + _NONCE_BYTES :], lookup_id)
        except InvalidTag as exc:
            raise SealError("record does not open with this token") from exc


def _aead(token: Token) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(
        token.raw
    )
    return AESGCM(key)


class OutboxSealer:
    """Seals outbox entries under the server secret, so Redis holds no readable identity.

    Each entry gets its own key, HKDF(secret, random salt), so the AES-GCM nonce can be
    fixed and no nonce-reuse bound applies however many entries are sealed.
    """

    _VERSION = b"\x01"
    _SALT_BYTES = 16
    _NONCE = bytes(12)

    def __init__(self, server_secret: bytes) -> None:
        self._secret = hashlib.sha256(b"identity-service outbox v1" + server_secret).digest()

    def seal(self, plaintext: bytes) -> bytes:
        salt = os.urandom(self._SALT_BYTES)
        return self._VERSION + salt + self._aead(salt).encrypt(self._NONCE, plaintext, None)

    def open(self, sealed: bytes) -> bytes:
        if sealed[:1] != self._VERSION or len(sealed) < 1 + self._SALT_BYTES + 16:
            raise SealError("unknown outbox entry format")
        salt = sealed[1 : 1 + self._SALT_BYTES]
        try:
            return self._aead(salt).decrypt(self._NONCE, sealed[1 + self._SALT_BYTES :], None)
        except InvalidTag as exc:
            raise SealError("outbox entry does not open with this secret") from exc

    def _aead(self, salt: bytes) -> AESGCM:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"outbox entry")
        return AESGCM(hkdf.derive(self._secret))
