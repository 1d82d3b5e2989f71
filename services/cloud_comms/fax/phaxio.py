"""Phaxio (API v2) callbacks: the X-Phaxio-Signature check and the fields of the received-fax and
sent-fax status callbacks.

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
A sent fax's status callback (https://www.phaxio.com/docs/api/v2/faxes/send_callback) has the same
shape with `direction` = "sent" and no file: the Fax object's `status` (queued, inprogress, success,
failure, and partialsuccess for a fax to several numbers), `num_pages`, `is_test` (sent with test
API keys: nothing was transmitted), the `tags` given at sending, and on failure `error_type` /
`error_message` and per recipient `status` and `error_message`. We send to one number, so a
partialsuccess is read by that recipient's status.

A PDF (received or to send) must open with pypdf and have at least one page; an encrypted one is
refused (`encrypted_pdf`): the provider cannot render it either.

Nothing here touches the database: a value that is not what Phaxio sends (an object where a number
belongs, an operator document) is refused before any look-up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pypdf

from services.kit.errors import InvalidInput, PayloadTooLarge
from services.kit.validation import parse_json

SIGNATURE_HEADER = "X-Phaxio-Signature"
PDF_PARTS = ("filename", "file")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
FAX_ID = re.compile(r"^[0-9]{1,20}$")
MAX_PAGES = 10_000
MAX_FAX_JSON = 64 * 1024
# The tag every sent fax carries (tag[outbound_id] at sending), naming our outbound fax.
OUTBOUND_TAG = "outbound_id"
OUTBOUND_ID = re.compile(r"^fxo_[0-9a-f]{24}$")
SENT_STATUSES = ("queued", "pendingbatch", "inprogress", "success", "failure")
# Accepted in a callback besides SENT_STATUSES: read by the recipient's own status.
PARTIAL_SUCCESS = "partialsuccess"
MAX_REASON = 200
PDF_TAIL = 1024

log = logging.getLogger(__name__)


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


def _fax_object(form: dict[str, str], direction: str) -> dict:
    """The `fax` field's Fax object of a callback about a fax of `direction` ("received" | "sent")."""
    raw = form.get("fax")
    if not isinstance(raw, str) or not raw.strip():
        raise _refuse("missing_field", "fax is required", "fax")
    if len(raw) > MAX_FAX_JSON:
        raise _refuse("invalid_fax", "fax is too long", "fax")
    try:
        # Too deep or unpaired surrogates: refused as in any JSON body (control characters in the
        # provider's texts are cleaned below, so NUL is let through).
        fax = parse_json(raw, allow_nul=True)
    except InvalidInput as exc:
        if exc.code == "malformed_json":
            raise _refuse("invalid_fax", "fax must be a JSON object", "fax") from exc
        raise _refuse(exc.code, f"fax: {exc.message}", "fax") from exc
    if not isinstance(fax, dict):
        raise _refuse("invalid_fax", "fax must be a JSON object", "fax")
    if fax.get("direction", direction) != direction or form.get("direction", direction) != direction:
        raise _refuse(f"not_{direction}", f"this callback takes {direction} faxes only", "direction")
    return fax


def _fax_id(fax: dict) -> str:
    fax_id = fax.get("id")
    if isinstance(fax_id, int) and not isinstance(fax_id, bool) and fax_id > 0:
        fax_id = str(fax_id)
    if not isinstance(fax_id, str) or not FAX_ID.fullmatch(fax_id):
        raise _refuse("invalid_fax", "fax.id must be Phaxio's fax id (a positive number)", "fax.id")
    return fax_id


def _pages(fax: dict) -> int:
    pages = fax.get("num_pages", 0)
    if pages is None:
        return 0
    if isinstance(pages, bool) or not isinstance(pages, int) or not 0 <= pages <= MAX_PAGES:
        raise _refuse("invalid_fax", f"fax.num_pages must be a whole number up to {MAX_PAGES}", "fax.num_pages")
    return pages


def parse_received(form: dict[str, str]) -> ReceivedFax:
    """The received fax a callback's form fields describe; InvalidInput when they are not Phaxio's."""
    fax = _fax_object(form, "received")
    fax_id = _fax_id(fax)

    to_number = fax.get("to_number")
    if not isinstance(to_number, str) or not E164.fullmatch(to_number.strip()):
        raise _refuse("invalid_fax", "fax.to_number must be an E.164 number", "fax.to_number")

    from_number = fax.get("from_number")
    if from_number is None:
        from_number = ""
    if not isinstance(from_number, str):
        raise _refuse("invalid_fax", "fax.from_number must be a string", "fax.from_number")
    from_number = from_number.strip() if E164.fullmatch(from_number.strip()) else ""

    pages = _pages(fax)

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


