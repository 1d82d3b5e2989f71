"""What an inbound document says about its patient(s) and itself, read from its content only.

Every part is read (bounded for cost), and every patient it names is kept, not only the first:
1. C-CDAs (an XML attachment whose root is `ClinicalDocument`, or each one inside an IHE XDM zip):
   the header's `recordTarget/patientRole` (every `id` as (root, extension) but SSNs and
   nullFlavors, the legal `patient/name` given, family and generational suffix, `birthTime`), the
   document `code` (LOINC) and `title`;
2. PDF text layers (pypdf), page by page, e.g. a fax: labelled blocks ("Patient:", "Patient Name:",
   a bare "Name:" only as a last resort; "DOB:", "Date of Birth:", "MRN:", "Medical Record #:"),
   each name label starting a new patient block;
3. text attachments and the message's own text body, read like a PDF's text.

`Extracted.patient` is the patient the document is mostly about (the first C-CDA's, else the first
patient-labelled block, merged with the later mentions that agree with it); `Extracted.patients`
every mention, for match.py's several-patients check; `Extracted.complete` is False when a part or
a page could not be read (page cap, an image page or attachment, a bound hit): such a document is
never filed without a person.

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
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)
logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings are about broken files, noise here

LOINC = "2.16.840.1.113883.6.1"
SSN_ROOT = "2.16.840.1.113883.4.1"
PDF_PAGES = 30  # read for cost; a longer PDF is read this far and never filed without a person
MAX_TEXT_CHARS = 200_000
ZIP_ENTRIES = 200
ZIP_ENTRY_BYTES = 10 * 1024 * 1024
ZIP_IGNORED = (".xsl", ".htm", ".html", ".txt", ".css", "metadata.xml")
NAME_PREFIXES = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "rev", "sr", "fr"}
GENERATIONS = {"jr": "JR", "junior": "JR", "sr": "SR", "senior": "SR", "ii": "II", "iii": "III", "iv": "IV"}
CREDENTIALS = {"v", "md", "do", "phd", "rn", "np", "esq", "dds", "lcsw"}
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
    """Who a document (or one block of it) says it is about; empty fields were not found."""

    mrns: tuple[str, ...] = ()  # labelled in text: no assigning authority
    family: str = ""
    given: tuple[str, ...] = ()
    birth_date: str = ""  # YYYY-MM-DD
    suffix: str = ""  # generational: JR, SR, II, III, IV
    ids: tuple[tuple[str, str], ...] = ()  # C-CDA patientRole ids: (root, extension)
    order_unsure: bool = False  # "CARTER JAMES": family and given may be either way round

    def __bool__(self) -> bool:
        return bool(self.mrns or self.ids or self.family or self.given or self.birth_date)


@dataclass(frozen=True)
class Extracted:
    patient: PatientFields = field(default_factory=PatientFields)
    code: str = ""  # the C-CDA document code, when LOINC
    title: str = ""  # the C-CDA title
    text: str = ""  # readable text (PDF text layers, the message body) for the document type
    source: str = "none"  # where the patient came from: "ccda" | "pdf" | "text" | "none"
    patients: tuple[PatientFields, ...] = ()  # every patient mention, in every part and page
    complete: bool = True  # every page of every part was read


# --- dates --------------------------------------------------------------------------------------------
def _date(year: int, month: int, day: int) -> str:
    """An ISO date from 1900 to today; "" for an impossible or future one."""
    try:
        value = dt.date(year, month, day)
    except ValueError:
        return ""
    return value.isoformat() if dt.date(1900, 1, 1) <= value <= dt.date.today() else ""


def _short_year(yy: int, month: int, day: int) -> str:
    """A two-digit year: the 2000s unless that date is still to come, then the 1900s
    ("1/5/24" -> 2024-01-05; "12/30/26" in March 2026 -> 1926-12-30; "3/12/84" -> 1984-03-12)."""
    return _date(2000 + yy, month, day) or _date(1900 + yy, month, day)


def _numeric(first: int, second: int, year: str) -> str:
    if len(year) == 2:
        return _short_year(int(year), first, second)
    return _date(int(year), first, second)


NUMERIC_DATE = re.compile(r"(\d{1,2})([/-])(\d{1,2})\2(\d{4}|\d{2})(?!\d)")
DOTTED_DATE = re.compile(r"(\d{1,2})\.(\d{1,2})\.(\d{4})(?!\d)")
ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")
EIGHT_DIGITS = re.compile(r"(\d{8})(?!\d)")
MONTH_FIRST = re.compile(r"([A-Za-z]{3,9})\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})")
DAY_FIRST = re.compile(r"(\d{1,2})[\s-]+([A-Za-z]{3,9})\.?[\s,-]+(\d{4})")


def _dotted(first: int, second: int, year: int) -> str:
    """D.M.Y outside the US, M.D.Y inside: only a day above 12 (or both readings equal) tells."""
    month_day, day_month = _date(year, first, second), _date(year, second, first)
    if first == second or not (first <= 12 and second <= 12):
        return month_day or day_month
    return ""


def _eight(digits: str) -> str:
    """MMDDYYYY ("03121984") or YYYYMMDD ("19840312"): never both valid for a real birth date."""
    return _date(int(digits[4:]), int(digits[:2]), int(digits[2:4])) or _date(
        int(digits[:4]), int(digits[4:6]), int(digits[6:])
    )


def parse_date(text: str) -> str:
    """A birth date written at the start of `text` (US order for numbers: MM/DD/YYYY), as ISO."""
    text = text.strip()
    if match := ISO_DATE.match(text):
        return _date(int(match[1]), int(match[2]), int(match[3]))
    if match := NUMERIC_DATE.match(text):
        return _numeric(int(match[1]), int(match[3]), match[4])
    if match := DOTTED_DATE.match(text):
        return _dotted(int(match[1]), int(match[2]), int(match[3]))
    if match := EIGHT_DIGITS.match(text):
        return _eight(match[1])
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


def _split_suffix(words: list[str]) -> tuple[list[str], str]:
    """Words without trailing suffixes and credentials; the generational suffix among them."""
    suffix = ""
    words = list(words)
    while words and (_bare(words[-1]) in GENERATIONS or _bare(words[-1]) in CREDENTIALS):
        suffix = GENERATIONS.get(_bare(words.pop()), suffix)
    return words, suffix


def suffix_of(name: str) -> tuple[str, str]:
    """(the name without a trailing generational suffix, the suffix): "Carter Jr." -> ("Carter", "JR")."""
    words, suffix = _split_suffix(_words(name))
    return " ".join(words), suffix


def parse_name(text: str) -> PatientFields:
    """The name parts of a written name: "Maria Lopez", "Lopez, Maria E.", "Mrs. Maria Lopez Jr.",
    "CARTER JAMES" (all capitals without a comma: either order, `order_unsure`). Prefixes and
    credentials dropped, a generational suffix kept; parenthesised or quoted parts ("(Pref: Mary)")
    dropped; a value without letters is no name."""
    text = re.sub(r"\([^)]*\)?|\"[^\"]*\"?", " ", text)
    text = re.sub(r"\s+", " ", text).strip(" .;:")
    if not re.search(r"[^\W\d_]", text):
        return PatientFields()
    if "," in text:
        family_part, _, given_part = text.partition(",")
        family_words, family_suffix = _split_suffix([w for w in _words(family_part) if _bare(w) not in NAME_PREFIXES])
        given_words, given_suffix = _split_suffix([w for w in _words(given_part) if _bare(w) not in NAME_PREFIXES])
        given_words = [w for w in given_words if _bare(w) not in GENERATIONS and _bare(w) not in CREDENTIALS]
        return PatientFields(
            family=" ".join(family_words),
            given=tuple(w.strip(".") for w in given_words),
            suffix=family_suffix or given_suffix,
        )
    words = _words(text)
    while words and _bare(words[0]) in NAME_PREFIXES:
        words.pop(0)
    words, suffix = _split_suffix(words)
    if len(words) < 2:
        return PatientFields(family=words[0] if words else "", suffix=suffix)
    unsure = " ".join(words).upper() == " ".join(words)
    return PatientFields(
        family=words[-1], given=tuple(w.strip(".") for w in words[:-1]), suffix=suffix, order_unsure=unsure
    )


# --- labelled text (PDF text layers, message bodies) ----------------------------------------------------
_LABEL_AHEAD = r"[A-Za-z][\w.#/'()-]*(?: [\w.#/'()-]+){0,3}[ \t]*[:#]"
_NEXT_LABEL = (
    rf"(?=[ \t]{{2,}}{_LABEL_AHEAD}"
    r"|[ \t]+(?:DOB|D\.O\.B|Date\s+of\s+Birth|Birth\s*Date|MRN|Medical\s+Record|Sex|Gender|Age)\b|[ \t]*$)"
)
NAME_LINE = re.compile(
    r"^[ \t]*(?:(?P<patient>Patient(?:'s)?(?:\s+Name)?|Pt\.?\s*Name|Client(?:\s+Name)?)|Name)"
    r"[ \t]*[:#][ \t]*(?P<name>[^\n]*?)" + _NEXT_LABEL,
    re.IGNORECASE | re.MULTILINE,
)
DOB_LABEL = re.compile(
    r"\b(?:DOB(?:\s*/\s*Age)?|D\.O\.B\.?|Date\s+of\s+Birth|Birth\s*Date|Birthdate)\s*[:#]?\s*", re.IGNORECASE
)
MRN_LABEL = re.compile(
    r"\b(?:MRN|Medical\s+Record(?:\s+(?:Number|No\.?))?|Med\.?\s*Rec\.?|Chart(?:\s+(?:Number|No\.?))?)"
    r"\s*(?:#|No\.?|Number)?\s*[:#]?\s*(?P<mrn>[A-Za-z0-9][A-Za-z0-9-]{2,31})\b",
    re.IGNORECASE,
)
# Someone else's date of birth or number: "Guarantor DOB", "Insured: ... DOB", "Mother's DOB".
QUALIFIER = re.compile(
    r"\b(?:guarantor|insured|subscriber|policy\s*holder|mother|father|parent|spouse|guardian|"
    r"responsible\s+party|emergency\s+contact|next\s+of\s+kin|husband|wife)\b",
    re.IGNORECASE,
)
PATIENT_WORD = re.compile(r"\b(?:patient|pt|client)\b|^[ \t]*name\b", re.IGNORECASE)


def _qualified(text: str, start: int) -> bool:
    """The label at `start` is about someone else: a qualifier comes after any patient word on its line."""
    before = text[text.rfind("\n", 0, start) + 1 : start]
    qualifiers = [m.end() for m in QUALIFIER.finditer(before)]
    patients = [m.end() for m in PATIENT_WORD.finditer(before)]
    return bool(qualifiers) and (not patients or qualifiers[-1] > patients[-1])


@dataclass
class _Block:
    """One patient's labelled fields in a text: from a name label to the next one."""

    patient_label: bool
    fields: PatientFields = field(default_factory=PatientFields)


