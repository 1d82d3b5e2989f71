"""Lab results, whatever way they came (HL7 v2 ORU^R01 or FHIR R4 DiagnosticReport): pure rules.

Severity from abnormal flags (HL7 v2.5.1 table 0078, OBX-8; FHIR v3-ObservationInterpretation,
whose codes are the same letters):
- urgent (critical, panic values): HH, LL, AA;
- abnormal: H, L, A, and < / > (off the instrument's scale: outside normal, yet not a panic flag
  by themselves), and any flag we do not know (better shown than missed);
- informational: N, empty, and the flags that do not say the value is abnormal: U, D, B, W
  (change since the last result), S, R, I, MS, VS (susceptibility), NEG, IND, DET, ND.
A result's severity is the worst of its observations' flags.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field

from services.kit.mongo import now_ms

INFO, ABNORMAL, URGENT = "info", "abnormal", "urgent"
_RANK = {INFO: 0, ABNORMAL: 1, URGENT: 2}

URGENT_FLAGS = frozenset({"HH", "LL", "AA"})
# Any other flag (H, L, A, <, >, HU, LU, POS, or one not in table 0078) is abnormal.
INFO_FLAGS = frozenset({"", "N", "U", "D", "B", "W", "S", "R", "I", "MS", "VS", "NEG", "IND", "DET", "ND", "NR"})

# OBR-25 result status (HL7 table 0123) -> the status a board shows.
HL7_STATUSES = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "A": "partial",
    "S": "partial",
    "R": "unverified",
    "I": "pending",
    "O": "pending",
    "X": "cancelled",
}
# FHIR DiagnosticReport.status values we take.
FHIR_STATUSES = {
    "registered": "pending",
    "partial": "partial",
    "preliminary": "preliminary",
    "final": "final",
    "amended": "amended",
    "corrected": "corrected",
    "appended": "amended",
    "cancelled": "cancelled",
    "entered-in-error": "retracted",
}


def flag_severity(flag: str) -> str:
    flag = flag.strip().upper()
    if flag in URGENT_FLAGS:
        return URGENT
    if flag in INFO_FLAGS:
        return INFO
    return ABNORMAL


def worst(severities) -> str:
    return max(severities, key=_RANK.__getitem__, default=INFO)


@dataclass(frozen=True)
class Observation:
    code: str
    name: str
    value: str
    units: str
    reference_range: str
    flags: tuple[str, ...]
    status: str
    # Comments that belong to the value (HL7 NTE after the OBX, FHIR Observation.note).
    comments: tuple[str, ...] = ()
    # Why the value is withdrawn ("" = valid): HL7 OBX-11 W or D, FHIR status entered-in-error.
    # A withdrawn value is never shown nor counted: only the reason is.
    retracted: str = ""
    # Why there is no value (FHIR dataAbsentReason), shown in its place.
    absent_reason: str = ""

    @property
    def severity(self) -> str:
        if self.retracted:
            return INFO
        return worst(flag_severity(f) for f in self.flags) if self.flags else INFO


@dataclass(frozen=True)
class LabReport:
    """One order's result as received. PHI throughout: never logged, sealed at rest."""

    origin: str  # "hl7:<sending facility>" or "fhir:<consumer>"
    order_number: str = field(repr=False)
    patient_ref: str = field(repr=False)
    test_code: str = field(repr=False)
    test_name: str = field(repr=False)
    status: str
    observed_at: str
    observations: tuple[Observation, ...] = field(repr=False)
    # Increases with every newer version of the same order's result: see `version_of`.
    version: int = 0
    # Comments on the whole order (HL7 NTE after the OBR, FHIR DiagnosticReport.conclusion).
    comments: tuple[str, ...] = field(default=(), repr=False)
    # Why the whole result is withdrawn ("" = valid): FHIR entered-in-error, or every OBX W/D.
    retracted: str = ""
    # Who ordered it, as "npi:<10 digits>" or "staff:<directory id>" (OBR-16, ORC-12; FHIR basedOn
    # requester is not read): told of the result when the agency option asks for it.
    ordering_providers: tuple[str, ...] = field(default=(), repr=False)
    # The patient's name as the sender wrote it (PID-5 "family, given"; FHIR subject.display): the full
    # view, and the delivery's sealed `patient_name` (the reading pane and search); never in a list row.
    patient_name: str = field(default="", repr=False)

    @property
    def severity(self) -> str:
        if self.retracted:
            return INFO
        return worst(o.severity for o in self.observations)

    @property
    def counts(self) -> tuple[int, int]:
        """(abnormal, urgent) observation counts."""
        severities = [o.severity for o in self.observations]
        return severities.count(ABNORMAL), severities.count(URGENT)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LabReport:
        """A stored report; those stored before comments and retractions existed read as without."""
        data = json.loads(text)
        observations = tuple(
            Observation(**{**o, "flags": tuple(o["flags"]), "comments": tuple(o.get("comments") or ())})
            for o in data.pop("observations")
        )
        data["comments"] = tuple(data.get("comments") or ())
        data["ordering_providers"] = tuple(data.get("ordering_providers") or ())
        return cls(**data, observations=observations)

    @property
    def retracted_count(self) -> int:
        return sum(1 for o in self.observations if o.retracted)


def board_title(report: LabReport) -> str:
    """Minimum necessary: the test and the result status, no value."""
    return f"Lab result: {report.test_name or report.test_code} ({report.status})"[:200]


def board_summary(report: LabReport) -> str:
    """Minimum necessary: the patient reference and the abnormal flags, counted; no value."""
    if report.retracted:
        return f"Patient {report.patient_ref}: result withdrawn ({report.retracted})"[:1000]
    abnormal, urgent = report.counts
    if urgent:
        flags = f"{urgent} critical" + (f", {abnormal} abnormal" if abnormal else "")
    elif abnormal:
        flags = f"{abnormal} abnormal"
    else:
        flags = "no abnormal flags"
    if report.retracted_count:
        flags += f"; {report.retracted_count} withdrawn"
    return f"Patient {report.patient_ref}: {flags}"[:1000]


def hl7_time_ms(value: str, zone: dt.tzinfo = dt.UTC) -> int | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]) as epoch ms; None when unreadable.
    Without an offset the time is the sender's local time: `zone` (the facility's or agency's)."""
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?", value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        tz = zone
        if offset:
            sign = 1 if offset[0] == "+" else -1
            tz = dt.timezone(sign * dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
        moment = dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=tz,
        )
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)


# How far a result has come (HL7 table 0123 / FHIR DiagnosticReport.status): a version of a result
# never replaces one further along, whatever the times say. A correction or a withdrawal replaces a
# final; among equals the later time wins.
STATUS_RANK = {
    "pending": 0,
    "preliminary": 1,
    "partial": 1,
    "unverified": 1,
    "final": 2,
    "cancelled": 2,
    "corrected": 3,
    "amended": 3,
    "retracted": 3,
}
_RANK_SPAN = 10**13  # above any epoch ms of this millennium


def version_of(status: str, *times_ms: int | None) -> int:
    """The version of one message about an order: its status's rank, then the first known time (else
    now). A higher version replaces a lower one on the boards and in the full view."""
    moment = next((t for t in times_ms if t), now_ms())
    return STATUS_RANK.get(status, 1) * _RANK_SPAN + max(0, min(moment, _RANK_SPAN - 1))
