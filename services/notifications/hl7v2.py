"""HL7 v2 messages in and acknowledgements out: pure functions, no I/O.

Parsing is python-hl7's (`hl7.parse`); what it does not check is checked here first, because of
how it behaves (see README, "python-hl7: known issues we cover"):
- it splits segments on `\\r` only: `\\r\\n` and `\\n` separators are turned into `\\r` before;
- it takes whatever follows `MSH|` as encoding characters without checking them: they must be
  four (or five, with v2.7's truncation character) distinct non-alphanumeric characters;
- it takes text, not bytes: the bytes are decoded here first, in the character set MSH-18 names
  (see `charset_codec`; absent or ASCII: UTF-8 when the bytes are valid UTF-8, else Latin-1).

Acknowledgements are written here, not with `Message.create_ack`, so that a frame we could not
parse (no MSH, broken encoding characters, an unknown character set) still gets one, always in
the standard encoding and in ASCII. Original mode (MSH-15 empty: AA/AE/AR) and enhanced mode
(MSH-15 set: a commit acknowledgement CA/CE/CR, sent or not as MSH-15 asks) are both served.
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import hl7

# Acknowledgement codes (HL7 table 0008).
ACCEPT, ERROR, REJECT = "AA", "AE", "AR"
# Their enhanced-mode (commit acknowledgement) counterparts.
COMMIT_CODES = {ACCEPT: "CA", ERROR: "CE", REJECT: "CR"}
# MSH-15 accept acknowledgement conditions (HL7 table 0155); AL (always), or none, acknowledges every message.
NEVER, ERROR_ONLY, SUCCESS_ONLY = "NE", "ER", "SU"

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
_CONTROL_ID = re.compile(r"^[\x21-\x7e]{1,199}$")  # MSH-10 is ST(199) in 2.5.1
# Control characters that have no place in HL7 text (tab, CR and LF do: separators and spacing).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
STANDARD_ENCODING = "|^~\\&"
PROCESSING_NAMES = {"P": "production", "T": "training", "D": "debugging"}

# MSH-18 (HL7 table 0211 and the spellings senders use) -> Python codec. "" = not declared.
_LATIN_1 = "latin-1"
_CHARSETS = {
    "": "",
    "ASCII": "",
    "US-ASCII": "",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "8859/1": _LATIN_1,
    "ISO-8859-1": _LATIN_1,
    "ISO8859-1": _LATIN_1,
    "ISO 8859-1": _LATIN_1,
    "LATIN-1": _LATIN_1,
    "LATIN1": _LATIN_1,
    "ISO IR100": _LATIN_1,
    "ISO IR 100": _LATIN_1,
    "ISO-IR-100": _LATIN_1,
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
    **{f"8859/{n}": f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 15)},
    **{f"ISO-8859-{n}": f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
}
# Declared but not carried on an MLLP byte stream here: not ASCII-compatible, so MSH itself would not read.
_UNSUPPORTED_CHARSETS = frozenset({"UNICODE UTF-16", "UNICODE UTF-32", "UTF-16", "UTF-32", "ISO IR87", "ISO IR159"})


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
    """What the MSH says about a message: first components, and MSH-3..6 whole (every HD component,
    in the standard encoding) for the acknowledgement's address."""

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
    # MSH-3..6 as sent, every component (e.g. "LAB^2.16.840.1.113883.3.1^ISO"), standard encoding.
    addresses: tuple[str, str, str, str] = ("", "", "", "")
    # MSH-15 / MSH-16: empty = original acknowledgement mode.
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset: str = ""

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type)

    def wants_ack(self, ack_code: str) -> bool:
        """Whether an acknowledgement with this outcome is to be sent (MSH-15, table 0155)."""
        condition = self.accept_ack_type
        if condition == NEVER:
            return False
        if condition == ERROR_ONLY:
            return ack_code != ACCEPT
        if condition == SUCCESS_ONLY:
            return ack_code == ACCEPT
        return True


@dataclass(frozen=True)
class InboundMessage:
    """A framed message, checked and parsed: its header and python-hl7's tree."""

    header: Header
    message: hl7.Message
    # What the message says (every segment, MSH-7 and MSH-10 left out): a sender that reuses a
    # control id for other content is told apart, one that re-stamps a resend is not.
    content_digest: str = dataclass_field(default="", repr=False)

    def segments(self, name: str) -> list:
        return [segment for segment in self.message if str(segment[0]) == name]

    @property
    def message_key(self) -> str:
        """The identity stored results and appointments are deduplicated on."""
        header = self.header
        return f"hl7\x1f{header.sending_facility}\x1f{header.control_id}\x1f{self.content_digest}"


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


