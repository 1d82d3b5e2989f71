"""Schedule Notifications: SIU messages (MLLP) and FHIR Appointments (gateway) onto linked staff's boards.

Storage: one `appointments` document per appointment (id from agency, source system and the
system's appointment id; see schedule.appointment_doc_id) holding what the next change is judged
against: version, state, start/end, linked staff and teams, who holds its board item, the last
message keys and a digest of the last change. No PHI is kept here: the patient's record number,
the kind of visit and the place go only into the delivery request.

Each change is one write guarded by the version read (insert for a new appointment), carrying its
`board_item.delivery_requested.v1` event (outbox, event id `<appointment>-v<version>`); a lost race
reads again. The HL7 ACK (AA) or the HTTP answer is sent after that write.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from flask import Blueprint
from pymongo.errors import DuplicateKeyError

from services.kit.errors import InvalidInput, NotFound, Unavailable
from services.kit.mongo import eq, now_ms
from services.kit.outbox import outbox_fields, with_outbox
from services.kit.service_identity import acting_as
from services.kit.validation import json_body
from services.notifications import fhir_appointment, hl7v2, schedule, siu
from services.notifications.components import Feature
from services.notifications.delivery import delivery_requested
from services.notifications.fhir_errors import MAX_DEPTH, answer_errors_in_fhir
from services.notifications.registrations import gateway_consumer
from services.notifications.schedule import AgencyView, Appointment, AppointmentChange

log = logging.getLogger(__name__)

APPOINTMENTS = "appointments"
WRITE_ATTEMPTS = 8
# The appointment's own fields (its outbox stays out of reads).
FIELDS = {"_outbox": 0}


def _appointment(doc: dict) -> Appointment:
    return Appointment(
        id=doc["_id"],
        agency_id=doc["agency_id"],
        system=doc["system"],
        appointment_id=doc["appointment_id"],
        version=int(doc["version"]),
        state=doc["state"],
        start_ms=doc.get("start_ms"),
        end_ms=doc.get("end_ms"),
        staff_ids=tuple(doc.get("staff_ids") or ()),
        team_ids=tuple(doc.get("team_ids") or ()),
        notified_ids=tuple(doc.get("notified_ids") or ()),
        recent_keys=tuple(doc.get("recent_keys") or ()),
        digest=doc.get("digest", ""),
        npis=tuple(doc.get("npis") or ()),
    )


def _fields(appointment: Appointment, now: int) -> dict:
    return {
        "agency_id": appointment.agency_id,
        "system": appointment.system,
        "appointment_id": appointment.appointment_id,
        "version": appointment.version,
        "state": appointment.state,
        "start_ms": appointment.start_ms,
        "end_ms": appointment.end_ms,
        "staff_ids": list(appointment.staff_ids),
        "team_ids": list(appointment.team_ids),
        "notified_ids": list(appointment.notified_ids),
        "recent_keys": list(appointment.recent_keys),
        "digest": appointment.digest,
        "npis": list(appointment.npis),
        "updated_at": now,
    }


def unknown_field(change: AppointmentChange, refused: InvalidInput) -> str:
    """The HL7 field that named the first resource directory does not know (AIP^1^3 when unsaid,
    e.g. a bare cancellation naming the staff we knew)."""
    fields = dict(change.resource_fields)
    details = refused.details or {}
    for kind, key in (("staff", "staff_ids"), ("team", "team_ids"), ("npi", "npis")):
        for value in details.get(key) or ():
            if f"{kind}:{value}" in fields:
                return fields[f"{kind}:{value}"]
    return "AIP^1^3"


class ScheduleNotifications(Feature):
    outbox_collections = (APPOINTMENTS,)

    def __init__(self, components):
        super().__init__(components)
        self.appointments = components.store.db[APPOINTMENTS]

    def attach(self) -> None:
        for trigger in siu.TRIGGERS:
            self.components.message_types.register("SIU", trigger, self.handle_siu)

    # --- the two ways in ----------------------------------------------------------------------
    def handle_siu(self, message: hl7v2.InboundMessage) -> None:
        agency_id = self.components.registrations.agency_for_facility(message.header.receiving_facility)
        if agency_id is None:
            raise hl7v2.reject(hl7v2.TABLE_VALUE_NOT_FOUND, "MSH-6 receiving facility is not registered", "MSH^1^6")
        with acting_as(self.components.service_tokens.identity(agency_id)):
            agency = self.agency_view(agency_id)
            change = self.actor_by_npi(siu.parse(message, agency.time_zone))
            try:
                self.apply(agency_id, change, agency)
            except InvalidInput as exc:
                raise hl7v2.error(hl7v2.TABLE_VALUE_NOT_FOUND, exc.message, unknown_field(change, exc)) from exc

    def actor_by_npi(self, change: AppointmentChange) -> AppointmentChange:
        """The change with its maker's staff id when the sender named them by NPI (an NPI the agency
        does not have, or an inactive holder's, names nobody: everyone linked is told)."""
        if not change.actor_npi or change.actor_staff_id:
            return change
        found = list(self.components.directory.resolve([], [], [change.actor_npi]).staff_ids)
        return replace(change, actor_staff_id=found[0]) if len(found) == 1 else change

    def receive_fhir(self, consumer: str, agency_id: str, appointment_id: str, body: object) -> tuple[dict, int]:
        agency_id = self.components.registrations.partner_agency(consumer, agency_id)
        change = fhir_appointment.parse(body, f"fhir:{consumer}", appointment_id)
        with acting_as(self.components.service_tokens.identity(agency_id)):
            stored, created, notified = self.apply(agency_id, change, self.agency_view(agency_id))
        body = {
            "id": stored.appointment_id,
            "status": stored.state,
            "version": stored.version,
            "notified_staff_ids": notified,
        }
        return body, 201 if created else 200

    def agency_view(self, agency_id: str) -> AgencyView:
        settings = self.components.directory.agency_settings(agency_id)
        return AgencyView(
            notify_linked_staff=settings.notify_linked_staff_on_schedule_change,
            time_zone=settings.time_zone or "UTC",
            patient_singular=settings.terminology.patient_singular or "Patient",
        )

    # --- storing ------------------------------------------------------------------------------
    def load(self, doc_id: str) -> Appointment | None:
        doc = self.appointments.find_one({"_id": eq(doc_id)}, FIELDS)
        return _appointment(doc) if doc else None

    def linked_staff(self, previous: Appointment | None, change: AppointmentChange) -> list[str]:
        """The active staff the change links (by id, team or NPI: one directory call);
        InvalidInput `unknown_staff` for ids or NPIs the agency lacks."""
        staff_ids, team_ids, npis = schedule.linked_resources(previous, change)
        if not staff_ids and not team_ids and not npis:
            return []
        resolution = self.components.directory.resolve(list(staff_ids), list(team_ids), list(npis))
        if resolution.missing_staff_ids or resolution.missing_team_ids or resolution.missing_npis:
            details = {"staff_ids": list(resolution.missing_staff_ids), "team_ids": list(resolution.missing_team_ids)}
            if resolution.missing_npis:
                details["npis"] = list(resolution.missing_npis)
            raise InvalidInput(
                "unknown_staff", "the appointment names staff, NPIs or teams that are not in this agency", details
            )
        return list(resolution.staff_ids)

    def apply(self, agency_id: str, change: AppointmentChange, agency: AgencyView) -> tuple[Appointment, bool, list]:
        """Store the change with its delivery; (appointment, created, staff told)."""
        doc_id = schedule.appointment_doc_id(agency_id, change.system, change.appointment_id)
        for _ in range(WRITE_ATTEMPTS):
            previous = self.load(doc_id)
            result = schedule.plan(agency_id, previous, change, self.linked_staff(previous, change), agency)
            if result.repeat:
                return result.appointment, False, []
            stored = result.appointment
            events = []
            if result.delivery is not None:
                events.append(delivery_requested(agency_id, result.delivery, f"{doc_id}-v{stored.version}"))
            fields = _fields(stored, now_ms())
            if previous is None:
                try:
                    self.appointments.insert_one({"_id": doc_id, **fields, **outbox_fields(events)})
                except DuplicateKeyError:
                    continue
            else:
                guard = {"_id": eq(doc_id), "version": eq(previous.version)}
                if not self.appointments.update_one(guard, with_outbox({"$set": fields}, events)).matched_count:
                    continue
            recipients = result.delivery.recipients.staff_ids if result.delivery is not None else []
            told = schedule.told(recipients, change.actor_staff_id)
            log.info(
                "appointment change stored",
                extra={"agency_id": agency_id, "item_id": doc_id, "recipients": len(told)},
            )
            return stored, previous is None, told
        raise Unavailable("busy", "the appointment is being changed by another message; try again")

    # --- HTTP -----------------------------------------------------------------------------------
    def blueprints(self) -> list:
        partner = Blueprint("schedule_partner", __name__, url_prefix="/api/v1/partner/schedule")
        answer_errors_in_fhir(partner)

        @partner.put("/<agency_id>/Appointment/<appointment_id>")
        def appointment(agency_id: str, appointment_id: str):
            consumer = gateway_consumer()
            if not fhir_appointment.FHIR_ID.fullmatch(appointment_id):
                raise NotFound("not_found", "no such appointment")
            return self.receive_fhir(consumer, agency_id, appointment_id, json_body(max_depth=MAX_DEPTH))

        return [partner]
