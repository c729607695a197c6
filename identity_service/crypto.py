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
import itertools
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from identity_service.constants import TOKEN_BYTES

# 42 characters of 6 bits and a last one of 4 (its 2 low bits zero): 32 bytes.
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]", re.ASCII)
_RECORD_VERSION = b"\x01"
_NONCE_BYTES = 12
_HKDF_INFO = b"identity-service handoff record v1"
_HKDF_SALT = b"identity-service"


class SealError(Exception):
    """A sealed record could not be opened: wrong token, wrong key or tampered bytes."""


@dataclass(slots=True)  # not frozen: one a request, and frozen costs 3x the __init__
class Token:
    """A handoff token: its raw bytes and the text form handed to callers."""

    raw: bytes

    @classmethod
    def generate(cls) -> "Token":
        return cls(os.urandom(TOKEN_BYTES))

    @classmethod
    def parse(cls, text: str) -> "Token | None":
        """The token for ``text``, or None when it cannot be one of ours.

        Only the canonical text of 32 bytes: 43 base64url characters, the last of them
        with its two unused bits clear, so that one token has one text.
        """
        if not _TOKEN_TEXT.fullmatch(text):
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=")
        except (binascii.Error, ValueError):
            return None
        return cls(raw)

    @property
    def text(self) -> str:
        return base64.urlsafe_b64encode(self.raw).rstrip(b"=").decode("ascii")


class KeyedHmac:
    """HMAC-SHA256 under one fixed key, its keyed state made once.

    ``hmac.digest`` keys a new context on every call (OpenSSL 3 also looks SHA-256 up
    again each time); copying a context keyed once costs about two thirds of that.
    """

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def digest(self, message: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(message)
        return mac.digest()


class TokenSealer:
    """Derives lookup ids and seals/opens records for tokens, under one server secret."""

    def __init__(self, server_secret: bytes) -> None:
        self._lookup = KeyedHmac(server_secret)

    def lookup_id(self, token: Token) -> bytes:
        return self._lookup.digest(token.raw)

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


class HkdfSha256:
    """HKDF-SHA256 (RFC 5869) of one 32-byte block under a fixed salt and info.

    Two HMACs: the salt's keyed once (KeyedHmac), the expansion's under each derived key.
    The same bytes as cryptography's HKDF with length=32 (a test holds them equal), at a
    fraction of the cost of building its objects on every request.
    """

    __slots__ = ("_expand_message", "_extract")

    def __init__(self, *, salt: bytes, info: bytes) -> None:
        self._extract = KeyedHmac(salt)
        self._expand_message = info + b"\x01"

    def derive(self, key_material: bytes) -> bytes:
        pseudorandom_key = self._extract.digest(key_material)
        return hmac.digest(pseudorandom_key, self._expand_message, "sha256")


_RECORD_KEY = HkdfSha256(salt=_HKDF_SALT, info=_HKDF_INFO)


def _aead(token: Token) -> AESGCM:
    return AESGCM(_RECORD_KEY.derive(token.raw))


def hkdf_sha256(key_material: bytes, *, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of one 32-byte block, for a salt used once (see HkdfSha256)."""
    return HkdfSha256(salt=salt, info=info).derive(key_material)


# Forks of this process so far, as seen in it: a sealer made before a fork draws a new key
# in the child. Cheaper than a getpid() (a system call) on every seal.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class OutboxSealer:
    """Seals outbox entries under the server secret, so Redis holds no readable identity.

    Each sealer (one per process) draws a random 16-byte salt and derives its key as
    HKDF(secret, salt); its nonces are a counter, so no nonce repeats under a key however
    many entries it seals, and any process with the secret opens any entry. Entries are
    ``02 | salt | nonce | ciphertext``. Version 1 entries (a key per entry, a fixed
    nonce) still open, so an outbox written before an upgrade drains.
    """

    _SALT_BYTES = 16
    _V1, _V2 = b"\x01", b"\x02"
    _V1_NONCE = bytes(12)
    _OPENERS_KEPT = 64

    def __init__(self, server_secret: bytes) -> None:
        self._secret = hashlib.sha256(b"identity-service outbox v1" + server_secret).digest()
        self._openers: dict[bytes, AESGCM] = {}
        self._new_key()

    def _new_key(self) -> None:
        self._forks = _forks
        self._salt = os.urandom(self._SALT_BYTES)
        self._aead = self._key(self._salt)
        self._header = self._V2 + self._salt
        self._nonces = itertools.count(1)
        self._openers[self._salt] = self._aead

    def seal(self, plaintext: bytes) -> bytes:
        if self._forks != _forks:
            # A forked child must not continue its parent's nonce sequence under its key.
            self._new_key()
        nonce = next(self._nonces).to_bytes(_NONCE_BYTES, "big")
        return self._header + nonce + self._aead.encrypt(nonce, plaintext, None)

    def open(self, sealed: bytes) -> bytes:
        salt = sealed[1 : 1 + self._SALT_BYTES]
        version = sealed[:1]
        try:
            if version == self._V2 and len(sealed) >= 1 + self._SALT_BYTES + _NONCE_BYTES + 16:
                nonce_end = 1 + self._SALT_BYTES + _NONCE_BYTES
                nonce = sealed[1 + self._SALT_BYTES : nonce_end]
                return self._opener(salt).decrypt(nonce, sealed[nonce_end:], None)
            if version == self._V1 and len(sealed) >= 1 + self._SALT_BYTES + 16:
                aead = self._key(salt, info=b"outbox entry")
                return aead.decrypt(self._V1_NONCE, sealed[1 + self._SALT_BYTES :], None)
        except InvalidTag as exc:
            raise SealError("outbox entry does not open with this secret") from exc
        raise SealError("unknown outbox entry format")

    def _opener(self, salt: bytes) -> AESGCM:
        aead = self._openers.get(salt)
        if aead is None:
            if len(self._openers) >= self._OPENERS_KEPT:
                self._openers = {self._salt: self._aead}
            aead = self._openers[salt] = self._key(salt)
        return aead

    def _key(self, salt: bytes, info: bytes = b"outbox key v2") -> AESGCM:
        return AESGCM(hkdf_sha256(self._secret, salt=salt, info=info))
