"""HL7 v2 SIU (scheduling) messages as AppointmentChanges: pure, on python-hl7's parse tree.

Triggers: S12 new (booked), S13 rescheduled, S14 modified, S15 cancelled, S17 deleted, S26
no-show. Fields read (2.5.1):
- the appointment: SCH-2 filler appointment id (else SCH-1 placer id), within the sending
  facility (MSH-4); SCH-8 appointment type (shown as the kind of visit);
- when: SCH-11 components 4 (start) and 5 (end), else the first AIS-4 (start) with AIS-7/AIS-8
  (duration), else the first AIP-6 with AIP-9/AIP-10; times without an offset are the agency's
  local time;
- who: AIP-3 (personnel, XCN) and AIG-3 when AIG-4 is STAFF (a person) or TEAM (a directory team
  id); other AIG resources (rooms, equipment) are not people. A person is named by NPI when a
  repetition says so (XCN-13 identifier type NPI, or XCN-9 assigning authority NPI / OID
  2.16.840.1.113883.4.6; for AIG-3 also CWE-3 coding system NPI): XCN-1 is then the NPI. Otherwise
  XCN-1 of the first repetition is a directory staff id. A resource segment whose action code
  (AIP-2 / AIG-2) is D was taken off the appointment and is not linked, except on S15, S17 and S26:
  senders mark every resource D when the whole appointment goes, and those are the staff to tell.
  A message without AIP or AIG segments keeps the staff we knew (a bare cancellation);
- where: AIL-3 (point of care and room); the patient: PID-3, the identifier of the registered
  type (MR by default; see hl7_people.patient_identifier);
- who made the change: EVN-5 operator, else SCH-20 entered-by person (XCN: a directory id, or an
  NPI as above).
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass, field

from services.kit.npi import is_valid_npi
from services.kit.validation import ID_PATTERN
from services.notifications import hl7v2, schedule
from services.notifications.hl7_people import patient_identifier, repetitions, says_npi
from services.notifications.hl7v2 import InboundMessage, component

TRIGGERS = {
    "S12": schedule.BOOKED,
    "S13": schedule.RESCHEDULED,
    "S14": schedule.MODIFIED,
    "S15": schedule.CANCELLED,
    "S17": schedule.DELETED,
    "S26": schedule.NO_SHOW,
}
DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-]\d{4})?$")
UNIT_MS = {"s": 1000, "sec": 1000, "min": 60_000, "m": 60_000, "h": 3_600_000, "hr": 3_600_000, "hour": 3_600_000}
MAX_TEXT = 120
# On these the whole appointment is off: a resource marked D is one to tell, not one taken off.
WHOLE_APPOINTMENT_ENDS = (schedule.CANCELLED, schedule.DELETED, schedule.NO_SHOW)


def parse(inbound: InboundMessage, time_zone: str, patient_id_type: str = "MR") -> schedule.AppointmentChange:
    """The SIU message as a change; hl7v2.Hl7Rejection (AE) when what it says cannot be used."""
    header = inbound.header
    event = TRIGGERS.get(header.trigger)
    if event is None:
        raise hl7v2.reject(hl7v2.UNSUPPORTED_EVENT_CODE, f"SIU^{header.trigger} is not accepted", "MSH^1^9")
    sch = _one(inbound, "SCH")
    appointment_id = component(sch, 2) or component(sch, 1)
    if not appointment_id:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, "SCH-2 filler appointment id is missing", "SCH^1^2")
    if len(appointment_id) > 64:
        raise hl7v2.error(hl7v2.DATA_TYPE_ERROR, "SCH-2 appointment id is too long", "SCH^1^2")
    zone = _zone(time_zone)
    start, end = _times(inbound, sch, zone)
    linked = _resources(inbound, event)
    actor_staff_id, actor_npi = _actor(inbound, sch)
    return schedule.AppointmentChange(
        system=f"hl7:{header.sending_facility}",
        appointment_id=appointment_id,
        event=event,
        start_ms=start,
        end_ms=end,
        staff_ids=linked.staff_ids,
        team_ids=linked.team_ids,
        npis=linked.npis,
        resource_fields=linked.fields,
        actor_staff_id=actor_staff_id,
        actor_npi=actor_npi,
        patient_ref=_text(_patient(inbound, patient_id_type)),
        visit_type=_text(component(sch, 8, 2) or component(sch, 8, 1)),
        location=_text(" ".join(p for p in (_first_component(inbound, "AIL", 3, 1),
                                            _first_component(inbound, "AIL", 3, 2)) if p)),
        message_key=inbound.message_key,
    )  # fmt: skip


def _patient(inbound: InboundMessage, id_type: str) -> str:
    """PID-3's identifier of the registered type, chosen as for lab results; "" when none is."""
    pids = inbound.segments("PID")
    if not pids:
        return ""
    try:
        return patient_identifier(pids[0], "PID^1", id_type)
    except hl7v2.Hl7Rejection:
        return ""  # a schedule notice is still owed; the record number is only shown


