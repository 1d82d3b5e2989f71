"""Schedule Notifications end to end: SIU S12/S13/S14/S15 over MLLP (python-hl7's own MLLPClient,
ACKs read with python-hl7) and FHIR Appointments through the gateway, onto the boards of exactly the
staff linked to the appointment (by directory id or NPI); the one who made the change is never told
of it and keeps the item they already had."""

from __future__ import annotations

import uuid

import hl7
import pytest
import requests
from hl7.client import MLLPClient

from services.inbox.delivery_rules import notice_id
from services.notifications import schedule
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
LAKESIDE = "agy_lakeside"


def siu(trigger: str, appointment: str, *, control: str, start: str = "20261202100000-0600",
        end: str = "20261202105000-0600", facility: str = "RIVERBEND", resources: list[str] | None = None,
        operator: str = "stf_riverbend_davis") -> str:  # fmt: skip
    """A realistic HL7 v2.5.1 SIU message from the practice-management system."""
    resources = (
        [
            "AIS|1||FOLLOWUP^Follow-up visit",
            "AIL|1||OP^Room 2^^RIVERBEND",
            "AIP|1||stf_riverbend_patel^Patel^Priya|THERAPIST",
            "AIP|2||stf_riverbend_kim^Kim^Jordan|NURSE",
            "AIP|3||stf_riverbend_davis^Davis^Jamie|SCHEDULER",
        ]
        if resources is None
        else resources
    )
    segments = [
        f"MSH|^~\\&|PMS|PRACTICE_MGMT|CLINIC_BOARD|{facility}|20261126080000||SIU^{trigger}^SIU_S12|{control}|P|2.5.1",
        f"SCH|PL-{appointment}^PMS|{appointment}^PMS|||||ROUTINE^Routine|FOLLOWUP^Follow-up visit|50|min"
        f"|^^50^{start}^{end}|||||||||{operator}^Entered^By|||||Booked",
        f"EVN|{trigger}|20261126080000|||{operator}",
        "PID|1||MRN48213^^^RIVERBEND^MR||DOE^JANE^Q||19800214|F",
        "RGS|1",
        *resources,
    ]
    return "\r".join(segments) + "\r"


@pytest.fixture(scope="module")
def notifications_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}notifications"]


@pytest.fixture(scope="module")
def mllp(stack):
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        yield client


def ack(client: MLLPClient, message: str) -> hl7.Message:
    raw = client.send_message(message)
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r"), raw
    return hl7.parse(raw[1:-2].decode("ascii"))


def the_item(client, ref_id: str) -> dict | None:
    return next((i for i in client.items(folder="schedule", limit=100)["items"] if i["ref_id"] == ref_id), None)


def hl7_ref(agency_id: str, appointment: str, facility: str = "PRACTICE_MGMT") -> str:
    return notice_id(agency_id, "schedule", schedule.appointment_doc_id(agency_id, f"hl7:{facility}", appointment))


