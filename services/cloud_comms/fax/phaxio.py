"""Phaxio (API v2) callbacks: the X-Phaxio-Signature check and the received-fax callback's fields.

The signature, as Phaxio documents it (https://www.phaxio.com/docs/security/callbacks): the
callback URL exactly as configured at Phaxio (trailing slash included), then every POST parameter
sorted by name, each as name + value with no delimiter, then every file part sorted by name, each
as part name + the hex SHA-1 of its contents; HMAC-SHA1 of that string keyed with the account's
callback token, sent as lowercase hex in `X-Phaxio-Signature`. The URL is the configured one, never
the request's own (behind the gateway the host and scheme differ).

A received-fax callback (https://www.phaxio.com/docs/api/v2/faxes/receive_callback) is a multipart
POST: `fax` (the Fax object as JSON: id, direction, num_pages, status, is_test, created_at,
completed_at, from_number, to_number, caller_name, ...), `direction` = "received", `is_test`,
`success`, and the PDF as a file part (`filename` in API v2, `file` in v2.1; both accepted).
Nothing here touches the database: a value that is not what Phaxio sends (an object where a number
belongs, an operator document) is refused before any look-up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from services.kit.errors import DomainError, InvalidInput

SIGNATURE_HEADER = "X-Phaxio-Signature"
PDF_PARTS = ("filename", "file")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
FAX_ID = re.compile(r"^[0-9]{1,20}$")
MAX_PAGES = 10_000
MAX_FAX_JSON = 64 * 1024


class TooLarge(DomainError):
    http_status = 413


def signature(token: str, url: str, params: Iterable[tuple[str, str]], files: Iterable[tuple[str, bytes]]) -> str:
    """The X-Phaxio-Signature of a callback to `url` with these form parameters and file parts."""
    text = url
    for name, value in sorted(params, key=lambda item: item[0]):
        text += f"{name}{value}"
    for name, content in sorted(files, key=lambda item: item[0]):
        text += name + hashlib.sha1(content).hexdigest()  # noqa: S324 - Phaxio's algorithm, not ours
    return hmac.new(token.encode(), text.encode(), hashlib.sha1).hexdigest()


def signature_valid(
    token: str, url: str, params: Iterable[tuple[str, str]], files: Iterable[tuple[str, bytes]], given: str | None
) -> bool:
    """True when `given` (the header) is the signature of this callback; constant-time compare."""
    if not token or not given:
        return False
    expected = signature(token, url, params, files)
    return hmac.compare_digest(expected, given.strip().lower())


@dataclass(frozen=True)
class ReceivedFax:
    fax_id: str
    to_number: str
    from_number: str  # E.164, or "" when the caller's number was withheld or unreadable
    pages: int
    received_at_ms: int | None  # completed_at (else created_at) as epoch ms, when given
    caller_name: str
    is_test: bool


def _refuse(code: str, message: str, field: str) -> InvalidInput:
    return InvalidInput(code, message, {"field": field})


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.strip().lower() in ("true", "1")


def _time_ms(value: object, field: str) -> int | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise _refuse("invalid_fax", f"fax.{field} must be an RFC 3339 time", f"fax.{field}")
    try:
        moment = dt.datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise _refuse("invalid_fax", f"fax.{field} must be an RFC 3339 time", f"fax.{field}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def parse_received(form: dict[str, str]) -> ReceivedFax:
    """The received fax a callback's form fields describe; InvalidInput when they are not Phaxio's."""
    raw = form.get("fax")
    if not isinstance(raw, str) or not raw.strip():
        raise _refuse("missing_field", "fax is required", "fax")
    if len(raw) > MAX_FAX_JSON:
        raise _refuse("invalid_fax", "fax is too long", "fax")
    try:
        fax = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _refuse("invalid_fax", "fax must be a JSON object", "fax") from exc
    if not isinstance(fax, dict):
        raise _refuse("invalid_fax", "fax must be a JSON object", "fax")
    direction = fax.get("direction", form.get("direction", "received"))
    if direction != "received" or form.get("direction", "received") != "received":
        raise _refuse("not_received", "this callback takes received faxes only", "direction")

    fax_id = fax.get("id")
    if isinstance(fax_id, int) and not isinstance(fax_id, bool) and fax_id > 0:
        fax_id = str(fax_id)
    if not isinstance(fax_id, str) or not FAX_ID.fullmatch(fax_id):
        raise _refuse("invalid_fax", "fax.id must be Phaxio's fax id (a positive number)", "fax.id")

    to_number = fax.get("to_number")
    if not isinstance(to_number, str) or not E164.fullmatch(to_number.strip()):
        raise _refuse("invalid_fax", "fax.to_number must be an E.164 number", "fax.to_number")

    from_number = fax.get("from_number")
    if from_number is None:
        from_number = ""
    if not isinstance(from_number, str):
        raise _refuse("invalid_fax", "fax.from_number must be a string", "fax.from_number")
    from_number = from_number.strip() if E164.fullmatch(from_number.strip()) else ""

    pages = fax.get("num_pages", 0)
    if isinstance(pages, bool) or not isinstance(pages, int) or not 0 <= pages <= MAX_PAGES:
        raise _refuse("invalid_fax", f"fax.num_pages must be a whole number up to {MAX_PAGES}", "fax.num_pages")

    caller_name = fax.get("caller_name") or ""
    if not isinstance(caller_name, str):
        raise _refuse("invalid_fax", "fax.caller_name must be a string", "fax.caller_name")

    received = _time_ms(fax.get("completed_at"), "completed_at") or _time_ms(fax.get("created_at"), "created_at")
    return ReceivedFax(
        fax_id=fax_id,
        to_number=to_number.strip(),
        from_number=from_number,
        pages=pages,
        received_at_ms=received,
        caller_name=caller_name.strip()[:200].replace("\x00", ""),
        is_test=_flag(fax.get("is_test", form.get("is_test", False))),
    )


def check_pdf(content: bytes, max_bytes: int) -> None:
    """A received PDF: at most `max_bytes` (TooLarge, 413), starting with the %PDF- header and with
    an end-of-file marker in its last 1024 bytes (InvalidInput `not_a_pdf`, 400)."""
    if len(content) > max_bytes:
        raise TooLarge("fax_too_large", f"the fax PDF exceeds {max_bytes} bytes", {"max_bytes": max_bytes})
    if not content.startswith(b"%PDF-") or b"%%EOF" not in content[-1024:]:
        raise InvalidInput("not_a_pdf", "the fax file is not a PDF", {"field": "filename"})
