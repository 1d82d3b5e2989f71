"""The staff directory and its administration over HTTP: roles, agency isolation, validation."""

from __future__ import annotations

import json

import grpc
import jwt
import pytest
from pymongo.errors import DuplicateKeyError

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.kit import gateway_identity
from services.kit.auth import Identity
from services.kit.mongo import now_ms
from services.kit.outbox import OUTBOX
from services.kit.service_identity import acting_as
from services.notifications.directory_client import DirectoryClient
from tests.helpers import auth
from tests.integration.test_directory_auth import Recorder
from tests.waits import wait_until

ADMIN = "/api/v1/directory/staff/stf_riverbend_admin"
ORTIZ = "/api/v1/directory/staff/stf_riverbend_ortiz"
KIM = "/api/v1/directory/staff/stf_riverbend_kim"


@pytest.fixture
def admin(dut):
    return dut.as_user("admin")


@pytest.fixture
def clinician(dut):
    return dut.as_user("dr.reyes")


NEW_STAFF = {
    "username": "Therapist.Quinn",
    "display_name": "Avery Quinn, LCSW",
    "email": "avery.quinn@riverbend.example",
    "password": "long-enough-password",
    "roles": ["staff"],
    "lab_result_notification": True,
}

ADMIN_ONLY = [
    ("post", "/api/v1/directory/staff", NEW_STAFF),
    ("patch", "/api/v1/directory/staff/stf_riverbend_kim", {"display_name": "Someone"}),
    ("post", "/api/v1/directory/teams", {"name": "Night Shift", "member_ids": []}),
    ("patch", "/api/v1/directory/teams/team_riverbend_intake", {"name": "Renamed"}),
    ("delete", "/api/v1/directory/teams/team_riverbend_intake", None),
    ("patch", "/api/v1/directory/agency", {"name": "Taken Over"}),
    ("get", "/api/v1/directory/patients", None),
    ("get", "/api/v1/directory/patients/pat_riverbend_demo", None),
    ("post", "/api/v1/directory/patients", {"portal_user_id": "p1", "display_name": "A Person"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ONLY)
def test_administration_needs_the_admin_role(dut, clinician, method, path, body):
    response = getattr(dut.client, method)(path, json=body, headers=clinician)
    assert response.status_code == 403
    assert response.get_json()["code"] == "forbidden"


def test_directory_endpoints_need_a_token(dut):
    response = dut.client.get("/api/v1/directory/staff")
    assert response.status_code == 401
    assert response.get_json()["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_me_describes_the_caller_with_their_teams(dut, clinician):
    body = dut.client.get("/api/v1/directory/me", headers=clinician).get_json()
    assert body["id"] == "stf_riverbend_reyes"
    assert body["username"] == "dr.reyes"
    assert body["eprescribing_enabled"] is True and body["lab_result_notification"] is True
    assert body["team_ids"] == ["team_riverbend_medical"]
    assert "password_hash" not in body


def test_staff_list_holds_only_the_callers_agency_without_secrets(dut, clinician):
    staff = dut.client.get("/api/v1/directory/staff", headers=clinician).get_json()["staff"]
    assert len(staff) == 20
    assert {member["agency_id"] for member in staff} == {"agy_riverbend"}
    names = [member["display_name"] for member in staff]
    assert names == sorted(names, key=str.casefold)
    young = next(member for member in staff if member["id"] == "stf_riverbend_young")
    assert young["active"] is False
    assert not any("password" in key or key == "username" for member in staff for key in member)


def test_teams_list_holds_the_agencys_teams(dut, clinician):
    teams = dut.client.get("/api/v1/directory/teams", headers=clinician).get_json()["teams"]
    assert [team["name"] for team in teams] == ["Intake", "Medical", "Outpatient Therapy"]
    medical = next(team for team in teams if team["id"] == "team_riverbend_medical")
    assert "stf_riverbend_reyes" in medical["member_ids"]


def test_admin_creates_staff_who_can_then_sign_in(dut, admin):
    response = dut.client.post("/api/v1/directory/staff", json=NEW_STAFF, headers=admin)
    assert response.status_code == 201
    created = response.get_json()
    assert created["id"].startswith("stf_")
    assert created["username"] == "therapist.quinn"
    assert created["roles"] == ["staff"]
    assert created["agency_id"] == "agy_riverbend"
    assert response.headers["Location"] == f"/api/v1/directory/staff/{created['id']}"
    signed_in = dut.sign_in("therapist.quinn", NEW_STAFF["password"])
    assert signed_in.status_code == 200
    assert signed_in.get_json()["staff"]["id"] == created["id"]
    raw = dut.store.staff.find_one({"_id": {"$eq": created["id"]}})
    assert raw["password_hash"].startswith("$argon2id$")
    assert NEW_STAFF["password"] not in json.dumps(raw, default=str)


def test_usernames_are_unique_regardless_of_case_across_agencies(dut):
    lakeside_admin = dut.as_user("lakeside.admin")
    response = dut.client.post(
        "/api/v1/directory/staff", json={**NEW_STAFF, "username": "DR.REYES"}, headers=lakeside_admin
    )
    assert response.status_code == 409
    assert response.get_json()["code"] == "username_taken"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"password": "too-short"}, "weak_password"),
        ({"roles": ["staff", "superuser"]}, "unknown_role"),
        ({"username": "x"}, "invalid_username"),
        ({"username": "has space"}, "invalid_username"),
        ({"email": "not-an-address"}, "invalid_email"),
        ({"roles": "admin"}, "invalid_type"),
        ({"lab_result_notification": "yes"}, "invalid_type"),
        ({"display_name": ""}, "invalid_value"),
        ({"agency_id": "agy_lakeside"}, "unknown_field"),
    ],
)
def test_new_staff_is_validated(dut, admin, change, code):
    response = dut.client.post("/api/v1/directory/staff", json={**NEW_STAFF, **change}, headers=admin)
    assert response.status_code == 400
    assert response.get_json()["code"] == code


