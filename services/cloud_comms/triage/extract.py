"""What an inbound document says about its patient and itself, read from its content only.

Sources, in the order they are trusted (the first that names a patient wins; the text of all of
them is kept for the document type):

1. a C-CDA (an XML attachment whose root is `ClinicalDocument`, or one inside an IHE XDM zip):
   the header's `recordTarget/patientRole` (every `id/@extension` but SSNs and nullFlavors, the
   legal `patient/name` given and family parts, `patient/birthTime/@value`), the document `code`
   (LOINC) and `title`;
2. a PDF's text layer (pypdf), e.g. a fax: labelled lines ("Patient:", "Name:", "DOB:",
   "Date of Birth:", "MRN:", "Medical Record #:"), dates in the common US formats;
3. the message's own text body, read like a PDF's text.

Nothing here raises for bad input: an unreadable part gives nothing. No network, no database.
Untrusted XML with a DOCTYPE or entity declaration is not parsed at all (C-CDA never has one), and a
zip is read within bounds (entries, sizes), so a hostile attachment cannot exhaust the worker.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import xml.etree.ElementTree as ET  # noqa: N817 - the usual short name
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings are about broken files, noise here

LOINC = "2.16.840.1.113883.6.1"
SSN_ROOT = "2.16.840.1.113883.4.1"
PDF_PAGES = 5
MAX_TEXT_CHARS = 50_000
ZIP_ENTRIES = 200
ZIP_XML_BYTES = 10 * 1024 * 1024
NAME_PREFIXES = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "rev", "sr", "fr"}
NAME_SUFFIXES = {"jr", "sr", "ii", "iii", "iv", "v", "md", "do", "phd", "rn", "np", "esq", "dds", "lcsw"}
MONTHS = {
    name: n
    for n, names in enumerate(
        [
            ("jan", "january"),
            ("feb", "february"),
            ("mar", "march"),
            ("apr", "april"),
            ("may",),
            ("jun", "june"),
            ("jul", "july"),
            ("aug", "august"),
            ("sep", "sept", "september"),
            ("oct", "october"),
            ("nov", "november"),
            ("dec", "december"),
        ],
        start=1,
    )
    for name in names
}


@dataclass(frozen=True)
class PatientFields:
    """Who a document says it is about; empty fields were not found."""

    mrns: tuple[str, ...] = ()
    family: str = ""
    given: tuple[str, ...] = ()
    birth_date: str = ""  # YYYY-MM-DD

    def __bool__(self) -> bool:
        return bool(self.mrns or self.family or self.given or self.birth_date)


@dataclass(frozen=True)
class Extracted:
    patient: PatientFields = field(default_factory=PatientFields)
    code: str = ""  # the C-CDA document code, when LOINC
    title: str = ""  # the C-CDA title
    text: str = ""  # readable text (PDF text layers, the message body) for the document type
    source: str = "none"  # where the patient came from: "ccda" | "pdf" | "text" | "none"


# --- dates --------------------------------------------------------------------------------------------
def _date(year: int, month: int, day: int) -> str:
    try:
        value = dt.date(year, month, day)
    except ValueError:
        return ""
    if not 1900 <= year <= dt.date.today().year:
        return ""
    return value.isoformat()


def _year(text: str) -> int:
    year = int(text)
    if len(text) == 2:  # a two-digit year is in the past: 84 -> 1984, 05 -> 2005
        this = dt.date.today().year % 100
        year += 2000 if year <= this else 1900
    return year


NUMERIC_DATE = re.compile(r"(\d{1,2})[/.-](\d{1,2})[/.-](\d{4}|\d{2})(?!\d)")
ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")
MONTH_FIRST = re.compile(r"([A-Za-z]{3,9})\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})")
DAY_FIRST = re.compile(r"(\d{1,2})[\s-]+([A-Za-z]{3,9})\.?[\s,-]+(\d{4})")


def parse_date(text: str) -> str:
    """A birth date written at the start of `text` (US order for numbers: MM/DD/YYYY), as ISO."""
    text = text.strip()
    if match := ISO_DATE.match(text):
        return _date(int(match[1]), int(match[2]), int(match[3]))
    if match := NUMERIC_DATE.match(text):
        return _date(_year(match[3]), int(match[1]), int(match[2]))
    if (match := MONTH_FIRST.match(text)) and match[1].lower() in MONTHS:
        return _date(int(match[3]), MONTHS[match[1].lower()], int(match[2]))
    if (match := DAY_FIRST.match(text)) and match[2].lower() in MONTHS:
        return _date(int(match[3]), MONTHS[match[2].lower()], int(match[1]))
    return ""


def hl7_date(value: str) -> str:
    """An HL7 TS (`YYYYMMDD[HHMM[SS[.S]]][+/-ZZZZ]`) as an ISO date; "" for year or month only."""
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(\d{0,6}(?:\.\d+)?)([+-]\d{4})?", value.strip())
    return _date(int(match[1]), int(match[2]), int(match[3])) if match else ""


# --- names --------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text.strip()) if w]


def _bare(word: str) -> str:
    return re.sub(r"[^a-z]", "", word.lower())


def parse_name(text: str) -> tuple[str, tuple[str, ...]]:
    """(family, given names) of a written name: "Maria Lopez", "Lopez, Maria E.", "Mrs. Maria
    Lopez Jr."; prefixes and suffixes dropped."""
    text = re.sub(r"\s+", " ", text).strip(" .;:")
    if "," in text:
        family_part, _, given_part = text.partition(",")
        family_words = [w for w in _words(family_part) if _bare(w) not in NAME_PREFIXES]
        given_words = [w for w in _words(given_part) if _bare(w) not in NAME_SUFFIXES | NAME_PREFIXES]
        return " ".join(family_words), tuple(w.strip(".") for w in given_words)
    words = _words(text)
    while words and _bare(words[0]) in NAME_PREFIXES:
        words.pop(0)
    while words and _bare(words[-1]) in NAME_SUFFIXES:
        words.pop()
    if len(words) < 2:
        return (words[0] if words else ""), ()
    return words[-1], tuple(w.strip(".") for w in words[:-1])


