"""How sure we are that a document is about a roster patient: pure scoring, no database.

Values are compared as given: the roster compares blind-index keys of the normalised values
(`normalize_mrn`, `name_tokens`, ISO birth dates), tests may compare plain ones.

Base confidence by what matches (a field "matches" when the document gives it and it equals the
patient's; the name is "full" when family and first given name match, "family" when the family
matches but the given name does not or is not given; `matched_on` names "name" for a full match, or
a family match when the document gives no given name):

| MRN | birth date | name | confidence |
|---|---|---|---|
| yes | yes | full | 0.99 |
| yes | yes | family | 0.96 |
| yes | yes | - | 0.93 |
| yes | - | full | 0.93 |
| yes | - | family | 0.85 |
| yes | - | - | 0.75 |
| - | yes | full | 0.90 |
| - | yes | family | 0.70 |
| - | yes | - | 0.10 |
| - | - | full | 0.45 |
| - | - | family | 0.25 |

Conflicts (the document gives the field and it differs) multiply it: birth date x0.5, an MRN that
is another roster patient's x0.5 (an MRN we do not know may be the sender's own number: no
conflict), family name x0.6, given name x0.8, a generational suffix (Jr, Sr, II...) other than the
roster's x0.5. When the runner-up is within 0.05 of the best, the confidences are capped at 0.6:
two equally likely patients are never filed without a person.

MRNs come in two strengths: `mrns` (labelled in text, or C-CDA ids of an assigning authority the
agency named) match and conflict; `weak_mrns` (C-CDA ids of an authority the agency did not name,
when it named none) match but never conflict: a partner hospital's own number that happens to equal
another roster MRN says nothing about that patient.

Review caps (REVIEW_CAP, 0.85: below the lowest auto-file threshold, 0.9), each with a reason:
- `multiple_patients`: the document's MRNs belong to two roster patients (`rank`), or it names two
  people who cannot be one (`several_patients`: names, birth dates or suffixes that differ);
- `suffix_not_in_roster`: the document says Jr/Sr/II... and the roster patient has no suffix (it
  may be the father or the son);
A name written in capitals without a comma ("CARTER JAMES") is tried both ways round, the better
reading x0.95 (ORDER_UNSURE).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from services.cloud_comms.triage.extract import PatientFields, swapped

BASE = {
    (True, True, "full"): 0.99,
    (True, True, "family"): 0.96,
    (True, True, ""): 0.93,
    (True, False, "full"): 0.93,
    (True, False, "family"): 0.85,
    (True, False, ""): 0.75,
    (False, True, "full"): 0.90,
    (False, True, "family"): 0.70,
    (False, True, ""): 0.10,
    (False, False, "full"): 0.45,
    (False, False, "family"): 0.25,
    (False, False, ""): 0.0,
}
BIRTH_CONFLICT, MRN_CONFLICT, FAMILY_CONFLICT, GIVEN_CONFLICT, SUFFIX_CONFLICT = 0.5, 0.5, 0.6, 0.8, 0.5
AMBIGUOUS_WITHIN, AMBIGUOUS_CAP = 0.05, 0.6
ORDER_UNSURE = 0.95
# Below the lowest auto-file threshold (settings.MIN_AUTO_FILE_CONFIDENCE, 0.9): a person decides.
REVIEW_CAP = 0.85
MULTIPLE_PATIENTS, SUFFIX_NOT_IN_ROSTER = "multiple_patients", "suffix_not_in_roster"
# Below this a patient is not suggested at all (the document is `no_match`).
MIN_SUGGESTED = 0.2


def normalize_mrn(value: str) -> str:
    """An MRN as compared: letters and digits only, upper case ("rb-100 234" = "RB100234")."""
    return re.sub(r"[^A-Z0-9]", "", value.upper())


def _ascii(value: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", value) if not unicodedata.combining(c)).lower()


def name_tokens(value: str) -> list[str]:
    """The words of a name as compared: accents dropped, lower case, letters only; hyphenated and
    apostrophised parts apart ("Demo-Client" -> demo, client; "O'Connor" -> o, connor)."""
    return [t for t in re.split(r"[^a-z]+", _ascii(value)) if t]


def family_forms(value: str) -> list[str]:
    """A family name's forms that count as equal: all its words together and each word alone
    ("Lopez Garcia" matches "Lopez-Garcia", "Lopez" and "Garcia")."""
    tokens = name_tokens(value)
    joined = "".join(tokens)
    return list(dict.fromkeys([joined, *(t for t in tokens if len(t) > 1)])) if joined else []


@dataclass(frozen=True)
class Probe:
    """What the document says, as comparable values."""

    mrns: frozenset[str] = frozenset()  # match, and conflict when another patient's
    birth_date: str = ""
    family: frozenset[str] = frozenset()  # family_forms
    given: str = ""  # the first given name
    suffix: str = ""  # generational suffix
    weak_mrns: frozenset[str] = frozenset()  # match, never conflict (unknown assigning authority)
    swapped: Probe | None = None  # the other reading of an order-unsure name


@dataclass(frozen=True)
class Candidate:
    """A roster patient, as comparable values."""

    patient_id: str
    mrn: str
    birth_date: str
    family: frozenset[str]  # family_forms
    given: frozenset[str]  # every given name word
    suffix: str = ""  # generational suffix, "" for none


@dataclass(frozen=True)
class Match:
    patient_id: str
    confidence: float
    matched_on: tuple[str, ...]  # of "name", "birth_date", "mrn"
    flags: tuple[str, ...] = ()  # why it is capped for review


def capped(matches: list[Match], cap: float, flag: str) -> list[Match]:
    """`matches` with every confidence at most `cap`, flagged."""
    return [Match(m.patient_id, min(m.confidence, cap), m.matched_on, (*m.flags, flag)) for m in matches]


def _score(probe: Probe, candidate: Candidate, mrn_elsewhere: bool) -> tuple[float, tuple[str, ...]]:
    mrn = candidate.mrn in probe.mrns or candidate.mrn in probe.weak_mrns
    birth = bool(probe.birth_date) and probe.birth_date == candidate.birth_date
    family = bool(probe.family & candidate.family)
    given = bool(probe.given) and probe.given in candidate.given
    name = "full" if family and given else "family" if family else ""
    confidence = BASE[(mrn, birth, name)]
    if probe.birth_date and not birth:
        confidence *= BIRTH_CONFLICT
    if mrn_elsewhere and not mrn:
        confidence *= MRN_CONFLICT
    if probe.family and not family:
        confidence *= FAMILY_CONFLICT
    if probe.given and not given:
        confidence *= GIVEN_CONFLICT
    named = name == "full" or name == "family" and not probe.given
    return confidence, tuple(f for f, hit in (("name", named), ("birth_date", birth), ("mrn", mrn)) if hit)


def score(probe: Probe, candidate: Candidate, mrn_elsewhere: bool = False) -> Match:
    """`mrn_elsewhere`: one of the document's (conflicting) MRNs is another roster patient's."""
    confidence, matched = _score(probe, candidate, mrn_elsewhere)
    if probe.swapped is not None:
        confidence, matched = max((confidence, matched), _score(probe.swapped, candidate, mrn_elsewhere))
        confidence *= ORDER_UNSURE
    flags: tuple[str, ...] = ()
    if probe.suffix and candidate.suffix and probe.suffix != candidate.suffix:
        confidence *= SUFFIX_CONFLICT
    elif probe.suffix and not candidate.suffix:
        confidence, flags = min(confidence, REVIEW_CAP), (SUFFIX_NOT_IN_ROSTER,)
    return Match(candidate.patient_id, round(confidence, 3), matched, flags)


def rank(probe: Probe, candidates: Iterable[Candidate], limit: int = 3) -> list[Match]:
    """The `limit` likeliest patients (confidence > 0), best first; capped when ambiguous, and for
    review when the document's MRNs belong to two roster patients."""
    candidates = list({c.patient_id: c for c in candidates}.values())
    owners = {c.patient_id for c in candidates if c.mrn in probe.mrns}
    matches = [score(probe, c, mrn_elsewhere=bool(owners - {c.patient_id})) for c in candidates]
    matches = sorted((m for m in matches if m.confidence > 0), key=lambda m: (-m.confidence, m.patient_id))
    if len(matches) > 1 and matches[0].confidence - matches[1].confidence <= AMBIGUOUS_WITHIN:
        matches = [Match(m.patient_id, min(m.confidence, AMBIGUOUS_CAP), m.matched_on, m.flags) for m in matches]
    if len(owners) > 1:
        matches = capped(matches, REVIEW_CAP, MULTIPLE_PATIENTS)
    return matches[:limit]


