"""SIU scheduling messages (HL7 v2.5.1) read into appointment changes, on python-hl7's parse."""

from __future__ import annotations

import datetime as dt

import pytest

from services.notifications import hl7v2, schedule, siu

TZ = "America/Chicago"


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def siu_message(trigger="S12", *, control="MSG0001", sch11="^^50^20261202100000-0600^20261202105000-0600",
                resources=None, evn_operator="stf_riverbend_davis", extra=(), sep="\r") -> bytes:  # fmt: skip
    resources = (
        [
            "AIS|1||FOLLOWUP^Follow-up visit",
            "AIG|1||team_riverbend_intake^Intake|TEAM",
            "AIG|2||ROOM-EQ-1^Sound machine|EQUIPMENT",
            "AIL|1||OP^Room 2^^RIVERBEND",
            "AIP|1||stf_riverbend_patel^Patel^Priya|THERAPIST|||20261202100000-0600|||50|min",
            "AIP|2||stf_riverbend_kim^Kim^Jordan|NURSE",
        ]
        if resources is None
        else resources
    )
    segments = [
        f"MSH|^~\\&|PMS|RIVERBEND|CLINIC_BOARD|RIVERBEND|20261126080000||SIU^{trigger}^SIU_S12|{control}|P|2.5.1",
        f"SCH|PL123^PMS|FL456^PMS|||||ROUTINE^Routine|FOLLOWUP^Follow-up visit|50|min|{sch11}"
        "|||||||||stf_riverbend_lopez^Lopez^Ana|||||Booked",
        f"EVN|{trigger}|20261126080000|||{evn_operator}",
        "PID|1||MRN12345^^^RIVERBEND^MR||Doe^Jane||19800101|F",
        "RGS|1",
        *resources,
        *extra,
    ]
    return sep.join(segments).encode("ascii")


def read(raw: bytes, tz: str = TZ) -> schedule.AppointmentChange:
    return siu.parse(hl7v2.read_message(raw), tz)


def test_a_new_appointment_names_its_staff_teams_time_and_maker():
    change = read(siu_message())
    assert change.event == schedule.BOOKED
    assert (change.system, change.appointment_id) == ("hl7:RIVERBEND", "FL456")
    assert change.start_ms == ms("2026-12-02T10:00:00-06:00") and change.end_ms == ms("2026-12-02T10:50:00-06:00")
    assert change.staff_ids == ("stf_riverbend_patel", "stf_riverbend_kim")
    assert change.team_ids == ("team_riverbend_intake",)  # the equipment AIG is not a person
    assert change.actor_staff_id == "stf_riverbend_davis"
    assert (change.patient_ref, change.visit_type, change.location) == ("MRN12345", "Follow-up visit", "OP Room 2")
    assert change.message_key == "hl7:RIVERBEND:MSG0001"


@pytest.mark.parametrize(
    ("trigger", "event"),
    [("S13", schedule.RESCHEDULED), ("S14", schedule.MODIFIED), ("S15", schedule.CANCELLED),
     ("S17", schedule.DELETED), ("S26", schedule.NO_SHOW)],
)  # fmt: skip
def test_each_trigger_says_what_happened(trigger, event):
    assert read(siu_message(trigger)).event == event


def test_without_an_evn_operator_the_entered_by_person_made_the_change():
    assert read(siu_message(evn_operator="")).actor_staff_id == "stf_riverbend_lopez"


def test_a_message_naming_no_resources_keeps_the_staff_we_knew():
    change = read(siu_message("S15", resources=[]))
    assert change.staff_ids is None and change.team_ids is None


def test_a_resource_marked_deleted_is_not_linked():
    change = read(siu_message("S14", resources=["AIP|1|D|stf_riverbend_kim", "AIP|2|U|stf_riverbend_patel"]))
    assert change.staff_ids == ("stf_riverbend_patel",) and change.team_ids == ()


def test_without_sch_11_the_time_comes_from_ais_and_local_times_are_the_agencys():
    change = read(siu_message(sch11="", resources=["AIS|1||FOLLOWUP|20261202090000|||45|min", "AIP|1||stf_x"]))
    assert change.start_ms == ms("2026-12-02T09:00:00-06:00")
    assert change.end_ms == ms("2026-12-02T09:45:00-06:00")


def test_newline_separated_segments_read_the_same():
    assert read(siu_message(sep="\n")) == read(siu_message())


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (siu_message(sch11="^^50^2026-12-02"), hl7v2.DATA_TYPE_ERROR),
        (siu_message(sch11="^^50^20261302100000"), hl7v2.DATA_TYPE_ERROR),
        (siu_message(sch11="^^50^20261202110000^20261202100000"), hl7v2.DATA_TYPE_ERROR),
        (siu_message(resources=["AIP|1||../etc"]), hl7v2.TABLE_VALUE_NOT_FOUND),
        (siu_message(resources=["AIP|1||"]), hl7v2.REQUIRED_FIELD_MISSING),
        (siu_message("S16"), hl7v2.UNSUPPORTED_EVENT_CODE),
    ],
)
def test_unusable_content_is_refused_with_its_hl7_error_code(raw, code):
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        read(raw)
    assert caught.value.error_code == code


def test_a_message_without_sch_is_refused():
    raw = b"MSH|^~\\&|PMS|RIVERBEND|CLINIC_BOARD|RIVERBEND|20261126080000||SIU^S12|M2|P|2.5.1\rPID|1||MRN1"
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        read(raw)
    assert caught.value.ack_code == hl7v2.ERROR and caught.value.error_code == hl7v2.SEGMENT_SEQUENCE_ERROR
