"""Schedule Notifications against the real database: each SIU message or FHIR Appointment is stored
with the delivery request it causes, in one write; repeats and refusals store nothing new."""

from __future__ import annotations

import pytest

from services.kit.errors import InvalidInput, NotFound
from services.notifications import schedule
from services.notifications.appointments import APPOINTMENTS, ScheduleNotifications
from tests.helpers import msa
from tests.integration.notifications_fixtures import DirectoryTable, Member, make_components, staged_deliveries
from tests.unit.test_schedule_rules import resource
from tests.unit.test_siu_messages import CHEN_BY_OID, REYES, siu_message

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
            "stf_riverbend_reyes": Member(RIVERBEND, "Elena Reyes", npi="1234567893"),
            "stf_riverbend_chen": Member(RIVERBEND, "Wei Chen", npi="1498263056"),
            "stf_lakeside_ramirez": Member("agy_lakeside", "Luis Ramirez", npi="1987654328"),
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


def err(ack: bytes) -> list[str]:
    return next(s for s in ack.decode("ascii").split("\r") if s.startswith("ERR|")).split("|")


def the_appointment(feature) -> dict:
    docs = list(feature.components.store.db[APPOINTMENTS].find({}))
    assert len(docs) == 1
    return docs[0]


def deliveries(feature):
    return sorted((r for _, r in staged_deliveries(the_appointment(feature))), key=lambda r: r.source_version)


def test_s12_s14_s15_update_one_item_per_linked_staff_member_and_never_tell_the_maker(feature):
    assert msa(send(feature, siu_message("S12", control="C1")))[:2] == ("AA", "C1")
    rescheduled = siu_message("S14", control="C2", sch11="^^50^20261202110000-0600^20261202115000-0600")
    assert msa(send(feature, rescheduled)).code == "AA"
    assert msa(send(feature, siu_message("S15", control="C3", resources=[]))).code == "AA"
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
    assert msa(send(feature, siu_message("S12", control="C1"))).code == "AA"
    assert msa(send(feature, siu_message("S12", control="C1"))).code == "AA"
    assert len(deliveries(feature)) == 1 and the_appointment(feature)["version"] == 1


def test_with_the_option_off_the_appointment_is_kept_and_nobody_told(feature, table):
    table.notify_linked_staff[RIVERBEND] = False
    assert msa(send(feature, siu_message("S12"))).code == "AA"
    assert deliveries(feature) == [] and the_appointment(feature)["version"] == 1


@pytest.mark.parametrize(
    "resources",
    [["AIP|1||stf_riverbend_nobody"], ["AIP|1||stf_lakeside_baker"], ["AIG|1||team_elsewhere|TEAM"]],
)
def test_unknown_or_another_agencys_staff_are_refused_and_nothing_is_stored(feature, resources):
    reply = msa(send(feature, siu_message("S12", resources=resources)))
    assert reply.code == "AE" and "not in this agency" in reply.text
    assert feature.components.store.db[APPOINTMENTS].count_documents({}) == 0


def test_an_unregistered_facility_is_rejected(feature):
    raw = siu_message().replace(b"|CLINIC_BOARD|RIVERBEND|", b"|CLINIC_BOARD|ELSEWHERE|")
    assert msa(send(feature, raw)).code == "AR"


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


# --- as practice-management systems write them ---------------------------------------------------

# Dr. Reyes by NPI (XCN-13), Dr. Chen by NPI (assigning authority OID only), Kim by directory id.
PROVIDERS = [
    "AIS|1||FOLLOWUP^Follow-up visit^LOCAL|20261202100000|||50|min",
    "AIL|1||OP^Room 2^^RIVERBEND",
    f"AIP|1|A|{REYES}|PRESCRIBER|||20261202100000|||50|min",
    f"AIP|2|A|{CHEN_BY_OID}|PRESCRIBER",
    "AIP|3|A|stf_riverbend_kim^KIM^JORDAN|NURSE",
]


def deleted(resources: list[str]) -> list[str]:
    """The same resources with action code D, as senders write them on a cancellation."""
    return [r.replace("|A|", "|D|", 1) for r in resources]


def test_providers_named_by_npi_are_told_and_their_npis_kept_for_a_bare_cancellation(feature):
    assert msa(send(feature, siu_message("S12", control="C1", resources=PROVIDERS))).code == "AA"
    doc = the_appointment(feature)
    assert doc["npis"] == ["1234567893", "1498263056"] and doc["staff_ids"] == ["stf_riverbend_kim"]
    assert msa(send(feature, siu_message("S15", control="C2", resources=[]))).code == "AA"
    booked, cancelled = deliveries(feature)
    linked = ["stf_riverbend_chen", "stf_riverbend_kim", "stf_riverbend_reyes"]
    assert sorted(booked.recipients.staff_ids) == sorted(cancelled.recipients.staff_ids) == linked
    assert cancelled.status == "cancelled" and not cancelled.withdrawn


