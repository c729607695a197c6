"""An amp-form submission read into a bounded mapping of string fields.

amp-form sends ``FormData`` (``multipart/form-data``); a page may also post
``application/x-www-form-urlencoded`` or a JSON object. Whatever the type, the result is
the same: at most ``max_fields`` fields, each name at most ``MAX_NAME_LENGTH`` and each
value at most ``MAX_VALUE_LENGTH`` characters, names unique, values strings. Files, nested
JSON, repeated names and malformed bodies are refused with a problem that names the rule,
never the data.

Nothing two readers could read differently is accepted: a name repeated in a JSON object
(which orjson would read as its last value), and in a multipart part a second
``Content-Disposition`` field or parameter, a parameter in RFC 2231's encoded form
(``name*=``), a field name that is not UTF-8 (the email parser would make it U+FFFD) or a
``Content-Transfer-Encoding`` other than the identity (RFC 7578 deprecates it).

The email parser reads a multipart body whole, every part, before the parts can be counted,
and its header parser takes time far from linear in a field's quotes, comments, commas and
parameters, and recurses on nested comments: 12 KB of one part's ``Content-Type:
text/plain; a=`` and pairs of double quotes held the event loop 2.8 s, ``;a=b`` repeated
0.46 s, colons or folded lines 0.3 s, 16 KB of empty parts 0.2 s, and a run of ``(``
raised RecursionError (a 500), all before any limit was counted. So a multipart form is
refused, in time linear in its size, before the parser reads it when its ``Content-Type``
or a part's head holds more than ``MAX_SPECIALS`` of the characters that structure a
header (``"`` ``\\`` ``(`` ``)`` ``,`` ``:`` ``;`` ``<`` ``>`` ``@`` ``[`` ``]`` ``=?``, CR
and LF; amp-form's heads hold a dozen at most), or it has more lines that begin with
``--`` (delimiters, a nested multipart's included) than twice the parts it may have.
"""

import email.parser
import email.policy
import re
from collections.abc import Iterable
from email.message import EmailMessage, Message, MIMEPart
from urllib.parse import parse_qsl

from identity_service.problems import (
    MalformedForm,
    MalformedJson,
    PayloadTooLarge,
    UnsupportedFormType,
)
from identity_service.validation import json_object_members

MAX_NAME_LENGTH = 128
MAX_VALUE_LENGTH = 4096
# Characters that structure a header (quotes, comments, lists, parameters, encoded words,
# field names, lines and folds) in a multipart form's Content-Type or a part's head, at most.
MAX_SPECIALS = 32
_SPECIALS = re.compile(rb'["\\(),:;<>@\[\]\r\n]|=\?')
_LINE_OF_DASHES = re.compile(rb"[\r\n]--")
_EMPTY_LINE = re.compile(rb"\r\r|\n\n|\n\r")

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
JSON = "application/json"
# Content-Transfer-Encoding values that leave a part's bytes as sent (RFC 2045).
_IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})


def read_form(
    content_type: str | None, body: bytes, *, max_bytes: int, max_fields: int
) -> dict[str, str]:
    """The fields of a submission; raises PayloadTooLarge, MalformedForm or UnsupportedFormType."""
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"the form must be at most {max_bytes} bytes")
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type == MULTIPART:
        pairs = _multipart(content_type or "", body, max_fields)
    elif media_type == URLENCODED:
        pairs = _urlencoded(body, max_fields)
    elif media_type == JSON:
        pairs = _json(body)
    else:
        raise UnsupportedFormType("send the form as amp-form does (multipart/form-data)")
    return _checked(pairs, max_fields)


