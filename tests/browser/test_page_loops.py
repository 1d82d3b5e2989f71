"""Closing loops on the page, in a real browser through the gateway: an agency admin's Team overview
(backlog from the dashboards API) and Retention dialogs, hidden from everyone else; coverage set from
the Staff Auto-Reply dialog and the coverer's copy marked "Covering for …"; a critical lab result's
"Acknowledge critical result" in the reading pane. axe-core clean in each new state."""

from __future__ import annotations

import datetime as dt
import uuid

from playwright.sync_api import expect

from clinic.inbox.v1 import inbox_pb2
from tests.browser.conftest import screenshot
from tests.browser.test_message_board import axe_violations

WHITE, CHEN = "stf_riverbend_white", "stf_riverbend_chen"


def test_admins_see_team_overview_and_retention_and_nobody_else_does(people):
    admin = people().sign_in("admin")
    page = admin.page
    page.get_by_role("button", name="Team overview").click()
    dialog = page.locator("#team-overview-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("section[aria-labelledby=team-overview-staff] tbody")).to_contain_text("Dr. Elena Reyes")
    expect(dialog.locator("section[aria-labelledby=team-overview-teams] tbody")).to_contain_text("Intake")
    screenshot(page, "team-overview")
    assert axe_violations(page) == []
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    page.get_by_role("button", name="Retention").click()
    retention = page.locator("#retention-dialog")
    expect(retention).to_be_visible()
    expect(retention.locator("section.retention h3")).to_have_text("Retention and legal holds")
    screenshot(page, "retention")
    assert axe_violations(page) == []
    retention.get_by_role("button", name="Close").click()

    nurse = people().sign_in("nurse.kim")
    expect(nurse.page.get_by_role("button", name="Team overview")).to_be_hidden()
    expect(nurse.page.get_by_role("button", name="Retention")).to_be_hidden()


def test_coverage_set_in_the_auto_reply_dialog_marks_the_coverers_copy(people, api):
    owner = people().sign_in("nurse.white")
    page = owner.page
    page.get_by_role("button", name="Staff Auto-Reply").click()
    panel = page.locator("#auto-reply-dialog section.coverage")
    expect(panel.locator("h3")).to_have_text("Coverage while away")
    panel.locator("#coverage-coverer").select_option(CHEN)
    ends = dt.datetime.now() + dt.timedelta(hours=4)
    panel.locator("#coverage-ends").fill(ends.strftime("%Y-%m-%dT%H:%M"))
    panel.get_by_role("button", name="Save coverage").click()
    expect(panel).to_contain_text("covers for you")
    screenshot(page, "coverage-set")
    assert axe_violations(page) == []
    page.keyboard.press("Escape")
    # My own board says so while it lasts, with a way back to the dialog.
    banner = page.locator("#away-banner")
    expect(banner).to_contain_text("Dr. Wei Chen covers for you until")
    expect(banner.get_by_role("button", name="Change")).to_be_visible()
    screenshot(page, "away-banner")
    assert axe_violations(page) == []

    subject = f"Covered {uuid.uuid4().hex[:6]}"
    sent = api("dr.reyes").send(to_staff_ids=[WHITE], subject=subject, body="Please call the family.")
    assert sent.status_code == 201, sent.text
    coverer = people().sign_in("dr.chen")
    expect(coverer.row(subject).locator(".badge.coverage")).to_contain_text("Covering for")
    coverer.open_row(subject)
    expect(coverer.page.locator("#pane .badge.coverage")).to_contain_text("Covering for")
    screenshot(coverer.page, "coverage-copy")
    assert axe_violations(coverer.page) == []
    assert api("nurse.white").delete("/api/v1/board/coverage").status_code == 204
    page.reload()
    expect(page.locator("#list-title")).to_be_visible()
    expect(page.locator("#away-banner")).to_be_hidden()


def test_a_critical_result_is_acknowledged_in_the_reading_pane(people, deliver):
    title = f"Potassium critical {uuid.uuid4().hex[:6]}"
    deliver(
        inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_LAB,
            recipients=inbox_pb2.Recipients(staff_ids=[CHEN]),
            title=title,
            summary="1 critical",
            severity=inbox_pb2.SEVERITY_URGENT,
            status="final",
            source="lab",
            source_ref=f"order-{uuid.uuid4().hex[:10]}",
        )
    )
    chen = people().sign_in("dr.chen")
    chen.page.locator('#folders [data-folder="lab"]').click()
    chen.open_row(title)
    button = chen.page.get_by_role("button", name="Acknowledge critical result")
    expect(button).to_be_visible()
    screenshot(chen.page, "critical-result-unacknowledged")
    button.click()
    expect(chen.page.locator("#pane")).to_contain_text("Acknowledged by")
    screenshot(chen.page, "critical-result-acknowledged")
    assert axe_violations(chen.page) == []


def test_the_requester_cancels_a_pending_signature_request_in_the_pane(people, api):
    title = f"Care plan countersign {uuid.uuid4().hex[:6]}"
    made = api("dr.reyes").post(
        "/api/v1/signature-requests",
        json={"document_kind": "patient", "title": title, "document_ref": "chart/12", "signer_ids": [CHEN, WHITE]},
    )
    assert made.status_code == 201, made.text
    reyes = people().sign_in("dr.reyes")
    page = reyes.page
    page.locator('#folders [data-folder="signatures"]').click()
    reyes.open_row(title)
    pane = page.locator("#pane")
    expect(pane).to_contain_text("Waiting for signatures (0 of 2 signed)")
    expect(pane).to_contain_text("Dr. Wei Chen: not answered yet")
    page.get_by_role("button", name="Cancel request").click()
    confirm = page.locator("#confirm-dialog")
    expect(confirm).to_contain_text("2 signers have not answered yet")
    confirm.get_by_role("button", name="Cancel request").click()
    expect(pane).to_contain_text("Cancelled by the requester")
    expect(page.get_by_role("button", name="Cancel request")).to_have_count(0)
    screenshot(page, "signature-cancelled")
    assert axe_violations(page) == []

    chen = people().sign_in("dr.chen")
    chen.page.locator('#folders [data-folder="signatures"]').click()
    chen.open_row(title)
    expect(chen.page.locator("#pane")).to_contain_text("Cancelled by the requester")
    expect(chen.page.locator("#pane").get_by_role("button", name="Sign", exact=True)).to_have_count(0)
