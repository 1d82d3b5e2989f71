"""Schedule Notifications rules: who is told of an appointment change, and what their board shows."""

from __future__ import annotations

import datetime as dt

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.kit.errors import InvalidInput
from services.notifications import fhir_appointment, schedule
from services.notifications.schedule import AgencyView, AppointmentChange

AGENCY = "agy_riverbend"
ON = AgencyView(notify_linked_staff=True, time_zone="America/Chicago", patient_singular="Client")
OFF = AgencyView(notify_linked_staff=False, time_zone="America/Chicago")


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def change(event=schedule.BOOKED, *, start="2026-12-02T10:00:00-06:00", end="2026-12-02T10:50:00-06:00",
           staff=("stf_patel", "stf_kim"), actor="", key="m1", **rest) -> AppointmentChange:  # fmt: skip
    return AppointmentChange(
        system="hl7:RIVERBEND",
        appointment_id="A100",
        event=event,
        start_ms=ms(start) if start else None,
        end_ms=ms(end) if end else None,
        staff_ids=staff,
        team_ids=() if staff is not None else None,
        actor_staff_id=actor,
        message_key=key,
        **rest,
    )


def run(previous, c, linked=None, agency=ON):
    linked = list(c.staff_ids if c.staff_ids is not None else previous.staff_ids) if linked is None else linked
    return schedule.plan(AGENCY, previous, c, linked, agency)


def test_a_new_appointment_reaches_every_linked_staff_member_with_its_time():
    result = run(None, change(visit_type="Follow-up", location="Room 2", patient_ref="MRN1"))
    delivery = result.delivery
    assert list(delivery.recipients.staff_ids) == ["stf_patel", "stf_kim"]
    assert delivery.kind == inbox_pb2.DELIVERED_KIND_SCHEDULE
    assert delivery.title == "New appointment: Wed 2 Dec 2026, 10:00–10:50 CST"
    assert delivery.summary == "Follow-up · Room 2 · Client record MRN1"
    assert delivery.status == "booked" and not delivery.mark_unread
    assert delivery.source_ref == result.appointment.id == schedule.appointment_doc_id(AGENCY, "hl7:RIVERBEND", "A100")
    assert delivery.source_version == 1
    assert result.appointment.notified_ids == ("stf_patel", "stf_kim")


def test_the_staff_member_who_made_the_change_is_not_told():
    result = run(None, change(actor="stf_kim"))
    assert list(result.delivery.recipients.staff_ids) == ["stf_patel"]
    assert result.delivery.actor_staff_id == "stf_kim"


def test_nobody_is_told_while_the_agency_option_is_off_but_the_appointment_is_kept():
    result = run(None, change(), agency=OFF)
    assert result.delivery is None
    assert result.appointment.version == 1 and result.appointment.start_ms == ms("2026-12-02T10:00:00-06:00")


def test_a_reschedule_updates_the_same_item_unread_again_with_the_new_time():
    first = run(None, change()).appointment
    moved = run(first, change(schedule.RESCHEDULED, start="2026-12-02T11:00:00-06:00",
                              end="2026-12-02T11:50:00-06:00", key="m2"))  # fmt: skip
    delivery = moved.delivery
    assert delivery.source_ref == first.id and delivery.source_version == 2
    assert delivery.mark_unread
    assert delivery.title == "Appointment rescheduled: Wed 2 Dec 2026, 11:00–11:50 CST (was Wed 2 Dec 2026, 10:00 CST)"
    assert delivery.status == "rescheduled"


def test_a_modification_that_moves_the_time_is_a_reschedule_and_one_that_does_not_is_an_update():
    first = run(None, change()).appointment
    moved = run(first, change(schedule.MODIFIED, start="2026-12-03T10:00:00-06:00", end=None, key="m2"))
    assert moved.delivery.status == "rescheduled"
    same = run(first, change(schedule.MODIFIED, location="Room 9", key="m3"))
    assert same.delivery.status == "updated" and same.delivery.title.startswith("Appointment updated: ")


def test_a_cancellation_keeps_the_item_and_says_so_to_the_staff_we_knew():
    first = run(None, change()).appointment
    cancelled = run(first, change(schedule.CANCELLED, start=None, end=None, staff=None, key="m2"))
    delivery = cancelled.delivery
    assert list(delivery.recipients.staff_ids) == ["stf_patel", "stf_kim"]
    assert delivery.title == "Appointment cancelled: Wed 2 Dec 2026, 10:00–10:50 CST"
    assert delivery.status == "cancelled" and delivery.mark_unread and not delivery.withdrawn
    assert not delivery.resolved  # resolved items are marked read: a cancellation must be seen
    assert cancelled.appointment.state == schedule.CANCELLED


