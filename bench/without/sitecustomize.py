"""What a guarantee costs: the service's worker with some switched off, for run.py only.

``run.py --without seal,log`` starts the service with this directory first on PYTHONPATH
and ``BENCH_WITHOUT`` naming what to switch off; Python imports this module at start, in
every process of the service, before anything else runs. The service has no such
switches of its own, and must not: a handoff record or an outbox entry that is not
sealed, or a request that leaves no log line, is a defect. Never use this outside a
benchmark.

- ``seal``: lookup ids are the tokens themselves, records and outbox entries are kept in
  the clear (no HMAC, no key derivation, no AES-GCM).
- ``log``: no request log line and no request metrics (the request's count and duration).

(``outbox``, the third thing run.py's ``--without`` takes, is the service's own
``IDENTITY_OUTBOX=off``: no events at all.)
"""

import os

_WITHOUT = {name for name in os.environ.get("BENCH_WITHOUT", "").split(",") if name}


def _without_sealing() -> None:
    from identity_service import crypto

    def lookup_id(self: object, token: crypto.Token) -> bytes:
        return token.raw

    def seal_record(self: object, token: object, lookup_id: bytes, plaintext: bytes) -> bytes:
        return plaintext

    def open_record(self: object, token: object, lookup_id: bytes, record: bytes) -> bytes:
        return record

    def in_the_clear(self: object, data: bytes) -> bytes:
        return data

    crypto.TokenSealer.lookup_id = lookup_id  # type: ignore[method-assign]
    crypto.TokenSealer.seal = seal_record  # type: ignore[method-assign]
    crypto.TokenSealer.open = open_record  # type: ignore[method-assign]
    crypto.OutboxSealer.seal = in_the_clear  # type: ignore[method-assign,assignment]
    crypto.OutboxSealer.open = in_the_clear  # type: ignore[method-assign,assignment]


def _without_request_log() -> None:
    from identity_service import middleware

    def nothing(*args: object) -> None:
        return None

    # Modules that imported log_request by name hold the function itself: its code is
    # what changes, so every reference to it runs the new one.
    middleware.log_request.__code__ = nothing.__code__


if "seal" in _WITHOUT:
    _without_sealing()
if "log" in _WITHOUT:
    _without_request_log()
