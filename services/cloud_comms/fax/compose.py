"""A staff member's Send Fax request, checked before anything is read or stored.

    POST /api/v1/cloud/faxes/outbound
    {"to": "+15555550177" | "(555) 555-0177",  "from_number"?: "+15555550100",
     "document": {"kind": "fax", "id": "fax_..."} | {"kind": "direct", "id": "dm_...", "index": 0}
     | "pdf_base64": "...", "filename"?: "referral.pdf"}

Numbers are E.164 (`+` and 7-15 digits) or a US number of 10 digits (11 with the leading 1), with
spaces, dots, dashes and parentheses allowed around the digits; anything else is 400
`invalid_number`. Exactly one document: a received fax or a Direct attachment delivered to the
caller (checked by their own features), or an uploaded PDF (base64). The number to send from is
one of the agency's fax numbers the caller is linked to in directory (403 `not_linked`).

Destinations (400 `destination_not_allowed`): only the country codes of
CLOUD_FAX_ALLOWED_COUNTRY_CODES, and in the NANP no premium-rate area code (900, 976), no N11
service code (as area code or exchange), no 555 exchange number but the fictional 555-0100 to
555-0199 (the demo's and the simulator's).

An `Idempotency-Key` header (1-128 printable ASCII characters, else 400
`invalid_idempotency_key`) makes a repeat of the request return the first one's fax.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from services.kit.auth import Identity
from services.kit.errors import Forbidden, InvalidInput, PayloadTooLarge, Unprocessable
from services.kit.validation import Choice, Fields, Id, Int, Str, validate

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
NUMBER_PUNCTUATION = re.compile(r"[\s().-]")
MAX_NUMBER_TEXT = 40
PREMIUM_AREA_CODES = ("900", "976")
FICTIONAL_LINES = range(100, 200)  # 555-0100 to 555-0199
MAX_ATTACHMENT_INDEX = 999
MAX_REQUEST_TEXT = 2**31
DOCUMENT_KINDS = ("fax", "direct")


@dataclass(frozen=True)
class SendRequest:
    to_number: str
    from_number: str | None
    document: dict | None  # {"kind", "id", "index"?} of a document delivered to the caller
    pdf: bytes | None  # an uploaded PDF (not yet checked as a PDF)
    filename: str


def normalize_number(text: str, field: str) -> str:
    """`text` as an E.164 number; 400 `invalid_number` naming `field` when it is not one."""
    digits = NUMBER_PUNCTUATION.sub("", text)
    if re.fullmatch(r"[0-9]{10}", digits):
        digits = "+1" + digits
    elif re.fullmatch(r"1[0-9]{10}", digits):
        digits = "+" + digits
    if not E164.fullmatch(digits) or digits.startswith(("+10", "+11")):
        raise InvalidInput("invalid_number", f"{field} must be an E.164 or a 10-digit US fax number", {"field": field})
    return digits


def _refuse_destination(reason: str) -> InvalidInput:
    return InvalidInput("destination_not_allowed", f"faxes cannot be sent to {reason}", {"field": "to"})


def check_destination(number: str, allowed_country_codes: tuple[str, ...]) -> None:
    """400 `destination_not_allowed` for an E.164 `number` outside the allowed country codes or,
    in the NANP, a premium-rate or special number."""
    if not any(number[1:].startswith(code) for code in allowed_country_codes):
        raise _refuse_destination(f"this country (allowed country codes: {', '.join(allowed_country_codes)})")
    if not number.startswith("+1") or len(number) != 12:
        return
    area, exchange, line = number[2:5], number[5:8], number[8:]
    if area in PREMIUM_AREA_CODES:
        raise _refuse_destination(f"premium-rate numbers (area code {area})")
    if area[1:] == "11" or exchange[1:] == "11":
        raise _refuse_destination("N11 service codes")
    if exchange == "555" and int(line) not in FICTIONAL_LINES:
        raise _refuse_destination("555 service numbers (only the fictional 555-0100 to 555-0199)")


def safe_filename(name: str, default: str) -> str:
    """A file name safe to pass to the provider and to show: [A-Za-z0-9._-], ending in .pdf."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._")[:100] or default
    return stem if stem.lower().endswith(".pdf") else f"{stem}.pdf"