def test_staff_taken_off_an_appointment_lose_its_item():
    first = run(None, change()).appointment
    edited = run(first, change(schedule.MODIFIED, staff=("stf_patel",), key="m2"))
    assert list(edited.delivery.recipients.staff_ids) == ["stf_patel"]
    assert edited.appointment.notified_ids == ("stf_patel",)


def test_when_nobody_is_left_to_tell_the_item_is_withdrawn():
    first = run(None, change()).appointment
    # Only its maker is left on the appointment, and they never had its item.
    edited = run(first, change(schedule.MODIFIED, staff=("stf_lee",), actor="stf_lee", key="m2"))
    assert edited.delivery.withdrawn and edited.delivery.source_ref == first.id
    assert edited.appointment.notified_ids == ()
    again = run(edited.appointment, change(schedule.MODIFIED, staff=("stf_lee",), actor="stf_lee", key="m3",
                                           location="Room 1"))  # fmt: skip
    assert again.delivery is None  # nothing left to withdraw


def test_the_maker_who_holds_the_item_keeps_it_and_only_the_others_are_told():
    first = run(None, change(actor="stf_davis")).appointment
    assert first.notified_ids == ("stf_patel", "stf_kim")
    # Kim, on the appointment and holding its item, moves it herself (EVN-5 = Kim).
    moved = run(first, change(schedule.RESCHEDULED, start="2026-12-02T11:00:00-06:00",
                              end="2026-12-02T11:50:00-06:00", actor="stf_kim", key="m2"))  # fmt: skip
    delivery = moved.delivery
    assert list(delivery.recipients.staff_ids) == ["stf_patel", "stf_kim"]  # Kim keeps her item...
    assert delivery.actor_staff_id == "stf_kim" and delivery.mark_unread  # ...which inbox leaves as read as it was
    assert moved.appointment.notified_ids == ("stf_patel", "stf_kim")
    assert schedule.told(delivery.recipients.staff_ids, "stf_kim") == ["stf_patel"]


def test_the_maker_never_gets_a_new_item_for_their_own_change():
    first = run(None, change(actor="stf_kim")).appointment
    assert first.notified_ids == ("stf_patel",)
    edited = run(first, change(schedule.MODIFIED, location="Room 4", actor="stf_kim", key="m2"))
    assert list(edited.delivery.recipients.staff_ids) == ["stf_patel"]


def test_a_maker_left_alone_on_the_appointment_keeps_the_item_the_others_lose():
    first = run(None, change()).appointment
    edited = run(first, change(schedule.MODIFIED, staff=("stf_patel",), actor="stf_patel", key="m2"))
    assert not edited.delivery.withdrawn
    assert list(edited.delivery.recipients.staff_ids) == ["stf_patel"]  # Kim's item goes, Patel's stays
    assert edited.appointment.notified_ids == ("stf_patel",)


def test_a_cancellation_by_someone_on_the_appointment_keeps_their_item_saying_so():
    first = run(None, change()).appointment
    cancelled = run(first, change(schedule.CANCELLED, start=None, end=None, actor="stf_patel", key="m2"))
    assert cancelled.delivery.status == "cancelled" and not cancelled.delivery.withdrawn
    assert list(cancelled.delivery.recipients.staff_ids) == ["stf_patel", "stf_kim"]


def test_providers_linked_by_npi_are_kept_for_a_later_bare_cancellation():
    first = run(None, change(staff=("stf_kim",), npis=("1234567893",)), linked=["stf_kim", "stf_reyes"])
    assert first.appointment.npis == ("1234567893",) and first.appointment.staff_ids == ("stf_kim",)
    bare = change(schedule.CANCELLED, start=None, end=None, staff=None, key="m2")
    assert schedule.linked_resources(first.appointment, bare) == (("stf_kim",), (), ("1234567893",))
    cancelled = run(first.appointment, bare, linked=["stf_kim", "stf_reyes"])
    assert cancelled.appointment.npis == ("1234567893",)
    assert list(cancelled.delivery.recipients.staff_ids) == ["stf_kim", "stf_reyes"]


def test_the_same_staff_named_by_another_npi_is_a_new_change():
    first = run(None, change(npis=("1234567893",))).appointment
    assert not run(first, change(npis=("1498263056",), key="m2")).repeat
    assert run(first, change(npis=("1234567893",), key="m3")).repeat  # the same content from another message


def test_the_same_message_twice_changes_nothing():
    first = run(None, change()).appointment
    again = run(first, change())
    assert again.repeat and again.delivery is None and again.appointment == first
    same_content_other_key = run(first, change(key="m9"))
    assert same_content_other_key.repeat


def test_an_attended_appointment_is_recorded_without_telling_anyone():
    first = run(None, change()).appointment
    arrived = run(first, change(schedule.ATTENDED, key="m2"))
    assert arrived.delivery is None
    assert arrived.appointment.state == schedule.BOOKED and arrived.appointment.version == 2