@pytest.mark.parametrize(
    ("resources", "location"),
    [
        # Another agency's provider, and a valid NPI nobody here holds.
        ([PROVIDERS[2], "AIP|2|A|1987654328^RAMIREZ^LUIS^^^DR^^^^^^^NPI|PRESCRIBER"], "AIP^2^3"),
        ([PROVIDERS[4], PROVIDERS[2], "AIG|1|A|1245319599^SOMEONE^NPI|STAFF"], "AIG^1^3"),
    ],
)
def test_an_npi_the_agency_does_not_have_is_refused_naming_its_field(feature, resources, location):
    ack = send(feature, siu_message("S12", resources=resources))
    assert msa(ack).code == "AE" and "not in this agency" in msa(ack).text
    assert err(ack)[2] == location and err(ack)[3].startswith("103^")
    assert feature.components.store.db[APPOINTMENTS].count_documents({}) == 0


@pytest.mark.parametrize("trigger", ["S15", "S17"])
def test_a_cancellation_marking_every_resource_deleted_tells_them_all_and_keeps_their_items(feature, trigger):
    assert msa(send(feature, siu_message("S12", control="C1", resources=PROVIDERS))).code == "AA"
    assert msa(send(feature, siu_message(trigger, control="C2", resources=deleted(PROVIDERS)))).code == "AA"
    booked, ended = deliveries(feature)
    assert sorted(ended.recipients.staff_ids) == sorted(booked.recipients.staff_ids)
    assert not ended.withdrawn and ended.mark_unread
    assert ended.status == ("cancelled" if trigger == "S15" else "deleted")
    assert ended.title.startswith(("Appointment cancelled: ", "Appointment removed: "))


def test_an_edit_still_takes_a_resource_marked_deleted_off_the_appointment(feature):
    assert msa(send(feature, siu_message("S12", control="C1", resources=PROVIDERS))).code == "AA"
    chen_off = [*PROVIDERS[:3], PROVIDERS[3].replace("|A|", "|D|"), PROVIDERS[4]]
    assert msa(send(feature, siu_message("S14", control="C2", resources=chen_off))).code == "AA"
    _, edited = deliveries(feature)
    assert sorted(edited.recipients.staff_ids) == ["stf_riverbend_kim", "stf_riverbend_reyes"]


def test_the_operator_who_is_on_the_appointment_keeps_the_item_they_had(feature):
    assert msa(send(feature, siu_message("S12", control="C1", resources=PROVIDERS))).code == "AA"
    # Kim (an AIP resource) reschedules it herself: EVN-5 names her.
    moved = siu_message("S13", control="C2", resources=PROVIDERS, evn_operator="stf_riverbend_kim^KIM^JORDAN",
                        sch11="^^50^20261202140000^20261202145000")  # fmt: skip
    assert msa(send(feature, moved)).code == "AA"
    _, rescheduled = deliveries(feature)
    assert "stf_riverbend_kim" in rescheduled.recipients.staff_ids  # kept: inbox leaves its read state alone
    assert rescheduled.actor_staff_id == "stf_riverbend_kim" and rescheduled.mark_unread
    assert "14:00" in rescheduled.title  # an offset-less time is the agency's (Chicago) time
    assert "stf_riverbend_kim" in the_appointment(feature)["notified_ids"]


def test_an_operator_named_by_npi_is_the_maker(feature):
    assert msa(send(feature, siu_message("S12", control="C1", resources=PROVIDERS))).code == "AA"
    without_chen = [*PROVIDERS[:3], PROVIDERS[4]]
    assert msa(send(feature, siu_message("S14", control="C2", resources=without_chen, evn_operator=REYES))).code == "AA"
    _, edited = deliveries(feature)
    assert edited.actor_staff_id == "stf_riverbend_reyes"
    assert sorted(edited.recipients.staff_ids) == ["stf_riverbend_kim", "stf_riverbend_reyes"]  # Chen is off it now
    assert edited.title.startswith("Appointment updated: Wed 2 Dec 2026, 10:00")


def test_the_operator_who_never_had_the_item_gets_none(feature):
    by_kim = siu_message("S12", control="C1", resources=PROVIDERS, evn_operator="stf_riverbend_kim")
    assert msa(send(feature, by_kim)).code == "AA"
    (booked,) = deliveries(feature)
    assert sorted(booked.recipients.staff_ids) == ["stf_riverbend_chen", "stf_riverbend_reyes"]