def _events(text: str) -> list[tuple[int, str, object]]:
    events: list[tuple[int, str, object]] = []
    for match in NAME_LINE.finditer(text):
        if name := parse_name(match["name"]):
            events.append((match.start(), "patient" if match["patient"] else "name", name))
    for match in DOB_LABEL.finditer(text):
        if not _qualified(text, match.start()) and (value := parse_date(text[match.end() : match.end() + 40])):
            events.append((match.start(), "dob", value))
    for match in MRN_LABEL.finditer(text):
        if re.search(r"\d", match["mrn"]) and not _qualified(text, match.start()):
            events.append((match.start(), "mrn", match["mrn"]))
    return sorted(events, key=lambda e: e[0])


def _blocks(text: str) -> list[_Block]:
    """The text's patient blocks in order; fields before any name label in a first nameless block."""
    blocks = [_Block(False)]
    for _, kind, value in _events(text[:MAX_TEXT_CHARS]):
        current = blocks[-1]
        if kind in ("patient", "name"):
            blocks.append(_Block(kind == "patient", value))  # type: ignore[arg-type]
        elif kind == "dob" and not current.fields.birth_date:
            current.fields = replace(current.fields, birth_date=value)
        elif kind == "dob" and current.fields.birth_date != value:  # a second date: someone else
            blocks.append(_Block(False, PatientFields(birth_date=value)))  # type: ignore[arg-type]
        elif kind == "mrn" and value not in current.fields.mrns:
            current.fields = replace(current.fields, mrns=(*current.fields.mrns, value))
    head, named = blocks[0], blocks[1:]
    if named and head.fields:
        first = next((b for b in named if b.patient_label), named[0])
        first.fields = replace(
            first.fields,
            birth_date=first.fields.birth_date or head.fields.birth_date,
            mrns=tuple(dict.fromkeys((*head.fields.mrns, *first.fields.mrns))),
        )
        if head.fields.birth_date and head.fields.birth_date != first.fields.birth_date:
            named.append(_Block(False, PatientFields(birth_date=head.fields.birth_date)))
        return named
    return [b for b in blocks if b.fields]


