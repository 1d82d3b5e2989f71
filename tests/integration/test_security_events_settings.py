"""Administration is a security event, over directory's real app and database: changing the agency's
options or terminology, creating staff, changing what a member may do or how they sign in, and
changing teams each leave one `settings_changed` naming the admin, the agency, member or team, and
the names of the fields changed, never their values. A change of nothing, or of a field that does
not matter for security (a display name), leaves none."""

from __future__ import annotations

import pytest

from tests.integration.test_security_events_http import recorded

RIVERBEND = "agy_riverbend"
ADMIN_ID = "stf_riverbend_admin"
KIM = "/api/v1/directory/staff/stf_riverbend_kim"


@pytest.fixture
def admin(dut):
    return dut.as_user("admin")


def changes(dut) -> list:
    return recorded(dut.store.db, "settings_changed")


def assert_by_admin(event, target_type: str, target_id: str) -> None:
    assert (event.agency_id, event.actor_id, event.actor_kind, event.outcome) == (
        RIVERBEND,
        ADMIN_ID,
        "staff",
        "succeeded",
    )
    assert (event.target_type, event.target_id, event.service) == (target_type, target_id, "directory")


def test_changing_agency_options_and_terminology_records_the_field_names_only(dut, admin):
    subscribed = dut.client.get("/api/v1/directory/agency", headers=admin).get_json()["options"]["erx_subscription"]
    reply = dut.client.patch(
        "/api/v1/directory/agency",
        json={
            "options": {"idle_signout_minutes": 7, "portal_consumer": "rogue-portal",
                        "erx_subscription": not subscribed},
            "terminology": {"patient_singular": "Resident"},
        },
        headers={**admin, "X-Real-IP": "198.51.100.4"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    assert reply.status_code == 200, reply.get_json()
    [event] = changes(dut)
    assert_by_admin(event, "agency", RIVERBEND)
    assert event.reason.split(",") == [
        "options.portal_consumer",
        "options.idle_signout_minutes",
        "options.erx_subscription",
        "terminology.patient_singular",
    ]
    assert event.source == "198.51.100.4"
    text = str(event)
    assert "rogue-portal" not in text and "Resident" not in text and "7" not in event.reason


def test_an_agency_patch_that_changes_nothing_records_nothing(dut, admin):
    current = dut.client.get("/api/v1/directory/agency", headers=admin).get_json()
    same = {"name": current["name"], "options": {"idle_signout_minutes": current["options"]["idle_signout_minutes"]}}
    assert dut.client.patch("/api/v1/directory/agency", json=same, headers=admin).status_code == 200
    assert changes(dut) == []


def test_creating_staff_records_one_event_for_the_new_member(dut, admin):
    reply = dut.client.post(
        "/api/v1/directory/staff",
        json={
            "username": "quinn.new",
            "display_name": "Avery Quinn",
            "password": "a-long-enough-passphrase",
            "roles": ["staff", "admin"],
            "eprescribing_enabled": True,
        },
        headers=admin,
    )
    assert reply.status_code == 201, reply.get_json()
    member_id = reply.get_json()["id"]
    [event] = changes(dut)
    assert_by_admin(event, "staff", member_id)
    assert event.reason == "created,roles,password,eprescribing_enabled"
    text = str(event)
    assert "quinn" not in text.lower() and "passphrase" not in text and "Avery" not in text


def test_security_relevant_staff_changes_record_one_event_naming_each_field(dut, admin):
    reply = dut.client.patch(
        KIM,
        json={
            "roles": ["staff", "prescriber"],
            "active": False,
            "password": "another-long-passphrase",
            "supervisor_id": "stf_riverbend_hall",
            "erx_clinician_id": "CLIN-777",
            "display_name": "J. Kim",
        },
        headers=admin,
    )
    assert reply.status_code == 200, reply.get_json()
    [event] = changes(dut)
    assert_by_admin(event, "staff", "stf_riverbend_kim")
    assert event.reason == "roles,active,password,supervisor_id,erx_clinician_id"
    text = str(event)
    assert "prescriber" not in text and "passphrase" not in text and "CLIN-777" not in text and "J. Kim" not in text


def test_a_display_name_change_or_a_refused_change_records_no_settings_change(dut, admin):
    assert dut.client.patch(KIM, json={"display_name": "Jordan K."}, headers=admin).status_code == 200
    assert dut.client.patch(KIM, json={"lab_result_notification": True}, headers=admin).status_code == 200  # as it was
    last_admin = dut.client.patch(f"/api/v1/directory/staff/{ADMIN_ID}", json={"active": False}, headers=admin)
    assert last_admin.status_code == 409
    assert changes(dut) == []


def test_team_changes_are_recorded(dut, admin):
    created = dut.client.post(
        "/api/v1/directory/teams", json={"name": "Night Shift", "member_ids": ["stf_riverbend_kim"]}, headers=admin
    )
    assert created.status_code == 201
    team_id = created.get_json()["id"]
    path = f"/api/v1/directory/teams/{team_id}"
    assert dut.client.patch(path, json={"member_ids": ["stf_riverbend_reyes"]}, headers=admin).status_code == 200
    assert dut.client.patch(path, json={"name": "Night Shift"}, headers=admin).status_code == 200  # unchanged
    assert dut.client.delete(path, headers=admin).status_code == 204
    events = changes(dut)
    assert [(e.target_type, e.target_id, e.reason) for e in events] == [
        ("team", team_id, "created,name,member_ids"),
        ("team", team_id, "member_ids"),
        ("team", team_id, "deleted"),
    ]
    for event in events:
        assert_by_admin(event, "team", team_id)
        assert "Night" not in str(event) and "stf_riverbend" not in event.reason
