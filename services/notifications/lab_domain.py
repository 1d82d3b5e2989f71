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

import json
from dataclasses import asdict, dataclass, field

from services.kit.mongo import now_ms

INFO, ABNORMAL, URGENT = "info", "abnormal", "urgent"
_RANK = {INFO: 0, ABNORMAL: 1, URGENT: 2}

URGENT_FLAGS = frozenset({"HH", "LL", "AA"})
ABNORMAL_FLAGS = frozenset({"H", "L", "A", "<", ">", "HU", "LU", "POS"})
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

    @property
    def severity(self) -> str:
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
    # Increases with every newer version of the same order's result (epoch ms of its time).
    version: int = 0

    @property
    def severity(self) -> str:
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
        data = json.loads(text)
        observations = tuple(Observation(**{**o, "flags": tuple(o["flags"])}) for o in data.pop("observations"))
        return cls(**data, observations=observations)


def board_title(report: LabReport) -> str:
    """Minimum necessary: the test and the result status, no value."""
    return f"Lab result: {report.test_name or report.test_code} ({report.status})"[:200]


def board_summary(report: LabReport) -> str:
    """Minimum necessary: the patient reference and the abnormal flags, counted; no value."""
    abnormal, urgent = report.counts
    if urgent:
        flags = f"{urgent} critical" + (f", {abnormal} abnormal" if abnormal else "")
    elif abnormal:
        flags = f"{abnormal} abnormal"
    else:
        flags = "no abnormal flags"
    return f"Patient {report.patient_ref}: {flags}"[:1000]


def hl7_time_ms(value: str) -> int | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]) as epoch ms; None when unreadable."""
    import datetime as dt
    import re

    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?", value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        tz = dt.UTC
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


def version_of(*times_ms: int | None) -> int:
    """The first known time, else now: a newer message about the same order has a higher version."""
    return next((t for t in times_ms if t), now_ms())
