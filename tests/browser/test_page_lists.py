"""The Message Board's lists in a real browser, through the gateway: a team's shared message with
its Claim button and "Claimed by" state seen by two members, Sent rows naming recipients and
whole-agency messages marked, the sort menu, selecting many rows (checkboxes, Shift-click, select
all in folder) for bulk mark read / unread / archive / label, and "Mark all read" behind a
confirmation. Two staff members in two browser contexts; axe-core clean."""

from __future__ import annotations

import re
import uuid

from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_message_board import axe_violations
from tests.waits import wait_until

KIM, CHEN = "stf_riverbend_kim", "stf_riverbend_chen"
INTAKE = "team_riverbend_intake"


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:6]}"


def sent(api, username: str, **body) -> dict:
    reply = api(username).send(**body)
    assert reply.status_code == 201, reply.text
    return reply.json()


def counts(api, username: str, folder: str) -> tuple[int, int]:
    return api(username).counts(folder)


def test_a_team_message_shows_claim_and_who_claimed_it_to_every_member(people, api):
    subject = unique("Team intake")
    sent(api, "dr.reyes", to_team_ids=[INTAKE], subject=subject, body="New referral to call back.")
    wilson = people().sign_in("intake.wilson")
    thompson = people().sign_in("intake.thompson")

    expect(wilson.row(subject).locator(".badge.queue.open")).to_have_text("Team")
    wilson.open_row(subject)
    panel = wilson.page.locator("#pane .team-queue")
    expect(panel).to_contain_text("Team item: not claimed yet.")
    screenshot(wilson.page, "team-queue-open")
    assert axe_violations(wilson.page) == []
    panel.get_by_role("button", name="Claim").click()
    expect(wilson.page.locator("#pane .team-queue .queue-state")).to_contain_text("Claimed by you")
    expect(wilson.page.locator("#pane .team-queue").get_by_role("button", name="Release")).to_be_visible()
    expect(wilson.row(subject).locator(".badge.queue.claimed")).to_have_text("Claimed by you")

    # The other member's list and pane say who holds it, with no Claim.
    thompson.page.get_by_role("button", name="Refresh").click()
    expect(thompson.row(subject).locator(".badge.queue.claimed")).to_have_text("Claimed by Chris Wilson")
    thompson.open_row(subject)
    other = thompson.page.locator("#pane .team-queue")
    expect(other.locator(".queue-state")).to_contain_text("Claimed by Chris Wilson")
    expect(other.get_by_role("button", name="Claim")).to_have_count(0)
    screenshot(thompson.page, "team-queue-claimed-by-other")
    assert axe_violations(thompson.page) == []


def test_sent_rows_name_recipients_and_whole_agency_is_marked(people, api):
    subject = unique("To two")
    sent(api, "dr.reyes", to_staff_ids=[KIM, CHEN], to_team_ids=[INTAKE], subject=subject)
    everyone = unique("Everyone")
    sent(api, "dr.reyes", to_whole_agency=True, subject=everyone)
    reyes = people().sign_in("dr.reyes")
    reyes.folder("sent").click()
    expect(reyes.row(subject).locator(".who")).to_have_text("To: Jordan Kim, RN, Dr. Wei Chen, Team Intake")
    expect(reyes.row(everyone).locator(".who")).to_have_text("To: Everyone in the agency")
    screenshot(reyes.page, "lists-sent-recipients")
    kim = people().sign_in("nurse.kim")
    expect(kim.row(everyone).locator(".badge.agency")).to_have_text("Whole agency")


def test_sort_menu_orders_the_list(people, api):
    first, urgent, last = unique("Sort first"), unique("Sort urgent"), unique("Sort last")
    sent(api, "dr.reyes", to_staff_ids=[CHEN], subject=first)
    sent(api, "dr.reyes", to_staff_ids=[CHEN], subject=urgent, priority="urgent")
    sent(api, "dr.reyes", to_staff_ids=[CHEN], subject=last)
    chen = people().sign_in("dr.chen")
    page = chen.page

    def order_of(*titles: str) -> list[int]:
        rows = page.locator("#items li .subject").all_inner_texts()
        return [rows.index(t) for t in titles]

    expect(chen.row(last)).to_be_visible()
    wait_until(lambda: order_of(last, urgent, first) == sorted(order_of(last, urgent, first)))
    page.get_by_label("Sort", exact=True).select_option("oldest")
    expect(page.locator("#items")).not_to_have_attribute("aria-busy", "true")
    wait_until(lambda: order_of(first, urgent, last) == sorted(order_of(first, urgent, last)))
    page.get_by_label("Sort", exact=True).select_option("urgent")
    expect(page.locator("#items li").first).to_have_class(re.compile(r"\burgent\b"))
    wait_until(lambda: order_of(urgent, last, first) == sorted(order_of(urgent, last, first)))

    def partitioned() -> bool:  # every urgent row before every other row
        urgent_flags = [
            " urgent" in f" {c}" for c in page.locator("#items li").evaluate_all("(l) => l.map((e) => e.className)")
        ]
        return urgent_flags == sorted(urgent_flags, reverse=True)

    assert partitioned()
    screenshot(page, "lists-sorted-urgent-first")
    assert axe_violations(page) == []
    page.get_by_label("Sort", exact=True).select_option("newest")