def _one(inbound: InboundMessage, name: str):
    segments = inbound.segments(name)
    if not segments:
        raise hl7v2.error(hl7v2.SEGMENT_SEQUENCE_ERROR, f"the {name} segment is missing", name)
    return segments[0]


def _first_component(inbound: InboundMessage, name: str, index: int, comp: int = 1) -> str:
    segments = inbound.segments(name)
    return component(segments[0], index, comp) if segments else ""


def _text(value: str) -> str:
    return value.strip()[:MAX_TEXT]


def _zone(time_zone: str) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def parse_dtm(value: str, zone: dt.tzinfo, location: str) -> int | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as epoch ms; "" is None."""
    if not value:
        return None
    match = DTM.fullmatch(value)
    if match is None:
        raise hl7v2.error(hl7v2.DATA_TYPE_ERROR, "a date/time is not an HL7 DTM", location)
    year, month, day, hour, minute, second, offset = match.groups()
    tz = zone
    if offset:
        sign = 1 if offset[0] == "+" else -1
        tz = dt.timezone(sign * dt.timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    try:
        moment = dt.datetime(
            int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=tz
        )
    except ValueError as exc:
        raise hl7v2.error(hl7v2.DATA_TYPE_ERROR, "a date/time is out of range", location) from exc
    if not 2000 <= moment.year <= 2099:
        raise hl7v2.error(hl7v2.DATA_TYPE_ERROR, "a date/time is out of range", location)
    return int(moment.timestamp() * 1000)


def _duration_ms(amount: str, unit: str) -> int | None:
    if not amount:
        return None
    if not amount.isascii() or not amount.isdigit():
        return None
    return int(amount) * UNIT_MS.get(unit.lower(), 60_000)


def _times(inbound: InboundMessage, sch, zone: dt.tzinfo) -> tuple[int | None, int | None]:
    start = parse_dtm(component(sch, 11, 4), zone, "SCH^1^11^1^4")
    end = parse_dtm(component(sch, 11, 5), zone, "SCH^1^11^1^5")
    duration = None
    if start is None:
        for name, at, length, unit in (("AIS", 4, 7, 8), ("AIP", 6, 9, 10)):
            segments = inbound.segments(name)
            if segments and component(segments[0], at):
                start = parse_dtm(component(segments[0], at), zone, f"{name}^1^{at}")
                duration = _duration_ms(component(segments[0], length), component(segments[0], unit))
                break
    if end is None and start is not None:
        duration = duration or _duration_ms(component(sch, 9), component(sch, 10, 1))
        end = start + duration if duration else None
    if start is not None and end is not None and end < start:
        raise hl7v2.error(hl7v2.DATA_TYPE_ERROR, "the appointment ends before it starts", "SCH^1^11")
    return start, end


@dataclass(frozen=True)
class _Linked:
    """The resources a message names: None for staff and teams when it names none at all."""

    staff_ids: tuple[str, ...] | None = None
    team_ids: tuple[str, ...] | None = None
    npis: tuple[str, ...] = ()
    fields: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def _resources(inbound: InboundMessage, event: str) -> _Linked:
    """The staff ids, team ids and NPIs the message links, each with the field that named it."""
    aip, aig = inbound.segments("AIP"), inbound.segments("AIG")
    if not aip and not aig:
        return _Linked()
    named: dict[str, str] = {}  # "staff:<id>" / "team:<id>" / "npi:<n>" -> the first field naming it
    for i, segment in enumerate(aip, start=1):
        if _taken_off(segment, event):
            continue
        ref = _person(segment, 3, f"AIP^{i}^3", coded=False)
        named.setdefault(ref, f"AIP^{i}^3")
    for i, segment in enumerate(aig, start=1):
        kind = component(segment, 4).upper()
        if kind not in ("STAFF", "TEAM") or _taken_off(segment, event):
            continue
        location = f"AIG^{i}^3"
        ref = (
            _person(segment, 3, location, coded=True)
            if kind == "STAFF"
            else "team:" + _directory_id(component(segment, 3), location)
        )
        named.setdefault(ref, location)
    if len(named) > schedule.MAX_LINKED:
        raise hl7v2.error(hl7v2.DATA_TYPE_ERROR, "the appointment links too many resources", "AIP")
    of = {
        kind: tuple(ref.partition(":")[2] for ref in named if ref.startswith(kind + ":"))
        for kind in ("staff", "team", "npi")
    }
    return _Linked(of["staff"], of["team"], of["npi"], tuple(named.items()))


def _taken_off(segment, event: str) -> bool:
    """Action code D: that resource left the appointment, unless the whole appointment is going."""
    return component(segment, 2).upper() == "D" and event not in WHOLE_APPOINTMENT_ENDS


def _person(segment, index: int, location: str, *, coded: bool) -> str:
    """The person a field names: "npi:<NPI>" when a repetition of it is an NPI, else
    "staff:<directory id>" (the first repetition's first component). `coded`: the field is a CWE
    (AIG-3), whose third component may name the coding system NPI."""
    for rep in range(1, repetitions(segment, index) + 1):
        if says_npi(segment, index, rep, coded=coded):
            value = component(segment, index, 1, rep).strip()
            if not is_valid_npi(value):
                raise hl7v2.error(
                    hl7v2.DATA_TYPE_ERROR, f"{_name(location)} is not a valid NPI (10 digits, check digit)", location
                )
            return "npi:" + value
    return "staff:" + _directory_id(component(segment, index), location)


def _directory_id(value: str, location: str) -> str:
    if not value:
        raise hl7v2.error(hl7v2.REQUIRED_FIELD_MISSING, f"{_name(location)} resource id is missing", location)
    if not ID_PATTERN.fullmatch(value):
        raise hl7v2.error(hl7v2.TABLE_VALUE_NOT_FOUND, f"{_name(location)} is not a directory id", location)
    return value


def _name(location: str) -> str:
    segment, _, rest = location.partition("^")
    return f"{segment}-{rest.split('^')[-1]}"


def _actor(inbound: InboundMessage, sch) -> tuple[str, str]:
    """(directory id, NPI) of who made the change: EVN-5 operator, else SCH-20 entered-by person;
    one of them (or neither, when unreadable) is filled."""
    evn = inbound.segments("EVN")
    for segment, index in ((evn[0] if evn else None, 5), (sch, 20)):
        if segment is None or not component(segment, index):
            continue
        for rep in range(1, repetitions(segment, index) + 1):
            if says_npi(segment, index, rep):
                value = component(segment, index, 1, rep).strip()
                return ("", value) if is_valid_npi(value) else ("", "")
        actor = component(segment, index)
        return (actor, "") if ID_PATTERN.fullmatch(actor) else ("", "")
    return "", ""
