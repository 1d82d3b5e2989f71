"""Search across the board in a real browser, through the gateway: the search field above the list,
the Filters panel (sender, the agency's word for a patient, dates, kind, urgent, unread, label),
results (the agency's announcements among them) drawn and opened like any list's rows, and Clear
search back to the folder. axe-core clean."""

from __future__ import annotations

import uuid

from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_message_board import axe_violations
from tests.waits import wait_until

KIM, REYES = "stf_riverbend_kim", "stf_riverbend_reyes"


def word() -> str:
    return "zq" + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:10])


def sent(api, username: str, **body) -> dict:
    reply = api(username).send(**body)
    assert reply.status_code == 201, reply.text
    return reply.json()


def indexed(api, username: str, q: str, count: int) -> None:
    """Wait until the indexer (off the send's path) has the items."""

    def ready():
        reply = api(username).get("/api/v1/board/search", params={"q": q})
        return reply.status_code == 200 and len(reply.json()["items"]) == count

    wait_until(ready, timeout=15)


def test_search_filter_open_a_result_and_clear(people, api):
    secret = word()
    plain, urgent = f"Plain {secret[-4:]}", f"Urgent {secret[-4:]}"
    sent(api, "dr.reyes", to_staff_ids=[KIM], subject=plain, body=f"Please review the {secret} chart.")
    sent(api, "dr.reyes", to_staff_ids=[KIM], subject=urgent, body=f"{secret} today", priority="urgent")
    sent(api, "dr.chen", to_staff_ids=[KIM], subject="Not this one", body="Nothing to find here.")
    notice = f"Notice {secret[-4:]}"
    body = f"The {secret} drill is at noon."
    posted = api("admin").post("/api/v1/announcements", json={"title": notice, "body": body})
    assert posted.status_code == 201, posted.text
    indexed(api, "nurse.kim", secret, 2)

    kim = people().sign_in("nurse.kim")
    page = kim.page
    expect(page.get_by_role("search", name="Search the board")).to_be_visible()
    page.get_by_role("searchbox", name="Search").fill(secret)
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#list-title")).to_have_text("Search results")
    expect(kim.row(plain)).to_be_visible()
    expect(kim.row(urgent)).to_be_visible()
    expect(kim.row(notice)).to_be_visible()  # an announcement of the agency, above the board's results
    expect(page.locator("#items li")).to_have_count(3)
    expect(page.locator("#items li").first).to_contain_text(notice)
    expect(kim.row(notice).locator(".badge.agency")).to_have_text("Announcement")
    expect(page.locator("#status")).to_contain_text("3 results")
    expect(page.get_by_role("button", name="Clear search")).to_be_visible()
    kim.open_row(notice)
    expect(page.locator("#pane")).to_contain_text("drill is at noon")
    expect(page.locator("#pane")).to_contain_text("Whole agency")
    screenshot(page, "search-announcement")

    # Filters: the agency's word for a patient, the staff list, urgent only.
    page.get_by_role("button", name="Filters").click()
    expect(page.get_by_role("button", name="Filters")).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#search-patient-label")).to_have_text("Client")
    expect(page.locator(f'#search-sender option[value="{REYES}"]')).to_have_count(1)
    page.locator("#search-sender").select_option(REYES)
    page.get_by_label("Urgent only").check()
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#items li")).to_have_count(1)
    expect(kim.row(urgent)).to_be_visible()
    screenshot(page, "search-filtered")
    assert axe_violations(page) == []

    # A result opens in the reading pane like any row.
    kim.open_row(urgent)
    expect(page.locator("#pane")).to_contain_text(f"{secret} today")

    # Nothing matches: said so.
    page.locator("#search-sender").select_option("")
    page.get_by_label("Urgent only").uncheck()
    page.locator("#search-kind").select_option("notice")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#list-empty")).to_have_text("No items match the search.")

    # Without words, sender or patient the page asks for one and sends nothing.
    page.get_by_role("searchbox", name="Search").fill("")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-error")).to_contain_text("Type words to look for")
    assert axe_violations(page) == []

    page.get_by_role("button", name="Clear search").click()
    expect(page.locator("#list-title")).to_have_text("Messages")
    expect(page.get_by_role("searchbox", name="Search")).to_have_value("")
    expect(page.get_by_role("button", name="Clear search")).to_be_hidden()
    expect(kim.row("Not this one")).to_be_visible()
    assert kim.csp_violations() == []
