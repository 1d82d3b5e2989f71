"""Compliance Alerts against the real database: items reach their assignees, turn overdue once,
escalate once however many passes run, and resolving withdraws every board item they made."""

from __future__ import annotations

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.kit.auth import Identity
from services.kit.errors import Conflict, InvalidInput, NotFound
from services.kit.service_identity import acting_as
from services.notifications import compliance
from services.notifications.compliance_alerts import ComplianceAlerts
from tests.integration.notifications_fixtures import DirectoryTable, Member, make_components, staged_deliveries
from tests.waits import together

RIVERBEND = "agy_riverbend"
HOUR = 3_600_000
DUE = 1_900_000_000_000
FIELDS = {
    "kind": "treatment_plan_review",
    "title": "Plan review for record 42",
    "assignee_ids": ["stf_patel", "stf_davis"],
    "due_at": DUE,
    "link": "https://compliance.example/items/42",
}


@pytest.fixture
def table():
    return DirectoryTable(
        staff={
            "stf_patel": Member(RIVERBEND, "Priya Patel", supervisor_id="stf_hall"),
            "stf_davis": Member(RIVERBEND, "Jamie Davis"),
            "stf_hall": Member(RIVERBEND, "Jordan Hall"),
            "stf_ortiz": Member(RIVERBEND, "Sam Ortiz", ("staff", "compliance_officer")),
            "stf_admin": Member(RIVERBEND, "Alex Morgan", ("staff", "admin")),
            "stf_young": Member(RIVERBEND, "Casey Young", active=False),
            "stf_baker": Member("agy_lakeside", "Jesse Baker"),
        },
        escalation_minutes={RIVERBEND: 60},
    )


@pytest.fixture
def alerts(mongo_client, db_name, table):
    feature = ComplianceAlerts(make_components(mongo_client[db_name], table), pass_interval_s=1.0)
    feature.ensure_indexes()
    return feature


def create(alerts, **changes):
    with acting_as(Identity("stf_ortiz", RIVERBEND, frozenset({"staff", "compliance_officer"}))):
        return alerts.create(
            RIVERBEND,
            compliance.new_id(),
            {**FIELDS, **changes},
            origin="staff",
            external_ref="",
            created_by="stf_ortiz",
        )


def raw(alerts, item_id: str) -> dict:
    return alerts.items.find_one({"_id": {"$eq": item_id}})


def deliveries(alerts, item_id: str) -> dict[str, inbox_pb2.DeliverItemRequest]:
    return dict(staged_deliveries(raw(alerts, item_id)))


def test_a_new_item_reaches_its_assignees_with_its_due_time_and_its_title_sealed(alerts):
    item = create(alerts)
    (event_id, request), = deliveries(alerts, item.id).items()  # fmt: skip
    assert event_id == f"{item.id}-v1-a"
    assert sorted(request.recipients.staff_ids) == ["stf_davis", "stf_patel"]
    assert request.kind == inbox_pb2.DELIVERED_KIND_COMPLIANCE and request.due_at.ToMilliseconds() == DUE
    doc = alerts.items.find_one({"_id": {"$eq": item.id}}, {"_outbox": 0})  # the item's own fields
    assert FIELDS["title"].encode() not in doc["title"] and "compliance.example" not in repr(doc)
    assert doc["next_check_at"] == DUE
    assert alerts.load(RIVERBEND, item.id).title == FIELDS["title"]
    assert alerts.load("agy_lakeside", item.id) is None


@pytest.mark.parametrize("assignees", [["stf_nobody"], ["stf_baker"], ["stf_young"]])
def test_assignees_must_be_active_staff_of_the_agency(alerts, assignees):
    with pytest.raises(InvalidInput) as caught:
        create(alerts, assignee_ids=assignees)
    assert caught.value.code == "unknown_staff"
    assert alerts.items.count_documents({}) == 0


def test_an_item_needs_an_assignee(alerts):
    with pytest.raises(InvalidInput) as caught:
        create(alerts, assignee_ids=[])
    assert caught.value.code == "no_assignees"
    assert alerts.items.count_documents({}) == 0


def test_past_its_due_time_it_is_reported_overdue_once(alerts):
    item = create(alerts)
    assert alerts.run_pass(now=DUE - 1) == 0
    assert alerts.run_pass(now=DUE + 1) == 1
    assert alerts.run_pass(now=DUE + 2) == 0
    overdue = deliveries(alerts, item.id)[f"{item.id}-v2-a"]
    assert overdue.status == "overdue" and overdue.severity == inbox_pb2.SEVERITY_URGENT and overdue.mark_unread
    assert raw(alerts, item.id)["next_check_at"] == DUE + HOUR


