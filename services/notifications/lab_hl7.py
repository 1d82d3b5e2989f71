"""ORU^R01 (observation results) -> LabReports: one per order, each under its own patient.

An ORU^R01 (2.5.1) is MSH, then one or more PATIENT_RESULT groups: PID (with its NTE, PV1...), then
one or more ORDER_OBSERVATION groups: [ORC] OBR [NTE...] {OBX [NTE...]} [SPM {OBX}]. Every order
is filed under the PID that precedes it, so a message about several patients never files a
second patient's result under the first.

- The patient: the PID-3 repetition whose identifier type (CX-5) is the facility's registered type
  (MR by default) and, when the registration names one, whose assigning authority (CX-4) matches;
  an identifier without a type is taken only when it is PID-3's only one. Never by position.
- Comments: NTE after the OBR belong to the order, NTE after an OBX to that value.
- Withdrawn values: OBX-11 W (posted in error) or D (deleted) withdraw the value; it is kept only as
  the reason. When every value of an order is withdrawn, the order's result is withdrawn.
- Times without an offset are the sender's local time: `zone` (the facility's, else the agency's).
"""

from __future__ import annotations

import contextlib
import datetime as dt

from services.kit.npi import is_valid_npi
from services.kit.validation import ID_PATTERN
from services.notifications import hl7v2
from services.notifications.hl7_people import patient_identifier, repetitions, says_npi
from services.notifications.hl7v2 import component, field
from services.notifications.lab_domain import HL7_STATUSES, LabReport, Observation, hl7_time_ms, version_of

MAX_ORDERS = 50
MAX_OBSERVATIONS = 500
MAX_COMMENTS = 50
MAX_TEXT = 2000
# OBX-11 values that withdraw a value already sent (HL7 table 0085).
WITHDRAWN = {"W": "posted in error", "D": "deleted by the laboratory"}
# OBX-2 value types whose components are (code, text, ...): the text is what is shown.
CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF"})


def _unescape(message, text: str) -> str:
    with contextlib.suppress(Exception):  # an escape python-hl7 cannot undo: keep the text as sent
        text = message.unescape(text)
    return text.replace("\r", "\n").strip()


def _value(segment, index: int, message) -> str:
    """A field as display text: repetitions and components joined by spaces, each unescaped after
    splitting (so an escaped separator, e.g. \\S\\, stays in the text)."""
    raw = field(segment, index)
    if not raw:
        return ""
    separators = getattr(message, "separators", "\r|~^&")
    parts = []
    for repetition in raw.split(separators[2]):
        for part in repetition.split(separators[3]):
            text = _unescape(message, part)
            if text:
                parts.append(text)
    return " ".join(parts)[:MAX_TEXT]


def _observation_value(segment, message) -> str:
    """OBX-5 as the sender means it: SN as written ("<0.01", "1:128"), coded values by their text."""
    value_type = component(segment, 2).upper()
    raw = field(segment, 5)
    if not raw:
        return ""
    separators = getattr(message, "separators", "\r|~^&")
    shown = []
    for repetition in raw.split(separators[2]):
        parts = [_unescape(message, p) for p in repetition.split(separators[3])]
        if value_type == "SN":
            shown.append("".join(parts[:4]).strip())
        elif value_type in CODED_TYPES:
            shown.append(parts[1] if len(parts) > 1 and parts[1] else parts[0])
        else:
            shown.append(" ".join(p for p in parts if p))
    return " ".join(s for s in shown if s)[:MAX_TEXT]


def _flags(segment) -> tuple[str, ...]:
    """OBX-8, every repetition."""
    if len(segment) <= 8 or not field(segment, 8):
        return ()
    value = segment[8]
    if isinstance(value, str):
        return (value.strip(),)
    flags = []
    for rep in range(1, len(value) + 1):
        flag = component(segment, 8, 1, rep).strip()
        if flag:
            flags.append(flag)
    return tuple(flags)


def patient_name(pid, message) -> str:
    """PID-5 (first repetition) as "FAMILY, GIVEN MIDDLE"."""
    family = _unescape(message, component(pid, 5, 1))
    given = " ".join(_unescape(message, component(pid, 5, c)) for c in (2, 3)).strip()
    return ", ".join(p for p in (family, given) if p)[:200]


def providers(segment, index: int) -> list[str]:
    """XCN repetitions of one field as "npi:<id>" (see hl7_people.says_npi) or "staff:<directory
    id>"; others are not ours to resolve."""
    found = []
    for rep in range(1, repetitions(segment, index) + 1):
        ident = component(segment, index, 1, rep).strip()
        if not ident:
            continue
        if says_npi(segment, index, rep) and is_valid_npi(ident):
            found.append(f"npi:{ident}")
        elif ID_PATTERN.fullmatch(ident) and ident.startswith("stf_"):
            found.append(f"staff:{ident}")
    return found


