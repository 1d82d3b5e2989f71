"""The type of an inbound document, from its C-CDA code, its title or heading, and its words.

| signal | confidence |
|---|---|
| a C-CDA document code (LOINC) in CODES | 0.97 |
| a generic C-CDA code (GENERIC_CODES: CCD 34133-9, note, progress note) | by title and words, at most 0.8 |
| a title naming one type: the C-CDA title, or a heading (below) | 0.95 |
| words in the text: 2 or more hits of one type | 0.8 |
| words in the text: 1 hit | 0.6 |
| nothing | "other", 0.3 |

A heading is one of the first 3 lines of the text, of up to 8 words, in capitals or Title Case
("REFERRAL FOR CONSULTATION", "Lab Report"). When two types have hits in the text, the one with
more wins and its confidence is lowered by 0.2 (an ambiguous text is never sure enough to be filed
without a person). Pure logic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAB_REPORT, REFERRAL, RECORDS_REQUEST, PRESCRIPTION_REQUEST, OTHER = (
    "lab_report",
    "referral",
    "records_request",
    "prescription_request",
    "other",
)
DOCUMENT_TYPES = (LAB_REPORT, REFERRAL, RECORDS_REQUEST, PRESCRIPTION_REQUEST, OTHER)
LABELS = {
    LAB_REPORT: "Lab report",
    REFERRAL: "Referral",
    RECORDS_REQUEST: "Records request",
    PRESCRIPTION_REQUEST: "Prescription request",
    OTHER: "Other",
}

# LOINC document codes (C-CDA ClinicalDocument/code) that name a type.
CODES = {
    "11502-2": LAB_REPORT,  # Laboratory report
    "26436-6": LAB_REPORT,  # Laboratory studies (set)
    "18725-2": LAB_REPORT,  # Microbiology studies (set)
    "18719-5": LAB_REPORT,  # Chemistry studies (set)
    "57133-1": REFERRAL,  # Referral note
    "18761-7": REFERRAL,  # Provider-unspecified transfer summary
    "57833-6": PRESCRIPTION_REQUEST,  # Prescription for medication
}

# Words of each type, matched as whole words, case-insensitive.
KEYWORDS = {
    LAB_REPORT: (
        r"lab(?:oratory)? (?:report|results?)",
        r"specimen",
        r"reference range",
        r"collected",
        r"result(?:ed)? date",
        r"cbc|cmp|bmp|hba1c|lipid panel|urinalysis|tsh",
    ),
    REFERRAL: (
        r"referral",
        r"referred (?:by|to|for)",
        r"reason for (?:referral|consult(?:ation)?)",
        r"consultation request",
        r"request for consult(?:ation)?",
    ),
    RECORDS_REQUEST: (
        r"(?:medical )?records? request",
        r"request(?:ing)? (?:for )?(?:medical |copies of )?records",
        r"release of (?:information|records)",
        r"authori[sz]ation (?:to|for) (?:release|disclose)",
        r"roi",
    ),
    PRESCRIPTION_REQUEST: (
        r"refill",
        r"prescription (?:request|renewal)",
        r"rx (?:request|renewal|refill)",
        r"medication (?:renewal|refill|request)",
        r"renewal request",
        r"prior authori[sz]ation",
    ),
}
PATTERNS = {kind: [re.compile(rf"\b(?:{w})\b", re.IGNORECASE) for w in words] for kind, words in KEYWORDS.items()}
# Codes of documents about anything (a CCD, a generic note): classified by title and words instead,
# and never sure enough to be filed without a person.
GENERIC_CODES = {
    "34133-9",  # Summarization of episode note (the CCD)
    "34109-9",  # Note
    "11506-3",  # Progress note
}
GENERIC_CAP = 0.8
HEADING_LINES = 3
HEADING_WORDS = 8


@dataclass(frozen=True)
class DocumentType:
    document_type: str
    confidence: float


def _hits(text: str) -> dict[str, int]:
    return {kind: sum(len(p.findall(text)) for p in patterns) for kind, patterns in PATTERNS.items()}


def _is_heading(line: str) -> bool:
    """A short line in capitals or Title Case ("REFERRAL FOR CONSULTATION", "Lab Report")."""
    words = [w for w in line.split() if w[:1].isalpha()]
    capitalised = sum(1 for w in words if w[0].isupper())
    return 0 < len(words) <= HEADING_WORDS and (line.upper() == line or capitalised >= len(words) - 1)


def _heading(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()][:HEADING_LINES]
    return "\n".join(line for line in lines if _is_heading(line))


def _titled(title: str) -> str:
    """The one type a short title names, else ""."""
    named = [kind for kind, count in _hits(title).items() if count]
    return named[0] if len(named) == 1 else ""


def classify(code: str = "", title: str = "", text: str = "") -> DocumentType:
    if code in CODES:
        return DocumentType(CODES[code], 0.97)
    found = _by_words(title, text)
    if code in GENERIC_CODES:
        return DocumentType(found.document_type, min(found.confidence, GENERIC_CAP))
    return found


def _by_words(title: str, text: str) -> DocumentType:
    for heading in (title, _heading(text)):
        if heading and (kind := _titled(heading)):
            return DocumentType(kind, 0.95)
    hits = sorted(((count, kind) for kind, count in _hits(f"{title}\n{text}").items() if count), reverse=True)
    if not hits:
        return DocumentType(OTHER, 0.3)
    count, kind = hits[0]
    confidence = 0.8 if count >= 2 else 0.6
    if len(hits) > 1:
        confidence -= 0.2
    return DocumentType(kind, round(confidence, 2))
