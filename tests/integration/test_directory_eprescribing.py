"""ePrescribing in the directory: the agency's subscription, vendor and clinic id, each prescriber's
clinician id at the vendor, and who has ePrescribing (their flag, and their agency subscribes) in
every view and answer."""

from __future__ import annotations

import grpc
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import demo
from tests.helpers import auth

AGENCY = "/api/v1/directory/agency"
ME = "/api/v1/directory/me"
STAFF = "/api/v1/directory/staff"
REYES = f"{STAFF}/stf_riverbend_reyes"
KIM = f"{STAFF}/stf_riverbend_kim"
RAMIREZ = f"{STAFF}/stf_lakeside_ramirez"
RIVERBEND_PRESCRIBERS = ["stf_riverbend_brooks", "stf_riverbend_chen", "stf_riverbend_reyes"]
NEW_STAFF = {
    "username": "np.rivera",
    "display_name": "Sol Rivera, NP",
    "password": "long-enough-password",
    "roles": ["staff", "prescriber"],
    "eprescribing_enabled": True,
}


@pytest.fixture
def admin(dut):
    return dut.as_user("admin")


@pytest.fixture
def lakeside_admin(dut):
    return dut.as_user("lakeside.admin")


@pytest.fixture
def stub(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


def staff_of(stub, token: str, *staff_ids: str) -> dict[str, directory_pb2.Staff]:
    reply = stub.GetStaff(directory_pb2.GetStaffRequest(staff_ids=list(staff_ids)), metadata=auth(token), timeout=5)
    return {member.staff_id: member for member in reply.staff}


def eprescribers(stub, token: str) -> list[str]:
    reply = stub.ListStaff(directory_pb2.ListStaffRequest(eprescribing_only=True), metadata=auth(token), timeout=5)
    assert all(member.eprescribing_enabled and member.active for member in reply.staff)
    return [member.staff_id for member in reply.staff]


def settings_of(stub, token: str) -> directory_pb2.GetAgencySettingsResponse:
    return stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=auth(token), timeout=5)


def options(dut, headers) -> dict:
    return dut.client.get(AGENCY, headers=headers).get_json()["options"]


# --- demo data -----------------------------------------------------------------------------------


def test_riverbend_subscribes_and_lakeside_does_not(dut, stub):
    riverbend = settings_of(stub, dut.token("dr.reyes"))
    assert (riverbend.erx_subscription, riverbend.erx_vendor, riverbend.erx_clinic_id) == (True, "dosespot", "1001")
    lakeside = settings_of(stub, dut.token("dr.ramirez"))
    assert (lakeside.erx_subscription, lakeside.erx_vendor, lakeside.erx_clinic_id) == (False, "", "")


def test_riverbends_prescribers_have_eprescribing_with_their_clinician_ids(dut, stub):
    token = dut.token("admin")
    assert eprescribers(stub, token) == RIVERBEND_PRESCRIBERS
    found = staff_of(stub, token, *RIVERBEND_PRESCRIBERS, "stf_riverbend_kim")
    assert {s: found[s].erx_clinician_id for s in RIVERBEND_PRESCRIBERS} == {
        "stf_riverbend_reyes": "2001",
        "stf_riverbend_chen": "2002",
        "stf_riverbend_brooks": "2003",
    }
    assert all(found[s].eprescribing_enabled for s in RIVERBEND_PRESCRIBERS)
    kim = found["stf_riverbend_kim"]
    assert not kim.eprescribing_enabled and kim.erx_clinician_id == ""
    # A prescriber's own token reads their own clinician id (erx-bridge signs them in with it), not a
    # colleague's: like the HTTP directory, that is for admins (and services).
    own = staff_of(stub, dut.token("dr.reyes"), "stf_riverbend_reyes", "stf_riverbend_chen")
    assert own["stf_riverbend_reyes"].erx_clinician_id == "2001" and own["stf_riverbend_chen"].erx_clinician_id == ""
    assert own["stf_riverbend_chen"].eprescribing_enabled
    me = dut.client.get(ME, headers=dut.as_user("dr.reyes")).get_json()
    assert me["eprescribing_enabled"] is True
    assert dut.client.get(ME, headers=dut.as_user("nurse.kim")).get_json()["eprescribing_enabled"] is False


