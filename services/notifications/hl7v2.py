"""HL7 v2 messages in and acknowledgements out: pure functions, no I/O.

Parsing is python-hl7's (`hl7.parse`); what it does not check is checked here first, because of
how it behaves (see README, "python-hl7: known issues we cover"):
- it splits segments on `\\r` only: `\\r\\n` and `\\n` separators are turned into `\\r` before;
- it takes whatever follows `MSH|` as encoding characters without checking them: they must be
  four (or five, with v2.7's truncation character) distinct non-alphanumeric characters;
- it decodes with any codec it is given: the text must be 7-bit ASCII here (no MSH-18 support).

Acknowledgements are written here, not with `Message.create_ack`, so that a frame we could not
parse (no MSH, broken encoding characters) still gets one, always in the standard encoding.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass

import hl7

# Acknowledgement codes (HL7 table 0008).
ACCEPT, ERROR, REJECT = "AA", "AE", "AR"

# Error codes (HL7 table 0357) used in ERR-3.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION_ID = "203"
APPLICATION_INTERNAL_ERROR = "207"

PROCESSING_IDS = ("P", "T", "D")
DEFAULT_VERSION = "2.5.1"
MAX_CONTROL_ID = 199  # MSH-10 is ST(199) in 2.5.1
_CONTROL_ID = re.compile(r"^[\x21-\x7e]{1,199}$")
_ASCII_TEXT = re.compile(r"^[\x20-\x7e\r]*$")


class Hl7Rejection(Exception):
    """A message we do not accept: AE (its content is in error) or AR (rejected as a whole).
    `header` is set when the MSH could be read, so the ACK echoes its control id."""

    def __init__(
        self,
        ack_code: str,
        error_code: str,
        text: str,
        *,
        location: str = "",
        header: Header | None = None,
    ):
        super().__init__(text)
        self.ack_code = ack_code
        self.error_code = error_code
        self.text = text
        self.location = location
        self.header = header

    def with_header(self, header: Header) -> Hl7Rejection:
        self.header = self.header or header
        return self


def error(code: str, text: str, location: str = "") -> Hl7Rejection:
    """The content of an accepted message type is in error (AE): the sender fixes and resends it."""
    return Hl7Rejection(ERROR, code, text, location=location)


def reject(code: str, text: str, location: str = "") -> Hl7Rejection:
    """The message is refused as a whole (AR): wrong type, version, facility, or we cannot take it now."""
    return Hl7Rejection(REJECT, code, text, location=location)


@dataclass(frozen=True)
class Header:
    """What the MSH says about a message (first components only)."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    timestamp: str
    message_type: str
    trigger: str
    control_id: str
    processing_id: str
    version: str


@dataclass(frozen=True)
class InboundMessage:
    """A framed message, checked and parsed: its header and python-hl7's tree."""

    header: Header
    message: hl7.Message

    def segments(self, name: str) -> list:
        return [segment for segment in self.message if str(segment[0]) == name]


def normalize_segments(text: str) -> str:
    """`\\r\\n`, `\\n` or `\\r` between segments become `\\r`; blank segments and trailing separators go."""
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return "\r".join(line for line in lines if line.strip())


def check_encoding_characters(text: str) -> None:
    """MSH-1 and MSH-2: a field separator, then 4 (or 5) distinct non-alphanumeric encoding characters."""
    if len(text) < 8:
        raise reject(SEGMENT_SEQUENCE_ERROR, "MSH segment is truncated", "MSH")
    field_sep = text[3]
    end = text.find(field_sep, 4)
    chars = text[4:end] if end != -1 else ""
    every = field_sep + chars
    if (
        end == -1
        or len(chars) not in (4, 5)
        or len(set(every)) != len(every)
        or any(c.isalnum() or c in " \r" for c in every)
    ):
        raise reject(DATA_TYPE_ERROR, "MSH-1/MSH-2 encoding characters are invalid", "MSH^1^2")


def _first(field) -> str:
    """The first component of a field (python-hl7 containers or a plain string)."""
    if field is None:
        return ""
    if isinstance(field, str):
        return field
    value = field
    while not isinstance(value, str):
        if len(value) == 0:
            return ""
        value = value[0]
    return value


def field(segment, index: int) -> str:
    """Field `index` of a python-hl7 segment as a string ("" when absent). MSH is counted as HL7
    counts it (MSH-1 is the field separator), as python-hl7 does."""
    try:
        return str(segment[index]) if index < len(segment) else ""
    except (IndexError, KeyError):
        return ""


def component(segment, index: int, comp: int = 1, rep: int = 1) -> str:
    """Component `comp` of repetition `rep` of field `index` ("" when absent)."""
    if index >= len(segment):
        return ""
    value = segment[index]
    if isinstance(value, str):
        return value if comp == 1 and rep == 1 else ""
    try:
        repetition = value[rep - 1]
    except IndexError:
        return ""
    if isinstance(repetition, str):
        return repetition if comp == 1 else ""
    try:
        part = repetition[comp - 1]
    except IndexError:
        return ""
    return _first(part)


def sniff_header(raw: bytes) -> Header | None:
    """MSH-3..12 read straight off the bytes (first components), to acknowledge a message that cannot
    be parsed (non-ASCII text, broken encoding characters); None without a usable MSH-10."""
    text = raw.decode("latin-1").replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH") or len(text) < 4:
        return None
    msh = text.split("\r", 1)[0]
    fields = msh.split(msh[3])

    def first(index: int) -> str:
        value = fields[index].split("^", 1)[0] if len(fields) > index else ""
        return value if _CONTROL_ID.fullmatch(value) else ""

    control_id = fields[9] if len(fields) > 9 else ""
    if not _CONTROL_ID.fullmatch(control_id):
        return None
    trigger = fields[8].split("^")[1] if len(fields) > 8 and "^" in fields[8] else ""
    return Header(
        sending_application=first(2),
        sending_facility=first(3),
        receiving_application=first(4),
        receiving_facility=first(5),
        timestamp="",
        message_type=first(8),
        trigger=trigger if _CONTROL_ID.fullmatch(trigger) else "",
        control_id=control_id,
        processing_id=first(10),
        version=first(11),
    )