# --- several patients in one document -----------------------------------------------------------------
def _readings(fields: PatientFields) -> list[tuple[list[str], str]]:
    """(family forms, first given word) of a written name, both ways round when its order is unsure."""
    readings = [fields, swapped(fields)] if fields.order_unsure else [fields]
    return [(family_forms(r.family), (name_tokens(r.given[0]) or [""])[0] if r.given else "") for r in readings]


def _given_agree(a: str, b: str) -> bool:
    return not a or not b or a == b or (len(a) == 1 and b.startswith(a)) or (len(b) == 1 and a.startswith(b))


def _names_agree(a: PatientFields, b: PatientFields) -> bool:
    if not (a.family and b.family):
        return True
    return any(set(fa) & set(fb) and _given_agree(ga, gb) for fa, ga in _readings(a) for fb, gb in _readings(b))


def same_person(a: PatientFields, b: PatientFields) -> bool:
    """Nothing the two mentions both give differs: name (either reading), birth date, suffix."""
    dates = not (a.birth_date and b.birth_date) or a.birth_date == b.birth_date
    suffixes = not (a.suffix and b.suffix) or a.suffix == b.suffix
    return dates and suffixes and _names_agree(a, b)


def several_patients(mentions: Iterable[PatientFields]) -> bool:
    """Two of a document's patient mentions (any page, any part) cannot be one person."""
    mentions = list(mentions)
    return any(not same_person(a, b) for n, a in enumerate(mentions) for b in mentions[n + 1 :])