def test_times_are_shown_in_the_agencys_time_zone():
    assert schedule.when(ms("2026-07-01T15:00:00+00:00"), None, "America/New_York") == "Wed 1 Jul 2026, 11:00 EDT"
    assert schedule.when(None, None, "UTC") == "time not given"


# --- FHIR Appointment ---------------------------------------------------------------------------


def resource(**changes) -> dict:
    body = {
        "resourceType": "Appointment",
        "id": "appt-7",
        "status": "booked",
        "start": "2026-12-02T10:00:00-06:00",
        "end": "2026-12-02T10:50:00-06:00",
        "appointmentType": {"coding": [{"code": "FOLLOWUP", "display": "Follow-up"}]},
        "participant": [
            {"actor": {"reference": "Practitioner/stf_riverbend_patel"}, "status": "accepted"},
            {"actor": {"reference": "CareTeam/team_riverbend_intake"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/stf_riverbend_chen"}, "status": "declined"},
            {"actor": {"reference": "Patient/MRN42"}, "status": "accepted"},
            {"actor": {"reference": "Location/room-2", "display": "Room 2"}, "status": "accepted"},
        ],
        "extension": [
            {
                "url": fhir_appointment.CHANGED_BY_URL,
                "valueReference": {"reference": "Practitioner/stf_riverbend_davis"},
            }
        ],
    }
    body.update(changes)
    return body


def test_a_fhir_appointment_becomes_the_same_internal_change():
    parsed = fhir_appointment.parse(resource(), "fhir:practice-management", "appt-7")
    assert parsed.appointment_id == "appt-7" and parsed.system == "fhir:practice-management"
    assert parsed.event == schedule.MODIFIED  # booked the first time we see it (plan decides)
    assert parsed.start_ms == ms("2026-12-02T10:00:00-06:00") and parsed.end_ms == ms("2026-12-02T10:50:00-06:00")
    assert parsed.staff_ids == ("stf_riverbend_patel",)  # the declined participant is not linked
    assert parsed.team_ids == ("team_riverbend_intake",)
    assert parsed.actor_staff_id == "stf_riverbend_davis"
    assert (parsed.patient_ref, parsed.visit_type, parsed.location) == ("MRN42", "Follow-up", "Room 2")
    assert schedule.plan(AGENCY, None, parsed, ["stf_riverbend_patel"], ON).delivery.status == "booked"


@pytest.mark.parametrize(
    ("status", "event"),
    [("cancelled", schedule.CANCELLED), ("noshow", schedule.NO_SHOW), ("entered-in-error", schedule.DELETED),
     ("fulfilled", schedule.ATTENDED)],
)  # fmt: skip
def test_fhir_statuses_map_to_what_they_do_to_the_schedule(status, event):
    assert fhir_appointment.parse(resource(status=status), "fhir:pm").event == event


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([1, 2], "invalid_type"),
        (resource(resourceType="Patient"), "invalid_resource_type"),
        (resource(id={"$gt": ""}), "invalid_type"),
        (resource(id="a b"), "invalid_value"),
        (resource(status="maybe"), "invalid_value"),
        (resource(status=None), "missing_field"),
        (resource(start="2026-12-02T10:00:00"), "invalid_value"),  # no UTC offset
        (resource(start=20261202), "invalid_type"),
        (resource(end="2026-12-02T09:00:00-06:00"), "invalid_value"),
        (resource(participant={"actor": {}}), "invalid_type"),
        (resource(participant=[{"actor": {"reference": {"$gt": ""}}}]), "invalid_type"),
        (resource(participant=[{"actor": {"reference": "Practitioner"}}]), "invalid_reference"),
        (resource(participant=[{"actor": {"reference": "Practitioner/a.b"}}]), "invalid_reference"),
        (resource(participant=[{"actor": "Practitioner/x"}]), "invalid_type"),
        (resource(participant=[{"status": "maybe", "actor": {"reference": "Practitioner/x"}}]), "invalid_value"),
        (resource(bogus=1), "unknown_field"),
        (resource(extension=[{"url": fhir_appointment.CHANGED_BY_URL,
                              "valueReference": {"reference": "Patient/p1"}}]), "invalid_reference"),
    ],
)  # fmt: skip
def test_malformed_fhir_appointments_are_refused_with_stable_codes(body, code):
    with pytest.raises(InvalidInput) as caught:
        fhir_appointment.parse(body, "fhir:pm")
    assert caught.value.code == code


def test_the_url_id_must_match_the_resource_id():
    with pytest.raises(InvalidInput) as caught:
        fhir_appointment.parse(resource(), "fhir:pm", "appt-8")
    assert caught.value.code == "id_mismatch"