def text_patients(text: str) -> tuple[list[PatientFields], list[PatientFields]]:
    """(patients named with a patient label or only by number/date, patients named only with a bare
    "Name:" label) of a text, in order."""
    blocks = _blocks(text)
    labelled = [b.fields for b in blocks if b.patient_label or not (b.fields.family or b.fields.given)]
    return labelled, [b.fields for b in blocks if not b.patient_label and (b.fields.family or b.fields.given)]


def text_fields(text: str) -> PatientFields:
    """The patient a text is mostly about: its first patient-labelled block (a bare "Name:" block
    only when there is none), with the fields of the later blocks that agree with it."""
    labelled, bare = text_patients(text)
    return primary([*labelled, *bare]) if labelled or bare else PatientFields()


def _agrees(a: PatientFields, b: PatientFields) -> bool:
    """Nothing in `b` contradicts `a` (used only to fill `a`'s gaps; match.py judges identity)."""
    same_name = not (a.family and b.family) or a.family.lower() == b.family.lower()
    same_date = not (a.birth_date and b.birth_date) or a.birth_date == b.birth_date
    return same_name and same_date and (bool(a.family and b.family) or bool(a.birth_date and b.birth_date))


def primary(mentions: list[PatientFields]) -> PatientFields:
    """The first mention naming someone, completed by the later mentions that agree with it."""
    named = [m for m in mentions if m.family or m.given] or mentions
    first = named[0]
    for other in mentions:
        if other is not first and _agrees(first, other):
            first = replace(
                first,
                birth_date=first.birth_date or other.birth_date,
                mrns=tuple(dict.fromkeys((*first.mrns, *other.mrns))),
            )
    return first


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