def _msh_fields(text: str) -> list[str] | None:
    """MSH's fields split on its own field separator (fields[n - 1] is MSH-n for n >= 2)."""
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH") or len(text) < 4:
        return None
    msh = text.split("\r", 1)[0]
    return msh.split(msh[3])


def _hd(value: str, encoding: str) -> str:
    """A hierarchic designator (MSH-3..6) in the standard encoding, every component kept."""
    if len(encoding) < 2:
        return ""
    components = value.split(encoding[1])
    if encoding[:5] != STANDARD_ENCODING[:5]:
        components = [escape(c) for c in components]
    text = "^".join(components).rstrip("^")
    return "".join(c for c in text if " " <= c <= "~")[:227]


def sniff_header(raw: bytes) -> Header | None:
    """MSH-3..18 read straight off the bytes, to acknowledge a message that cannot be parsed (bad
    character set, broken encoding characters, too large); None without a usable MSH-10."""
    fields = _msh_fields(raw[:8192].decode("latin-1"))
    if fields is None:
        return None

    def first(index: int) -> str:
        value = fields[index - 1].split("^", 1)[0] if len(fields) >= index else ""
        return value if _CONTROL_ID.fullmatch(value) else ""

    control_id = fields[9] if len(fields) > 9 else ""
    if not _CONTROL_ID.fullmatch(control_id):
        return None
    trigger = fields[8].split("^")[1] if len(fields) > 8 and "^" in fields[8] else ""
    encoding = raw[3:4].decode("latin-1") + fields[1] if len(fields) > 1 else STANDARD_ENCODING
    return Header(
        sending_application=first(3),
        sending_facility=first(4),
        receiving_application=first(5),
        receiving_facility=first(6),
        timestamp="",
        message_type=first(9),
        trigger=trigger if _CONTROL_ID.fullmatch(trigger) else "",
        control_id=control_id,
        processing_id=first(11),
        version=first(12),
        addresses=tuple(_hd(fields[i - 1], encoding) if len(fields) >= i else "" for i in (3, 4, 5, 6)),
        accept_ack_type=first(15).upper(),
        application_ack_type=first(16).upper(),
        charset=_charset_field(fields[17]) if len(fields) > 17 else "",
    )


def _charset_field(value: str) -> str:
    """MSH-18's first repetition (character set names hold spaces: "UNICODE UTF-8")."""
    value = value.split("~", 1)[0].split("^", 1)[0].strip()
    return value if re.fullmatch(r"[\x20-\x7e]{1,40}", value) else value[:40].encode("ascii", "replace").decode()


def charset_codec(declared: str) -> str:
    """The codec for an MSH-18 value ("" when none is declared); Hl7Rejection AR for one we do not read."""
    name = " ".join(declared.replace("_", " ").split()).upper()
    codec = _CHARSETS.get(name) if name not in _UNSUPPORTED_CHARSETS else None
    if codec is None:
        raise reject(TABLE_VALUE_NOT_FOUND, f"MSH-18 character set {declared[:40]!r} is not supported", "MSH^1^18")
    return codec


def decode_text(raw: bytes, codec: str) -> str:
    """The message's bytes as text. Not declared (or ASCII): UTF-8 when the bytes are valid UTF-8,
    else Latin-1, as Windows and older lab systems send. Declared: that codec, strictly; Latin-1 is
    read as Windows-1252 where that defines the byte (curly quotes), as senders mean it."""
    if codec == "":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("cp1252", errors="latin1fallback")
    if codec == _LATIN_1:
        return raw.decode("cp1252", errors="latin1fallback")
    return raw.decode(codec)


def _latin1_fallback(error: UnicodeError):
    # The five bytes Windows-1252 leaves undefined read as Latin-1 (C1 controls), never refused.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("latin1fallback", _latin1_fallback)


def undecodable_location(raw: bytes, offset: int) -> tuple[str, str]:
    """(ERR-2 location, "SEG-n") of the field holding byte `offset`, from the raw bytes."""
    text = raw.decode("latin-1").replace("\r\n", "\r").replace("\n", "\r")
    offset = min(offset, len(text))
    segment_start = text.rfind("\r", 0, offset) + 1
    name = text[segment_start : segment_start + 3]
    if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
        return "", "the message"
    ordinal = sum(1 for line in text[:segment_start].split("\r") if line.startswith(name))
    separator = text[3] if len(text) > 3 else "|"
    field_number = text[segment_start:offset].count(separator) + (1 if name == "MSH" else 0)
    return f"{name}^{ordinal + 1}^{field_number}", f"{name}-{field_number}"