def test_roles_always_include_staff(dut, admin):
    body = {**NEW_STAFF, "roles": ["compliance_officer"]}
    created = dut.client.post("/api/v1/directory/staff", json=body, headers=admin).get_json()
    assert created["roles"] == ["staff", "compliance_officer"]


def test_admin_updates_staff_flags_and_roles(dut, admin):
    response = dut.client.patch(
        "/api/v1/directory/staff/stf_riverbend_kim",
        json={"eprescribing_enabled": True, "roles": ["staff", "prescriber"], "display_name": "Jordan Kim, NP"},
        headers=admin,
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["eprescribing_enabled"] is True
    assert body["lab_result_notification"] is True
    assert body["roles"] == ["staff", "prescriber"]
    assert body["team_ids"] == ["team_riverbend_medical"]
    again = dut.client.get("/api/v1/directory/staff/stf_riverbend_kim", headers=admin).get_json()
    assert again["display_name"] == "Jordan Kim, NP" and again["eprescribing_enabled"] is True


def test_a_reactivated_staff_member_can_sign_in_again(dut, admin):
    assert dut.sign_in("former.young").status_code == 401
    response = dut.client.patch("/api/v1/directory/staff/stf_riverbend_young", json={"active": True}, headers=admin)
    assert response.get_json()["active"] is True
    assert dut.sign_in("former.young").status_code == 200


def test_the_last_active_admin_cannot_be_removed(dut, admin):
    for change in ({"active": False}, {"roles": ["staff"]}):
        response = dut.client.patch("/api/v1/directory/staff/stf_riverbend_admin", json=change, headers=admin)
        assert response.status_code == 409
        assert response.get_json()["code"] == "last_admin"


def test_a_demoted_admin_loses_admin_rights_at_once(dut, admin):
    dut.client.patch("/api/v1/directory/staff/stf_riverbend_ortiz", json={"roles": ["staff", "admin"]}, headers=admin)
    ortiz = dut.as_user("compliance.ortiz")
    demoted = dut.client.patch("/api/v1/directory/staff/stf_riverbend_admin", json={"roles": ["staff"]}, headers=ortiz)
    assert demoted.status_code == 200
    # The old admin still holds a token that says "admin": its session has ended.
    response = dut.client.patch("/api/v1/directory/agency", json={"name": "Mine Now"}, headers=admin)
    assert response.status_code == 401 and response.get_json()["code"] == "session_revoked"
    # Signed in again, they are staff only.
    again = dut.client.patch("/api/v1/directory/agency", json={"name": "Mine Now"}, headers=dut.as_user("admin"))
    assert again.status_code == 403 and again.get_json()["code"] == "forbidden"


def test_removing_a_role_ends_the_members_sessions_and_announces_it(dut, admin):
    dut.client.patch(ORTIZ, json={"roles": ["staff", "admin"]}, headers=admin)
    grant = dut.sign_in("compliance.ortiz").get_json()
    sid = jwt.decode(grant["access_token"], options={"verify_signature": False})["sid"]
    kim = dut.sign_in("nurse.kim").get_json()

    assert dut.client.patch(ORTIZ, json={"roles": ["staff"]}, headers=admin).status_code == 200

    session = dut.store.sessions.find_one({"_id": sid})
    assert session["revoked_reason"] == "roles_changed" and list(session[OUTBOX]) == [f"{sid}-revoked"]
    recorded = list(dut.store.db["security_outbox"].find({"kind": {"$eq": "session_revoked"}}))
    assert len(recorded) == 1  # the admin's act is a security event naming the member, not the session
    assert recorded[0]["agency_id"] == "agy_riverbend"
    refreshed = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert refreshed.status_code == 401
    # A role added, or other changes, end nothing.
    kim_sid = jwt.decode(kim["access_token"], options={"verify_signature": False})["sid"]
    dut.client.patch(KIM, json={"roles": ["staff", "prescriber"]}, headers=admin)
    dut.client.patch(KIM, json={"display_name": "J. Kim"}, headers=admin)
    assert not dut.store.is_session_revoked(kim_sid)
    again = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": kim["refresh_token"]}).get_json()
    assert again["staff"]["roles"] == ["staff", "prescriber"]  # the new role, from the next refresh on


def test_admin_checks_trust_the_token_and_read_no_staff_record(dut, admin):
    recorder = Recorder(dut.store.staff)
    dut.store.staff = recorder
    assert dut.client.get("/api/v1/directory/patients", headers=admin).status_code == 200
    assert dut.client.patch("/api/v1/directory/agency", json={"name": "Riverbend BH"}, headers=admin).status_code == 200
    assert recorder.calls == []


def test_admins_demoting_each_other_at_once_leave_one_admin(dut, admin, monkeypatch):
    dut.client.patch(ORTIZ, json={"roles": ["staff", "admin"]}, headers=admin)
    ortiz = dut.as_user("compliance.ortiz")
    save_staff = dut.store.save_staff
    other = []

    def save_after_the_other_demotion(member, password_hash=None):
        if not other:  # the other admin's request lands between this one's checks and its write
            other.append(None)
            other[0] = dut.client.patch(ADMIN, json={"roles": ["staff"]}, headers=ortiz)
        return save_staff(member, password_hash)

    monkeypatch.setattr(dut.store, "save_staff", save_after_the_other_demotion)
    response = dut.client.patch(ORTIZ, json={"roles": ["staff"]}, headers=admin)

    assert other[0].status_code == 200
    assert response.status_code == 409 and response.get_json()["code"] == "last_admin"
    admins = [m.id for m in dut.store.list_staff("agy_riverbend") if m.counts_as_admin]
    assert admins == ["stf_riverbend_ortiz"]
    assert dut.store.active_admins("agy_riverbend") == 1


def test_the_active_admin_count_follows_every_change(dut, admin):
    def count() -> int:
        return dut.store.active_admins("agy_riverbend")

    assert (count(), dut.store.active_admins("agy_lakeside")) == (1, 1)
    body = {**NEW_STAFF, "roles": ["admin"]}
    created = dut.client.post("/api/v1/directory/staff", json=body, headers=admin).get_json()
    assert count() == 2
    dut.client.post(
        "/api/v1/directory/staff", json={**body, "username": "inactive.admin", "active": False}, headers=admin
    )
    assert count() == 2
    path = f"/api/v1/directory/staff/{created['id']}"
    for change, expected in [
        ({"active": False}, 1),
        ({"active": False, "display_name": "Edited While Inactive"}, 1),
        ({"active": True}, 2),
        ({"display_name": "Still An Admin"}, 2),
        ({"roles": ["staff"]}, 1),
        ({"roles": ["staff"]}, 1),
        ({"roles": ["staff", "admin"]}, 2),
        ({"roles": ["staff"], "active": False}, 1),
    ]:
        assert dut.client.patch(path, json=change, headers=admin).status_code == 200, change
        assert count() == expected, change
    for change in ({"active": False}, {"roles": ["staff"]}):
        assert dut.client.patch(ADMIN, json=change, headers=admin).get_json()["code"] == "last_admin"
    assert count() == 1


def test_agencies_stored_before_the_counter_get_it_at_start(dut, admin):
    dut.client.patch(ORTIZ, json={"roles": ["staff", "admin"]}, headers=admin)
    dut.client.patch(KIM, json={"roles": ["staff", "admin"]}, headers=admin)
    dut.client.patch(KIM, json={"active": False}, headers=admin)
    dut.store.agencies.update_many({}, {"$unset": {"active_admins": ""}})
    dut.store.staff.update_many({}, {"$unset": {"admin_counted": ""}})

    dut.store.ensure_indexes()

    assert dut.store.active_admins("agy_riverbend") == 2  # admin and ortiz; kim is inactive
    assert dut.store.active_admins("agy_lakeside") == 1
    flags = {doc["_id"]: doc["admin_counted"] for doc in dut.store.staff.find({}, {"admin_counted": 1})}
    assert flags["stf_riverbend_admin"] == flags["stf_riverbend_ortiz"] == 1 and flags["stf_riverbend_kim"] == 0
    assert dut.client.patch(ORTIZ, json={"roles": ["staff"]}, headers=admin).status_code == 200
    assert dut.client.patch(ADMIN, json={"active": False}, headers=admin).get_json()["code"] == "last_admin"
    # A second start changes nothing.
    dut.store.ensure_indexes()
    assert dut.store.active_admins("agy_riverbend") == 1
    # A member written without the flag by an older version (after the start) is simply not counted.
    dut.store.staff.update_one({"_id": {"$eq": "stf_riverbend_white"}}, {"$unset": {"admin_counted": ""}})
    white = dut.client.patch("/api/v1/directory/staff/stf_riverbend_white", json={"active": False}, headers=admin)
    assert white.status_code == 200
    assert dut.store.staff.find_one({"_id": "stf_riverbend_white"})["admin_counted"] == 0


def test_staff_lookups_never_load_password_hashes(dut, clinician):
    recorder = Recorder(dut.store.staff)
    dut.store.staff = recorder
    assert dut.client.get("/api/v1/directory/me", headers=clinician).status_code == 200
    assert dut.client.get("/api/v1/directory/staff/stf_riverbend_kim", headers=clinician).status_code == 200
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_kim").username == "nurse.kim"
    assert len(dut.store.staff_by_ids("agy_riverbend", ["stf_riverbend_kim", "stf_riverbend_reyes"])) == 2
    assert recorder.read and not any("password_hash" in doc for doc in recorder.read)


def test_which_teams_members_are_in(dut):
    teams_of = dut.store.team_ids_of("agy_riverbend", ["stf_riverbend_reyes", "stf_riverbend_admin", "stf_nobody"])
    assert teams_of == {"stf_riverbend_reyes": ["team_riverbend_medical"], "stf_riverbend_admin": [], "stf_nobody": []}
    assert dut.store.team_ids_of("agy_lakeside", ["stf_riverbend_reyes"]) == {"stf_riverbend_reyes": []}


def test_admin_creates_renames_refills_and_deletes_a_team(dut, admin, clinician):
    created = dut.client.post(
        "/api/v1/directory/teams",
        json={"name": "Crisis Response", "member_ids": ["stf_riverbend_patel", "stf_riverbend_kim"]},
        headers=admin,
    )
    assert created.status_code == 201
    team = created.get_json()
    assert team["id"].startswith("team_") and team["member_ids"] == ["stf_riverbend_patel", "stf_riverbend_kim"]
    path = f"/api/v1/directory/teams/{team['id']}"
    patched = dut.client.patch(path, json={"name": "Crisis Team", "member_ids": ["stf_riverbend_hall"]}, headers=admin)
    assert patched.get_json() == {"id": team["id"], "name": "Crisis Team", "member_ids": ["stf_riverbend_hall"]}
    assert dut.client.get(path, headers=clinician).get_json()["name"] == "Crisis Team"
    assert dut.client.delete(path, headers=admin).status_code == 204
    assert dut.client.get(path, headers=clinician).status_code == 404
    assert dut.client.delete(path, headers=admin).status_code == 404


@pytest.mark.parametrize("member_id", ["stf_nobody", "stf_lakeside_ramirez"])
def test_team_members_must_be_staff_of_the_agency(dut, admin, member_id):
    response = dut.client.post(
        "/api/v1/directory/teams", json={"name": "Mixed", "member_ids": ["stf_riverbend_kim", member_id]}, headers=admin
    )
    assert response.status_code == 400
    body = response.get_json()
    assert body["code"] == "unknown_staff"
    assert body["details"]["staff_ids"] == [member_id]
    patched = dut.client.patch(
        "/api/v1/directory/teams/team_riverbend_intake", json={"member_ids": [member_id]}, headers=admin
    )
    assert patched.get_json()["code"] == "unknown_staff"


def test_team_names_are_unique_within_an_agency_only(dut, admin):
    clash = dut.client.post("/api/v1/directory/teams", json={"name": "  intake "}, headers=admin)
    assert clash.status_code == 409
    assert clash.get_json()["code"] == "team_name_taken"
    medical = "/api/v1/directory/teams/team_riverbend_medical"
    name_before = dut.client.get(medical, headers=admin).get_json()["name"]
    rename = dut.client.patch(medical, json={"name": "INTAKE"}, headers=admin)
    assert rename.status_code == 409 and rename.get_json()["code"] == "team_name_taken"
    assert dut.client.get(medical, headers=admin).get_json()["name"] == name_before  # the refusal changed nothing
    lakeside = dut.as_user("lakeside.admin")
    assert dut.client.post("/api/v1/directory/teams", json={"name": "Intake"}, headers=lakeside).status_code == 201


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/v1/directory/staff/stf_lakeside_ramirez", None),
        ("patch", "/api/v1/directory/staff/stf_lakeside_ramirez", {"active": False}),
        ("get", "/api/v1/directory/teams/team_lakeside_clinical", None),
        ("patch", "/api/v1/directory/teams/team_lakeside_clinical", {"name": "Ours"}),
        ("delete", "/api/v1/directory/teams/team_lakeside_clinical", None),
        ("get", "/api/v1/directory/patients/pat_riverbend_demo", None),
        ("get", "/api/v1/directory/staff/not%20an%20id", None),
    ],
)
def test_another_agencys_ids_are_not_found(dut, method, path, body):
    lakeside_admin_for_patient = path.endswith("pat_riverbend_demo")
    headers = dut.as_user("lakeside.admin" if lakeside_admin_for_patient else "admin")
    response = getattr(dut.client, method)(path, json=body, headers=headers)
    assert response.status_code == 404
    assert response.get_json()["code"] == "not_found"
    assert dut.store.get_staff("agy_lakeside", "stf_lakeside_ramirez").active
    assert dut.store.get_team("agy_lakeside", "team_lakeside_clinical").name == "Clinical"


