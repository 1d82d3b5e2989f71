"""Schedule Notifications: the rules, free of storage and transport.

The practice-management system tells us about appointments two ways: HL7 v2 SIU messages over
MLLP (siu.py) and FHIR Appointment resources through the gateway (fhir_appointment.py). Both
become one `AppointmentChange`; `plan()` compares it with what we knew of the appointment and
decides what the linked staff's boards must show.

Decisions (also in the service README):
- Linked staff are the staff the appointment names (SIU AIP-3, and AIG-3 when AIG-4 says STAFF,
  each by directory id or by NPI; a TEAM there names a directory team, whose members are linked;
  other general resources such as rooms and equipment are not people). A message that names no
  resources at all (a bare S15 cancellation) keeps the staff (and NPIs) we knew.
- Nobody is told while the agency option *Notify Linked Staff on Scheduled Event Creation/Edit*
  is off; the appointment is still recorded, so a later edit knows the time it moved from.
- The staff member who made the change (SIU EVN-5, else SCH-20; FHIR: the changed-by extension)
  is never told of it: no new item, not unread again. One who already holds the appointment's
  item keeps it (inbox updates its text and leaves its read state alone, see `actor_staff_id`).
- One board item per appointment (source_ref = the appointment): an edit updates it (new time,
  unread again); a cancellation, deletion or no-show keeps it on the boards, unread, saying so,
  because a clinic expects to learn that a visit is off; staff no longer linked lose it.
- Minimum necessary: when, what kind of visit, where, and the patient's record number (never a
  name, never the reason for the visit).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import zoneinfo
from dataclasses import dataclass, field, replace

from clinic.inbox.v1 import inbox_pb2

SOURCE = "schedule"

# What a change does to the appointment.
BOOKED = "booked"
RESCHEDULED = "rescheduled"
MODIFIED = "modified"
CANCELLED = "cancelled"
DELETED = "deleted"
NO_SHOW = "no_show"
# A status change that is not a schedule change (arrived, checked in, fulfilled): recorded, nobody told.
ATTENDED = "attended"

TITLES = {
    BOOKED: "New appointment",
    RESCHEDULED: "Appointment rescheduled",
    MODIFIED: "Appointment updated",
    CANCELLED: "Appointment cancelled",
    DELETED: "Appointment removed",
    NO_SHOW: "No-show",
}
STATUSES = {
    BOOKED: "booked",
    RESCHEDULED: "rescheduled",
    MODIFIED: "updated",
    CANCELLED: "cancelled",
    DELETED: "deleted",
    NO_SHOW: "no_show",
}
MAX_LINKED = 100
RECENT_KEYS = 20


@dataclass(frozen=True)
class AppointmentChange:
    """One message or resource about an appointment, as the source system said it.

    `staff_ids` / `team_ids` are None when the message named no resources (keep the ones we
    knew, `npis` included). `npis` are providers named by NPI (directory resolves them to staff).
    Times are epoch ms (None: not given). `patient_ref`, `visit_type` and `location` are shown to
    the linked staff and never logged."""

    system: str
    appointment_id: str
    event: str
    start_ms: int | None
    end_ms: int | None
    staff_ids: tuple[str, ...] | None
    team_ids: tuple[str, ...] | None
    actor_staff_id: str = ""
    patient_ref: str = field(default="", repr=False)
    visit_type: str = field(default="", repr=False)
    location: str = field(default="", repr=False)
    # The message's own identity (sending facility + MSH-10, or a request id): a repeat changes nothing.
    message_key: str = ""
    npis: tuple[str, ...] = ()
    # The change's maker named by NPI (SIU EVN-5 / SCH-20), resolved to actor_staff_id before plan().
    actor_npi: str = ""
    # Where the message named each resource ("staff:<id>", "team:<id>", "npi:<n>" -> e.g. "AIP^2^3"),
    # so a refusal can name the field.
    resource_fields: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Appointment:
    """What we know of one appointment (the `appointments` document, without its outbox)."""

    id: str
    agency_id: str
    system: str
    appointment_id: str
    version: int
    state: str
    start_ms: int | None
    end_ms: int | None
    staff_ids: tuple[str, ...]
    team_ids: tuple[str, ...]
    # Who holds its board item now (empty: nobody, or it was withdrawn).
    notified_ids: tuple[str, ...] = ()
    recent_keys: tuple[str, ...] = ()
    # Digest of what the last change said (see change_digest): the same again is a repeat.
    digest: str = ""
    # Providers linked by NPI (public identifiers, not PHI), resolved again with every change.
    npis: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgencyView:
    """The directory's agency settings a schedule notice needs."""

    notify_linked_staff: bool
    time_zone: str = "UTC"
    patient_singular: str = "Patient"