class _Order:
    """One ORDER_OBSERVATION group while it is read."""

    def __init__(self, obr, orc, patient: tuple[str, str], index: int):
        self.obr, self.orc, self.patient, self.index = obr, orc, patient, index
        self.comments: list[str] = []
        self.observations: list[dict] = []


def reports_from_oru(
    message: hl7v2.InboundMessage,
    *,
    patient_id_type: str = "MR",
    patient_id_authority: str = "",
    zone: dt.tzinfo = dt.UTC,
) -> list[LabReport]:
    """Every order of the message, each under its own patient; AE with the reason when a required
    part is missing."""
    msg = message.message
    origin = f"hl7:{message.header.sending_facility}"
    message_time = hl7_time_ms(message.header.timestamp, zone)
    reports: list[LabReport] = []
    patient: tuple[str, str] | None = None
    patients = 0
    order: _Order | None = None
    pending_orc = None
    total = 0

    def close() -> None:
        if order is not None:
            reports.append(_report(order, msg, origin, message_time, zone))

    for segment in msg:
        name = str(segment[0])
        if name == "PID":
            close()
            order, pending_orc = None, None
            patients += 1
            where = f"PID^{patients}"
            patient = (
                patient_identifier(segment, where, patient_id_type, patient_id_authority),
                patient_name(segment, msg),
            )
        elif name == "ORC":
            close()
            order, pending_orc = None, segment
        elif name == "OBR":
            close()
            if patient is None:
                raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "PID segment is required before the OBR", "PID")
            if len(reports) >= MAX_ORDERS:
                raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, f"at most {MAX_ORDERS} orders per message", "OBR")
            order, pending_orc = _Order(segment, pending_orc, patient, len(reports) + 1), None
        elif name == "OBX":
            if order is None:
                raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, "OBX before any OBR", "OBX")
            total += 1
            if total > MAX_OBSERVATIONS:
                raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, f"at most {MAX_OBSERVATIONS} OBX lines", "OBX")
            order.observations.append(_observation(segment, msg))
        elif name == "NTE" and order is not None:
            text = _value(segment, 3, msg)
            target = order.observations[-1]["comments"] if order.observations else order.comments
            if text and len(target) < MAX_COMMENTS:
                target.append(text)
    close()
    if patient is None:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "PID segment is required", "PID")
    if not reports:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "OBR segment is required", "OBR")
    return reports


def _observation(segment, msg) -> dict:
    status = component(segment, 11, 1).strip().upper()
    withdrawn = WITHDRAWN.get(status, "")
    return {
        "code": component(segment, 3, 1),
        "name": _unescape(msg, component(segment, 3, 2)) or component(segment, 3, 1),
        "value": "" if withdrawn else _observation_value(segment, msg),
        "units": _unescape(msg, component(segment, 6, 1) or component(segment, 6, 2)),
        "reference_range": _value(segment, 7, msg),
        "flags": _flags(segment),
        "status": status,
        "comments": [],
        "retracted": withdrawn,
    }


def _report(order: _Order, msg, origin: str, message_time, zone) -> LabReport:
    obr, orc = order.obr, order.orc
    where = f"OBR^{order.index}"
    order_number = (
        component(obr, 3, 1) or (component(orc, 3, 1) if orc else "") or component(obr, 2, 1)
        or (component(orc, 2, 1) if orc else "")
    )  # fmt: skip
    if not order_number:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "OBR-3 filler or OBR-2 placer order number is required", where)
    test_code, test_name = component(obr, 4, 1), _unescape(msg, component(obr, 4, 2))
    if not (test_code or test_name):
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "OBR-4 universal service identifier is required", where)
    observations = tuple(Observation(**{**o, "comments": tuple(o["comments"])}) for o in order.observations)
    raw_status = component(obr, 25, 1).upper()
    if raw_status:
        status = HL7_STATUSES.get(raw_status)
        if status is None:
            raise hl7v2.error(hl7v2.TABLE_VALUE_NOT_FOUND, "OBR-25 result status is not a known value", where)
    else:
        finals = [o.status in ("F", "C") for o in observations if not o.retracted]
        status = "final" if finals and all(finals) else "preliminary"
    retracted = ""
    if observations and all(o.retracted for o in observations):
        reasons = sorted({o.retracted for o in observations})
        retracted, status = "; ".join(reasons), "retracted"
    reported = hl7_time_ms(component(obr, 22, 1), zone)
    ordering = list(dict.fromkeys([*providers(obr, 16), *(providers(orc, 12) if orc else [])]))
    return LabReport(
        origin=origin,
        order_number=order_number,
        patient_ref=order.patient[0],
        test_code=test_code,
        test_name=test_name or test_code,
        status=status,
        observed_at=component(obr, 7, 1),
        observations=observations,
        version=version_of(status, reported, message_time),
        comments=tuple(order.comments),
        retracted=retracted,
        ordering_providers=tuple(ordering),
        patient_name=order.patient[1],
    )