def test_agency_settings_are_read_by_anyone_and_changed_by_admins(dut, admin, clinician):
    body = dut.client.get("/api/v1/directory/agency", headers=clinician).get_json()
    assert body == {
        "id": "agy_riverbend",
        "name": "Riverbend Behavioral Health",
        "time_zone": "America/Chicago",
        "options": {
            "notify_linked_staff_on_schedule_change": True,
            "compliance_escalation_minutes": 240,
            "idle_signout_minutes": 15,
            "notify_ordering_provider_of_results": False,
            "erx_subscription": True,
            "erx_vendor": "dosespot",
        },
        "terminology": {"patient_singular": "Client", "patient_plural": "Clients"},
    }
    response = dut.client.patch(
        "/api/v1/directory/agency",
        json={
            "time_zone": "America/Denver",
            "options": {"notify_linked_staff_on_schedule_change": False},
            "terminology": {"patient_singular": "Member"},
        },
        headers=admin,
    )
    assert response.status_code == 200
    after = dut.client.get("/api/v1/directory/agency", headers=clinician).get_json()
    assert after["time_zone"] == "America/Denver"
    assert after["options"]["notify_linked_staff_on_schedule_change"] is False
    assert after["terminology"] == {"patient_singular": "Member", "patient_plural": "Clients"}
    lakeside = dut.client.get("/api/v1/directory/agency", headers=dut.as_user("dr.ramirez")).get_json()
    assert lakeside["terminology"] == {"patient_singular": "Patient", "patient_plural": "Patients"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"time_zone": "Mars/Olympus_Mons"}, "invalid_time_zone"),
        ({"options": {"notify_everyone": True}}, "unknown_field"),
        ({"options": {"notify_linked_staff_on_schedule_change": 1}}, "invalid_type"),
        ({"terminology": {"patient_singular": {"$gt": ""}}}, "invalid_type"),
        ({"terminology": "Client"}, "invalid_type"),
        ({"options": {"compliance_escalation_minutes": "60"}}, "invalid_type"),
        ({"options": {"compliance_escalation_minutes": {"$gt": 0}}}, "invalid_type"),
        ({"options": {"compliance_escalation_minutes": True}}, "invalid_type"),
        ({"options": {"compliance_escalation_minutes": 0}}, "out_of_range"),
        ({"options": {"compliance_escalation_minutes": 30 * 24 * 60 + 1}}, "out_of_range"),
    ],
)
def test_agency_changes_are_validated(dut, admin, body, code):
    response = dut.client.patch("/api/v1/directory/agency", json=body, headers=admin)
    assert response.status_code == 400
    assert response.get_json()["code"] == code