# --- labelled text (PDF text layers, message bodies) ----------------------------------------------------
_NEXT_LABEL = r"(?=\s{2,}|\s+(?:DOB|D\.O\.B|Date\s+of\s+Birth|Birth\s*Date|MRN|Medical\s+Record|Sex|Gender|Age)\b|$)"
NAME_LINE = re.compile(
    r"^\s*(?:Patient(?:'s)?(?:\s+Name)?|Pt\.?\s*Name|Client(?:\s+Name)?|Name)\s*[:#]\s*(?P<name>[^\n]*?)" + _NEXT_LABEL,
    re.IGNORECASE | re.MULTILINE,
)
DOB_LABEL = re.compile(r"\b(?:DOB|D\.O\.B\.?|Date\s+of\s+Birth|Birth\s*Date|Birthdate)\s*[:#]?\s*", re.IGNORECASE)
MRN_LABEL = re.compile(
    r"\b(?:MRN|Medical\s+Record(?:\s+(?:Number|No\.?))?|Med\.?\s*Rec\.?|Chart(?:\s+(?:Number|No\.?))?)"
    r"\s*(?:#|No\.?|Number)?\s*[:#]?\s*(?P<mrn>[A-Za-z0-9][A-Za-z0-9-]{2,31})\b",
    re.IGNORECASE,
)


def text_fields(text: str) -> PatientFields:
    """The patient a text names with labels (the first of each label)."""
    text = text[:MAX_TEXT_CHARS]
    family, given = "", ()
    for match in NAME_LINE.finditer(text):
        family, given = parse_name(match["name"])
        if family:
            break
    birth_date = ""
    for match in DOB_LABEL.finditer(text):
        birth_date = parse_date(text[match.end() : match.end() + 40])
        if birth_date:
            break
    mrns = tuple(dict.fromkeys(m["mrn"] for m in MRN_LABEL.finditer(text) if re.search(r"\d", m["mrn"])))
    return PatientFields(mrns=mrns[:3], family=family, given=given, birth_date=birth_date)


# --- C-CDA ----------------------------------------------------------------------------------------------
def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(element: ET.Element | None, name: str) -> list[ET.Element]:
    return [] if element is None else [c for c in element if _local(c.tag) == name]


def _child(element: ET.Element | None, name: str) -> ET.Element | None:
    found = _children(element, name)
    return found[0] if found else None


def _text(element: ET.Element | None) -> str:
    return re.sub(r"\s+", " ", "".join(element.itertext())).strip() if element is not None else ""


def parse_xml(data: bytes) -> ET.Element | None:
    """The root of a well-formed XML document without DTD or entities; None otherwise."""
    head = data[:1_000_000].lower()
    if b"<!doctype" in head or b"<!entity" in head:
        return None
    try:
        return ET.fromstring(data)  # noqa: S314 - no DTD or entity declarations (checked above)
    except (ET.ParseError, ValueError):
        return None


def _ids(role: ET.Element) -> tuple[str, ...]:
    found = []
    for ident in _children(role, "id"):
        extension = (ident.get("extension") or "").strip()
        if ident.get("nullFlavor") or ident.get("root") == SSN_ROOT or not extension:
            continue
        found.append(extension)
    return tuple(dict.fromkeys(found))