def test_s12_s14_s15_keep_one_item_per_linked_staff_member_unread_again_then_cancelled(mllp, login, kim, admin):
    patel, davis = login("therapist.patel"), login("frontdesk.davis")
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    ref = hl7_ref(RIVERBEND, appointment)

    booked = ack(mllp, siu("S12", appointment, control=f"{appointment}-1"))
    assert str(booked.segment("MSA")(1)) == "AA" and str(booked.segment("MSA")(2)) == f"{appointment}-1"
    first = wait_until(lambda: the_item(patel, ref), timeout=15)
    assert first["title"] == "New appointment: Wed 2 Dec 2026, 10:00–10:50 CST"
    assert first["summary"] == "Follow-up visit · OP Room 2 · Client record MRN48213"
    assert first["status"] == "booked" and not first["read"]
    assert wait_until(lambda: the_item(kim, ref), timeout=15)["title"] == first["title"]
    assert patel.post(f"/api/v1/board/items/{first['id']}/read").status_code in (200, 204)
    assert the_item(patel, ref)["read"]

    moved = ack(mllp, siu("S14", appointment, control=f"{appointment}-2",
                          start="20261202140000-0600", end="20261202145000-0600"))  # fmt: skip
    assert str(moved.segment("MSA")(1)) == "AA"
    rescheduled = wait_until(lambda: (i := the_item(patel, ref)) and i["status"] == "rescheduled" and i, timeout=15)
    assert rescheduled["id"] == first["id"] and not rescheduled["read"]  # the same item, unread again
    assert rescheduled["title"].startswith("Appointment rescheduled: Wed 2 Dec 2026, 14:00–14:50 CST")

    cancelled = ack(mllp, siu("S15", appointment, control=f"{appointment}-3", start="", end="", resources=[]))
    assert str(cancelled.segment("MSA")(1)) == "AA"
    item = wait_until(lambda: (i := the_item(kim, ref)) and i["status"] == "cancelled" and i, timeout=15)
    assert item["title"].startswith("Appointment cancelled: Wed 2 Dec 2026, 14:00")
    assert not item["read"]
    assert len([i for i in patel.items(folder="schedule", limit=100)["items"] if i["ref_id"] == ref]) == 1
    # The scheduler who made every change, and staff not on the appointment, got nothing.
    assert the_item(davis, ref) is None and the_item(admin, ref) is None


def test_staff_taken_off_an_appointment_lose_its_item(mllp, login, kim):
    patel = login("therapist.patel")
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    ref = hl7_ref(RIVERBEND, appointment)
    ack(mllp, siu("S12", appointment, control=f"{appointment}-1"))
    wait_until(lambda: the_item(kim, ref), timeout=15)
    only_patel = ["AIP|1||stf_riverbend_patel^Patel^Priya|THERAPIST", "AIP|2|D|stf_riverbend_kim^Kim^Jordan|NURSE"]
    ack(mllp, siu("S14", appointment, control=f"{appointment}-2", resources=only_patel))
    wait_until(lambda: the_item(kim, ref) is None, timeout=15)
    # One fan-out removes Kim's item, then updates Patel's: the two become visible one after the other.
    wait_until(lambda: the_item(patel, ref)["status"] == "updated", timeout=15)


def test_with_the_agency_option_off_nobody_is_told(mllp, login, notifications_db):
    # Lakeside keeps Notify Linked Staff on Scheduled Event Creation/Edit off (demo data).
    foster = login("nurse.foster")
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    lakeside = ["AIP|1||stf_lakeside_foster^Foster^Kelly|NURSE"]
    reply = ack(mllp, siu("S12", appointment, control=f"{appointment}-1", facility="LAKESIDE", resources=lakeside,
                          operator="stf_lakeside_baker"))  # fmt: skip
    assert str(reply.segment("MSA")(1)) == "AA"
    # A Riverbend appointment sent after it arrives; by then the Lakeside one would have too.
    marker = "APPT-" + uuid.uuid4().hex[:8]
    ack(mllp, siu("S12", marker, control=f"{marker}-1"))
    wait_until(lambda: the_item(login("therapist.patel"), hl7_ref(RIVERBEND, marker)), timeout=15)
    assert the_item(foster, hl7_ref(LAKESIDE, appointment)) is None
    # Recorded (a later edit knows the time it moved from), delivered to nobody.
    stored = notifications_db["appointments"].find_one(
        {"_id": {"$eq": schedule.appointment_doc_id(LAKESIDE, "hl7:PRACTICE_MGMT", appointment)}}
    )
    assert stored["version"] == 1 and stored["notified_ids"] == []


def test_unknown_staff_are_refused_with_ae_and_the_listener_keeps_serving(mllp, login):
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    refused = ack(mllp, siu("S12", appointment, control=f"{appointment}-1",
                            resources=["AIP|1||stf_lakeside_foster^Foster^Kelly|NURSE"]))  # fmt: skip
    assert str(refused.segment("MSA")(1)) == "AE" and str(refused.segment("MSA")(2)) == f"{appointment}-1"
    assert "not in this agency" in str(refused.segment("MSA")(3))
    assert str(refused.segment("ERR")(3)).startswith("103")
    fine = ack(mllp, siu("S12", appointment, control=f"{appointment}-2"))
    assert str(fine.segment("MSA")(1)) == "AA"