def test_portal_patient_names_are_sealed_at_rest_and_read_by_admins(dut, admin):
    created = dut.client.post(
        "/api/v1/directory/patients",
        json={"portal_user_id": "portal_42", "display_name": "Rosa Example"},
        headers=admin,
    )
    assert created.status_code == 201
    patient = created.get_json()
    raw = dut.store.patients.find_one({"_id": {"$eq": patient["id"]}})
    assert "Rosa Example" not in json.dumps(raw, default=str)
    assert b"Rosa Example" not in bytes(raw["display_name_sealed"])
    fetched = dut.client.get(f"/api/v1/directory/patients/{patient['id']}", headers=admin).get_json()
    assert fetched["display_name"] == "Rosa Example"
    duplicate = dut.client.post(
        "/api/v1/directory/patients",
        json={"portal_user_id": "portal_42", "display_name": "Someone Else"},
        headers=admin,
    )
    assert duplicate.status_code == 409


def test_portal_patients_are_listed_newest_first_in_pages(dut, admin):
    for number in range(3):
        # Each one created in a millisecond of its own (after the last), so "newest first" is one order.
        last = now_ms()
        wait_until(lambda last=last: now_ms() > last, interval=0.001)
        created = dut.client.post(
            "/api/v1/directory/patients",
            json={"portal_user_id": f"portal_{number}", "display_name": f"Person {number}"},
            headers=admin,
        )
        assert created.status_code == 201, created.get_json()
    first = dut.client.get("/api/v1/directory/patients?limit=2", headers=admin).get_json()
    assert [p["portal_user_id"] for p in first["patients"]] == ["portal_2", "portal_1"]
    second = dut.client.get(f"/api/v1/directory/patients?limit=2&before={first['next_before']}", headers=admin)
    page = second.get_json()
    assert [p["portal_user_id"] for p in page["patients"]] == ["portal_0", "portal_riverbend_0001"]
    assert page["next_before"] is None
    bad = dut.client.get("/api/v1/directory/patients?before=%7B%22%24gt%22%3A1%7D", headers=admin)
    assert bad.status_code == 400