def test_escalation_reaches_the_supervisor_and_the_officers_once(alerts):
    item = create(alerts)
    alerts.run_pass(now=DUE + 1)
    assert alerts.run_pass(now=DUE + HOUR) == 1
    assert alerts.run_pass(now=DUE + 5 * HOUR) == 0
    escalations = [r for e, r in deliveries(alerts, item.id).items() if e.endswith("-e")]
    assert len(escalations) == 1
    # patel's supervisor, and the compliance officer for davis, who has none
    assert sorted(escalations[0].recipients.staff_ids) == ["stf_hall", "stf_ortiz"]
    assert escalations[0].source_ref == f"{item.id}.escalation"
    doc = raw(alerts, item.id)
    assert doc["escalated_due"] == DUE and "next_check_at" not in doc


def test_two_passes_at_once_escalate_once(alerts):
    items = [create(alerts) for _ in range(5)]
    # Both passes end, and neither raises.
    together(lambda: alerts.run_pass(now=DUE + 2 * HOUR), lambda: alerts.run_pass(now=DUE + 2 * HOUR))
    for item in items:
        escalations = [e for e in deliveries(alerts, item.id) if e.endswith("-e")]
        assert len(escalations) == 1, escalations


def test_resolving_withdraws_the_item_and_its_escalation(alerts):
    item = create(alerts)
    alerts.run_pass(now=DUE + 2 * HOUR)
    resolved = alerts.resolve(RIVERBEND, item.id)
    staged = deliveries(alerts, item.id)
    version = resolved.version
    assert staged[f"{item.id}-v{version}-a"].withdrawn and staged[f"{item.id}-v{version}-e"].withdrawn
    assert staged[f"{item.id}-v{version}-e"].source_ref == f"{item.id}.escalation"
    assert "next_check_at" not in raw(alerts, item.id)
    assert alerts.resolve(RIVERBEND, item.id).version == version  # resolving again changes nothing
    with pytest.raises(Conflict):
        with acting_as(Identity("stf_ortiz", RIVERBEND)):
            alerts.change(RIVERBEND, item.id, {"title": "Another"})


def test_an_extension_withdraws_the_escalation_and_starts_over(alerts):
    item = create(alerts)
    alerts.run_pass(now=DUE + 2 * HOUR)
    with acting_as(Identity("stf_ortiz", RIVERBEND)):
        extended = alerts.change(RIVERBEND, item.id, {"due_at": DUE + 48 * HOUR})
    staged = deliveries(alerts, item.id)
    assert staged[f"{item.id}-v{extended.version}-e"].withdrawn
    assert staged[f"{item.id}-v{extended.version}-a"].status == "open"
    doc = raw(alerts, item.id)
    assert doc["overdue_at"] == 0 and doc["escalated_due"] == 0 and doc["next_check_at"] == DUE + 48 * HOUR


def test_an_agency_directory_cannot_answer_for_does_not_hold_up_the_others(alerts, table):
    with acting_as(Identity("stf_baker", "agy_lakeside")):
        stuck = alerts.create("agy_lakeside", compliance.new_id(), {**FIELDS, "assignee_ids": ["stf_baker"]},
                              origin="staff", external_ref="", created_by="stf_baker")  # fmt: skip
    item = create(alerts, due_at=DUE + 1)  # checked after the stuck one
    table.unknown_agencies.add("agy_lakeside")
    assert alerts.run_pass(now=DUE + 2) == 1
    assert raw(alerts, item.id)["overdue_at"] == DUE + 2
    assert raw(alerts, stuck.id)["overdue_at"] == 0 and raw(alerts, stuck.id)["next_check_at"] == DUE


def test_a_backlog_larger_than_a_batch_is_worked_through_in_one_pass(alerts, monkeypatch):
    monkeypatch.setattr("services.notifications.compliance_alerts.PASS_BATCH", 2)
    items = [create(alerts) for _ in range(5)]
    assert alerts.run_pass(now=DUE + 1) == 5
    assert all(raw(alerts, item.id)["overdue_at"] == DUE + 1 for item in items)


def test_a_changed_escalation_delay_moves_the_next_check(alerts, table):
    item = create(alerts)
    alerts.run_pass(now=DUE + 1)
    table.escalation_minutes[RIVERBEND] = 24 * 60
    assert alerts.run_pass(now=DUE + HOUR) == 0
    assert raw(alerts, item.id)["next_check_at"] == DUE + 24 * HOUR


def test_unknown_and_other_agencies_items_are_not_found(alerts):
    item = create(alerts)
    with pytest.raises(NotFound):
        alerts.resolve("agy_lakeside", item.id)
    with pytest.raises(NotFound):
        alerts.resolve(RIVERBEND, "cmp_nothing")
    assert not raw(alerts, item.id)["resolved_at"]