# --- as practice-management systems write them: NPIs, several resources, D on a cancel, the operator


def providers(action: str = "A") -> list[str]:
    """Dr. Reyes by NPI (XCN-13), Dr. Chen by NPI (assigning authority OID only), Kim by directory id."""
    return [
        "AIS|1||FOLLOWUP^Follow-up visit^LOCAL",
        f"AIL|1|{action}|OP^Room 2^^RIVERBEND",
        f"AIP|1|{action}|1234567893^REYES^ELENA^^^DR^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI|PRESCRIBER",
        f"AIP|2|{action}|1498263056^CHEN^WEI^^^DR^^^&2.16.840.1.113883.4.6&ISO|PRESCRIBER",
        f"AIP|3|{action}|stf_riverbend_kim^KIM^JORDAN|NURSE",
    ]


def test_providers_named_by_npi_are_told_and_a_cancel_marking_every_resource_deleted_keeps_their_items(
    mllp, reyes, chen, kim
):
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    ref = hl7_ref(RIVERBEND, appointment)
    booked = ack(mllp, siu("S12", appointment, control=f"{appointment}-1", resources=providers()))
    assert str(booked.segment("MSA")(1)) == "AA"
    items = {who.staff_id: wait_until(lambda who=who: the_item(who, ref), timeout=15) for who in (reyes, chen, kim)}
    assert all(i["status"] == "booked" for i in items.values())
    assert reyes.post(f"/api/v1/board/items/{items[reyes.staff_id]['id']}/read").status_code in (200, 204)

    # Senders mark every resource D on a cancellation: those are the staff to tell, not staff taken off.
    cancelled = ack(mllp, siu("S15", appointment, control=f"{appointment}-2", resources=providers("D")))
    assert str(cancelled.segment("MSA")(1)) == "AA"
    for who in (reyes, chen, kim):
        item = wait_until(lambda who=who: (i := the_item(who, ref)) and i["status"] == "cancelled" and i, timeout=15)
        assert item["id"] == items[who.staff_id]["id"] and not item["read"]
        assert item["title"].startswith("Appointment cancelled: Wed 2 Dec 2026, 10:00")


def test_the_operator_on_the_appointment_keeps_the_item_they_had_without_being_told(mllp, login, kim):
    patel = login("therapist.patel")
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    ref = hl7_ref(RIVERBEND, appointment)
    on_it = ["AIP|1||stf_riverbend_patel^PATEL^PRIYA|THERAPIST", "AIP|2||stf_riverbend_kim^KIM^JORDAN|NURSE"]
    ack(mllp, siu("S12", appointment, control=f"{appointment}-1", resources=on_it))
    first = wait_until(lambda: the_item(patel, ref), timeout=15)
    assert patel.post(f"/api/v1/board/items/{first['id']}/read").status_code in (200, 204)
    unread_before = patel.counts("schedule")[0]

    # Patel moves it herself (EVN-5 and SCH-20 name her); times without an offset are Riverbend's (Chicago).
    moved = ack(mllp, siu("S13", appointment, control=f"{appointment}-2", resources=on_it,
                          start="20261202140000", end="20261202145000", operator="stf_riverbend_patel"))  # fmt: skip
    assert str(moved.segment("MSA")(1)) == "AA"
    told = wait_until(lambda: (i := the_item(kim, ref)) and i["status"] == "rescheduled" and i, timeout=15)
    assert told["title"].startswith("Appointment rescheduled: Wed 2 Dec 2026, 14:00–14:50 CST") and not told["read"]
    kept = wait_until(lambda: (i := the_item(patel, ref)) and i["status"] == "rescheduled" and i, timeout=15)
    assert kept["id"] == first["id"] and kept["read"]  # her item, updated, still read: not told of her own change
    assert patel.counts("schedule")[0] == unread_before

    # A new appointment she books for herself and Kim: only Kim gets an item.
    other = "APPT-" + uuid.uuid4().hex[:8]
    other_ref = hl7_ref(RIVERBEND, other)
    ack(mllp, siu("S12", other, control=f"{other}-1", resources=on_it, operator="stf_riverbend_patel"))
    wait_until(lambda: the_item(kim, other_ref), timeout=15)
    assert the_item(patel, other_ref) is None