def _checked(pairs: Iterable[tuple[str, str]], max_fields: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in pairs:
        if len(fields) >= max_fields:
            raise MalformedForm(f"the form may have at most {max_fields} fields")
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise MalformedForm(
                f"field names must be printable and 1 to {MAX_NAME_LENGTH} characters long"
            )
        if len(value) > MAX_VALUE_LENGTH:
            raise MalformedForm(f"field values must be at most {MAX_VALUE_LENGTH} characters")
        if name in fields:
            raise MalformedForm("each field name may appear once")
        fields[name] = value
    return fields


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedForm("the form must be UTF-8") from exc


def _urlencoded(body: bytes, max_fields: int) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            _text(body),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=max_fields,
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedForm("the form is not valid application/x-www-form-urlencoded") from exc


def _json(body: bytes) -> list[tuple[str, str]]:
    try:
        members = json_object_members(body)  # repeated names kept: _checked refuses them
    except MalformedJson as exc:
        raise MalformedForm(f"a JSON form must be an object: {exc.detail}") from exc
    pairs: list[tuple[str, str]] = []
    for name, value in members:
        if not isinstance(value, str):
            raise MalformedForm("the values of a JSON form must be strings")
        pairs.append((name, value))
    return pairs


def _multipart(content_type: str, body: bytes, max_fields: int) -> list[tuple[str, str]]:
    _check_parse_bounds(content_type, body, max_fields)
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    try:
        message = parser.parsebytes(head + body)
    except RecursionError as exc:  # nested comments; MAX_SPECIALS stops them before
        raise MalformedForm("the form is not valid multipart/form-data") from exc
    if not isinstance(message, EmailMessage) or not message.is_multipart() or message.defects:
        raise MalformedForm("the form is not valid multipart/form-data")
    pairs: list[tuple[str, str]] = []
    for part in message.iter_parts():
        if len(pairs) >= max_fields:
            raise MalformedForm(f"the form may have at most {max_fields} fields")
        pairs.append(_form_part(part))
    return pairs


def _check_parse_bounds(content_type: str, body: bytes, max_fields: int) -> None:
    """Refuse, in time linear in the body, a multipart form the email parser would take long
    over (see the module's docstring)."""
    if _specials(content_type.encode("latin-1", "replace")) > MAX_SPECIALS:
        raise MalformedForm("the form's Content-Type is not one amp-form sends")
    # Each delimiter line begins with "--" (RFC 2046, 5.1.1), a nested multipart's too; the
    # email parser ends a line at CR, LF or CRLF.
    pieces = _LINE_OF_DASHES.split(body)
    if len(pieces) - 1 + body.startswith(b"--") > 2 * (max_fields + 1):
        raise MalformedForm(f"the form may have at most {max_fields} fields")
    for piece in pieces:
        empty_line = _EMPTY_LINE.search(piece)  # where a part's head ends
        if _specials(piece[: empty_line.start() if empty_line else None]) > MAX_SPECIALS:
            raise MalformedForm("a part's head is not one amp-form sends")


def _specials(text: bytes) -> int:
    return sum(1 for _ in _SPECIALS.finditer(text))


def _form_part(part: MIMEPart) -> tuple[str, str]:
    kind, params = _disposition(part)
    if part.defects or kind != "form-data":
        raise MalformedForm("each part must be a form-data field")
    if part.get_filename() is not None or part.is_multipart():
        raise MalformedForm("files are not accepted")
    name = params.get("name")
    if name is None:
        raise MalformedForm("each part must be a form-data field with a name")
    encodings = _raw_fields(part, "content-transfer-encoding")
    if len(encodings) > 1 or any(e.strip().lower() not in _IDENTITY_ENCODINGS for e in encodings):
        raise MalformedForm("parts must be sent as they are, without a Content-Transfer-Encoding")
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise MalformedForm("the form is not valid multipart/form-data")
    return name, _text(payload)


def _disposition(part: MIMEPart) -> tuple[str, dict[str, str]]:
    """A part's ``Content-Disposition``: its type (lower case) and its parameters.

    Read from the field as received: the email parser's own reading keeps the first of
    repeated parameters and makes undecodable bytes U+FFFD, so a name could be read as
    another one. Refused: no field or two, bytes that are not UTF-8, a parameter twice
    (names compared in any case) or in RFC 2231's form (RFC 7578 sends names as UTF-8).
    """
    fields = _raw_fields(part, "content-disposition")
    if len(fields) != 1:
        raise MalformedForm("each part must have one Content-Disposition")
    try:
        text = fields[0].encode("ascii", "surrogateescape").decode("utf-8")
    except UnicodeError as exc:
        raise MalformedForm("a part's Content-Disposition (its field name) must be UTF-8") from exc
    reader = Message()  # compat32: its get_params returns every parameter, repeats too
    reader["Content-Disposition"] = text
    kind, *params = reader.get_params(header="content-disposition") or [("", "")]
    names = {name for name, _ in params}
    if len(names) != len(params):
        raise MalformedForm("each Content-Disposition parameter may appear once")
    if not all(isinstance(value, str) for _, value in params):
        raise MalformedForm("send field names as UTF-8, not in RFC 2231's encoded form")
    return kind[0].lower(), dict(params)


def _raw_fields(part: MIMEPart, name: str) -> list[str]:
    """The values of a part's header fields called ``name`` (lower case), as received (the
    bytes that are not ASCII as surrogate escapes)."""
    return [value for key, value in part.raw_items() if key.lower() == name]