def test_partner_whoami_reports_the_gateway_consumer(dut):
    headers = gateway_identity.partner_headers(
        dut.directory.settings.gateway_identity_keys[0], "GET", "/api/v1/partner/whoami",
        username="patient-portal", credential="cred-123",
    )
    response = dut.client.get("/api/v1/partner/whoami", headers=headers)
    assert response.status_code == 200
    assert response.get_json() == {"consumer": "patient-portal", "credential": "cred-123"}


def test_partner_whoami_without_a_gateway_consumer_is_401(dut):
    missing = dut.client.get("/api/v1/partner/whoami")
    assert missing.status_code == 401
    assert missing.get_json()["code"] == "unauthenticated"
    anonymous = dut.client.get(
        "/api/v1/partner/whoami",
        headers=gateway_identity.partner_headers(
            dut.directory.settings.gateway_identity_keys[0], "GET", "/api/v1/partner/whoami",
            username="anonymous", anonymous=True,
        ),
    )
    assert anonymous.status_code == 401


def test_unknown_routes_and_health_answer_json(dut):
    missing = dut.client.get("/api/v1/directory/nothing-here")
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"
    assert dut.client.get("/healthz").get_json() == {"status": "ok", "service": "directory"}


def test_the_compliance_escalation_delay_is_an_agency_option(dut, admin, clinician):
    lakeside = dut.client.get("/api/v1/directory/agency", headers=dut.as_user("dr.ramirez")).get_json()
    assert lakeside["options"]["compliance_escalation_minutes"] == 24 * 60  # the default
    response = dut.client.patch(
        "/api/v1/directory/agency", json={"options": {"compliance_escalation_minutes": 90}}, headers=admin
    )
    assert response.status_code == 200
    assert response.get_json()["options"]["compliance_escalation_minutes"] == 90
    after = dut.client.get("/api/v1/directory/agency", headers=clinician).get_json()
    assert after["options"]["compliance_escalation_minutes"] == 90
    assert after["options"]["notify_linked_staff_on_schedule_change"] is True
    assert dut.store.get_agency("agy_lakeside").compliance_escalation_minutes == 24 * 60