def test_a_flagged_prescriber_of_an_agency_without_a_subscription_has_no_eprescribing(dut, stub, lakeside_admin):
    token = dut.token("dr.ramirez")
    me = dut.client.get(ME, headers=auth(token)).get_json()
    assert me["eprescribing_enabled"] is False
    assert staff_of(stub, token, "stf_lakeside_ramirez")["stf_lakeside_ramirez"].eprescribing_enabled is False
    assert eprescribers(stub, token) == []
    # The flag itself is kept: admins see it, and it counts once the agency subscribes.
    seen = dut.client.get(RAMIREZ, headers=lakeside_admin).get_json()
    assert seen["eprescribing_enabled"] is False and seen["eprescribing_flag"] is True
    assert dut.store.get_staff("agy_lakeside", "stf_lakeside_ramirez").eprescribing_enabled is True


# --- who sees what ---------------------------------------------------------------------------------


def test_only_admins_see_the_stored_flag_the_clinician_id_and_the_clinic_id(dut, admin):
    reyes = dut.as_user("dr.reyes")
    for view in (
        dut.client.get(ME, headers=reyes).get_json(),
        dut.client.get(KIM, headers=reyes).get_json(),
        *dut.client.get(STAFF, headers=reyes).get_json()["staff"],
    ):
        assert "eprescribing_flag" not in view and "erx_clinician_id" not in view
    assert "erx_clinic_id" not in options(dut, reyes)
    assert options(dut, reyes)["erx_subscription"] is True and options(dut, reyes)["erx_vendor"] == "dosespot"

    seen = dut.client.get(REYES, headers=admin).get_json()
    assert (seen["eprescribing_enabled"], seen["eprescribing_flag"], seen["erx_clinician_id"]) == (True, True, "2001")
    listed = {m["id"]: m for m in dut.client.get(STAFF, headers=admin).get_json()["staff"]}
    assert listed["stf_riverbend_chen"]["erx_clinician_id"] == "2002"
    assert listed["stf_riverbend_kim"]["eprescribing_flag"] is False
    assert options(dut, admin)["erx_clinic_id"] == "1001"


# --- clinician ids -------------------------------------------------------------------------------


def test_admin_sets_changes_and_clears_a_clinician_id(dut, admin, stub):
    created = dut.client.post(STAFF, json={**NEW_STAFF, "erx_clinician_id": " 3001 "}, headers=admin)
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["erx_clinician_id"] == "3001" and body["eprescribing_enabled"] is True
    path = f"{STAFF}/{body['id']}"
    token = dut.token("admin")
    assert staff_of(stub, token, body["id"])[body["id"]].erx_clinician_id == "3001"
    assert body["id"] in eprescribers(stub, token)

    changed = dut.client.patch(path, json={"erx_clinician_id": "ds-3001_b"}, headers=admin)
    assert changed.status_code == 200 and changed.get_json()["erx_clinician_id"] == "ds-3001_b"
    renamed = dut.client.patch(path, json={"display_name": "Sol Rivera, FNP"}, headers=admin)
    assert renamed.get_json()["erx_clinician_id"] == "ds-3001_b"  # other edits leave it alone
    cleared = dut.client.patch(path, json={"erx_clinician_id": ""}, headers=admin)
    assert cleared.status_code == 200 and cleared.get_json()["erx_clinician_id"] == ""
    assert staff_of(stub, token, body["id"])[body["id"]].erx_clinician_id == ""
    assert dut.store.get_staff("agy_riverbend", body["id"]).erx_clinician_id == ""


def test_admin_turns_a_members_eprescribing_on_and_off(dut, admin, stub):
    token = dut.token("dr.reyes")
    given = dut.client.patch(KIM, json={"eprescribing_enabled": True, "erx_clinician_id": "2010"}, headers=admin)
    assert given.status_code == 200
    assert given.get_json()["eprescribing_enabled"] is True and given.get_json()["eprescribing_flag"] is True
    assert "stf_riverbend_kim" in eprescribers(stub, token)
    taken = dut.client.patch(KIM, json={"eprescribing_enabled": False}, headers=admin)
    assert taken.get_json()["eprescribing_enabled"] is False and taken.get_json()["erx_clinician_id"] == "2010"
    assert "stf_riverbend_kim" not in eprescribers(stub, token)
    assert staff_of(stub, token, "stf_riverbend_kim")["stf_riverbend_kim"].eprescribing_enabled is False


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("a" * 65, "invalid_erx_clinician_id"),
        ("20 01", "invalid_erx_clinician_id"),
        ("../2001", "invalid_erx_clinician_id"),
        ("2001;drop", "invalid_erx_clinician_id"),
        ("clínico", "invalid_erx_clinician_id"),
        ("x" * 201, "too_long"),
        (2001, "invalid_type"),
        ({"$gt": ""}, "invalid_type"),
    ],
)
def test_a_malformed_clinician_id_is_refused(dut, admin, value, code):
    changed = dut.client.patch(REYES, json={"erx_clinician_id": value}, headers=admin)
    assert changed.status_code == 400 and changed.get_json()["code"] == code
    created = dut.client.post(STAFF, json={**NEW_STAFF, "erx_clinician_id": value}, headers=admin)
    assert created.status_code == 400 and created.get_json()["code"] == code
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_reyes").erx_clinician_id == "2001"
    assert dut.store.credentials("np.rivera") is None