def _ids(role: ET.Element) -> tuple[tuple[str, str], ...]:
    found = []
    for ident in _children(role, "id"):
        extension, root = (ident.get("extension") or "").strip(), (ident.get("root") or "").strip()
        if ident.get("nullFlavor") or root == SSN_ROOT or not extension:
            continue
        found.append((root, extension))
    return tuple(dict.fromkeys(found))


def _name(patient: ET.Element | None) -> PatientFields:
    names = [n for n in _children(patient, "name") if not n.get("nullFlavor")]
    legal = [n for n in names if "L" in (n.get("use") or "").split()]
    name = (legal or names or [None])[0]
    if name is None:
        return PatientFields()
    families = [f for f in _children(name, "family") if _text(f)]
    givens = [g for g in _children(name, "given") if _text(g) and g.get("qualifier") != "CL"]
    if not families and not givens:
        return replace(parse_name(_text(name)), order_unsure=False)  # an unstructured name
    plain = [f for f in families if not f.get("qualifier")]
    family, family_suffix = suffix_of(_text((plain or families)[0])) if families else ("", "")
    suffixes = [GENERATIONS.get(_bare(_text(s)), "") for s in _children(name, "suffix")]
    suffix = next((s for s in suffixes if s), family_suffix)
    return PatientFields(family=family, given=tuple(_text(g).strip(".") for g in givens), suffix=suffix)


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
    birth = _child(patient, "birthTime")
    birth_date = hl7_date(birth.get("value") or "") if birth is not None else ""
    fields = replace(_name(patient), ids=_ids(role) if role is not None else (), birth_date=birth_date)
    title = _text(_child(root, "title"))
    return Extracted(
        patient=fields,
        code=loinc,
        title=title[:200],
        source="ccda" if fields else "none",
        patients=(fields,) if fields else (),
    )


# --- PDF ------------------------------------------------------------------------------------------------
def pdf_pages(data: bytes, pages: int | None = None) -> tuple[list[str], bool]:
    """The text layer of a PDF's first `pages` pages, one string per page, and whether every page
    was read with text (False past the cap, for a page without text among pages with text, or when
    the text is cut at MAX_TEXT_CHARS). A scan without any text layer, an encrypted or broken PDF:
    ([], True) - nothing to read, nobody suggested."""
    pages = PDF_PAGES if pages is None else pages
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return [], True
        texts = [(page.extract_text() or "") for page in reader.pages[:pages]]
        total = len(reader.pages)
    except Exception:  # noqa: BLE001 - pypdf raises many kinds for a damaged file: no text then
        log.info("pdf text not readable")
        return [], True
    if not any(t.strip() for t in texts):
        return [], True
    complete = total <= pages and all(t.strip() for t in texts) and sum(map(len, texts)) <= MAX_TEXT_CHARS
    return texts, complete


def pdf_text(data: bytes, pages: int | None = None) -> str:
    """The text layer of a PDF's first `pages` pages ("" for a scan without one, or a broken file)."""
    return "\n".join(pdf_pages(data, pages)[0])[:MAX_TEXT_CHARS]


# --- one document ---------------------------------------------------------------------------------------
def kind_of(filename: str, content_type: str, data: bytes) -> str:
    """The kind of an attachment, "xml" | "zip" | "pdf" | "text" | "", by content first, then its name and type."""
    name, ctype = filename.lower(), content_type.lower()
    if data.startswith(b"%PDF-") or name.endswith(".pdf") or ctype == "application/pdf":
        return "pdf"
    if data.startswith(b"PK\x03\x04") or name.endswith(".zip") or "zip" in ctype:
        return "zip"
    if name.endswith(".xml") or ctype.endswith("xml") or data.lstrip()[:5] in (b"<?xml", b"<Clin"):
        return "xml"
    if ctype.startswith("text/") or name.endswith(".txt"):
        return "text"
    return ""


