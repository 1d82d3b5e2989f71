"""SIU scheduling messages (HL7 v2.5.1) read into appointment changes, on python-hl7's parse."""

from __future__ import annotations

import datetime as dt

import pytest

from services.kit.npi import is_valid_npi
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
    assert change.message_key == hl7v2.read_message(siu_message()).message_key


def test_a_reused_control_id_with_other_content_is_another_message():
    """Interface engines reuse MSH-10 after a restart: the key tells the two messages apart."""
    first = read(siu_message())
    other = read(siu_message().replace(b"Room 2", b"Room 3"))
    restamped = read(siu_message().replace(b"|20261126080000||SIU", b"|20261201090500||SIU"))
    assert first.message_key != other.message_key and first.message_key == restamped.message_key


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


# --- as practice-management systems write them: NPIs, several resources, every resource D on a cancel


REYES = "1234567893^REYES^ELENA^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI"
CHEN_BY_OID = "1498263056^CHEN^WEI^^^DR^^^&2.16.840.1.113883.4.6&ISO"
# Many systems send their own user id first and the NPI in a second repetition.
BROOKS_LOCAL_THEN_NPI = "PM0042^BROOKS^TAYLOR~1654321094^BROOKS^TAYLOR^^^^^^^^^^NPI"


def pm_resources(action: str = "") -> list[str]:
    return [
        "AIS|1||FOLLOWUP^Follow-up visit^LOCAL|20261202100000|||50|min",
        f"AIG|1|{action}|team_riverbend_intake^Intake|TEAM",
        f"AIG|2|{action}|1987654320^Room 2 scale|EQUIPMENT",
        f"AIL|1|{action}|OP^Room 2^^RIVERBEND",
        f"AIP|1|{action}|{REYES}|PRESCRIBER|||20261202100000|||50|min",
        f"AIP|2|{action}|{CHEN_BY_OID}|PRESCRIBER",
        f"AIP|3|{action}|{BROOKS_LOCAL_THEN_NPI}|PRESCRIBER",
        f"AIP|4|{action}|stf_riverbend_kim^KIM^JORDAN|NURSE",
        f"AIG|3|{action}|1654321094^BROOKS^NPI|STAFF",
    ]


def test_providers_named_by_npi_are_linked_by_npi_each_once_with_the_field_that_named_them():
    change = read(siu_message(resources=pm_resources()))
    assert change.npis == ("1234567893", "1498263056", "1654321094")  # Brooks twice (AIP-3 and AIG-3)
    assert change.staff_ids == ("stf_riverbend_kim",)
    assert change.team_ids == ("team_riverbend_intake",)  # the equipment is not a person
    fields = dict(change.resource_fields)
    assert fields["npi:1234567893"] == "AIP^1^3" and fields["npi:1654321094"] == "AIP^3^3"
    assert fields["staff:stf_riverbend_kim"] == "AIP^4^3" and fields["team:team_riverbend_intake"] == "AIG^1^3"


@pytest.mark.parametrize("trigger", ["S15", "S17"])
def test_a_cancellation_marking_every_resource_deleted_still_names_them_all(trigger):
    change = read(siu_message(trigger, resources=pm_resources("D")))
    assert change.event in (schedule.CANCELLED, schedule.DELETED)
    assert change.npis == ("1234567893", "1498263056", "1654321094")
    assert change.staff_ids == ("stf_riverbend_kim",) and change.team_ids == ("team_riverbend_intake",)


@pytest.mark.parametrize("trigger", ["S12", "S13", "S14"])
def test_on_a_booking_or_an_edit_a_resource_marked_deleted_left_the_appointment(trigger):
    resources = [f"AIP|1|D|{REYES}|PRESCRIBER", f"AIP|2|U|{CHEN_BY_OID}|PRESCRIBER", "AIG|1|D|team_x|TEAM"]
    change = read(siu_message(trigger, resources=resources))
    assert change.npis == ("1498263056",) and change.staff_ids == () and change.team_ids == ()


def test_an_evn_operator_named_by_npi_is_the_maker():
    change = read(siu_message(evn_operator=REYES))
    assert (change.actor_staff_id, change.actor_npi) == ("", "1234567893")


def test_an_evn_operator_with_name_components_is_still_read_by_directory_id():
    change = read(siu_message(evn_operator="stf_riverbend_patel^PATEL^PRIYA^^^^^^RIVERBEND"))
    assert (change.actor_staff_id, change.actor_npi) == ("stf_riverbend_patel", "")


def test_an_unreadable_operator_npi_names_no_maker():
    change = read(siu_message(evn_operator="1234567890^REYES^^^^^^^^^^^NPI"))
    assert (change.actor_staff_id, change.actor_npi) == ("", "")


@pytest.mark.parametrize(
    ("resources", "location"),
    [
        (["AIP|1||stf_riverbend_kim", "AIP|2||1234567890^REYES^^^^^^^^^^^NPI"], "AIP^2^3"),  # check digit
        (["AIP|1||123456789^REYES^^^^^^^NPI"], "AIP^1^3"),  # nine digits
        (["AIG|1||PM-77^X^NPI|STAFF"], "AIG^1^3"),
    ],
)
def test_a_malformed_npi_is_refused_naming_its_field(resources, location):
    with pytest.raises(hl7v2.Hl7Rejection) as caught:
        read(siu_message(resources=resources))
    assert caught.value.error_code == hl7v2.DATA_TYPE_ERROR and caught.value.location == location
    assert "NPI" in caught.value.text


def test_an_untyped_ten_digit_id_is_a_directory_id_not_an_npi():
    change = read(siu_message(resources=["AIP|1||1234567893^REYES^ELENA"]))
    assert change.staff_ids == ("1234567893",) and change.npis == ()


def test_the_npi_check_digit():
    assert is_valid_npi("1234567893") and is_valid_npi("1245319599")
    assert not is_valid_npi("1234567890") and not is_valid_npi("123456789") and not is_valid_npi("12345678x3")