def message_digest(text: str) -> str:
    """A digest of what a message says: its segments with MSH-7 and MSH-10 blanked."""
    lines = text.split("\r")
    fields = lines[0].split(lines[0][3]) if len(lines[0]) > 3 else [lines[0]]
    for index in (6, 9):  # MSH-7, MSH-10
        if len(fields) > index:
            fields[index] = ""
    canonical = "\r".join([lines[0][3].join(fields), *lines[1:]])
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def read_message(raw: bytes, *, processing_id: str = "P") -> InboundMessage:
    """One frame's bytes as a checked, parsed message; Hl7Rejection when it cannot be accepted.
    `processing_id` is this interface's (MSH-11): P in production; other messages are refused."""
    sniffed = sniff_header(raw)
    try:
        codec = charset_codec(sniffed.charset if sniffed else "")
    except Hl7Rejection as rejection:
        raise rejection.with_header(sniffed) if sniffed else rejection from None
    try:
        text = decode_text(raw, codec)
    except UnicodeDecodeError as exc:
        location, name = undecodable_location(raw, exc.start)
        charset = sniffed.charset if sniffed and sniffed.charset else "UTF-8"
        rejection = error(DATA_TYPE_ERROR, f"{name} holds bytes that are not valid {charset} (MSH-18)", location)
        rejection.header = sniffed
        raise rejection from None
    text = normalize_segments(text)
    if not text.startswith("MSH"):
        raise reject(SEGMENT_SEQUENCE_ERROR, "message does not start with an MSH segment", "MSH")
    if _CONTROL_CHARACTERS.search(text):
        rejection = error(DATA_TYPE_ERROR, "message text contains control characters")
        rejection.header = sniffed
        raise rejection
    try:
        check_encoding_characters(text)
    except Hl7Rejection as rejection:
        rejection.header = sniffed
        raise
    text = text.replace("\t", " ")
    try:
        message = hl7.parse(text)
    except Exception as exc:  # python-hl7 raises assorted errors on broken structure
        raise reject(SEGMENT_SEQUENCE_ERROR, "message cannot be parsed", "MSH") from exc
    msh = message.segment("MSH")
    encoding = text[3] + text[4 : text.find(text[3], 4)]
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
        addresses=tuple(_hd(field(msh, i), encoding) for i in (3, 4, 5, 6)),
        accept_ack_type=component(msh, 15).upper(),
        application_ack_type=component(msh, 16).upper(),
        charset=component(msh, 18),
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
    if header.processing_id != processing_id:
        ours = PROCESSING_NAMES.get(processing_id, processing_id)
        theirs = PROCESSING_NAMES.get(header.processing_id, "unknown")
        raise reject(
            UNSUPPORTED_PROCESSING_ID,
            f"MSH-11 processing id {header.processing_id[:3]!r} ({theirs}) is not accepted by this {ours} interface",
            "MSH^1^11",
        ).with_header(header)
    if not header.version.startswith("2."):
        raise reject(UNSUPPORTED_VERSION_ID, "MSH-12 version must be an HL7 v2 version", "MSH^1^12").with_header(header)
    return InboundMessage(header, message, message_digest(text))


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
    """An acknowledgement: MSH (addressed back to the sender, every HD component kept; MSH-7 with
    its offset), MSA (MSA-1 the code, or its commit counterpart CA/CE/CR in enhanced mode; MSA-2 the
    message's MSH-10; MSA-3 `text`), and an ERR segment when the code is not AA. Unparsed messages
    (header None) are answered from us to nobody."""
    moment = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S%z") or ""
    h = header or Header("", "", "", "", "", "", "", "", "P", DEFAULT_VERSION)
    version = h.version if re.fullmatch(r"2\.[0-9.]{1,6}", h.version or "") else DEFAULT_VERSION
    processing = h.processing_id if h.processing_id in PROCESSING_IDS else "P"
    trigger = escape(h.trigger)
    sending_app, sending_facility, receiving_app, receiving_facility = (
        h.addresses if any(h.addresses) else tuple(escape(v) for v in (
            h.sending_application, h.sending_facility, h.receiving_application, h.receiving_facility
        ))
    )  # fmt: skip
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            receiving_app or "CLINIC_BOARD",
            receiving_facility,
            sending_app,
            sending_facility,
            moment,
            "",
            f"ACK^{trigger}^ACK" if trigger else "ACK",
            ack_control_id or "ACK" + uuid.uuid4().hex[:20],
            processing,
            version,
        ]
    )
    msa = ["MSA", COMMIT_CODES[ack_code] if h.enhanced_mode else ack_code, escape(h.control_id)]
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