@dataclass
class _Parts:
    """What the parts of one document said so far."""

    headers: list[Extracted] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (source, text of one page or part)
    complete: bool = True

    def add(self, filename: str, content_type: str, data: bytes, *, zipped: bool = False) -> None:
        kind = kind_of(filename, content_type, data)
        if kind == "xml" and (found := ccda(data)) is not None:
            self.headers.append(found)
        elif kind == "zip" and not zipped:
            self.add_zip(data)
        elif kind == "pdf":
            pages, complete = pdf_pages(data)
            self.texts += [("pdf", page) for page in pages]
            self.complete &= complete
        elif kind == "text":
            self.texts.append(("text", data[:MAX_TEXT_CHARS].decode("utf-8", "replace")))
        elif kind != "xml":  # an image, an office file, a nested zip: not read
            self.complete = False

    def add_zip(self, data: bytes) -> None:
        """Every C-CDA and PDF of an XDM zip (its index, readme, metadata and stylesheets skipped)."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            entries = archive.infolist()
        except (zipfile.BadZipFile, ValueError, OSError):
            self.complete = False
            return
        self.complete &= len(entries) <= ZIP_ENTRIES
        for info in entries[:ZIP_ENTRIES]:
            if info.is_dir() or info.filename.lower().endswith(ZIP_IGNORED):
                continue
            content = _member(archive, info)
            if content is None:
                self.complete = False
                continue
            self.add(info.filename.rsplit("/", 1)[-1], "", content, zipped=True)


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes | None:
    """An entry's bytes within ZIP_ENTRY_BYTES; None when it is larger or broken (not read)."""
    if info.file_size > ZIP_ENTRY_BYTES:
        return None
    try:
        with archive.open(info) as member:
            content = member.read(ZIP_ENTRY_BYTES + 1)
    except (zipfile.BadZipFile, RuntimeError, ValueError, OSError, EOFError):
        return None
    return content if len(content) <= ZIP_ENTRY_BYTES else None


def ccda_in_zip(data: bytes) -> Extracted | None:
    """The first C-CDA inside an XDM zip (IHE_XDM/<subset>/*.xml); None when there is none."""
    parts = _Parts()
    parts.add_zip(data)
    return parts.headers[0] if parts.headers else None


def _undated(fields: PatientFields) -> bool:
    return not (fields.birth_date or fields.mrns)


def swapped(fields: PatientFields) -> PatientFields:
    """The other reading of an order-unsure name: "CARTER JAMES" read as family Carter, given James."""
    if not (fields.order_unsure and fields.given):
        return fields
    return replace(fields, family=fields.given[0], given=(*fields.given[1:], fields.family), order_unsure=False)


def document(body: str, files: Iterable[tuple[str, str, bytes]]) -> Extracted:
    """Everything a message (its text body and attachments) or a fax (one PDF) says.

    The patient comes from the first C-CDA header that names one, else the first patient-labelled
    text block (PDF pages and text attachments, then the body), else the first bare "Name:" block;
    every mention of every part is kept in `patients`; the code and title from the first C-CDA."""
    parts = _Parts()
    for filename, content_type, data in files:
        parts.add(filename, content_type, data)
    parts.texts.append(("text", body[:MAX_TEXT_CHARS]))
    first = parts.headers[0] if parts.headers else Extracted()
    text = "\n".join(t for _, t in parts.texts if t)[:MAX_TEXT_CHARS]
    mentions = [h.patient for h in parts.headers if h.patient]
    labelled: list[tuple[str, PatientFields]] = []
    bare: list[tuple[str, PatientFields]] = []
    for source, part in parts.texts:
        found_labelled, found_bare = text_patients(part)
        labelled += [(source, m) for m in found_labelled]
        bare += [(source, m) for m in found_bare]
    if mentions:
        patient, source = primary([*mentions, *(m for _, m in labelled)]), "ccda"
    elif labelled or bare:
        source = (labelled or bare)[0][0]
        patient = primary([m for _, m in labelled] or sorted((m for _, m in bare), key=_undated))
    else:
        patient, source = PatientFields(), "none"
    if not patient:
        source = "none"
    everyone = (*mentions, *(m for _, m in labelled), *(m for _, m in bare if m.birth_date or m.mrns))
    return Extracted(patient, first.code, first.title, text, source, everyone, parts.complete)