def test_demo_staff_have_supervisors(dut, clinician):
    kim = dut.client.get(KIM, headers=clinician).get_json()
    assert kim["supervisor_id"] == "stf_riverbend_reyes"
    davis = dut.client.get("/api/v1/directory/staff/stf_riverbend_davis", headers=clinician).get_json()
    assert davis["supervisor_id"] == ""


def test_admin_sets_changes_and_clears_a_supervisor(dut, admin):
    created = dut.client.post(
        "/api/v1/directory/staff", json={**NEW_STAFF, "supervisor_id": "stf_riverbend_hall"}, headers=admin
    )
    assert created.status_code == 201
    assert created.get_json()["supervisor_id"] == "stf_riverbend_hall"
    path = f"/api/v1/directory/staff/{created.get_json()['id']}"
    changed = dut.client.patch(path, json={"supervisor_id": "stf_riverbend_reyes"}, headers=admin)
    assert changed.status_code == 200 and changed.get_json()["supervisor_id"] == "stf_riverbend_reyes"
    unrelated = dut.client.patch(path, json={"display_name": "Avery Quinn, LICSW"}, headers=admin)
    assert unrelated.get_json()["supervisor_id"] == "stf_riverbend_reyes"
    cleared = dut.client.patch(path, json={"supervisor_id": ""}, headers=admin)
    assert cleared.get_json()["supervisor_id"] == ""
    assert dut.store.get_staff("agy_riverbend", created.get_json()["id"]).supervisor_id == ""


@pytest.mark.parametrize(
    ("supervisor_id", "code"),
    [
        ("stf_riverbend_kim", "invalid_supervisor"),  # themself
        ("stf_riverbend_young", "invalid_supervisor"),  # deactivated
        ("stf_lakeside_ramirez", "invalid_supervisor"),  # another agency's
        ("stf_nobody", "invalid_supervisor"),
        ("../etc", "invalid_supervisor"),
        ({"$gt": ""}, "invalid_type"),
        (7, "invalid_type"),
    ],
)
def test_a_supervisor_must_be_an_active_colleague(dut, admin, supervisor_id, code):
    response = dut.client.patch(KIM, json={"supervisor_id": supervisor_id}, headers=admin)
    assert response.status_code == 400
    assert response.get_json()["code"] == code
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_kim").supervisor_id == "stf_riverbend_reyes"
    if supervisor_id == "stf_riverbend_kim":
        return  # a new member cannot name themself: their id does not exist yet
    created = dut.client.post(
        "/api/v1/directory/staff", json={**NEW_STAFF, "supervisor_id": supervisor_id}, headers=admin
    )
    assert created.status_code == 400
    assert dut.store.credentials("therapist.quinn") is None


def test_only_admins_set_supervisors(dut, clinician):
    response = dut.client.patch(KIM, json={"supervisor_id": "stf_riverbend_chen"}, headers=clinician)
    assert response.status_code == 403