@dataclass(frozen=True)
class Plan:
    """The appointment as it will be stored and the delivery to stage with it (None: none)."""

    appointment: Appointment
    delivery: inbox_pb2.DeliverItemRequest | None
    repeat: bool = False


def appointment_doc_id(agency_id: str, system: str, appointment_id: str) -> str:
    """One record (and one board item) per appointment of one source system in one agency."""
    return "apt_" + hashlib.sha256(f"{agency_id}|{system}|{appointment_id}".encode()).hexdigest()[:32]


def effective_event(previous: Appointment | None, change: AppointmentChange) -> str:
    """What the change amounts to. An update (SIU S14, a FHIR PUT of an active appointment) of an
    appointment we never saw books it; one that moves the time reschedules it."""
    if change.event != MODIFIED:
        return change.event
    if previous is None:
        return BOOKED
    if change.start_ms is not None and (change.start_ms, change.end_ms) != (previous.start_ms, previous.end_ms):
        return RESCHEDULED
    return MODIFIED


def plan(  # noqa: PLR0913 - the change and everything it is judged against
    agency_id: str,
    previous: Appointment | None,
    change: AppointmentChange,
    linked_staff: list[str],
    agency: AgencyView,
) -> Plan:
    """The next state of the appointment and what to deliver.

    `linked_staff` is the active staff the change links (its staff and its teams' members,
    resolved by the directory; the previous ones when the change named none)."""
    doc_id = appointment_doc_id(agency_id, change.system, change.appointment_id)
    event = effective_event(previous, change)
    digest = change_digest(doc_id, change.event, change)
    if previous is not None and (
        (change.message_key and change.message_key in previous.recent_keys) or digest == previous.digest
    ):
        return Plan(previous, None, repeat=True)
    version = (previous.version if previous else 0) + 1
    keys = (*(previous.recent_keys if previous else ()), change.message_key) if change.message_key else ()
    start = change.start_ms if change.start_ms is not None else (previous.start_ms if previous else None)
    end = change.end_ms if change.end_ms is not None else (previous.end_ms if previous else None)
    staff_ids, team_ids, npis = linked_resources(previous, change)
    state = event if event != ATTENDED else (previous.state if previous else BOOKED)
    stored = Appointment(
        id=doc_id,
        agency_id=agency_id,
        system=change.system,
        appointment_id=change.appointment_id,
        version=version,
        state=state,
        start_ms=start,
        end_ms=end,
        staff_ids=tuple(staff_ids),
        team_ids=tuple(team_ids),
        notified_ids=previous.notified_ids if previous else (),
        recent_keys=tuple(keys[-RECENT_KEYS:]),
        digest=digest,
        npis=tuple(npis),
    )
    if event == ATTENDED or not agency.notify_linked_staff:
        return Plan(stored, None)
    recipients = keepers(linked_staff, change.actor_staff_id, stored.notified_ids)
    if not recipients:
        if not stored.notified_ids:
            return Plan(stored, None)
        withdrawal = inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_SCHEDULE,
            source=SOURCE,
            source_ref=doc_id,
            withdrawn=True,
            source_version=version,
        )
        return Plan(replace(stored, notified_ids=()), withdrawal)
    delivery = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_SCHEDULE,
        recipients=inbox_pb2.Recipients(staff_ids=recipients),
        title=title(event, start, end, previous, agency.time_zone),
        summary=summary(change, agency.patient_singular),
        severity=inbox_pb2.SEVERITY_INFO,
        status=STATUSES[event],
        source=SOURCE,
        source_ref=doc_id,
        source_version=version,
        mark_unread=previous is not None,
        actor_staff_id=change.actor_staff_id,
    )
    return Plan(replace(stored, notified_ids=tuple(recipients)), delivery)