def test_only_admins_set_clinician_ids_and_flags(dut):
    reyes = dut.as_user("dr.reyes")
    for change in ({"erx_clinician_id": "9999"}, {"eprescribing_enabled": True}):
        response = dut.client.patch(KIM, json=change, headers=reyes)
        assert response.status_code == 403 and response.get_json()["code"] == "forbidden"
    kim = dut.store.get_staff("agy_riverbend", "stf_riverbend_kim")
    assert kim.erx_clinician_id == "" and kim.eprescribing_enabled is False


# --- the agency's subscription -----------------------------------------------------------------------


def test_admins_set_the_subscription_vendor_and_clinic_id(dut, stub, lakeside_admin):
    change = {"options": {"erx_subscription": True, "erx_vendor": "dosespot", "erx_clinic_id": " 1002 "}}
    changed = dut.client.patch(AGENCY, json=change, headers=lakeside_admin)
    assert changed.status_code == 200, changed.get_json()
    assert {k: changed.get_json()["options"][k] for k in ("erx_subscription", "erx_vendor", "erx_clinic_id")} == {
        "erx_subscription": True,
        "erx_vendor": "dosespot",
        "erx_clinic_id": "1002",
    }
    token = dut.token("dr.ramirez")
    lakeside = settings_of(stub, token)
    assert (lakeside.erx_subscription, lakeside.erx_vendor, lakeside.erx_clinic_id) == (True, "dosespot", "1002")
    # Ramirez's flag counts now that Lakeside subscribes.
    assert dut.client.get(ME, headers=auth(token)).get_json()["eprescribing_enabled"] is True
    assert staff_of(stub, token, "stf_lakeside_ramirez")["stf_lakeside_ramirez"].eprescribing_enabled is True
    assert eprescribers(stub, token) == ["stf_lakeside_ramirez"]

    cleared = dut.client.patch(
        AGENCY, json={"options": {"erx_vendor": "", "erx_clinic_id": ""}}, headers=lakeside_admin
    )
    assert cleared.status_code == 200
    assert (cleared.get_json()["options"]["erx_vendor"], cleared.get_json()["options"]["erx_clinic_id"]) == ("", "")
    riverbend = settings_of(stub, dut.token("dr.reyes"))
    assert (riverbend.erx_vendor, riverbend.erx_clinic_id) == ("dosespot", "1001")  # another agency's untouched


def test_an_agency_that_stops_subscribing_takes_eprescribing_from_all_its_staff(dut, admin, stub):
    assert dut.client.patch(AGENCY, json={"options": {"erx_subscription": False}}, headers=admin).status_code == 200
    token = dut.token("dr.reyes")
    assert eprescribers(stub, token) == []
    found = staff_of(stub, token, *RIVERBEND_PRESCRIBERS)
    assert not any(member.eprescribing_enabled for member in found.values())
    assert found["stf_riverbend_reyes"].erx_clinician_id == "2001"  # kept for when it subscribes again
    assert dut.client.get(ME, headers=auth(token)).get_json()["eprescribing_enabled"] is False
    assert not any(m["eprescribing_enabled"] for m in dut.client.get(STAFF, headers=auth(token)).get_json()["staff"])
    assert dut.client.get(REYES, headers=admin).get_json()["eprescribing_flag"] is True
    assert settings_of(stub, token).erx_vendor == "dosespot"  # the rest of the configuration stays

    assert dut.client.patch(AGENCY, json={"options": {"erx_subscription": True}}, headers=admin).status_code == 200
    assert eprescribers(stub, token) == RIVERBEND_PRESCRIBERS