def read_message(raw: bytes) -> InboundMessage:
    """One frame's bytes as a checked, parsed message; Hl7Rejection when it cannot be accepted."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        rejection = error(DATA_TYPE_ERROR, "message text must be 7-bit ASCII")
        rejection.header = sniff_header(raw)
        raise rejection from None
    text = normalize_segments(text)
    if not text.startswith("MSH"):
        raise reject(SEGMENT_SEQUENCE_ERROR, "message does not start with an MSH segment", "MSH")
    if not _ASCII_TEXT.fullmatch(text):
        rejection = error(DATA_TYPE_ERROR, "message text contains control characters")
        rejection.header = sniff_header(raw)
        raise rejection
    try:
        check_encoding_characters(text)
    except Hl7Rejection as rejection:
        rejection.header = sniff_header(raw)
        raise
    try:
        message = hl7.parse(text)
    except Exception as exc:  # python-hl7 raises assorted errors on broken structure
        raise reject(SEGMENT_SEQUENCE_ERROR, "message cannot be parsed", "MSH") from exc
    msh = message.segment("MSH")
    header = Header(
        sending_application=component(msh, 3),
        sending_facility=component(msh, 4),
        receiving_application=component(msh, 5),
        receiving_facility=component(msh, 6),
        timestamp=component(msh, 7),
        message_type=component(msh, 9, 1),
        trigger=component(msh, 9, 2),
        control_id=field(msh, 10),
        processing_id=component(msh, 11),
        version=component(msh, 12),
    )
    if not _CONTROL_ID.fullmatch(header.control_id):
        raise reject(REQUIRED_FIELD_MISSING, "MSH-10 message control id is missing or invalid", "MSH^1^10")
    for value, location, name in (
        (header.sending_facility, "MSH^1^4", "MSH-4 sending facility"),
        (header.receiving_facility, "MSH^1^6", "MSH-6 receiving facility"),
        (header.message_type, "MSH^1^9", "MSH-9 message type"),
        (header.trigger, "MSH^1^9", "MSH-9 trigger event"),
    ):
        if not value:
            raise reject(REQUIRED_FIELD_MISSING, f"{name} is missing", location).with_header(header)
    if header.processing_id not in PROCESSING_IDS:
        raise reject(UNSUPPORTED_PROCESSING_ID, "MSH-11 processing id must be P, T or D", "MSH^1^11").with_header(
            header
        )
    if not header.version.startswith("2."):
        raise reject(UNSUPPORTED_VERSION_ID, "MSH-12 version must be an HL7 v2 version", "MSH^1^12").with_header(header)
    return InboundMessage(header, message)


# --- acknowledgements -------------------------------------------------------------------------

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}


def escape(text: str) -> str:
    """Text for a field of a message in the standard encoding (|^~\\&), on one line, ASCII."""
    text = "".join(_ESCAPES.get(c, c) for c in text)
    return "".join(c if " " <= c <= "~" else " " for c in text)


def build_ack(
    header: Header | None,
    ack_code: str = ACCEPT,
    text: str = "",
    *,
    error_code: str = "",
    location: str = "",
    now: dt.datetime | None = None,
    ack_control_id: str | None = None,
) -> bytes:
    """An original-mode ACK: MSH, MSA (MSA-2 = the message's MSH-10, MSA-3 = `text`), and an ERR
    segment when the code is not AA. Unparsed messages (header None) are answered from us to nobody."""
    moment = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S")
    h = header or Header("", "", "", "", "", "", "", "", "P", DEFAULT_VERSION)
    version = h.version if re.fullmatch(r"2\.[0-9.]{1,6}", h.version or "") else DEFAULT_VERSION
    processing = h.processing_id if h.processing_id in PROCESSING_IDS else "P"
    trigger = escape(h.trigger)
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            escape(h.receiving_application) or "CLINIC_BOARD",
            escape(h.receiving_facility),
            escape(h.sending_application),
            escape(h.sending_facility),
            moment,
            "",
            f"ACK^{trigger}^ACK" if trigger else "ACK",
            ack_control_id or "ACK" + uuid.uuid4().hex[:20],
            processing,
            version,
        ]
    )
    msa = ["MSA", ack_code, escape(h.control_id)]
    if text:
        msa.append(escape(text))
    segments = [msh, "|".join(msa)]
    if ack_code != ACCEPT:
        code = error_code or APPLICATION_INTERNAL_ERROR
        severity = "E"
        segments.append(
            "|".join(
                ["ERR", "", _location(location), f"{code}^{escape(text)}^HL70357", severity, "", "", "", escape(text)]
            )
        )
    return ("\r".join(segments) + "\r").encode("ascii")


def _location(location: str) -> str:
    """ERR-2 (ERL: segment^sequence^field^...) is ours: components kept, anything else dropped."""
    return "".join(c for c in location if c.isalnum() or c == "^")


def rejection_ack(rejection: Hl7Rejection) -> bytes:
    return build_ack(
        rejection.header,
        rejection.ack_code,
        rejection.text,
        error_code=rejection.error_code,
        location=rejection.location,
    )
