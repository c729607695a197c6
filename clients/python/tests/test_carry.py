"""The carry cookie's format (identity_client._carry), shared with the Node SDK.

``clients/carry-vectors.json`` holds cookies this module makes with a fixed key and expiry,
and cookies signed with that key that must be refused (not JSON, not an object, a field of
the wrong type or missing, expired, oversized). This suite checks that the Python encoder
makes exactly those values and that the decoder accepts and refuses them;
``clients/node/test/carry.test.mjs`` checks the same file against the Node SDK, so a cookie
either SDK makes is read by the other. After a deliberate format change, rewrite the file
with ``python clients/python/tests/test_carry.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from identity_client import Identity, _carry

VECTORS = Path(__file__).resolve().parents[2] / "carry-vectors.json"
WRITE_KEY = "carry-vectors-write-key"
NOW = 1_700_000_000
EXPIRES = 4_102_444_800  # 2100-01-01

ACCEPTED: list[dict[str, Any]] = [
    {
        "anonymousId": "visitor-1",
        "userId": "user-42",
        "traits": {"plan": "pro", "name": "Zoë 🎉", "seats": 3, "ratio": 1.5, "tags": ["a"]},
        "consent": {"analytics": True, "ads": False},
        "source": "handoff",
    },
    {
        "anonymousId": "0b9d4c1e-5f0a-4c2b-9d7e-3a1f2b4c5d6e",
        "userId": None,
        "traits": {},
        "consent": {},
        "source": "generated",
    },
    {
        "anonymousId": 'a%41b "quoted"',
        "userId": "é/ü",
        "traits": {"text": 'tab\tline\nquote" back\\ </script> \x01 \x7f \u2028', "null": None},
        "consent": {},
        "source": "handoff",
    },
]

_GOOD: dict[str, Any] = {
    "anonymousId": "visitor-1",
    "userId": None,
    "traits": {},
    "consent": {},
    "source": "handoff",
    "exp": EXPIRES,
}


def signed(payload: bytes, write_key: str = WRITE_KEY) -> str:
    """``payload`` base64url-encoded and signed with ``write_key``'s carry key, whatever it
    holds."""
    text = _carry._b64(payload)
    return f"{text}.{_carry._signature(_carry.carry_key(write_key), text)}"


def _document(**changes: Any) -> bytes:
    document = {**_GOOD, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


def refused() -> dict[str, str]:
    """Cookies signed with the right key (but the last two) that no decoder may accept."""
    key = _carry.carry_key(WRITE_KEY)
    good = _carry.encode(Identity("visitor-1"), key, EXPIRES)
    assert good is not None
    return {
        "payload not JSON": signed(b"not json"),
        "payload not UTF-8": signed(b'{"anonymousId":"\xff"}'),
        "a JSON array": signed(json.dumps([_GOOD]).encode()),
        "a JSON string": signed(b'"visitor-1"'),
        "JSON null": signed(b"null"),
        "anonymousId a number": signed(_document(anonymousId=7)),
        "anonymousId empty": signed(_document(anonymousId="")),
        "anonymousId missing": signed(_document(anonymousId=...)),
        # A handoff prepared with a userId alone: neither middleware carries it.
        "anonymousId null": signed(_document(anonymousId=None, userId="user-only")),
        "userId a number": signed(_document(userId=42)),
        "userId missing": signed(_document(userId=...)),
        "traits an array": signed(_document(traits=["plan"])),
        "traits null": signed(_document(traits=None)),
        "consent a string": signed(_document(consent="all")),
        "source cookie": signed(_document(source="cookie")),
        "exp a string": signed(_document(exp=str(EXPIRES))),
        "exp true": signed(_document(exp=True)),
        "exp missing": signed(_document(exp=...)),
        "exp Infinity": signed(_document(exp=float("inf"))),
        "exp NaN": signed(_document(exp=float("nan"))),
        "expired": signed(_document(exp=NOW - 1)),
        "expires now": signed(_document(exp=NOW)),
        "over MAX_VALUE_BYTES": signed(_document(traits={"bio": "x" * 1200})),
        "no signature": good.split(".")[0],
        "signed with another key": _carry.encode(
            Identity("visitor-1"), _carry.carry_key("another-write-key"), EXPIRES
        )
        or "",
    }


def vectors() -> dict[str, Any]:
    key = _carry.carry_key(WRITE_KEY)
    accepted = []
    for fields in ACCEPTED:
        identity = Identity(
            anonymous_id=fields["anonymousId"],
            user_id=fields["userId"],
            traits=fields["traits"],
            consent=fields["consent"],
            source=fields["source"],
        )
        accepted.append({"identity": fields, "value": _carry.encode(identity, key, EXPIRES)})
    return {
        "writeKey": WRITE_KEY,
        "maxValueBytes": _carry.MAX_VALUE_BYTES,
        "now": NOW,
        "expires": EXPIRES,
        "accepted": accepted,
        "refused": refused(),
    }


def test_the_vectors_file_is_what_this_encoder_makes() -> None:
    assert json.loads(VECTORS.read_text(encoding="utf-8")) == vectors()


def test_the_accepted_vectors_decode_to_their_identity() -> None:
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    key = _carry.carry_key(data["writeKey"])
    for vector in data["accepted"]:
        decoded = _carry.decode(vector["value"], key, data["now"])
        assert decoded is not None, vector
        fields = vector["identity"]
        assert (
            decoded.anonymous_id,
            decoded.user_id,
            decoded.traits,
            decoded.consent,
            decoded.source,
        ) == tuple(fields[k] for k in ("anonymousId", "userId", "traits", "consent", "source"))
        # The expiry in the value holds: a second later it is refused.
        assert _carry.decode(vector["value"], key, data["expires"]) is None


def test_the_refused_vectors_are_refused() -> None:
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    key = _carry.carry_key(data["writeKey"])
    # The signed ones reach the JSON and field checks: the signature itself holds.
    signed = {k: v for k, v in data["refused"].items() if "." in v and "another" not in k}
    for why, value in signed.items():
        payload, _, signature = value.partition(".")
        assert signature == _carry._signature(key, payload), why
    for why, value in data["refused"].items():
        assert _carry.decode(value, key, data["now"]) is None, why


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