def _name(patient: ET.Element | None) -> tuple[str, tuple[str, ...]]:
    names = [n for n in _children(patient, "name") if not n.get("nullFlavor")]
    legal = [n for n in names if "L" in (n.get("use") or "").split()]
    name = (legal or names or [None])[0]
    if name is None:
        return "", ()
    families = [f for f in _children(name, "family") if _text(f)]
    givens = [g for g in _children(name, "given") if _text(g) and g.get("qualifier") != "CL"]
    if not families and not givens:
        return parse_name(_text(name))  # an unstructured name
    plain = [f for f in families if not f.get("qualifier")]
    family = _text((plain or families)[0]) if families else ""
    return family, tuple(_text(g).strip(".") for g in givens)


def ccda(data: bytes) -> Extracted | None:
    """The header of a C-CDA document; None when `data` is not one."""
    root = parse_xml(data)
    if root is None or _local(root.tag) != "ClinicalDocument":
        return None
    code = _child(root, "code")
    loinc = ""
    if code is not None and (code.get("codeSystem") or LOINC) == LOINC:
        loinc = (code.get("code") or "").strip()
    role = _child(_child(root, "recordTarget"), "patientRole")
    patient = _child(role, "patient")
    family, given = _name(patient)
    birth = _child(patient, "birthTime")
    birth_date = hl7_date(birth.get("value") or "") if birth is not None else ""
    fields = PatientFields(
        mrns=_ids(role) if role is not None else (), family=family, given=given, birth_date=birth_date
    )
    title = _text(_child(root, "title"))
    return Extracted(patient=fields, code=loinc, title=title[:200], source="ccda" if fields else "none")


def ccda_in_zip(data: bytes) -> Extracted | None:
    """The first C-CDA inside an XDM zip (IHE_XDM/<subset>/*.xml); None when there is none."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()[:ZIP_ENTRIES]
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    for info in entries:
        if not info.filename.lower().endswith(".xml") or info.filename.upper().endswith("METADATA.XML"):
            continue
        if info.file_size > ZIP_XML_BYTES:
            continue
        try:
            with archive.open(info) as member:
                content = member.read(ZIP_XML_BYTES + 1)
        except (zipfile.BadZipFile, RuntimeError, ValueError, OSError, EOFError):
            continue
        if len(content) <= ZIP_XML_BYTES and (found := ccda(content)) is not None:
            return found
    return None


# --- PDF ------------------------------------------------------------------------------------------------
def pdf_text(data: bytes, pages: int = PDF_PAGES) -> str:
    """The text layer of a PDF's first `pages` pages ("" for a scan without one, or a broken file)."""
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return ""
        text = "\n".join((page.extract_text() or "") for page in reader.pages[:pages])
    except Exception:  # noqa: BLE001 - pypdf raises many kinds for a damaged file: no text then
        log.info("pdf text not readable")
        return ""
    return text[:MAX_TEXT_CHARS]


# --- one document ---------------------------------------------------------------------------------------
def kind_of(filename: str, content_type: str, data: bytes) -> str:
    """The kind of an attachment, "xml" | "zip" | "pdf" | "",, by content first, then its name and type."""
    name, ctype = filename.lower(), content_type.lower()
    if data.startswith(b"%PDF-") or name.endswith(".pdf") or ctype == "application/pdf":
        return "pdf"
    if data.startswith(b"PK\x03\x04") or name.endswith(".zip") or "zip" in ctype:
        return "zip"
    if name.endswith(".xml") or ctype.endswith("xml") or data.lstrip()[:5] in (b"<?xml", b"<Clin"):
        return "xml"
    return ""


def document(body: str, files: Iterable[tuple[str, str, bytes]]) -> Extracted:
    """Everything a message (its text body and attachments) or a fax (one PDF) says.

    The patient comes from the first C-CDA header that names one, else the first PDF text that
    does, else the body; the code and title from the first C-CDA; the text from all of them."""
    headers: list[Extracted] = []
    texts: list[str] = []
    for filename, content_type, data in files:
        kind = kind_of(filename, content_type, data)
        if kind == "xml" and (found := ccda(data)) is not None:
            headers.append(found)
        elif kind == "zip" and (found := ccda_in_zip(data)) is not None:
            headers.append(found)
        elif kind == "pdf" and (text := pdf_text(data)):
            texts.append(text)
    texts.append(body[:MAX_TEXT_CHARS])
    first = headers[0] if headers else Extracted()
    text = "\n".join(t for t in texts if t)[:MAX_TEXT_CHARS]
    for header in headers:
        if header.patient:
            return Extracted(header.patient, first.code, first.title, text, "ccda")
    for source, candidate in [*(("pdf", t) for t in texts[:-1]), ("text", texts[-1])]:
        fields = text_fields(candidate)
        if fields:
            return Extracted(fields, first.code, first.title, text, source)
    return Extracted(PatientFields(), first.code, first.title, text, "none")