def test_select_many_then_act_on_them_and_mark_all_read_with_a_confirmation(people, api):
    titles = [unique(f"Bulk row {n}") for n in range(4)]
    for title in titles:
        sent(api, "dr.reyes", to_staff_ids=[KIM], subject=title)
    kim = people().sign_in("nurse.kim")
    page = kim.page
    for title in titles:
        expect(kim.row(title)).to_be_visible()
    unread_before, total_before = counts(api, "nurse.kim", "messages")

    # Click the newest of the four, then Shift-click the third: three rows in a range.
    kim.row(titles[3]).locator(".pick").click()
    kim.row(titles[1]).locator(".pick").click(modifiers=["Shift"])
    expect(page.locator("#bulk-count")).to_have_text("3 selected")
    for title in titles[1:]:
        expect(kim.row(title).locator(".pick")).to_be_checked()
    expect(kim.row(titles[0]).locator(".pick")).not_to_be_checked()
    screenshot(page, "lists-bulk-selected")
    assert axe_violations(page) == []

    bar = page.get_by_role("toolbar", name="Selected items")
    bar.get_by_role("button", name="Mark read").click()
    expect(page.locator("#status")).to_contain_text("3 items marked read")
    wait_until(lambda: counts(api, "nurse.kim", "messages") == (unread_before - 3, total_before))
    for title in titles[1:]:
        expect(kim.row(title)).not_to_have_class(re.compile(r"\bunread\b"))

    kim.row(titles[2]).locator(".pick").click()
    bar.get_by_role("button", name="Mark unread").click()
    expect(page.locator("#status")).to_contain_text("1 item marked unread")
    wait_until(lambda: counts(api, "nurse.kim", "messages") == (unread_before - 2, total_before))

    label = api("nurse.kim").post("/api/v1/labels", json={"name": unique("Bulk")})
    assert label.status_code == 201, label.text
    page.get_by_role("button", name="Refresh").click()
    kim.row(titles[0]).locator(".pick").click()
    kim.row(titles[1]).locator(".pick").click()
    page.get_by_label("Label to apply").select_option(label.json()["id"])
    bar.get_by_role("button", name="Apply label").click()
    expect(page.locator("#status")).to_contain_text("2 items labelled")
    expect(kim.row(titles[0]).locator(".badge.label")).to_have_text(label.json()["name"])

    kim.row(titles[0]).locator(".pick").click()
    bar.get_by_role("button", name="Archive").click()
    expect(page.locator("#status")).to_contain_text("1 item archived")
    expect(kim.row(titles[0])).to_have_count(0)
    wait_until(lambda: counts(api, "nurse.kim", "messages")[1] == total_before - 1)

    # x selects the open item's row, and clears it again.
    kim.open_row(titles[1])
    page.keyboard.press("x")
    expect(page.locator("#bulk-count")).to_have_text("1 selected")
    expect(kim.row(titles[1]).locator(".pick")).to_be_checked()
    page.keyboard.press("x")
    expect(page.locator("#bulk-count")).to_have_text("")

    # Select all in folder, then clear it again.
    page.get_by_label("Select all in folder").check()
    expect(page.locator("#bulk-count")).to_have_text(f"{total_before - 1} selected")
    page.get_by_label("Select all in folder").uncheck()
    expect(page.locator("#bulk-count")).to_have_text("")

    # Mark all read asks first; Cancel changes nothing, confirming empties the folder's unread count.
    unread_now = counts(api, "nurse.kim", "messages")[0]
    assert unread_now > 0
    page.get_by_role("button", name="Mark all read").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(f"{unread_now} unread item")
    screenshot(page, "lists-mark-all-read-confirm")
    assert axe_violations(page) == []
    dialog.get_by_role("button", name="Cancel").click()
    assert counts(api, "nurse.kim", "messages")[0] == unread_now
    page.get_by_role("button", name="Mark all read").click()
    dialog.get_by_role("button", name="Mark all read").click()
    expect(page.locator("#status")).to_contain_text(re.compile(rf"^{unread_now} items? marked read in Messages"))
    wait_until(lambda: counts(api, "nurse.kim", "messages")[0] == 0)
    expect(kim.unread_count("messages")).to_have_text("")
    screenshot(page, "lists-mark-all-read-done")
