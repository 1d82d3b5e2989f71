"""Compliance Alerts rules: overdue once, escalation once and to whom, resolving clears every board."""

from __future__ import annotations

from dataclasses import replace

from clinic.inbox.v1 import inbox_pb2
from services.notifications import compliance
from services.notifications.compliance import Assignee, ComplianceItem

HOUR = 3_600_000
DUE = 1_800_000_000_000
ITEM = ComplianceItem(
    id="cmp_1",
    agency_id="agy_riverbend",
    origin="staff",
    external_ref="",
    kind="treatment_plan_review",
    title="Plan review for record 42",
    link="https://compliance.example/items/42",
    assignee_ids=("stf_patel", "stf_davis"),
    due_at=DUE,
)


def test_nothing_happens_before_the_due_time_and_the_next_look_is_at_it():
    step = compliance.check(ITEM, DUE - 1, 60)
    assert (step.report_overdue, step.escalate, step.next_check_at) == (False, False, DUE)


def test_past_the_due_time_it_is_reported_overdue_once_and_looked_at_again_at_the_escalation_point():
    step = compliance.check(ITEM, DUE, 60)
    assert step.report_overdue and not step.escalate
    assert step.next_check_at == DUE + HOUR
    reported = replace(ITEM, overdue_at=DUE)
    again = compliance.check(reported, DUE + 1, 60)
    assert not again.report_overdue and not again.escalate


def test_overdue_longer_than_the_agency_delay_escalates_once():
    reported = replace(ITEM, overdue_at=DUE)
    step = compliance.check(reported, DUE + HOUR, 60)
    assert step.escalate and not step.report_overdue and step.next_check_at is None
    escalated = replace(reported, escalated_due=DUE)
    assert compliance.check(escalated, DUE + 10 * HOUR, 60) == compliance.Check(False, False, None)


def test_an_item_first_seen_long_overdue_is_reported_and_escalated_in_one_pass():
    step = compliance.check(ITEM, DUE + 5 * HOUR, 60)
    assert step.report_overdue and step.escalate


def test_a_resolved_item_is_never_looked_at_again():
    assert compliance.check(replace(ITEM, resolved_at=DUE), DUE + 99 * HOUR, 60) == compliance.Check(False, False, None)


def test_a_new_due_time_starts_overdue_and_escalation_over():
    late = replace(ITEM, overdue_at=DUE, escalated_due=DUE, escalation_ids=("stf_hall",))
    extended = compliance.changed(late, due_at=DUE + 48 * HOUR)
    assert extended.version == 2 and extended.overdue_at == 0 and extended.escalated_due == 0
    retitled = compliance.changed(late, title="New title")
    assert retitled.escalated_due == DUE and retitled.overdue_at == DUE


def test_escalation_goes_to_supervisors_and_to_officers_for_the_unsupervised():
    assignees = [Assignee("stf_patel", "Priya Patel", "stf_hall"), Assignee("stf_davis", "Jamie Davis")]
    chosen = compliance.escalation_recipients(assignees, {"stf_hall"}, ["stf_ortiz"], ["stf_admin"])
    assert chosen == ["stf_hall", "stf_ortiz"]


def test_an_inactive_supervisor_counts_as_none():
    assignees = [Assignee("stf_patel", "Priya Patel", "stf_young")]
    assert compliance.escalation_recipients(assignees, set(), ["stf_ortiz"], ["stf_admin"]) == ["stf_ortiz"]


def test_without_compliance_officers_the_admins_are_told_and_never_the_assignees():
    assignees = [Assignee("stf_ortiz", "Sam Ortiz")]
    assert compliance.escalation_recipients(assignees, set(), ["stf_ortiz"], ["stf_admin"]) == ["stf_admin"]
    supervised = [Assignee("stf_patel", "Priya Patel", "stf_hall")]
    assert compliance.escalation_recipients(supervised, {"stf_hall"}, ["stf_ortiz"], []) == ["stf_hall"]


def test_the_assignees_item_carries_its_due_time_and_turns_urgent_once_overdue():
    open_item = compliance.assignee_delivery(ITEM, "America/Chicago", mark_unread=False)
    assert open_item.kind == inbox_pb2.DELIVERED_KIND_COMPLIANCE
    assert list(open_item.recipients.staff_ids) == ["stf_patel", "stf_davis"]
    assert open_item.due_at.ToMilliseconds() == DUE
    assert open_item.status == "open" and open_item.severity == inbox_pb2.SEVERITY_INFO
    assert open_item.title == "Treatment plan review due: Plan review for record 42"
    assert open_item.links[0].url == ITEM.link and open_item.source_ref == "cmp_1"
    overdue = compliance.assignee_delivery(replace(ITEM, overdue_at=DUE, version=2), "UTC", mark_unread=True)
    assert overdue.status == "overdue" and overdue.severity == inbox_pb2.SEVERITY_URGENT and overdue.mark_unread
    assert overdue.source_version == 2


def test_the_escalation_is_its_own_item_naming_the_assignees():
    assignees = [Assignee("stf_patel", "Priya Patel", "stf_hall")]
    escalation = compliance.escalation_delivery(ITEM, ["stf_hall"], assignees, "UTC")
    assert escalation.source_ref == "cmp_1.escalation" and list(escalation.recipients.staff_ids) == ["stf_hall"]
    assert escalation.severity == inbox_pb2.SEVERITY_URGENT and escalation.status == "escalated"
    assert "assigned to Priya Patel" in escalation.summary


def test_resolving_withdraws_the_item_and_its_escalation():
    plain = compliance.resolution_deliveries(replace(ITEM, version=3))
    assert [(d.source_ref, d.withdrawn, d.source_version) for d in plain] == [("cmp_1", True, 3)]
    escalated = compliance.resolution_deliveries(replace(ITEM, version=4, escalation_ids=("stf_hall",)))
    assert [d.source_ref for d in escalated] == ["cmp_1", "cmp_1.escalation"]
    assert all(d.withdrawn for d in escalated)


def test_partner_items_are_named_by_the_partners_own_id():
    first = compliance.partner_item_id("agy_a", "compliance-tracker", "CT-1")
    assert first == compliance.partner_item_id("agy_a", "compliance-tracker", "CT-1")
    assert first != compliance.partner_item_id("agy_b", "compliance-tracker", "CT-1")
    assert compliance.kind_label("consent_expiring") == "Consent expiring"
    assert compliance.kind_label("annual_audit") == "Annual audit"


def test_an_edit_that_changes_nothing_is_recognised():
    assert compliance.same_content(ITEM, compliance.changed(ITEM, title=ITEM.title))
    assert not compliance.same_content(ITEM, compliance.changed(ITEM, assignee_ids=("stf_patel",)))