def test_admins_set_the_idle_sign_out_time_that_staff_and_services_read(dut, admin, clinician):
    changed = dut.client.patch("/api/v1/directory/agency", json={"options": {"idle_signout_minutes": 5}}, headers=admin)
    assert changed.status_code == 200
    assert changed.get_json()["options"]["idle_signout_minutes"] == 5
    seen = dut.client.get("/api/v1/directory/agency", headers=clinician).get_json()
    assert seen["options"]["idle_signout_minutes"] == 5
    assert dut.store.get_agency("agy_riverbend").idle_signout_minutes == 5
    assert dut.store.get_agency("agy_lakeside").idle_signout_minutes == 15


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0, "out_of_range"),
        (241, "out_of_range"),
        ("5", "invalid_type"),
        (True, "invalid_type"),
        (2.5, "invalid_type"),
        ({"$gt": 1}, "invalid_type"),
    ],
)
def test_the_idle_sign_out_time_is_bounded(dut, admin, value, code):
    response = dut.client.patch(
        "/api/v1/directory/agency", json={"options": {"idle_signout_minutes": value}}, headers=admin
    )
    assert response.status_code == 400
    assert response.get_json()["code"] == code
    assert dut.store.get_agency("agy_riverbend").idle_signout_minutes == 15


def test_only_admins_change_the_idle_sign_out_time(dut, clinician):
    response = dut.client.patch(
        "/api/v1/directory/agency", json={"options": {"idle_signout_minutes": 1}}, headers=clinician
    )
    assert response.status_code == 403
    assert dut.store.get_agency("agy_riverbend").idle_signout_minutes == 15


# --- NPIs and the ordering-provider option ---------------------------------------------------------

REYES_NPI = "1234567893"  # demo data
RAMIREZ_NPI = "1987654328"  # Lakeside's demo prescriber
NEW_NPI = "1245319599"  # valid check digit, held by no demo member


@pytest.fixture
def stub(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


def test_demo_prescribers_carry_npis_everyone_can_read(dut, clinician):
    reyes = dut.client.get("/api/v1/directory/staff/stf_riverbend_reyes", headers=clinician).get_json()
    assert reyes["npi"] == REYES_NPI
    kim = dut.client.get(KIM, headers=clinician).get_json()
    assert kim["npi"] == ""
    assert "npi" not in dut.store.staff.find_one({"_id": {"$eq": "stf_riverbend_kim"}})  # absent, not ""


def test_admin_sets_changes_and_clears_a_members_npi(dut, admin):
    created = dut.client.post("/api/v1/directory/staff", json={**NEW_STAFF, "npi": f" {NEW_NPI} "}, headers=admin)
    assert created.status_code == 201 and created.get_json()["npi"] == NEW_NPI
    path = f"/api/v1/directory/staff/{created.get_json()['id']}"
    cleared = dut.client.patch(path, json={"npi": ""}, headers=admin)
    assert cleared.status_code == 200 and cleared.get_json()["npi"] == ""
    given = dut.client.patch(KIM, json={"npi": NEW_NPI}, headers=admin)  # free again once cleared
    assert given.status_code == 200 and given.get_json()["npi"] == NEW_NPI
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_kim").npi == NEW_NPI
    renamed = dut.client.patch(KIM, json={"display_name": "Jordan Kim, RN, BSN"}, headers=admin)
    assert renamed.get_json()["npi"] == NEW_NPI  # other edits leave it alone


@pytest.mark.parametrize("npi", ["1234567890", "123456789", "12345678931", "ABCDEFGHIJ", "80840" + REYES_NPI])
def test_an_npi_failing_the_check_digit_or_shape_is_refused(dut, admin, npi):
    created = dut.client.post("/api/v1/directory/staff", json={**NEW_STAFF, "npi": npi}, headers=admin)
    assert created.status_code == 400 and created.get_json()["code"] == "invalid_npi"
    assert "check digit" in created.get_json()["message"]
    changed = dut.client.patch(KIM, json={"npi": npi}, headers=admin)
    assert changed.status_code == 400 and changed.get_json()["code"] == "invalid_npi"
    assert dut.store.get_staff("agy_riverbend", "stf_riverbend_kim").npi == ""


def test_an_npi_is_unique_within_an_agency_only(dut, admin):
    taken = dut.client.patch(KIM, json={"npi": REYES_NPI}, headers=admin)
    assert taken.status_code == 409 and taken.get_json()["code"] == "npi_taken"
    again = dut.client.post("/api/v1/directory/staff", json={**NEW_STAFF, "npi": REYES_NPI}, headers=admin)
    assert again.status_code == 409 and again.get_json()["code"] == "npi_taken"
    assert dut.store.credentials("therapist.quinn") is None
    # An admin (counted in the active admins) is saved another way: refused the same, the count intact.
    admin_taken = dut.client.patch(ADMIN, json={"npi": REYES_NPI}, headers=admin)
    assert admin_taken.status_code == 409 and admin_taken.get_json()["code"] == "npi_taken"
    assert dut.store.active_admins("agy_riverbend") == 1
    lakeside = dut.as_user("lakeside.admin")
    elsewhere = dut.client.patch(
        "/api/v1/directory/staff/stf_lakeside_foster", json={"npi": REYES_NPI}, headers=lakeside
    )
    assert elsewhere.status_code == 200  # the same provider may work for two agencies
    same = dut.client.patch("/api/v1/directory/staff/stf_riverbend_reyes", json={"npi": REYES_NPI}, headers=admin)
    assert same.status_code == 200


def test_the_npi_index_refuses_a_duplicate_even_past_the_check(dut):
    dut.store.staff.update_one({"_id": {"$eq": "stf_riverbend_kim"}}, {"$set": {"npi": NEW_NPI}})
    with pytest.raises(DuplicateKeyError):
        dut.store.staff.update_one({"_id": {"$eq": "stf_riverbend_white"}}, {"$set": {"npi": NEW_NPI}})
    dut.store.staff.update_one({"_id": {"$eq": "stf_lakeside_foster"}}, {"$set": {"npi": NEW_NPI}})  # another agency


def test_resolve_recipients_turns_npis_into_the_callers_agencys_active_staff(dut, admin, stub):
    riverbend = auth(dut.token("dr.reyes"))
    request = directory_pb2.ResolveRecipientsRequest(
        staff_ids=["stf_riverbend_kim"], npis=[REYES_NPI, "1498263056", RAMIREZ_NPI, NEW_NPI, "not-an-npi"]
    )
    reply = stub.ResolveRecipients(request, metadata=riverbend, timeout=5)
    assert list(reply.staff_ids) == ["stf_riverbend_chen", "stf_riverbend_kim", "stf_riverbend_reyes"]
    assert list(reply.missing_npis) == [RAMIREZ_NPI, NEW_NPI, "not-an-npi"]  # Lakeside's provider is not ours
    assert list(reply.missing_staff_ids) == []
    lakeside = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(npis=[RAMIREZ_NPI, REYES_NPI]),
        metadata=auth(dut.token("dr.ramirez")),
        timeout=5,
    )
    assert list(lakeside.staff_ids) == ["stf_lakeside_ramirez"] and list(lakeside.missing_npis) == [REYES_NPI]
    # A deactivated provider's NPI is known (not missing) but reaches nobody, like their staff id.
    chen = "/api/v1/directory/staff/stf_riverbend_chen"
    assert dut.client.patch(chen, json={"active": False}, headers=admin).status_code == 200
    reply = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(npis=["1498263056"]), metadata=riverbend, timeout=5
    )
    assert list(reply.staff_ids) == [] and list(reply.missing_npis) == []
    staff = stub.GetStaff(
        directory_pb2.GetStaffRequest(staff_ids=["stf_riverbend_reyes"]), metadata=riverbend, timeout=5
    )
    assert staff.staff[0].npi == REYES_NPI