def linked_resources(
    previous: Appointment | None, change: AppointmentChange
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(staff ids, team ids, NPIs) the appointment links after the change: what it names, or what
    we knew when it names no resources at all."""
    known = previous or Appointment("", "", "", "", 0, BOOKED, None, None, (), ())
    team_ids = change.team_ids if change.team_ids is not None else known.team_ids
    if change.staff_ids is None:
        return known.staff_ids, team_ids, known.npis
    return tuple(change.staff_ids), tuple(team_ids), tuple(change.npis)


def keepers(linked_staff: list[str], actor_staff_id: str, holders: tuple[str, ...]) -> list[str]:
    """Who the delivery names: the linked staff, but the change's maker only when they already hold
    the item (they keep it, untold); never a new item for their own change."""
    return [s for s in dict.fromkeys(linked_staff) if s != actor_staff_id or s in holders]


def told(recipients: list[str] | tuple[str, ...], actor_staff_id: str) -> list[str]:
    """The recipients who learn of the change: everyone but its maker."""
    return [s for s in recipients if s != actor_staff_id]


def change_digest(doc_id: str, event: str, change: AppointmentChange) -> str:
    """What a change says, as a digest salted with the appointment: a partner sending the same
    resource again (a retry after a timeout) changes nothing and tells nobody twice."""
    said = [
        doc_id,
        event,
        str(change.start_ms),
        str(change.end_ms),
        ",".join(change.staff_ids) if change.staff_ids is not None else "-",
        ",".join(change.team_ids) if change.team_ids is not None else "-",
        change.actor_staff_id,
        change.patient_ref,
        change.visit_type,
        change.location,
    ]
    if change.npis or change.actor_npi:
        # Only messages naming NPIs say more, so digests stored before NPIs existed still match.
        said += [",".join(change.npis), change.actor_npi]
    return hashlib.sha256("\x1f".join(said).encode()).hexdigest()


def title(event: str, start: int | None, end: int | None, previous: Appointment | None, time_zone: str) -> str:
    """e.g. "Appointment rescheduled: Wed 2 Dec 2026, 11:00–11:50 CST (was Wed 2 Dec 2026, 10:00)"."""
    text = f"{TITLES[event]}: {when(start, end, time_zone)}"
    if event == RESCHEDULED and previous is not None and previous.start_ms and previous.start_ms != start:
        text += f" (was {when(previous.start_ms, None, time_zone)})"
    return text


def summary(change: AppointmentChange, patient_singular: str) -> str:
    parts = [change.visit_type, change.location]
    if change.patient_ref:
        parts.append(f"{patient_singular} record {change.patient_ref}")
    return " · ".join(p for p in parts if p)[:1000]


def when(start: int | None, end: int | None, time_zone: str) -> str:
    """An appointment's time as the agency reads it (its own time zone)."""
    if start is None:
        return "time not given"
    try:
        zone = zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    begins = dt.datetime.fromtimestamp(start / 1000, zone)
    text = f"{begins:%a} {begins.day} {begins:%b %Y}, {begins:%H:%M}"
    if end is not None and end > start:
        ends = dt.datetime.fromtimestamp(end / 1000, zone)
        text += f"–{ends:%H:%M}" if ends.date() == begins.date() else f" – {ends:%a} {ends.day} {ends:%b}, {ends:%H:%M}"
    return f"{text} {begins:%Z}".strip()