def parse(body: dict, max_pdf_bytes: int, allowed_country_codes: tuple[str, ...] = ("1",)) -> SendRequest:
    """The request body, checked (400 for any field that is not as documented or a destination not
    allowed, 413 for a PDF larger than `max_pdf_bytes`)."""
    cleaned = validate(
        body,
        {
            "to": Str(max_len=MAX_NUMBER_TEXT),
            "from_number": Str(max_len=MAX_NUMBER_TEXT, required=False),
            "document": Fields(
                {
                    "kind": Choice(DOCUMENT_KINDS, required=True),
                    "id": Id(),
                    "index": Int(maximum=MAX_ATTACHMENT_INDEX),
                }
            ),
            # Its size is refused as 413 by decode_pdf (the request's body limit bounds it here).
            "pdf_base64": Str(max_len=MAX_REQUEST_TEXT, strip=False, required=False),
            "filename": Str(max_len=200, required=False),
        },
    )
    document, encoded = cleaned.get("document"), cleaned.get("pdf_base64")
    if (document is None) == (encoded is None):
        raise InvalidInput(
            "one_document_required", "send exactly one of document and pdf_base64", {"field": "document"}
        )
    if document is not None:
        _check_document(document, cleaned)
    pdf = None if encoded is None else decode_pdf(encoded, max_pdf_bytes)
    from_number = cleaned.get("from_number")
    to_number = normalize_number(cleaned["to"], "to")
    check_destination(to_number, allowed_country_codes)
    return SendRequest(
        to_number=to_number,
        from_number=None if from_number is None else normalize_number(from_number, "from_number"),
        document=document,
        pdf=pdf,
        filename=safe_filename(cleaned.get("filename") or "", "document.pdf"),
    )


def _check_document(document: dict, cleaned: dict) -> None:
    if document["kind"] == "direct" and "index" not in document:
        raise InvalidInput(
            "missing_field", "document.index is required for a Direct attachment", {"field": "document.index"}
        )
    if document["kind"] == "fax" and "index" in document:
        raise InvalidInput("unknown_field", "a fax has no attachment index", {"field": "document.index"})
    if "filename" in cleaned:
        raise InvalidInput("unknown_field", "filename goes with pdf_base64 only", {"field": "filename"})


def decode_pdf(encoded: str, max_pdf_bytes: int) -> bytes:
    """The uploaded bytes (strict base64); 413 `fax_too_large` past `max_pdf_bytes`."""
    if len(encoded) > 4 * ((max_pdf_bytes + 2) // 3):
        raise PayloadTooLarge(
            "fax_too_large", f"the fax PDF exceeds {max_pdf_bytes} bytes", {"max_bytes": max_pdf_bytes}
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("invalid_base64", "pdf_base64 is not base64", {"field": "pdf_base64"}) from exc


def sending_number(directory, caller: Identity, from_number: str | None):
    """The caller's fax number to send from, as directory resolves it (agency, address id, linked
    staff). Named: it must be linked to the caller (403 `not_linked`). Not named: the one fax number
    linked to the caller (directory's `linked_addresses`); 422 `from_number_required` when there are
    several, 403 `not_linked` when none."""
    if from_number is None:
        return _only_linked_number(directory, caller)
    address = directory.resolve_address("fax", from_number)
    if address is None or address.agency_id != caller.agency_id or caller.staff_id not in address.staff_ids:
        raise Forbidden("not_linked", "you are not linked to this fax number")
    return address


def _only_linked_number(directory, caller: Identity):
    linked = directory.linked_addresses("fax", caller.agency_id, caller.staff_id)
    numbers = [a for a in linked if caller.staff_id in a.staff_ids]
    if not numbers:
        raise Forbidden("not_linked", "you are not linked to any fax number")
    if len(numbers) > 1:
        raise Unprocessable(
            "from_number_required", "you are linked to several fax numbers: name one", {"field": "from_number"}
        )
    return numbers[0]