def test_an_npi_the_agency_does_not_have_is_refused_with_ae_naming_the_field(mllp):
    appointment = "APPT-" + uuid.uuid4().hex[:8]
    lakeside_provider = "AIP|2|A|1987654328^RAMIREZ^LUIS^^^DR^^^^^^^NPI|PRESCRIBER"  # Lakeside's Dr. Ramirez
    refused = ack(mllp, siu("S12", appointment, control=f"{appointment}-1",
                            resources=["AIP|1|A|stf_riverbend_kim^KIM^JORDAN|NURSE", lakeside_provider]))  # fmt: skip
    assert str(refused.segment("MSA")(1)) == "AE"
    assert str(refused.segment("ERR")(2)) == "AIP^2^3" and str(refused.segment("ERR")(3)).startswith("103")
    bad_check_digit = "AIP|1|A|1234567890^REYES^^^^^^^^^^^NPI|PRESCRIBER"
    refused = ack(mllp, siu("S12", appointment, control=f"{appointment}-2", resources=[bad_check_digit]))
    assert str(refused.segment("MSA")(1)) == "AE" and str(refused.segment("ERR")(3)).startswith("102")


def test_an_npi_an_admin_gives_a_staff_member_names_them_in_siu_messages(mllp, login, admin, reyes):
    nguyen = login("therapist.nguyen")
    member = "/api/v1/directory/staff/stf_riverbend_nguyen"
    invalid = admin.patch(member, json={"npi": "1245319590"})
    assert invalid.status_code == 400 and invalid.json()["code"] == "invalid_npi"
    taken = admin.patch(member, json={"npi": "1234567893"})  # Dr. Reyes's
    assert taken.status_code == 409 and taken.json()["code"] == "npi_taken"
    assert reyes.patch(member, json={"npi": "1245319599"}).status_code == 403
    given = admin.patch(member, json={"npi": "1245319599"})
    assert given.status_code == 200 and given.json()["npi"] == "1245319599"
    try:
        assert nguyen.get(member).json()["npi"] == "1245319599"
        appointment = "APPT-" + uuid.uuid4().hex[:8]
        by_npi = ["AIP|1|A|1245319599^NGUYEN^MINH^^^^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI|THERAPIST"]
        reply = ack(mllp, siu("S12", appointment, control=f"{appointment}-1", resources=by_npi))
        assert str(reply.segment("MSA")(1)) == "AA"
        assert wait_until(lambda: the_item(nguyen, hl7_ref(RIVERBEND, appointment)), timeout=15)["status"] == "booked"
    finally:
        assert admin.patch(member, json={"npi": ""}).status_code == 200


# --- FHIR Appointment through the gateway ---------------------------------------------------------


def appointment_resource(appointment: str, **changes) -> dict:
    body = {
        "resourceType": "Appointment",
        "id": appointment,
        "status": "booked",
        "start": "2026-12-03T09:00:00-06:00",
        "end": "2026-12-03T09:30:00-06:00",
        "appointmentType": {"text": "Intake assessment"},
        "participant": [
            {"actor": {"reference": "Practitioner/stf_riverbend_patel"}, "status": "accepted"},
            {"actor": {"reference": "CareTeam/team_riverbend_intake"}, "status": "accepted"},
            {"actor": {"reference": "Patient/MRN777"}, "status": "accepted"},
        ],
        "extension": [
            {
                "url": "https://clinic-board.example/fhir/StructureDefinition/changed-by",
                "valueReference": {"reference": "Practitioner/stf_riverbend_wilson"},
            }
        ],
    }
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def practice_management(stack):
    session = requests.Session()
    session.headers["apikey"] = stack.practice_management_api_key
    base = f"{stack.gateway_url}/api/v1/partner/schedule"
    return lambda agency, appointment, **kw: session.put(f"{base}/{agency}/Appointment/{appointment}", **kw)