def test_npi_lookups_use_the_agency_npi_index(dut):
    plan = dut.store.staff.find({"agency_id": {"$eq": "agy_riverbend"}, "npi": {"$eq": REYES_NPI}}).explain()
    winning = json.dumps(plan["queryPlanner"]["winningPlan"], default=str)
    # nx-27017 names the index idx_staff_agency_id_npi, MongoDB staff_npi_unique_in_agency.
    assert "_npi" in winning and "COLLSCAN" not in winning and "SCAN staff" not in winning


def test_notifications_resolves_provider_refs_through_directory(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    client = DirectoryClient(f"127.0.0.1:{server.port}")
    reyes = Identity(subject="stf_riverbend_reyes", agency_id="agy_riverbend", token=dut.token("dr.reyes"))
    try:
        with acting_as(reyes):
            refs = [f"npi:{REYES_NPI}", "staff:stf_riverbend_kim", f"npi:{RAMIREZ_NPI}", "staff:stf_nobody",
                    "npi:12", "dr.reyes", "staff:../x"]  # fmt: skip
            assert client.staff_ids_for_providers(refs) == ["stf_riverbend_kim", "stf_riverbend_reyes"]
            assert client.staff_ids_for_providers([]) == []
            assert client.agency_settings("agy_riverbend").notify_ordering_provider_of_results is False
    finally:
        client.close()
        server.stop(0)


def test_admins_turn_on_telling_the_ordering_provider_of_results(dut, admin, clinician, stub):
    option = {"options": {"notify_ordering_provider_of_results": True}}
    assert dut.client.patch("/api/v1/directory/agency", json=option, headers=clinician).status_code == 403
    changed = dut.client.patch("/api/v1/directory/agency", json=option, headers=admin)
    assert changed.status_code == 200 and changed.get_json()["options"]["notify_ordering_provider_of_results"] is True
    seen = dut.client.get("/api/v1/directory/agency", headers=clinician).get_json()
    assert seen["options"]["notify_ordering_provider_of_results"] is True
    settings = stub.GetAgencySettings(
        directory_pb2.GetAgencySettingsRequest(), metadata=auth(dut.token("dr.reyes")), timeout=5
    )
    assert settings.notify_ordering_provider_of_results is True
    lakeside = stub.GetAgencySettings(
        directory_pb2.GetAgencySettingsRequest(), metadata=auth(dut.token("dr.ramirez")), timeout=5
    )
    assert lakeside.notify_ordering_provider_of_results is False  # off unless an admin turns it on
    not_a_flag = {"options": {"notify_ordering_provider_of_results": "yes"}}
    wrong = dut.client.patch("/api/v1/directory/agency", json=not_a_flag, headers=admin)
    assert wrong.status_code == 400 and wrong.get_json()["code"] == "invalid_type"
