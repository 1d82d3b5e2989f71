"""Schedule Notifications against the real database: each SIU message or FHIR Appointment is stored
with the delivery request it causes, in one write; repeats and refusals store nothing new."""

from __future__ import annotations

import pytest

from services.kit.errors import InvalidInput, NotFound
from services.notifications import schedule
from services.notifications.appointments import APPOINTMENTS, ScheduleNotifications
from tests.integration.notifications_fixtures import DirectoryTable, Member, make_components, staged_deliveries
from tests.unit.test_schedule_rules import resource
from tests.unit.test_siu_messages import siu_message

RIVERBEND = "agy_riverbend"


@pytest.fixture
def table():
    return DirectoryTable(
        staff={
            "stf_riverbend_patel": Member(RIVERBEND, "Priya Patel"),
            "stf_riverbend_kim": Member(RIVERBEND, "Jordan Kim"),
            "stf_riverbend_davis": Member(RIVERBEND, "Jamie Davis"),
            "stf_riverbend_wilson": Member(RIVERBEND, "Chris Wilson"),
            "stf_lakeside_baker": Member("agy_lakeside", "Jesse Baker"),
        },
        teams={"team_riverbend_intake": ["stf_riverbend_wilson", "stf_riverbend_davis"]},
    )


@pytest.fixture
def feature(mongo_client, db_name, table):
    components = make_components(mongo_client[db_name], table)
    feature = ScheduleNotifications(components)
    feature.ensure_indexes()
    feature.attach()
    return feature


def send(feature, raw: bytes) -> bytes:
    """The ACK the listener would send for `raw`."""
    return feature.components.message_types.acknowledge(raw)


def msa(ack: bytes) -> list[str]:
    return ack.decode("ascii").split("\r")[1].split("|")


def the_appointment(feature) -> dict:
    docs = list(feature.components.store.db[APPOINTMENTS].find({}))
    assert len(docs) == 1
    return docs[0]


def deliveries(feature):
    return sorted((r for _, r in staged_deliveries(the_appointment(feature))), key=lambda r: r.source_version)


def test_s12_s14_s15_update_one_item_per_linked_staff_member_and_never_tell_the_maker(feature):
    assert msa(send(feature, siu_message("S12", control="C1")))[1:3] == ["AA", "C1"]
    assert msa(send(feature, siu_message("S14", control="C2",
                                         sch11="^^50^20261202110000-0600^20261202115000-0600")))[1] == "AA"  # fmt: skip
    assert msa(send(feature, siu_message("S15", control="C3", resources=[])))[1] == "AA"
    booked, moved, cancelled = deliveries(feature)
    everyone = ["stf_riverbend_kim", "stf_riverbend_patel", "stf_riverbend_wilson"]  # davis made the change
    assert sorted(booked.recipients.staff_ids) == everyone
    assert booked.source_ref == moved.source_ref == cancelled.source_ref
    assert [d.source_version for d in (booked, moved, cancelled)] == [1, 2, 3]
    assert moved.status == "rescheduled" and moved.mark_unread and "11:00" in moved.title
    assert cancelled.status == "cancelled" and cancelled.mark_unread
    assert sorted(cancelled.recipients.staff_ids) == everyone  # a bare S15 keeps the staff we knew
    assert all(d.actor_staff_id == "stf_riverbend_davis" for d in (booked, moved, cancelled))
    doc = the_appointment(feature)
    assert doc["state"] == schedule.CANCELLED and doc["version"] == 3
    assert "MRN12345" not in repr(doc["recent_keys"]) and "patient" not in doc  # no PHI kept in clear


def test_the_same_message_twice_is_stored_once_and_acknowledged_both_times(feature):
    assert msa(send(feature, siu_message("S12", control="C1")))[1] == "AA"
    assert msa(send(feature, siu_message("S12", control="C1")))[1] == "AA"
    assert len(deliveries(feature)) == 1 and the_appointment(feature)["version"] == 1


def test_with_the_option_off_the_appointment_is_kept_and_nobody_told(feature, table):
    table.notify_linked_staff[RIVERBEND] = False
    assert msa(send(feature, siu_message("S12")))[1] == "AA"
    assert deliveries(feature) == [] and the_appointment(feature)["version"] == 1


@pytest.mark.parametrize(
    "resources",
    [["AIP|1||stf_riverbend_nobody"], ["AIP|1||stf_lakeside_baker"], ["AIG|1||team_elsewhere|TEAM"]],
)
def test_unknown_or_another_agencys_staff_are_refused_and_nothing_is_stored(feature, resources):
    reply = msa(send(feature, siu_message("S12", resources=resources)))
    assert reply[1] == "AE" and "not in this agency" in reply[3]
    assert feature.components.store.db[APPOINTMENTS].count_documents({}) == 0


def test_an_unregistered_facility_is_rejected(feature):
    raw = siu_message().replace(b"|CLINIC_BOARD|RIVERBEND|", b"|CLINIC_BOARD|ELSEWHERE|")
    assert msa(send(feature, raw))[1] == "AR"


def test_a_fhir_appointment_is_stored_once_and_its_edit_updates_the_same_item(feature):
    body, status = feature.receive_fhir("practice-management", RIVERBEND, "appt-7", resource())
    assert status == 201 and body["notified_staff_ids"] == ["stf_riverbend_patel", "stf_riverbend_wilson"]
    again, status = feature.receive_fhir("practice-management", RIVERBEND, "appt-7", resource())
    assert status == 200 and again["version"] == 1  # a retry tells nobody twice
    moved = resource(start="2026-12-02T12:00:00-06:00", end="2026-12-02T12:50:00-06:00")
    feature.receive_fhir("practice-management", RIVERBEND, "appt-7", moved)
    first, second = deliveries(feature)
    assert (first.status, second.status) == ("booked", "rescheduled") and second.mark_unread
    assert first.source_ref == second.source_ref


def test_fhir_refusals_store_nothing(feature):
    with pytest.raises(InvalidInput) as caught:
        elsewhere = [{"actor": {"reference": "Practitioner/stf_lakeside_baker"}}]
        feature.receive_fhir("practice-management", RIVERBEND, "appt-7", resource(participant=elsewhere))
    assert caught.value.code == "unknown_staff"
    with pytest.raises(NotFound):
        feature.receive_fhir("practice-management", "agy_elsewhere", "appt-7", resource())
    with pytest.raises(NotFound):
        feature.receive_fhir("someone-else", RIVERBEND, "appt-7", resource())
    assert feature.components.store.db[APPOINTMENTS].count_documents({}) == 0