def fhir_ref(agency_id: str, appointment: str) -> str:
    return notice_id(agency_id, "schedule", schedule.appointment_doc_id(agency_id, "fhir:practice-management",
                                                                        appointment))  # fmt: skip


def test_a_fhir_appointment_reaches_linked_staff_and_team_members_but_not_its_maker(practice_management, login):
    patel, thompson, wilson = login("therapist.patel"), login("intake.thompson"), login("intake.wilson")
    appointment = "fhir-" + uuid.uuid4().hex[:8]
    reply = practice_management(RIVERBEND, appointment, json=appointment_resource(appointment))
    assert reply.status_code == 201, reply.text
    assert reply.json()["status"] == "booked" and "stf_riverbend_wilson" not in reply.json()["notified_staff_ids"]
    ref = fhir_ref(RIVERBEND, appointment)
    item = wait_until(lambda: the_item(thompson, ref), timeout=15)  # a member of the intake team
    assert item["title"] == "New appointment: Thu 3 Dec 2026, 09:00–09:30 CST"
    wait_until(lambda: the_item(patel, ref), timeout=15)  # the fan-out writes one item after another
    assert the_item(wilson, ref) is None

    again = practice_management(RIVERBEND, appointment, json=appointment_resource(appointment))
    assert again.status_code == 200 and again.json()["version"] == 1
    noshow = practice_management(RIVERBEND, appointment, json=appointment_resource(appointment, status="noshow"))
    assert noshow.status_code == 200 and noshow.json()["status"] == "no_show"
    assert wait_until(lambda: (i := the_item(thompson, ref)) and i["status"] == "no_show" and i, timeout=15)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        ({"resourceType": "Appointment", "id": "X", "status": 7}, 400, "invalid_type"),
        ({"resourceType": "Appointment", "id": {"$gt": ""}, "status": "booked"}, 400, "invalid_type"),
        ({"resourceType": "Appointment", "id": "X", "status": {"$gt": ""}}, 400, "invalid_type"),
        ({"resourceType": "Appointment", "id": "X", "status": "booked",
          "participant": [{"actor": {"reference": "Practitioner/stf_unknown"}}]}, 400, "unknown_staff"),
        ({"resourceType": "Appointment", "id": "X", "status": "booked",
          "participant": [{"actor": {"reference": "Practitioner/stf_lakeside_foster"}}]}, 400, "unknown_staff"),
        ({"resourceType": "Appointment", "id": "Y", "status": "booked"}, 400, "id_mismatch"),
    ],
)  # fmt: skip
def test_bad_appointments_are_refused_with_stable_codes_and_nothing_stored(
    practice_management, notifications_db, body, status, code
):
    kwargs = (
        {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    )
    reply = practice_management(RIVERBEND, "X", **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["code"] == code
    stored = notifications_db["appointments"]
    assert (
        stored.find_one({"_id": {"$eq": schedule.appointment_doc_id(RIVERBEND, "fhir:practice-management", "X")}})
        is None
    )


def test_partner_routes_need_the_practice_management_key_and_its_own_agencies(stack, practice_management):
    base = f"{stack.gateway_url}/api/v1/partner/schedule/{RIVERBEND}/Appointment/z1"
    assert requests.put(base, json=appointment_resource("z1"), timeout=10).status_code == 401
    lab_key = {"apikey": stack.lab_interface_api_key}
    assert requests.put(base, json=appointment_resource("z1"), headers=lab_key, timeout=10).status_code == 403
    malformed_id = practice_management(RIVERBEND, "bad%20id", json=appointment_resource("bad id"))
    assert malformed_id.status_code == 404 and malformed_id.json()["code"] == "not_found"
    elsewhere = practice_management("agy_elsewhere", "z1", json=appointment_resource("z1"))
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "agency_not_found"
