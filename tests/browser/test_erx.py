"""The ePrescribing tools of the Message Board page in a real browser, through the gateway: eRx Sync,
the ePrescribing Portal and "Open in ePrescribing" (single sign-on in a new tab), the Pending Rx
Report dialog (text only, Download CSV, keyboard, axe-core), staff without ePrescribing, and what
the page says when erx-bridge refuses, fails or does not answer."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.browser.conftest import held_request, screenshot
from tests.browser.test_message_board import axe_violations

SYNC_S = 30  # a whole sync of the prescriber against the vendor simulator


def erx_button(page: Page, name: str):
    return page.locator("#erx-tools").get_by_role("button", name=name, exact=True)


def json_answer(status: int, body: dict) -> dict:
    return {"status": status, "content_type": "application/json", "body": json.dumps(body)}


def sync_now(page: Page) -> None:
    erx_button(page, "eRx Sync").click()
    expect(page.locator("#erx-status")).to_contain_text("Synced:", timeout=SYNC_S * 1000)


def assert_sso_tab(person, click, sso_address: str) -> str:
    """Clicks, and answers the address the new tab was sent to. The stack's simulator may not serve
    that path: the request is what counts, not the page it shows. The request is taken at the
    network (a route that lets it through): the tab changes process as it leaves about:blank for the
    vendor (the board's COOP), and only interception sees every such request."""
    sent: list[str] = []

    def through(route) -> None:
        sent.append(route.request.url)
        route.fallback()  # to the test's own answer, if it set one; otherwise to the network

    person.context.route(f"{sso_address}*", through)
    try:
        with person.context.expect_page() as new_tab:
            click()
        tab = new_tab.value
        tab.wait_for_url(lambda u: u.startswith(sso_address), wait_until="commit")
    finally:
        person.context.unroute(f"{sso_address}*", through)
    assert len(sent) == 1, sent
    url = sent[0]
    assert "SingleSignOnUserId" in url, url
    assert tab.url == url
    assert tab.evaluate("window.opener") is None  # the vendor's page cannot reach the board
    tab.close()
    # The address is a bearer credential: it appears nowhere in the board's page.
    assert url not in person.page.content()
    return url


# --- against the stack's erx-bridge and its vendor simulator ------------------------------------------


def test_a_prescriber_syncs_opens_the_portal_and_an_item_and_reads_the_pending_rx_report(people, web_stack):
    reyes = people().sign_in("dr.reyes")
    page = reyes.page
    for name in ("eRx Sync", "ePrescribing Portal", "Pending Rx Report"):
        expect(erx_button(page, name)).to_be_enabled()
        assert erx_button(page, name).get_attribute("title") is None

    sync_now(page)
    expect(page.locator("#erx-status")).to_have_text(re.compile(r"^Synced: \d+ new, \d+ updated, \d+ resolved$"))
    reyes.folder("erx").click()
    rows = page.locator("#items li")
    expect(rows.first).to_be_visible()
    rows.first.locator(".row").click()
    open_item = page.locator("#pane").get_by_role("button", name="Open in ePrescribing")
    expect(open_item).to_be_visible()
    screenshot(page, "erx")
    assert axe_violations(page) == []

    sso = f"{web_stack.erx_simulator_url}/LoginSingleSignOn.aspx"  # the stack's practice: the simulator
    assert_sso_tab(reyes, open_item.click, sso)
    assert_sso_tab(reyes, erx_button(page, "ePrescribing Portal").click, sso)

    erx_button(page, "Pending Rx Report").click()
    dialog = page.locator("#erx-report-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("thead th").first).to_be_visible()
    assert all(name.strip() for name in dialog.locator("thead th").all_text_contents())
    with page.expect_download() as download:
        dialog.get_by_role("button", name="Download CSV").click()
    assert re.fullmatch(r"pending-rx-\d{4}-\d{2}-\d{2}\.csv", download.value.suggested_filename)
    header = Path(download.value.path()).read_text(encoding="utf-8-sig").splitlines()[0]
    assert header and "," in header
    screenshot(page, "erx-report")
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    expect(dialog.locator("table")).to_have_count(0)  # the report does not stay in the page
    assert reyes.csp_violations() == []


def test_staff_without_eprescribing_have_no_erx_buttons(people):
    kim = people().sign_in("nurse.kim")
    for name in ("eRx Sync", "ePrescribing Portal", "Pending Rx Report"):
        expect(kim.page.get_by_role("button", name=name)).to_have_count(0)
    expect(kim.folder("erx")).to_have_count(0)


def test_the_pending_rx_report_works_from_the_keyboard_and_has_no_serious_accessibility_violations(people):
    page = people().sign_in("dr.reyes").page
    report = erx_button(page, "Pending Rx Report")
    report.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("#erx-report-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("thead th").first).to_be_visible()
    assert axe_violations(page) == []
    # Tab never reaches the page behind the dialog (inert): it goes round the dialog's controls, by way
    # of the browser's own controls (document.body here) between the last and the first.
    where = """() => {
      const el = document.activeElement;
      if (el === document.body) return "browser";
      const inside = document.getElementById("erx-report-dialog").contains(el);
      return inside ? el.id : "outside: " + el.outerHTML.slice(0, 80);
    }"""
    seen = []
    for _ in range(8):
        page.keyboard.press("Tab")
        seen.append(page.evaluate(where))
        if seen[-1] != "browser":
            assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    assert not [s for s in seen if s.startswith("outside")], seen
    assert {"erx-report-close", "erx-report-download", "erx-report-table"} <= set(seen), seen
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(report).to_be_focused()  # back where the dialog was opened from
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Close").focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()


# --- what the page does with erx-bridge's answers (answers set at the browser's network) -------------


def test_sync_progress_and_outcome_are_said_in_the_status_line(people):
    person = people().sign_in("dr.reyes")
    page = person.page
    answers = iter(
        [
            {"status": "running", "prescribers_done": 0, "prescribers_total": 2},
            {"status": "running", "prescribers_done": 1, "prescribers_total": 2},
            {
                "status": "done",
                "prescribers_done": 2,
                "prescribers_total": 2,
                "added": 3,
                "updated": 1,
                "resolved": 2,
                "errors": [],
            },
        ]
    )
    page.route(
        "**/api/v1/erx/sync", lambda route: route.fulfill(**json_answer(202, {"sync_id": "syn_1", "status": "running"}))
    )
    page.route(
        "**/api/v1/erx/sync/syn_1",
        lambda route: route.fulfill(**json_answer(200, {"sync_id": "syn_1", **next(answers)})),
    )
    status = page.locator("#erx-status")
    expect(status).to_have_attribute("aria-live", "polite")
    with page.expect_request("**/api/v1/erx/sync") as started:
        erx_button(page, "eRx Sync").click()
    assert started.value.method == "POST" and started.value.post_data is None  # a sync of oneself: no body
    assert started.value.headers["authorization"].startswith("Bearer ")
    expect(status).to_have_text("eRx Sync: 1 of 2 prescribers…")
    expect(erx_button(page, "eRx Sync")).to_have_attribute("aria-disabled", "true")
    with page.expect_response("**/api/v1/board"):  # the counts and the list are fetched again
        expect(status).to_have_text("Synced: 3 new, 1 updated, 2 resolved")
    expect(erx_button(page, "eRx Sync")).not_to_have_attribute("aria-disabled", "true")

    page.unroute("**/api/v1/erx/sync/syn_1")
    failed = {
        "sync_id": "syn_1",
        "status": "failed",
        "prescribers_done": 0,
        "prescribers_total": 1,
        "added": 0,
        "updated": 0,
        "resolved": 0,
        "errors": [{"code": "vendor_rejected", "message": "the vendor refused the practice's credentials"}],
    }
    page.route("**/api/v1/erx/sync/syn_1", lambda route: route.fulfill(**json_answer(200, failed)))
    erx_button(page, "eRx Sync").click()
    expect(status).to_have_text("eRx Sync failed: the vendor refused the practice's credentials.")
    expect(status).to_have_class(re.compile(r"\berror\b"))


def test_failures_and_timeouts_are_said_and_the_buttons_stay_usable(people):
    person = people()
    page = person.page
    page.clock.install()
    person.sign_in("dr.reyes", fake_clock=True)
    status = page.locator("#erx-status")
    unavailable = json_answer(503, {"code": "vendor_unavailable", "message": "the vendor did not answer"})
    page.route("**/api/v1/erx/sync", lambda route: route.fulfill(**unavailable))
    erx_button(page, "eRx Sync").click()
    expect(status).to_have_text(
        "eRx Sync: ePrescribing is not available right now (the vendor did not answer). Try again in a few minutes."
    )
    expect(erx_button(page, "eRx Sync")).not_to_have_attribute("aria-disabled", "true")
    with page.expect_request("**/api/v1/erx/sync"):  # usable again at once
        erx_button(page, "eRx Sync").click()
    page.unroute("**/api/v1/erx/sync")

    # The portal's tab, opened on the click, closes again when there is no address for it.
    page.route("**/api/v1/erx/sso", lambda route: route.fulfill(**json_answer(502, {"message": "Bad gateway"})))
    with person.context.expect_page() as tab:
        erx_button(page, "ePrescribing Portal").click()
    if not tab.value.is_closed():
        tab.value.wait_for_event("close")
    expect(status).to_have_text(
        "ePrescribing Portal: ePrescribing is not available right now. Try again in a few minutes."
    )

    # No answer at all: the report says so once the page stops waiting.
    dialog = page.locator("#erx-report-dialog")
    held = held_request(page, "**/api/v1/erx/reports/pending-rx*", erx_button(page, "Pending Rx Report").click)
    expect(dialog.locator("#erx-report-note")).to_have_text("Loading…")
    page.clock.fast_forward("00:31")
    expect(dialog.locator("#erx-report-note")).to_have_text(
        "The report could not be loaded: ePrescribing did not answer in time. Try again in a minute."
    )
    held.abort()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    for name in ("eRx Sync", "ePrescribing Portal", "Pending Rx Report"):
        expect(erx_button(page, name)).to_be_enabled()


def test_a_user_erx_bridge_refuses_loses_the_buttons(people):
    person = people().sign_in("dr.reyes")
    page = person.page
    refused = json_answer(
        403, {"code": "erx_not_enabled", "message": "ePrescribing is not enabled for this staff member"}
    )
    page.route("**/api/v1/erx/**", lambda route: route.fulfill(**refused))
    erx_button(page, "eRx Sync").click()
    expect(page.locator("#erx-tools")).to_be_hidden()
    expect(page.locator("#erx-status")).to_contain_text("ePrescribing is not enabled for your account")


def test_the_report_is_shown_as_text(people):
    page = people().sign_in("dr.reyes").page
    csv = (
        "Patient,Medication,Note\r\n"
        '"Doe, Jane","<img src=x onerror=""window.__owned=1"">","line one\nline two"\r\n'
        "Roe Rick,<b>sertraline</b>,\r\n"
    )
    page.route(
        "**/api/v1/erx/reports/pending-rx*", lambda route: route.fulfill(status=200, content_type="text/csv", body=csv)
    )
    with page.expect_request("**/api/v1/erx/reports/pending-rx*") as asked:
        erx_button(page, "Pending Rx Report").click()
    assert asked.value.url.endswith("/api/v1/erx/reports/pending-rx?format=csv")
    table = page.locator("#erx-report-dialog table")
    expect(table.locator("thead th")).to_have_text(["Patient", "Medication", "Note"])
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tbody tr").first.locator("td")).to_have_text(
        ["Doe, Jane", '<img src=x onerror="window.__owned=1">', "line one\nline two"]
    )
    assert table.locator("img, b").count() == 0 and page.evaluate("window.__owned") is None
    expect(page.locator("#erx-report-note")).to_have_text("2 pending prescriptions.")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    assert Path(download.value.path()).read_bytes() == csv.encode()  # the server's bytes, as sent


def test_signing_out_stops_a_running_sync_and_empties_the_report(people):
    person = people()
    page = person.page
    page.clock.install()
    person.sign_in("dr.reyes", fake_clock=True)
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/api/v1/erx/sync/" in r.url else None)
    page.route(
        "**/api/v1/erx/sync", lambda route: route.fulfill(**json_answer(202, {"sync_id": "syn_2", "status": "running"}))
    )
    running = json_answer(200, {"sync_id": "syn_2", "status": "running", "prescribers_done": 0, "prescribers_total": 1})
    page.route("**/api/v1/erx/sync/syn_2", lambda route: route.fulfill(**running))
    page.route(
        "**/api/v1/erx/reports/pending-rx*",
        lambda route: route.fulfill(
            status=200, content_type="text/csv", body="Patient,Medication\nDoe Jane,sertraline\n"
        ),
    )
    erx_button(page, "eRx Sync").click()
    expect(page.locator("#erx-status")).to_have_text("eRx Sync: syncing…")
    with page.expect_request("**/api/v1/erx/sync/syn_2"):
        page.clock.fast_forward(1000)
    expect(page.locator("#erx-status")).to_have_text("eRx Sync: 0 of 1 prescribers…")
    erx_button(page, "Pending Rx Report").click()
    expect(page.locator("#erx-report-dialog td").first).to_have_text("Doe Jane")

    page.locator("#signout").dispatch_event("click")  # the modal report is open: as the idle sign-out does
    expect(page.locator("#signin")).to_be_visible()
    asked = len(polls)
    page.clock.fast_forward("00:05")  # five poll intervals
    with page.expect_request("**/healthz"):  # a later request: any poll would have been sent before it
        page.evaluate("fetch('/healthz')")
    assert len(polls) == asked
    text = page.evaluate("document.body.textContent")
    assert "Doe Jane" not in text and "eRx Sync:" not in text


def test_open_in_eprescribing_and_the_portal_ask_for_their_address_and_open_it_in_a_new_tab(people, deliver, web_stack):
    from clinic.inbox.v1 import inbox_pb2

    title = f"Refill request {uuid.uuid4().hex[:6]}"
    deliver(
        inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_LAB,
            recipients=inbox_pb2.Recipients(staff_ids=["stf_riverbend_reyes"]),
            title=title,
            summary="A notice carrying an eRx item's link, as erx-bridge's items do",
            severity=inbox_pb2.SEVERITY_INFO,
            links=[
                inbox_pb2.ActionLink(
                    label="Open in ePrescribing", url=f"{web_stack.gateway_url}/api/v1/erx/sso/patient/erx_item_1"
                ),
                inbox_pb2.ActionLink(label="Open result", url="https://ehr.example/results/1"),
            ],
            source="lab",
            source_ref=f"ref-{uuid.uuid4().hex[:10]}",
        )
    )
    reyes = people().sign_in("dr.reyes")
    page = reyes.page
    vendor = "https://vendor.example/LoginSingleSignOn.aspx"
    asked: list[dict] = []

    def sso(route):
        asked.append(route.request.post_data_json)
        url = f"{vendor}?SingleSignOnClinicId=1&SingleSignOnUserId=2&SingleSignOnCode=secret{len(asked)}"
        route.fulfill(**json_answer(200, {"url": url, "expires_at": "2026-12-06T21:00:00Z"}))

    page.route("**/api/v1/erx/sso", sso)
    reyes.context.route(f"{vendor}*", lambda route: route.fulfill(status=200, content_type="text/plain", body="vendor"))
    reyes.folder("lab").click()
    reyes.open_row(title)
    pane = page.locator("#pane")
    expect(pane.get_by_role("link", name="Open result")).to_have_attribute("href", "https://ehr.example/results/1")
    expect(pane.get_by_role("link", name="Open in ePrescribing")).to_have_count(0)  # a button, not a link
    url = assert_sso_tab(reyes, pane.get_by_role("button", name="Open in ePrescribing").click, vendor)
    assert url.endswith("SingleSignOnCode=secret1")
    assert asked[-1] == {"context": "patient", "item_id": "erx_item_1"}
    assert_sso_tab(reyes, erx_button(page, "ePrescribing Portal").click, vendor)
    assert asked[-1] == {"context": "home"}
    reyes.folder("erx").click()
    assert_sso_tab(reyes, erx_button(page, "ePrescribing Portal").click, vendor)
    assert asked[-1] == {"context": "notifications"}
    expect(page.locator("#erx-status")).to_have_text("ePrescribing Portal: opened in a new tab.")
    assert reyes.csp_violations() == []