def test_a_deactivated_prescriber_has_no_eprescribing(dut, admin, stub):
    chen = f"{STAFF}/stf_riverbend_chen"
    assert dut.client.patch(chen, json={"active": False}, headers=admin).status_code == 200
    token = dut.token("dr.reyes")
    assert eprescribers(stub, token) == ["stf_riverbend_brooks", "stf_riverbend_reyes"]
    member = staff_of(stub, token, "stf_riverbend_chen")["stf_riverbend_chen"]
    assert member.active is False and member.eprescribing_enabled is False
    assert dut.client.get(chen, headers=admin).get_json()["eprescribing_flag"] is True


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"erx_vendor": "surescripts"}, "invalid_erx_vendor"),
        ({"erx_vendor": "DoseSpot"}, "invalid_erx_vendor"),
        ({"erx_vendor": "x" * 65}, "too_long"),
        ({"erx_vendor": 1}, "invalid_type"),
        ({"erx_clinic_id": "10 01"}, "invalid_erx_clinic_id"),
        ({"erx_clinic_id": "a" * 65}, "invalid_erx_clinic_id"),
        ({"erx_clinic_id": {"$ne": ""}}, "invalid_type"),
        ({"erx_subscription": "yes"}, "invalid_type"),
        ({"erx_clinic_key": "secret"}, "unknown_field"),  # the clinic key is erx-bridge's, never directory's
    ],
)
def test_agency_erx_options_are_validated(dut, admin, change, code):
    # A valid option in the same request is not applied either.
    response = dut.client.patch(AGENCY, json={"options": {"erx_subscription": False, **change}}, headers=admin)
    assert response.status_code == 400 and response.get_json()["code"] == code
    agency = dut.store.get_agency("agy_riverbend")
    assert (agency.erx_subscription, agency.erx_vendor, agency.erx_clinic_id) == (True, "dosespot", "1001")


def test_only_admins_change_the_subscription(dut):
    reyes = dut.as_user("dr.reyes")
    response = dut.client.patch(AGENCY, json={"options": {"erx_subscription": False}}, headers=reyes)
    assert response.status_code == 403
    assert dut.store.get_agency("agy_riverbend").erx_subscription is True


# --- databases seeded before these fields existed -------------------------------------------------------


def test_seeding_fills_the_erx_fields_of_demo_records_seeded_before_them(dut, admin):
    """Demo records written by an older version lack the fields; seeding again gives them their demo
    values, but never overwrites what an admin has set since."""
    dut.store.agencies.update_many({}, {"$unset": {"erx_subscription": "", "erx_vendor": "", "erx_clinic_id": ""}})
    dut.store.staff.update_many({}, {"$unset": {"erx_clinician_id": ""}})
    assert dut.store.get_agency("agy_riverbend").erx_subscription is False  # absent reads as off
    assert dut.client.get(ME, headers=dut.as_user("dr.reyes")).get_json()["eprescribing_enabled"] is False
    # An admin sets Brooks's id before the next seeding: that value stays.
    brooks = f"{STAFF}/stf_riverbend_brooks"
    assert dut.client.patch(brooks, json={"erx_clinician_id": "7777"}, headers=admin).status_code == 200

    assert demo.seed(dut.store, dut.directory.hasher).created == 0
    riverbend = dut.store.get_agency("agy_riverbend")
    assert (riverbend.erx_subscription, riverbend.erx_vendor, riverbend.erx_clinic_id) == (True, "dosespot", "1001")
    assert dut.store.get_agency("agy_lakeside").erx_subscription is False
    assert "erx_subscription" in dut.store.agencies.find_one({"_id": {"$eq": "agy_lakeside"}})
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_reyes").erx_clinician_id == "2001"
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_brooks").erx_clinician_id == "7777"
    assert dut.client.get(ME, headers=dut.as_user("dr.reyes")).get_json()["eprescribing_enabled"] is True

    # Later edits are never undone by seeding again.
    assert dut.client.patch(AGENCY, json={"options": {"erx_subscription": False}}, headers=admin).status_code == 200
    assert dut.client.patch(REYES, json={"erx_clinician_id": ""}, headers=admin).status_code == 200
    demo.seed(dut.store, dut.directory.hasher)
    assert dut.store.get_agency("agy_riverbend").erx_subscription is False
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_reyes").erx_clinician_id == ""
