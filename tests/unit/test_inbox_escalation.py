"""The pure rules of critical-result escalation (services/inbox/escalation.py)."""

from __future__ import annotations

import dataclasses

from clinic.directory.v1 import directory_pb2
from services.inbox import domain
from services.inbox.delivery_request import DeliveryRequest
from services.inbox.directory_client import DirectoryClient
from services.inbox.escalation import (
    ESCALATION_SOURCE,
    critical_fields,
    first_level_targets,
    is_critical,
    trail,
)

MINUTE = 60_000


def wanted(**overrides) -> DeliveryRequest:
    fields = {
        "folder": domain.FOLDER_LAB,
        "addressing": domain.Addressing(staff_ids=("stf_a",)),
        "title": "Lab result",
        "summary": None,
        "severity": "urgent",
        "status": "final",
        "due_at": None,
        "links": (),
        "source": "lab",
        "source_ref": "order-1",
        "resolved": False,
        "withdrawn": False,
        "source_version": 0,
        "delivery_id": None,
        "mark_unread": False,
        "actor_staff_id": None,
    }
    fields.update(overrides)
    return DeliveryRequest(**fields)


def test_only_an_urgent_open_lab_item_is_critical():
    assert is_critical(wanted())
    assert not is_critical(wanted(severity="abnormal"))
    assert not is_critical(wanted(folder=domain.FOLDER_SCHEDULE))
    assert not is_critical(wanted(resolved=True))
    assert not is_critical(wanted(withdrawn=True))
    assert not is_critical(wanted(source=ESCALATION_SOURCE))  # a copy does not start a loop of its own


def test_a_new_critical_result_starts_its_loop():
    fields = critical_fields(wanted(), None, 1_000, 30)
    assert fields == {
        "critical_at": 1_000,
        "unacked_since": 1_000,
        "escalation_stage": 0,
        "escalation_from": 1_000,
        "escalation_due_at": 1_000 + 30 * MINUTE,
    }
    # Deadlines count from the arrival by the deadline clock (a test clock moved forward).
    moved = critical_fields(wanted(), None, 1_000, 30, clock_at=5_000)
    assert moved["critical_at"] == 1_000 and moved["escalation_due_at"] == 5_000 + 30 * MINUTE


def test_a_redelivery_keeps_the_loop_and_resolving_stops_it():
    started = {"critical_at": 1_000, "unacked_since": 1_000, "escalation_stage": 1, "escalation_due_at": 9}
    assert critical_fields(wanted(status="corrected"), started, 5_000, 30) == {}
    assert critical_fields(wanted(resolved=True), started, 5_000, 30) == {
        "unacked_since": None,
        "escalation_due_at": None,
    }
    assert critical_fields(wanted(severity="abnormal"), started, 5_000, 30)["escalation_due_at"] is None
    acknowledged = {**started, "acknowledged_at": 2_000}
    assert critical_fields(wanted(resolved=True), acknowledged, 5_000, 30) == {}
    assert critical_fields(wanted(severity="abnormal"), None, 5_000, 30) == {}


def test_first_level_goes_to_supervisors_then_the_team_or_the_admins():
    supervisors = {"stf_a": "stf_boss", "stf_b": "stf_boss", "stf_c": ""}
    assert first_level_targets(["stf_a", "stf_b"], supervisors, "team_x", ["stf_admin"]) == (["stf_boss"], [])
    assert first_level_targets(["stf_a", "stf_c"], supervisors, "team_x", []) == (["stf_boss"], ["team_x"])
    assert first_level_targets(["stf_c"], supervisors, "", ["stf_admin"]) == (["stf_admin"], [])
    assert first_level_targets(["stf_a", "stf_c"], supervisors, "", ["stf_admin"]) == (
        ["stf_admin", "stf_boss"],
        [],
    )


def test_the_trail_names_deliveries_escalations_and_the_acknowledgement():
    root = {
        "_id": "ntc_1",
        "critical_at": 0,
        "recipient_ids": ["stf_a"],
        "escalation_due_at": 60 * MINUTE,
        "escalations": {
            "2": {"at": 61 * MINUTE, "staff_ids": ["stf_admin"], "team_ids": []},
            "1": {"at": 31 * MINUTE, "staff_ids": ["stf_boss"], "team_ids": ["team_x"]},
        },
    }
    shown = trail(root, root)["critical_result"]
    assert shown["escalation_level"] == 0 and shown["acknowledged"] is None
    assert [(e["level"], e["stage"]) for e in shown["escalations"]] == [(1, "supervisor"), (2, "admins")]
    assert shown["escalations"][0]["team_ids"] == ["team_x"]
    assert shown["next_escalation_at"] == "1970-01-01T01:00:00.000Z"

    acked = {**root, "acknowledged_at": 40 * MINUTE, "acknowledged_by": "stf_boss", "acknowledged_on": "ntc_copy"}
    copy = {"_id": "ntc_copy", "escalation_of": "ntc_1", "escalation_level": 1}
    seen = trail(acked, copy)["critical_result"]
    assert seen["escalation_level"] == 1 and seen["next_escalation_at"] is None
    assert seen["acknowledged"] == {
        "at": "1970-01-01T00:40:00.000Z",
        "by": {"id": "stf_boss", "name": ""},
        "on_escalation": True,
    }


def test_the_request_type_is_what_the_escalation_builds():
    # The copies are built as DeliveryRequest directly: every field of it is named.
    assert {f.name for f in dataclasses.fields(DeliveryRequest)} == set(wanted().__dict__)


class FakeStub:
    """directory's GetStaff and ListStaff, as DirectoryClient calls them."""

    def __init__(self, members):
        self.members = {m.staff_id: m for m in members}

    def GetStaff(self, request):  # noqa: N802 - the gRPC method name
        found = [self.members[i] for i in request.staff_ids if i in self.members]
        missing = [i for i in request.staff_ids if i not in self.members]
        return directory_pb2.GetStaffResponse(staff=found, missing_staff_ids=missing)

    def ListStaff(self, request):  # noqa: N802
        return directory_pb2.ListStaffResponse(
            staff=[m for m in self.members.values() if request.role in m.roles and m.active]
        )


def test_the_directory_client_names_active_supervisors_and_admins():
    def member(staff_id, supervisor="", active=True, admin=False):
        roles = [directory_pb2.ROLE_STAFF] + ([directory_pb2.ROLE_ADMIN] if admin else [])
        return directory_pb2.Staff(staff_id=staff_id, supervisor_id=supervisor, active=active, roles=roles)

    client = DirectoryClient.__new__(DirectoryClient)
    client._stub = FakeStub(
        [
            member("stf_a", "stf_boss"),
            member("stf_b", "stf_gone"),
            member("stf_c"),
            member("stf_boss"),
            member("stf_gone", active=False),
            member("stf_admin", admin=True),
            member("stf_old_admin", admin=True, active=False),
        ]
    )
    assert client.supervisors(["stf_a", "stf_b", "stf_c", "stf_x"]) == {"stf_a": "stf_boss", "stf_b": "", "stf_c": ""}
    assert client.supervisors([]) == {}
    assert client.admin_ids() == ["stf_admin"]
