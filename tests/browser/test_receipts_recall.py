"""Read receipts and Recall on a Sent item, in a real browser through the gateway."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.test_message_board import axe_violations, unique

KIM = "stf_riverbend_kim"
CHEN = "stf_riverbend_chen"


def test_a_sent_message_shows_who_read_it_and_is_recalled_from_the_others(people, api):
    subject = unique("Wrong chart")
    sent = api("dr.reyes").send(to_staff_ids=[KIM, CHEN], subject=subject, body="Please ignore.")
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    assert api("nurse.kim").get(f"/api/v1/messages/{message_id}").status_code == 200

    reyes = people().sign_in("dr.reyes")
    page = reyes.page
    reyes.folder("sent").click()
    reyes.open_row(subject)
    receipts = page.locator("#pane section.receipts")
    expect(receipts.locator(".receipt-counts")).to_have_text("2 of 2 delivered, 1 read")
    expect(receipts.locator('li[data-status="read"]')).to_contain_text("Jordan Kim, RN")
    expect(receipts.locator('li[data-status="delivered"]')).to_contain_text("Dr. Wei Chen")
    assert axe_violations(page) == []

    # Recall asks first; Cancel keeps the message where it is.
    receipts.get_by_role("button", name="Recall").click()
    confirm = page.locator("#confirm-dialog")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("has not read it yet")
    confirm.get_by_role("button", name="Cancel").click()
    assert any(i["ref_id"] == message_id for i in api("dr.chen").items(folder="messages", limit=100)["items"])

    receipts.get_by_role("button", name="Recall").click()
    confirm.locator("#confirm-ok").click()
    result = receipts.locator(".recall-result")
    expect(result).to_contain_text("Taken back from: Dr. Wei Chen.")
    expect(result).to_contain_text("Already read by: Jordan Kim, RN.")
    expect(receipts.locator(".recall-state")).to_contain_text("1 taken back, 1 had already read it")
    expect(receipts.locator('li[data-status="recalled"]')).to_contain_text("Dr. Wei Chen")
    expect(receipts.get_by_role("button", name="Recall")).to_have_count(0)
    assert not any(i["ref_id"] == message_id for i in api("dr.chen").items(folder="messages", limit=100)["items"])
    assert any(i["ref_id"] == message_id for i in api("nurse.kim").items(folder="messages", limit=100)["items"])
    assert axe_violations(page) == []
    assert reyes.csp_violations() == []


def test_a_received_message_shows_no_receipts(people, api):
    subject = unique("Not yours to recall")
    assert api("dr.reyes").send(to_staff_ids=[KIM], subject=subject).status_code == 201
    kim = people().sign_in("nurse.kim")
    kim.open_row(subject)
    expect(kim.page.locator("#pane article .body")).to_be_visible()
    expect(kim.page.locator("#pane section.receipts")).to_have_count(0)
