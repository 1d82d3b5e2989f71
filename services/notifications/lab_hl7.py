"""ORU^R01 (observation results) -> LabReports: one per order (OBR and the OBX lines after it)."""

from __future__ import annotations

import contextlib

from services.notifications import hl7v2
from services.notifications.hl7v2 import component, field
from services.notifications.lab_domain import HL7_STATUSES, LabReport, Observation, hl7_time_ms, version_of

MAX_ORDERS = 50
MAX_OBSERVATIONS = 500


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
            text = part
            with contextlib.suppress(Exception):  # an escape python-hl7 cannot undo: keep the text as sent
                text = message.unescape(part)
            if text.strip():
                parts.append(text.strip())
    return " ".join(parts)


def _flags(segment) -> tuple[str, ...]:
    """OBX-8, every repetition."""
    if len(segment) <= 8 or not field(segment, 8):
        return ()
    flags = []
    value = segment[8]
    if isinstance(value, str):
        return (value.strip(),)
    for rep in range(1, len(value) + 1):
        flag = component(segment, 8, 1, rep).strip()
        if flag:
            flags.append(flag)
    return tuple(flags)


def reports_from_oru(message: hl7v2.InboundMessage) -> list[LabReport]:
    """Every order of the message; AE with the reason when a required part is missing."""
    msg = message.message
    pids = message.segments("PID")
    if not pids:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "PID segment is required", "PID")
    patient_ref = component(pids[0], 3, 1)
    if not patient_ref:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "PID-3 patient identifier is required", "PID^1^3")
    origin = f"hl7:{message.header.sending_facility}"
    message_time = hl7_time_ms(message.header.timestamp)
    reports: list[LabReport] = []
    current: dict | None = None
    observations: list[Observation] = []
    total = 0

    def close():
        if current is not None:
            reports.append(_report(current, observations, origin, patient_ref, message_time))

    for segment in msg:
        name = str(segment[0])
        if name == "OBR":
            close()
            current = {"segment": segment, "index": len(reports) + 1}
            observations = []
            if len(reports) >= MAX_ORDERS:
                raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, f"at most {MAX_ORDERS} orders per message", "OBR")
        elif name == "OBX":
            if current is None:
                raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, "OBX before any OBR", "OBX")
            total += 1
            if total > MAX_OBSERVATIONS:
                raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, f"at most {MAX_OBSERVATIONS} OBX lines", "OBX")
            observations.append(
                Observation(
                    code=component(segment, 3, 1),
                    name=component(segment, 3, 2) or component(segment, 3, 1),
                    value=_value(segment, 5, msg),
                    units=component(segment, 6, 1),
                    reference_range=_value(segment, 7, msg),
                    flags=_flags(segment),
                    status=component(segment, 11, 1),
                )
            )
    close()
    if not reports:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "OBR segment is required", "OBR")
    return reports


def _report(current: dict, observations: list[Observation], origin: str, patient_ref: str, message_time) -> LabReport:
    obr = current["segment"]
    where = f"OBR^{current['index']}"
    order_number = component(obr, 3, 1) or component(obr, 2, 1)
    if not order_number:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "OBR-3 filler or OBR-2 placer order number is required", where)
    test_code, test_name = component(obr, 4, 1), component(obr, 4, 2)
    if not (test_code or test_name):
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "OBR-4 universal service identifier is required", where)
    raw_status = component(obr, 25, 1).upper()
    if raw_status:
        status = HL7_STATUSES.get(raw_status)
        if status is None:
            raise hl7v2.error(hl7v2.TABLE_VALUE_NOT_FOUND, "OBR-25 result status is not a known value", where)
    else:
        finals = [o.status.upper() in ("F", "C") for o in observations]
        status = "final" if finals and all(finals) else "preliminary"
    reported = hl7_time_ms(component(obr, 22, 1))
    return LabReport(
        origin=origin,
        order_number=order_number,
        patient_ref=patient_ref,
        test_code=test_code,
        test_name=test_name or test_code,
        status=status,
        observed_at=component(obr, 7, 1),
        observations=tuple(observations),
        version=version_of(reported, message_time),
    )