@dataclass(frozen=True)
class SentStatus:
    """A status callback of a sent fax."""

    fax_id: str
    status: str  # one of SENT_STATUSES
    pages: int
    failure_reason: str  # "" unless the status is failure
    outbound_id: str  # the outbound_id tag given at sending, "" when absent
    is_test: bool = False  # sent with the provider's test API keys: nothing was transmitted


def _text(value: object) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(c if c.isprintable() else " " for c in value).strip()[:MAX_REASON]


def _recipients(fax: dict) -> list[dict]:
    recipients = fax.get("recipients")
    return [r for r in recipients if isinstance(r, dict)] if isinstance(recipients, list) else []


def failure_reason(fax: dict, recipient: dict | None = None) -> str:
    """Why a sent fax failed, in Phaxio's words: the recipient's error message (`recipient`, else
    the first), else the fax's, else their error types."""
    first = recipient if recipient is not None else next(iter(_recipients(fax)), {})
    for value in (first.get("error_message"), fax.get("error_message"), first.get("error_type"), fax.get("error_type")):
        if _text(value):
            return _text(value)
    return "the provider reported a failure without a reason"


def _partial_outcome(fax: dict) -> tuple[str, str]:
    """(status, failure reason) of a partialsuccess, by the recipients' own statuses: any failed
    recipient is our (one) recipient failing; else a successful one is success."""
    recipients = _recipients(fax)
    failed = next((r for r in recipients if r.get("status") == "failure"), None)
    if failed is not None:
        return "failure", failure_reason(fax, failed)
    if any(r.get("status") == "success" for r in recipients):
        return "success", ""
    return "failure", "the provider reported a partial success without the recipient's status"


def parse_sent(form: dict[str, str]) -> SentStatus:
    """The sent fax's status a callback's form fields describe; InvalidInput when not Phaxio's."""
    fax = _fax_object(form, "sent")
    status = fax.get("status")
    if not isinstance(status, str) or status not in (*SENT_STATUSES, PARTIAL_SUCCESS):
        allowed = ", ".join((*SENT_STATUSES, PARTIAL_SUCCESS))
        raise _refuse("invalid_fax", f"fax.status must be one of {allowed}", "fax.status")
    reason = failure_reason(fax) if status == "failure" else ""
    if status == PARTIAL_SUCCESS:
        status, reason = _partial_outcome(fax)
    tags = fax.get("tags")
    tag = tags.get(OUTBOUND_TAG) if isinstance(tags, dict) else None
    return SentStatus(
        fax_id=_fax_id(fax),
        status=status,
        pages=_pages(fax),
        failure_reason=reason,
        outbound_id=tag if isinstance(tag, str) and OUTBOUND_ID.fullmatch(tag) else "",
        is_test=_flag(fax.get("is_test")) or _flag(form.get("is_test")),
    )


def check_pdf(content: bytes, max_bytes: int, field: str = "filename") -> int:
    """A PDF received or to send, and its page count: at most `max_bytes` (PayloadTooLarge, 413,
    checked first so pypdf never reads more), starting with the %PDF- header, an end-of-file
    marker in its last 1024 bytes, opening with pypdf with at least one page (InvalidInput
    `not_a_pdf`, 400, naming `field`) and not encrypted (`encrypted_pdf`, 400)."""
    if len(content) > max_bytes:
        raise PayloadTooLarge("fax_too_large", f"the fax PDF exceeds {max_bytes} bytes", {"max_bytes": max_bytes})
    not_a_pdf = InvalidInput("not_a_pdf", "the fax file is not a PDF with at least one page", {"field": field})
    if not content.startswith(b"%PDF-") or b"%%EOF" not in content[-PDF_TAIL:]:
        raise not_a_pdf
    try:
        reader = pypdf.PdfReader(io.BytesIO(content), strict=False)
        encrypted = reader.is_encrypted
        pages = 0 if encrypted else len(reader.pages)
    except Exception as exc:  # noqa: BLE001 - whatever a malformed file makes pypdf raise, it is not a PDF
        log.info("pdf refused", extra={"error_type": type(exc).__name__})
        raise not_a_pdf from None
    if encrypted:
        raise InvalidInput(
            "encrypted_pdf", "the PDF is password-protected: save it without a password and retry", {"field": field}
        )
    if pages < 1:
        raise not_a_pdf
    return pages
