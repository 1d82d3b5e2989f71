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
conflict), family name x0.6, given name x0.8. When the runner-up is within 0.05 of the best, the
confidences are capped at 0.6: two equally likely patients are never filed without a person.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

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
BIRTH_CONFLICT, MRN_CONFLICT, FAMILY_CONFLICT, GIVEN_CONFLICT = 0.5, 0.5, 0.6, 0.8
AMBIGUOUS_WITHIN, AMBIGUOUS_CAP = 0.05, 0.6
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

    mrns: frozenset[str] = frozenset()
    birth_date: str = ""
    family: frozenset[str] = frozenset()  # family_forms
    given: str = ""  # the first given name


@dataclass(frozen=True)
class Candidate:
    """A roster patient, as comparable values."""

    patient_id: str
    mrn: str
    birth_date: str
    family: frozenset[str]  # family_forms
    given: frozenset[str]  # every given name word


@dataclass(frozen=True)
class Match:
    patient_id: str
    confidence: float
    matched_on: tuple[str, ...]  # of "name", "birth_date", "mrn"


def score(probe: Probe, candidate: Candidate, mrn_elsewhere: bool = False) -> Match:
    """`mrn_elsewhere`: the document's MRN is another roster patient's."""
    mrn = candidate.mrn in probe.mrns
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
    matched = tuple(f for f, hit in (("name", named), ("birth_date", birth), ("mrn", mrn)) if hit)
    return Match(candidate.patient_id, round(confidence, 3), matched)


def rank(probe: Probe, candidates: Iterable[Candidate], limit: int = 3) -> list[Match]:
    """The `limit` likeliest patients (confidence > 0), best first, the best capped when ambiguous."""
    candidates = list({c.patient_id: c for c in candidates}.values())
    owners = {c.patient_id for c in candidates if c.mrn in probe.mrns}
    matches = [score(probe, c, mrn_elsewhere=bool(owners - {c.patient_id})) for c in candidates]
    matches = sorted((m for m in matches if m.confidence > 0), key=lambda m: (-m.confidence, m.patient_id))
    if len(matches) > 1 and matches[0].confidence - matches[1].confidence <= AMBIGUOUS_WITHIN:
        matches = [Match(m.patient_id, min(m.confidence, AMBIGUOUS_CAP), m.matched_on) for m in matches]
    return matches[:limit]
