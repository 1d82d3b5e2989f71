"""A FHIR R4 Appointment (JSON) as an AppointmentChange: strict about what we read, pure.

Read: `resourceType` ("Appointment"), `id`, `status`, `start`, `end` (instants with a UTC offset),
`appointmentType` (its text or first coding's display: the kind of visit), `participant[]`
(`actor.reference` and `status`) and the changed-by extension. Every other R4 Appointment element
is allowed and ignored; an element R4 does not define is `unknown_field`.

Participants: `Practitioner/<staff id>` is a linked staff member, `CareTeam/<team id>` a directory
team whose members are linked, `Patient/<id>` the patient (its id is shown as the record number),
`Location/<id>` where (its display, else its id). Other actors (devices, services, related people)
are not staff and are ignored; a participant that `declined` is not linked.

Who made the change: the extension
`{"url": CHANGED_BY_URL, "valueReference": {"reference": "Practitioner/<staff id>"}}` on the
Appointment (FHIR's place for facts the base resource lacks); that staff member is not told.

Before reading: no more than fhir_errors.MAX_DEPTH levels of nesting (`too_deep`), no NaN or
Infinity and no text that is not Unicode (`invalid_type`). After reading: the whole resource
against the fhir.resources R4B Appointment model (nested element names, JSON shapes, primitive
formats), except `id` (ours allows "_", see FHIR_ID) and R4's minimum cardinalities (participant
1..*, participant.status 1..1), which senders we take omit and which we check ourselves where we
need them.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B.appointment import Appointment

from services.kit.errors import InvalidInput
from services.kit.validation import ID_PATTERN, instant_ms
from services.notifications import schedule
from services.notifications.fhir_errors import check_json, check_model

CHANGED_BY_URL = "https://clinic-board.example/fhir/StructureDefinition/changed-by"
# FHIR ids are [A-Za-z0-9\-\.]{1,64}; directory ids also hold "_" (stf_riverbend_patel), which
# references to staff and teams must carry, so "_" is accepted too.
FHIR_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_PARTICIPANTS = 100
MAX_TEXT = 120

R4_ELEMENTS = frozenset(
    {
        "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
        "modifierExtension", "identifier", "status", "cancelationReason", "serviceCategory", "serviceType",
        "specialty", "appointmentType", "reasonCode", "reasonReference", "priority", "description",
        "supportingInformation", "start", "end", "minutesDuration", "slot", "created", "comment",
        "patientInstruction", "basedOn", "participant", "requestedPeriod",
    }
)  # fmt: skip
# Appointment.status -> what it does to the schedule.
STATUS_EVENTS = {
    "proposed": schedule.MODIFIED,
    "pending": schedule.MODIFIED,
    "booked": schedule.MODIFIED,
    "waitlist": schedule.MODIFIED,
    "arrived": schedule.ATTENDED,
    "checked-in": schedule.ATTENDED,
    "fulfilled": schedule.ATTENDED,
    "cancelled": schedule.CANCELLED,
    "noshow": schedule.NO_SHOW,
    "entered-in-error": schedule.DELETED,
}
PARTICIPANT_STATUSES = ("accepted", "declined", "tentative", "needs-action")


def _bad(code: str, message: str, path: str) -> InvalidInput:
    return InvalidInput(code, message, {"field": path})


def _string(resource: dict, path: str, name: str, *, required: bool = False, max_len: int = MAX_TEXT) -> str:
    value = resource.get(name)
    if value is None:
        if required:
            raise _bad("missing_field", f"{path}{name} is required", f"{path}{name}")
        return ""
    if not isinstance(value, str):
        raise _bad("invalid_type", f"{path}{name} must be a string", f"{path}{name}")
    value = value.strip()
    if len(value) > max_len:
        raise _bad("too_long", f"{path}{name} must be at most {max_len} characters", f"{path}{name}")
    if any(ord(c) < 0x20 for c in value):
        raise _bad("invalid_value", f"{path}{name} must not contain control characters", f"{path}{name}")
    return value


def _object(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _bad("invalid_type", f"{path} must be an object", path)
    return value


def _list(value: Any, path: str, max_items: int) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("invalid_type", f"{path} must be a list", path)
    if len(value) > max_items:
        raise _bad("too_many", f"{path} may hold at most {max_items} items", path)
    return value


def reference(value: Any, path: str) -> tuple[str, str]:
    """`{"reference": "Type/id"}` -> (Type, id); ids of staff and teams must be directory ids."""
    ref = _string(_object(value, path), f"{path}.", "reference", required=True)
    kind, slash, ident = ref.partition("/")
    if not slash or not kind.isalpha() or not FHIR_ID.fullmatch(ident):
        raise _bad("invalid_reference", f"{path}.reference must be 'Type/id'", f"{path}.reference")
    if kind in ("Practitioner", "CareTeam") and not ID_PATTERN.fullmatch(ident):
        raise _bad("invalid_reference", f"{path}.reference is not a staff or team id", f"{path}.reference")
    return kind, ident


def parse(resource: Any, system: str, path_id: str | None = None) -> schedule.AppointmentChange:
    """The Appointment as a change; InvalidInput (400, stable code) for anything malformed."""
    resource = _object(resource, "body")
    check_json(resource)
    unknown = sorted(k for k in resource if k not in R4_ELEMENTS)
    if unknown:
        raise _bad("unknown_field", f"unknown field: {unknown[0][:60]}", unknown[0][:60])
    if resource.get("resourceType") != "Appointment":
        raise _bad("invalid_resource_type", "resourceType must be Appointment", "resourceType")
    appointment_id = _string(resource, "", "id", required=True, max_len=64)
    if not FHIR_ID.fullmatch(appointment_id):
        raise _bad("invalid_value", "id must be a FHIR id ([A-Za-z0-9-.], at most 64)", "id")
    if path_id is not None and path_id != appointment_id:
        raise _bad("id_mismatch", "the resource id differs from the id in the URL", "id")
    status = _string(resource, "", "status", required=True, max_len=20)
    if status not in STATUS_EVENTS:
        raise _bad("invalid_value", f"status must be one of: {', '.join(STATUS_EVENTS)}", "status")
    start = _instant(resource, "start")
    end = _instant(resource, "end")
    if start is not None and end is not None and end < start:
        raise _bad("invalid_value", "end must not be before start", "end")
    staff: list[str] = []
    teams: list[str] = []
    patient_ref = location = ""
    for i, raw in enumerate(_list(resource.get("participant"), "participant", MAX_PARTICIPANTS)):
        path = f"participant[{i}]"
        participant = _object(raw, path)
        taken = _string(participant, f"{path}.", "status", max_len=20)
        if taken and taken not in PARTICIPANT_STATUSES:
            raise _bad("invalid_value", f"{path}.status is not a participation status", f"{path}.status")
        if "actor" not in participant:
            continue
        kind, ident = reference(participant["actor"], f"{path}.actor")
        if taken == "declined":
            continue
        if kind == "Practitioner":
            staff.append(ident)
        elif kind == "CareTeam":
            teams.append(ident)
        elif kind == "Patient":
            patient_ref = ident
        elif kind == "Location":
            location = _string(participant["actor"], f"{path}.actor.", "display") or ident
    actor, visit, message_key = changed_by(resource), visit_type(resource), _version_key(resource)
    # Read first, so what we read keeps its own codes; the model judges the rest.
    check_model(Appointment, {k: v for k, v in resource.items() if k != "id"}, required=False)
    return schedule.AppointmentChange(
        system=system,
        appointment_id=appointment_id,
        event=STATUS_EVENTS[status],
        start_ms=start,
        end_ms=end,
        staff_ids=tuple(dict.fromkeys(staff)),
        team_ids=tuple(dict.fromkeys(teams)),
        actor_staff_id=actor,
        patient_ref=patient_ref,
        visit_type=visit,
        location=location,
        message_key=message_key,
    )


def _instant(resource: dict, name: str) -> int | None:
    text = _string(resource, "", name, max_len=40)
    return instant_ms(name, text, "invalid_value") if text else None


def visit_type(resource: dict) -> str:
    if resource.get("appointmentType") is None:
        return ""
    concept = _object(resource["appointmentType"], "appointmentType")
    text = _string(concept, "appointmentType.", "text")
    if text:
        return text
    codings = _list(concept.get("coding"), "appointmentType.coding", 20)
    if codings:
        first = _object(codings[0], "appointmentType.coding[0]")
        return _string(first, "appointmentType.coding[0].", "display") or _string(
            first, "appointmentType.coding[0].", "code"
        )
    return ""


def changed_by(resource: dict) -> str:
    """The staff member the changed-by extension names ("" when none)."""
    for i, raw in enumerate(_list(resource.get("extension"), "extension", 50)):
        extension = _object(raw, f"extension[{i}]")
        if extension.get("url") != CHANGED_BY_URL:
            continue
        kind, ident = reference(extension.get("valueReference"), f"extension[{i}].valueReference")
        if kind != "Practitioner":
            raise _bad(
                "invalid_reference",
                "the changed-by extension must name a Practitioner",
                f"extension[{i}].valueReference",
            )
        return ident
    return ""


def _version_key(resource: dict) -> str:
    if resource.get("meta") is None:
        return ""
    version = _string(_object(resource["meta"], "meta"), "meta.", "versionId", max_len=64)
    return f"fhir-version:{version}" if version else ""
