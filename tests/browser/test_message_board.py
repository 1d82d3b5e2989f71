"""The Message Board page in a real browser, through the gateway: two staff members in two browser
contexts, live counts, reply, reply all, labels, announcements, signatures, reminders, safety
(text as text, CSP, tokens out of storage), accessibility (axe-core), idle sign-out, narrow window."""

from __future__ import annotations

import itertools
import re
import time
import uuid

import requests
from playwright.sync_api import expect

from tests.browser.chromium import DEMO_PASSWORD
from tests.browser.conftest import AXE_SOURCE, held_request, screenshot
from tests.waits import wait_until

LIVE_S = 2.0  # a new item must show within this, without Refresh


def axe_violations(page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(AXE_SOURCE.read_text())  # evaluated by the browser's debugger: not an inline script
    return page.evaluate(
        """async () => {
          const result = await axe.run(document, {resultTypes: ["violations"]});
          return result.violations.filter(v => ["serious", "critical"].includes(v.impact))
            .map(v => v.id + ": " + v.nodes.map(n => n.target.join(" ")).join(", "));
        }"""
    )


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:6]}"


def compose_message(person, to: list[str], subject: str, body: str, urgent: bool = False) -> None:
    page = person.page
    page.get_by_role("button", name="Compose").click()
    dialog = page.locator("#compose-dialog")
    expect(dialog).to_be_visible()
    for name in to:
        page.get_by_label("Add a colleague or team").fill(name)
        page.get_by_label("Add a colleague or team").press("Enter")
        expect(dialog.locator(".chip", has_text=name)).to_be_visible()
    page.get_by_label("Subject").fill(subject)
    page.get_by_label("Message", exact=True).fill(body)
    if urgent:
        page.get_by_label("Urgent").check()


def send(person) -> None:
    person.page.locator("#compose-send").click()
    expect(person.page.locator("#compose-dialog")).to_be_hidden()


def count_of(person, folder: str) -> int:
    text = person.unread_count(folder).text_content() or ""
    return int(text) if text.strip() else 0


def test_send_pressed_again_after_a_lost_answer_sends_the_message_once(people, api):
    """The stored send answered 502 (inbox died before answering): Send again is safe."""
    reyes = people().sign_in("dr.reyes")
    page = reyes.page
    subject = unique("Lost answer")
    compose_message(reyes, ["Jordan Kim, RN"], subject, "Are you free at 4?")
    keys = []

    def lose_the_answer(route) -> None:  # inbox stores the message, then the page gets a 502 instead
        keys.append(route.request.headers.get("idempotency-key", ""))
        route.fetch()
        route.fulfill(status=502, json={"message": "An invalid response was received from the upstream server"})

    page.route("**/api/v1/messages", lose_the_answer)
    page.locator("#compose-send").click()
    # The page says it was not sent and keeps the dialog; the message is stored all the same.
    expect(page.locator("#compose-error")).to_contain_text("invalid response", timeout=15_000)
    expect(page.locator("#compose-dialog")).to_be_visible()
    assert len(keys) == 1
    page.unroute("**/api/v1/messages")
    send(reyes)  # pressed again: the same Idempotency-Key
    kim_items = api("nurse.kim").items(folder="messages", limit=100)["items"]
    assert sum(1 for item in kim_items if item["title"] == subject) == 1
    sent = api("dr.reyes").items(folder="sent", limit=100)["items"]
    assert sum(1 for item in sent if item["title"] == subject) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", keys[0])


def test_a_message_arrives_live_is_read_and_answered_and_the_sender_sees_the_reply(people, api):
    reyes = people().sign_in("dr.reyes")
    kim = people().sign_in("nurse.kim")
    before = count_of(kim, "messages")
    subject = unique("Intake at 3")

    compose_message(reyes, ["Jordan Kim, RN"], subject, "Can you take the 3pm intake?", urgent=True)
    screenshot(reyes.page, "compose-dialog")
    send(reyes)
    # Kim's count changes and the message appears without Refresh or reload.
    expect(kim.unread_count("messages")).to_have_text(str(before + 1), timeout=LIVE_S * 1000)
    row = kim.row(subject)
    expect(row).to_be_visible(timeout=LIVE_S * 1000)
    expect(row).to_have_class(re.compile(r"\bunread\b"))
    expect(row.locator(".badge.urgent")).to_have_text("Urgent")
    assert row.evaluate("el => getComputedStyle(el.querySelector('.row')).fontWeight") == "700"
    expect(kim.folder("messages")).to_have_class(re.compile(r"\bhas-unread\b"))
    screenshot(kim.page, "board")

    kim.open_row(subject)
    expect(kim.page.locator("#pane h2")).to_have_text(subject)
    expect(kim.unread_count("messages")).to_have_text(str(before) if before else "")
    screenshot(kim.page, "reading-pane")
    expect(row).not_to_have_class(re.compile(r"\bunread\b"))

    reyes_before = count_of(reyes, "messages")
    kim.page.locator("#pane").get_by_role("button", name="Reply", exact=True).click()
    kim.page.get_by_label("Message", exact=True).fill("Yes, I will take it.")
    send(kim)
    expect(reyes.unread_count("messages")).to_have_text(str(reyes_before + 1), timeout=LIVE_S * 1000)
    reyes.open_row(f"Re: {subject}")
    expect(reyes.page.locator("#pane .body")).to_have_text("Yes, I will take it.")
    assert reyes.csp_violations() == [] and kim.csp_violations() == []


def test_reply_all_reaches_every_original_recipient_but_the_replier(people, api):
    subject = unique("Team huddle")
    sent = api("dr.reyes").send(
        to_staff_ids=["stf_riverbend_kim", "stf_riverbend_chen"], subject=subject, body="Huddle?"
    )
    assert sent.status_code == 201, sent.text
    kim = people().sign_in("nurse.kim")
    kim.open_row(subject)
    kim.page.locator("#pane").get_by_role("button", name="Reply All", exact=True).click()
    expect(kim.page.locator("#compose-title")).to_contain_text("Reply All")
    kim.page.get_by_label("Message", exact=True).fill("Count me in.")
    send(kim)
    chen = api("dr.chen").items(folder="messages")["items"]
    reyes = api("dr.reyes").items(folder="messages")["items"]
    assert any(i["title"] == f"Re: {subject}" for i in chen)
    assert any(i["title"] == f"Re: {subject}" for i in reyes)
    assert not any(i["title"] == f"Re: {subject}" for i in api("nurse.kim").items(folder="messages")["items"])


def test_mark_as_unread_makes_the_message_bold_and_counted_again(people, api):
    subject = unique("Unread again")
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=subject).status_code == 201
    kim = people().sign_in("nurse.kim")
    kim.open_row(subject)
    expect(kim.row(subject)).not_to_have_class(re.compile(r"\bunread\b"))
    read_count = api("nurse.kim").counts("messages")[0]
    expect(kim.unread_count("messages")).to_have_text(str(read_count) if read_count else "")
    kim.more_options("Mark as Unread")
    expect(kim.row(subject)).to_have_class(re.compile(r"\bunread\b"))
    expect(kim.unread_count("messages")).to_have_text(str(read_count + 1))


def test_labels_are_added_by_typing_a_new_name_moved_and_removed(people, api):
    subject = unique("Label me")
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=subject).status_code == 201
    first, second = unique("Follow up"), unique("Done")
    created = api("nurse.kim").post("/api/v1/labels", json={"name": second})
    assert created.status_code == 201, created.text
    kim = people().sign_in("nurse.kim")
    kim.open_row(subject)

    kim.more_options("Add Label")
    kim.page.get_by_label("Label name (type a new name to create it)").fill(first)
    kim.page.locator("#label-ok").click()
    expect(kim.page.locator("#folders [data-label]", has_text=first)).to_be_visible()
    expect(kim.row(subject).locator(".badge.label")).to_have_text(first)

    kim.more_options("Move to Label")
    kim.page.get_by_label("From label", exact=True).select_option(label=first)
    kim.page.get_by_label("To label", exact=True).select_option(label=second)
    kim.page.locator("#label-ok").click()
    expect(kim.row(subject).locator(".badge.label")).to_have_text(second)
    kim.page.locator("#folders [data-label]", has_text=second).click()
    expect(kim.row(subject)).to_be_visible()

    kim.open_row(subject)
    kim.more_options("Remove Label")
    kim.page.get_by_label("From label", exact=True).select_option(label=second)
    kim.page.locator("#label-ok").click()
    expect(kim.row(subject)).to_be_hidden()
    item = next(i for i in api("nurse.kim").items(folder="messages", limit=100)["items"] if i["title"] == subject)
    assert item["labels"] == []


def test_an_admin_posts_an_announcement_that_both_staff_see_live_and_acknowledge(people, api):
    reyes = people().sign_in("dr.reyes")
    kim = people().sign_in("nurse.kim")
    admin = people().sign_in("admin")
    title = unique("New consent forms")
    before = {p: count_of(p, "announcements") for p in (reyes, kim)}

    admin.page.get_by_role("button", name="Compose").click()
    admin.page.get_by_label("Kind").select_option(label="Announcement")
    expect(admin.page.locator("#recipients-field")).to_be_hidden()
    admin.page.get_by_label("Title").fill(title)
    admin.page.get_by_label("Message", exact=True).fill("Use the 2027 forms from Monday.")
    admin.page.get_by_label("Acknowledgement required").check()
    admin.page.locator("#compose-send").click()
    expect(admin.page.locator("#compose-dialog")).to_be_hidden()

    for person in (reyes, kim):
        expect(person.unread_count("announcements")).to_have_text(str(before[person] + 1), timeout=LIVE_S * 1000)
        person.folder("announcements").click()
        expect(person.row(title).get_by_text("Please acknowledge")).to_be_visible()
        person.open_row(title)
        person.page.get_by_role("button", name="Acknowledge", exact=True).click()
        expect(person.page.locator("#pane")).to_contain_text("Acknowledged")
    announcement = next(a for a in api("admin").get("/api/v1/announcements").json()["items"] if a["title"] == title)
    acks = api("admin").get(f"/api/v1/announcements/{announcement['id']}/acknowledgements").json()
    assert {"stf_riverbend_reyes", "stf_riverbend_kim"} <= {a["staff_id"] for a in acks["acknowledged"]}


def test_a_staff_member_who_is_not_an_admin_has_no_announcement_option(people):
    kim = people().sign_in("nurse.kim")
    kim.page.get_by_role("button", name="Compose").click()
    options = kim.page.locator("#compose-kind option").all_text_contents()
    assert options == ["Message", "Reminder", "Signature request"]


def test_sending_to_the_whole_agency_asks_for_confirmation_first(people, api):
    kim = people().sign_in("nurse.kim")
    subject = unique("Fire drill")
    kim.page.get_by_role("button", name="Compose").click()
    kim.page.get_by_label("Whole agency").check()
    kim.page.get_by_label("Subject").fill(subject)
    kim.page.get_by_label("Message", exact=True).fill("At noon.")
    kim.page.locator("#compose-send").click()
    confirm = kim.page.locator("#confirm-dialog")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("Riverbend Behavioral Health")
    confirm.get_by_role("button", name="Cancel").click()
    expect(kim.page.locator("#compose-dialog")).to_be_visible()
    assert not any(i["title"] == subject for i in api("dr.chen").items(folder="messages")["items"])

    kim.page.locator("#compose-send").click()
    confirm.get_by_role("button", name="Send to everyone").click()
    expect(kim.page.locator("#compose-dialog")).to_be_hidden()
    # Sent once: the cancelled attempt never went out, not even late.
    assert [i["title"] for i in api("dr.chen").items(folder="messages")["items"]].count(subject) == 1


def test_signature_requests_are_signed_and_declined_from_the_reading_pane(people, api):
    reyes = people().sign_in("dr.reyes")
    title = unique("Treatment plan")
    reyes.page.get_by_role("button", name="Compose").click()
    reyes.page.get_by_label("Kind").select_option(label="Signature request")
    for name in ("Jordan Kim, RN", "Dr. Wei Chen"):
        reyes.page.get_by_label("Add a signer").fill(name)
        reyes.page.get_by_label("Add a signer").press("Enter")
        expect(reyes.page.locator("#compose-dialog .chip", has_text=name)).to_be_visible()
    reyes.page.get_by_label("Title").fill(title)
    expect(reyes.page.get_by_label("Document", exact=True).locator("option").first).to_have_text("Client document")
    reyes.page.get_by_label("Document reference").fill("doc-42")
    screenshot(reyes.page, "compose-signature-request")
    reyes.page.locator("#compose-send").click()
    expect(reyes.page.locator("#compose-dialog")).to_be_hidden()

    kim = people().sign_in("nurse.kim")
    kim.folder("signatures").click()
    kim.open_row(title)
    kim.page.get_by_role("button", name="Sign", exact=True).click()
    expect(kim.page.locator("#pane [role=alert]")).to_contain_text("attestation")
    kim.page.get_by_label("Attestation or reason").fill("Reviewed and agreed.")
    kim.page.get_by_role("button", name="Sign", exact=True).click()
    expect(kim.page.locator("#pane")).to_contain_text("Jordan Kim, RN: signed")

    chen = people().sign_in("dr.chen")
    chen.folder("signatures").click()
    chen.open_row(title)
    chen.page.get_by_label("Attestation or reason").fill("Wrong client on page 2.")
    chen.page.get_by_role("button", name="Decline").click()
    expect(chen.page.locator("#pane")).to_contain_text("Status: Declined")
    mine = api("dr.reyes").get("/api/v1/signature-requests").json()["requests"]
    assert next(r for r in mine if r["title"] == title)["status"] == "declined"


def test_a_colleague_typed_before_the_colleague_list_arrives_is_added_once_it_does(people):
    person = people()

    def sign_in_and_type() -> None:
        person.sign_in("dr.reyes")
        person.page.get_by_role("button", name="Compose").click()
        person.page.get_by_label("Add a colleague or team").fill("Jordan Kim, RN")
        person.page.get_by_label("Add a colleague or team").press("Enter")

    # The colleague list comes after the board is shown: hold it until a name has been typed.
    staff_list = held_request(person.page, "**/api/v1/directory/staff", sign_in_and_type)
    expect(person.page.locator("#compose-dialog .chip")).to_have_count(0)
    staff_list.continue_()
    expect(person.page.locator("#compose-dialog .chip", has_text="Jordan Kim, RN")).to_be_visible()
    expect(person.page.locator("#compose-error")).to_be_hidden()
    expect(person.page.get_by_label("Add a colleague or team")).to_have_value("")


def test_reminders_are_snoozed_and_completed(people, api):
    kim_api = api("nurse.kim")
    texts = [unique("Call the pharmacy"), unique("Chart review")]
    soon = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 2))
    for text in texts:
        reply = kim_api.post("/api/v1/reminders", json={"text": text, "remind_at": soon})
        assert reply.status_code == 201, reply.text
    kim = people().sign_in("nurse.kim")
    kim.folder("reminders").click()
    for text in texts:  # due within about a second of their time; delivered live
        expect(kim.row(text)).to_be_visible(timeout=15_000)
    kim.open_row(texts[0])
    kim.page.get_by_label("Snooze for").select_option(label="1 hour")
    kim.page.get_by_role("button", name="Snooze").click()
    expect(kim.row(texts[0])).to_be_hidden()
    kim.open_row(texts[1])
    kim.page.get_by_role("button", name="Complete").click()
    expect(kim.page.locator("#pane")).to_contain_text("State: completed")
    states = {
        r["text"]: r["state"] for r in kim_api.get("/api/v1/reminders", params={"limit": 100}).json()["reminders"]
    }
    assert states[texts[0]] == "snoozed" and states[texts[1]] == "completed"


def test_message_text_that_looks_like_html_is_shown_as_text(people, api):
    subject = '<img src=x onerror="window.__owned=1">'
    body = "<script>window.__owned=2</script>\n<b>not bold</b>"
    reply = api("dr.reyes").send(
        to_staff_ids=["stf_riverbend_kim"], subject=subject, body=body, links=["https://example.org/chart?id=1"]
    )
    assert reply.status_code == 201
    kim = people().sign_in("nurse.kim")
    kim.open_row(subject)
    pane = kim.page.locator("#pane")
    expect(pane.locator("h2")).to_have_text(subject)
    expect(pane.locator(".body")).to_have_text(body)
    assert pane.locator("img, script, b").count() == 0
    assert kim.page.locator("#items img").count() == 0
    link = pane.get_by_role("link", name="https://example.org/chart?id=1")
    assert link.get_attribute("rel") == "noopener noreferrer" and link.get_attribute("target") == "_blank"
    assert kim.page.evaluate("window.__owned") is None
    assert kim.csp_violations() == []


def test_the_page_sends_a_strict_csp_and_keeps_tokens_out_of_storage(people, web_stack):
    person = people()
    response = person.page.goto(f"{web_stack.gateway_url}/")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert "default-src 'none'" in csp and "style-src 'self'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    person.sign_in("nurse.kim")
    storage = person.page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert storage == [0, 0, ""]  # the refresh cookie is HttpOnly; the access token only in memory
    cookie = next(c for c in person.context.cookies() if c["name"] == "clinic_refresh")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/app/session"
    assert person.csp_violations() == []


def test_a_reload_keeps_the_user_signed_in_and_sign_out_ends_the_session(people, web_stack):
    person = people().sign_in("nurse.kim")
    tokens: list[str] = []
    person.page.on("request", lambda r: tokens.append(r.headers.get("authorization", "")))
    person.page.reload()
    expect(person.page.locator("#app")).to_be_visible()
    expect(person.page.locator("#me")).to_have_text("Jordan Kim, RN")
    token = next(t for t in tokens if t.startswith("Bearer "))
    person.page.get_by_role("button", name="Sign out").click()
    expect(person.page.locator("#signin")).to_be_visible()
    expect(person.page.locator("#signin-note")).to_have_text("You have signed out.")
    screenshot(person.page, "signed-out")
    assert axe_violations(person.page) == []
    person.page.reload()
    expect(person.page.locator("#signin")).to_be_visible()

    def refusal():  # inbox hears session.revoked.v1 a moment after sign-out
        answer = requests.get(f"{web_stack.gateway_url}/api/v1/board", headers={"Authorization": token}, timeout=5)
        return answer.json()["code"] if answer.status_code == 401 else None

    assert wait_until(refusal, timeout=15) == "session_revoked"


def test_no_serious_accessibility_violations_on_the_board_and_in_compose(people, api):
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=unique("Accessible")).status_code == 201
    kim = people().sign_in("nurse.kim")
    kim.page.locator("#items li .row").first.click()
    expect(kim.page.locator("#pane article")).to_be_visible()
    assert axe_violations(kim.page) == []
    kim.page.get_by_role("button", name="Compose").click()
    expect(kim.page.locator("#compose-dialog")).to_be_visible()
    assert axe_violations(kim.page) == []
    # Keyboard: Escape closes the dialog and Tab reaches the toolbar with a visible focus ring.
    kim.page.keyboard.press("Escape")
    expect(kim.page.locator("#compose-dialog")).to_be_hidden()
    expect(kim.page.locator("#compose")).to_be_focused()  # focus returns to what opened the dialog
    kim.page.locator("#compose").focus()
    outline = kim.page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"


def test_the_terminology_and_erx_buttons_follow_the_agency_and_the_user(people):
    reyes = people().sign_in("dr.reyes")
    expect(reyes.page.get_by_role("button", name="Client Auto-Reply")).to_be_visible()
    expect(reyes.folder("portal")).to_contain_text("Client Portal Messages")
    erx = reyes.page.get_by_role("button", name="Pending Rx Report")
    expect(erx).to_be_enabled()  # erx-bridge serves them (tests/browser/test_erx.py)
    assert erx.get_attribute("title") is None
    kim = people().sign_in("nurse.kim")
    expect(kim.page.get_by_role("button", name="Pending Rx Report")).to_be_hidden()
    lakeside = people().sign_in("nurse.foster")
    expect(lakeside.page.get_by_role("button", name="Patient Auto-Reply")).to_be_visible()


def test_the_auto_reply_dialogs_say_so_when_the_service_does_not_answer(people):
    kim = people()
    # What the gateway answers while no auto-reply service runs (or it is down): 404 or 502.
    kim.page.route(
        "**/api/v1/auto-replies/**",
        lambda route: route.fulfill(
            status=502,
            content_type="application/json",
            body='{"message": "An invalid response was received from the upstream server"}',
        ),
    )
    kim.sign_in("nurse.kim")
    for button in ("Staff Auto-Reply", "Client Auto-Reply"):
        kim.page.get_by_role("button", name=button).click()
        expect(kim.page.locator("#auto-reply-note")).to_have_text("Auto-reply is not available yet on this system.")
        expect(kim.page.locator("#auto-reply-save")).to_be_hidden()
        kim.page.get_by_role("button", name="Close").click()


def test_an_auto_reply_set_in_the_dialog_answers_a_message(people, api):
    kim = people().sign_in("nurse.kim")
    kim.page.get_by_role("button", name="Staff Auto-Reply").click()
    expect(kim.page.locator("#auto-reply-fields")).to_be_visible()
    kim.page.get_by_label("Turn on").check()
    kim.page.get_by_label("Reply with").fill("I am out until Monday.")
    kim.page.locator("#auto-reply-save").click()
    expect(kim.page.locator("#auto-reply-note")).to_contain_text("On now")
    kim.page.get_by_role("button", name="Close").click()
    subject = unique("Are you in?")
    reyes = people().sign_in("dr.reyes")
    before = count_of(reyes, "messages")
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=subject).status_code == 201
    expect(reyes.unread_count("messages")).to_have_text(str(before + 1), timeout=10_000)
    reyes.open_row(f"Re: {subject}")
    expect(reyes.page.locator("#pane .body")).to_have_text("I am out until Monday.")
    kim.page.get_by_role("button", name="Staff Auto-Reply").click()
    kim.page.get_by_label("Turn on").uncheck()
    kim.page.locator("#auto-reply-save").click()
    expect(kim.page.locator("#auto-reply-note")).to_contain_text("Off now")


def test_an_idle_user_is_warned_then_signed_out(people, api):
    admin = api("admin")
    assert admin.patch("/api/v1/directory/agency", json={"options": {"idle_signout_minutes": 2}}).status_code == 200
    subject = unique("Private note")
    body = "Results for the 3pm client are back."
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=subject, body=body).status_code == 201
    try:
        person = people()
        person.page.clock.install()
        person.sign_in("nurse.kim", fake_clock=True)
        person.open_row(subject)
        person.page.get_by_role("button", name="Compose").click()
        person.page.get_by_label("Message", exact=True).fill("A draft about the client")
        person.page.get_by_role("button", name="Cancel").click()
        person.page.clock.fast_forward("00:30")
        expect(person.page.locator("#idle-dialog")).to_be_hidden()
        person.page.clock.fast_forward("00:35")  # one minute before the two: the warning
        expect(person.page.locator("#idle-dialog")).to_be_visible()
        person.page.get_by_role("button", name="Stay signed in").click()
        expect(person.page.locator("#idle-dialog")).to_be_hidden()
        person.page.clock.fast_forward("01:10")
        expect(person.page.locator("#idle-dialog")).to_be_visible()
        person.page.clock.fast_forward("01:00")
        expect(person.page.locator("#signin")).to_be_visible()
        expect(person.page.locator("#signin-note")).to_have_text(
            "You were signed out after 2 minutes without activity."
        )
        # Nothing of the board stays behind in the page, hidden or not.
        page_text = person.page.evaluate("document.body.textContent")
        assert subject not in page_text and body not in page_text and "Jordan Kim" not in page_text
        assert person.page.locator("#compose-body").input_value() == ""
        person.page.reload()  # the session was ended, not only the page
        expect(person.page.locator("#signin")).to_be_visible()
    finally:
        assert (
            admin.patch("/api/v1/directory/agency", json={"options": {"idle_signout_minutes": 15}}).status_code == 200
        )


def test_activity_in_one_tab_keeps_the_others_signed_in(people, api):
    """Idle sign-out ends the session every tab shares, so it counts activity in any of them."""
    admin = api("admin")
    assert admin.patch("/api/v1/directory/agency", json={"options": {"idle_signout_minutes": 2}}).status_code == 200
    try:
        first = people()
        first.context.clock.install()
        first.sign_in("nurse.kim", fake_clock=True)
        other = first.context.new_page()
        other.goto(f"{first.base_url}/")
        expect(other.locator("#live-state")).to_have_text("Live")
        first.context.clock.fast_forward("00:50")
        listen = """() => {
          window.__heard = false;
          const channel = new BroadcastChannel("clinic-board-activity");
          channel.onmessage = () => { window.__heard = true; channel.close(); };
        }"""
        first.page.evaluate(listen)
        other.keyboard.press("Shift")  # working in the other tab
        first.page.wait_for_function("() => window.__heard === true", timeout=10_000)
        first.context.clock.fast_forward("00:35")  # past the first tab's own warning time
        expect(first.page.locator("#idle-dialog")).to_be_hidden()
        first.context.clock.fast_forward("00:30")  # now both tabs have been idle long enough to warn
        for page in (first.page, other):
            expect(page.locator("#idle-dialog")).to_be_visible()
        first.page.evaluate(listen)
        other.get_by_role("button", name="Stay signed in").click()
        first.page.wait_for_function("() => window.__heard === true", timeout=10_000)
        expect(first.page.locator("#idle-dialog")).to_be_hidden()  # answered in one tab, closed in all
    finally:
        assert (
            admin.patch("/api/v1/directory/agency", json={"options": {"idle_signout_minutes": 15}}).status_code == 200
        )


def test_a_narrow_window_is_still_usable(people, api):
    subject = unique("Narrow")
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=subject).status_code == 201
    kim = people({"width": 400, "height": 800}).sign_in("nurse.kim")
    compose = kim.page.get_by_role("button", name="Compose")
    expect(compose).to_be_in_viewport()
    kim.open_row(subject)
    expect(kim.page.locator("#pane h2")).to_have_text(subject)
    width = kim.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400  # nothing forces sideways scrolling
    screenshot(kim.page, "board-narrow")
    assert axe_violations(kim.page) == []
    compose.click()
    expect(kim.page.locator("#compose-dialog")).to_be_in_viewport()


def test_the_next_page_loads_on_scrolling_and_forward_and_archive_work(people, api):
    sender = api("dr.reyes")
    tag = unique("Batch")
    for n in range(55):
        assert sender.send(to_staff_ids=["stf_riverbend_patel"], subject=f"{tag} #{n:02d}").status_code == 201
    patel = people().sign_in("therapist.patel")
    rows = patel.page.locator("#items li")
    expect(rows).to_have_count(50)
    patel.page.locator("#more").scroll_into_view_if_needed()
    expect(rows).to_have_count(api("therapist.patel").counts("messages")[1])  # 55 and what else came
    expect(patel.row(f"{tag} #00")).to_be_visible()  # the oldest, from the second page
    # A live arrival adds its row on top and keeps the rows already scrolled to.
    shown = rows.count()
    patel.page.evaluate(
        """() => {
          const list = document.getElementById("items");
          window.__fewestRows = list.children.length;
          new MutationObserver(() => {
            window.__fewestRows = Math.min(window.__fewestRows, list.children.length);
          }).observe(list, {childList: true});
        }"""
    )
    late = unique("Late arrival")
    assert sender.send(to_staff_ids=["stf_riverbend_patel"], subject=late).status_code == 201
    expect(patel.row(late)).to_be_visible(timeout=LIVE_S * 1000)
    expect(rows).to_have_count(shown + 1)
    expect(rows.first).to_contain_text(late)
    expect(patel.row(f"{tag} #00")).to_be_visible()
    assert patel.page.evaluate("window.__fewestRows") == shown  # never drawn back to one page

    patel.open_row(f"{tag} #54")
    patel.page.locator("#pane").get_by_role("button", name="Forward", exact=True).click()
    patel.page.get_by_label("Add a colleague or team").fill("Dr. Wei Chen")
    patel.page.get_by_label("Add a colleague or team").press("Enter")
    expect(patel.page.locator("#compose-dialog .chip", has_text="Dr. Wei Chen")).to_be_visible()
    patel.page.get_by_label("Note (optional)").fill("For your list.")
    send(patel)
    forwarded = [i for i in api("dr.chen").items(folder="messages")["items"] if tag in i["title"]]
    assert forwarded and forwarded[0]["sender"]["id"] == "stf_riverbend_patel"

    patel.open_row(f"{tag} #53")
    patel.more_options("Archive")
    expect(patel.row(f"{tag} #53")).to_be_hidden()
    patel.folder("archive").click()
    expect(patel.row(f"{tag} #53")).to_be_visible()


def test_the_board_works_from_the_keyboard(people, api):
    first, second = unique("Keyboard one"), unique("Keyboard two")
    for subject in (first, second):
        assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_white"], subject=subject).status_code == 201
    white = people().sign_in("nurse.white")
    white.row(second).locator(".row").focus()  # the newest, first in the list
    white.page.keyboard.press("ArrowDown")
    focused = white.page.evaluate("document.activeElement.textContent")
    assert first in focused
    # A live arrival redraws the list; the keyboard focus stays on the same row.
    late = unique("Keyboard late")
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_white"], subject=late).status_code == 201
    expect(white.row(late)).to_be_visible(timeout=LIVE_S * 1000)
    expect(white.row(first).locator(".row")).to_be_focused()
    assert white.page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    white.page.keyboard.press("Enter")
    expect(white.page.locator("#pane h2")).to_have_text(first)
    white.page.get_by_role("button", name="More options").focus()
    white.page.keyboard.press("Enter")
    expect(white.page.get_by_role("menuitem", name="Mark as Unread", exact=True)).to_be_focused()
    white.page.keyboard.press("ArrowDown")
    expect(white.page.get_by_role("menuitem", name="Archive")).to_be_focused()
    white.page.keyboard.press("Escape")
    expect(white.page.get_by_role("button", name="More options")).to_be_focused()
    white.page.get_by_role("button", name="Refresh").click()
    expect(white.page.locator("#status")).to_have_text("Refreshed")


def test_abnormal_and_urgent_lab_results_are_marked_and_overdue_compliance_alerts_are_red(people, deliver):
    from google.protobuf.timestamp_pb2 import Timestamp

    from clinic.inbox.v1 import inbox_pb2

    def notice(kind, title, severity, **more):
        return inbox_pb2.DeliverItemRequest(
            kind=kind,
            recipients=inbox_pb2.Recipients(staff_ids=["stf_riverbend_kim"]),
            title=title,
            summary="Basic metabolic panel, final",
            severity=severity,
            links=[inbox_pb2.ActionLink(label="Open result", url="https://ehr.example/results/1")],
            source="lab" if kind == inbox_pb2.DELIVERED_KIND_LAB else "compliance",
            source_ref=f"ref-{uuid.uuid4().hex[:10]}",
            **more,
        )

    abnormal, urgent, overdue = unique("Potassium high"), unique("Troponin critical"), unique("Treatment plan due")
    deliver(notice(inbox_pb2.DELIVERED_KIND_LAB, abnormal, inbox_pb2.SEVERITY_ABNORMAL))
    deliver(notice(inbox_pb2.DELIVERED_KIND_LAB, urgent, inbox_pb2.SEVERITY_URGENT))
    past = Timestamp()
    past.FromSeconds(int(time.time()) - 3600)
    deliver(notice(inbox_pb2.DELIVERED_KIND_COMPLIANCE, overdue, inbox_pb2.SEVERITY_INFO, due_at=past))

    kim = people().sign_in("nurse.kim")
    kim.folder("lab").click()
    expect(kim.row(abnormal).locator(".badge.abnormal")).to_have_text("Abnormal")
    expect(kim.row(urgent).locator(".badge.urgent")).to_have_text("Urgent")
    kim.open_row(abnormal)
    link = kim.page.locator("#pane").get_by_role("link", name="Open result")
    assert link.get_attribute("href") == "https://ehr.example/results/1"
    kim.folder("compliance").click()
    row = kim.row(overdue)
    expect(row.locator(".badge.overdue")).to_have_text("Overdue")
    expect(row.locator(".subject")).to_have_css("color", "rgb(179, 38, 30)")  # the alert red


def test_collapsed_sections_stay_collapsed_for_that_user(people, deliver):
    from clinic.inbox.v1 import inbox_pb2

    lee = people().sign_in("billing.lee")
    toggle = lee.page.get_by_role("button", name="Collapse notifications")
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(lee.folder("lab")).to_be_visible()
    with lee.page.expect_response("**/api/v1/board/sections/notifications") as stored:
        toggle.click()
    assert stored.value.status == 200
    expect(lee.folder("lab")).to_be_hidden()
    expect(lee.page.get_by_role("button", name="Expand notifications")).to_have_attribute("aria-expanded", "false")
    again = people().sign_in("billing.lee")  # another browser: the choice is stored with the user
    expect(again.folder("lab")).to_be_hidden()
    # A new lab result still shows, as the collapsed section's unread total beside its heading.
    heading_count = again.page.locator("#folders .heading .count .num")
    before = int(heading_count.text_content() or 0)
    deliver(
        inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_LAB,
            recipients=inbox_pb2.Recipients(staff_ids=["stf_riverbend_lee"]),
            title=unique("Lipid panel"),
            summary="Lipid panel, final",
            severity=inbox_pb2.SEVERITY_INFO,
            source="lab",
            source_ref=f"ref-{uuid.uuid4().hex[:10]}",
        )
    )
    expect(heading_count).to_have_text(str(before + 1), timeout=LIVE_S * 1000)
    expect(again.page.locator("#folders .heading")).to_have_class(re.compile(r"\bhas-unread\b"))
    again.page.get_by_role("button", name="Expand notifications").click()
    expect(again.folder("lab")).to_be_visible()


def test_failures_are_shown_where_they_happened_and_the_message_stays_in_view(people, api):
    subject = unique("Keep me")
    assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_kim"], subject=subject).status_code == 201
    kim = people().sign_in("nurse.kim")
    page = kim.page
    expect(page.locator("#pane")).to_have_text("Select an item to read it.")
    unavailable = {"status": 503, "content_type": "application/json"}
    body = '{"code": "unavailable", "message": "the board is busy; try again shortly"}'
    page.route("**/api/v1/board/items/*/archive", lambda route: route.fulfill(body=body, **unavailable))
    kim.open_row(subject)
    kim.more_options("Archive")
    expect(page.locator("#pane [role=alert]")).to_have_text("Not done: the board is busy; try again shortly")
    expect(page.locator("#pane h2")).to_have_text(subject)  # the message is still there to act on
    expect(kim.row(subject)).to_be_visible()

    page.route("**/api/v1/board/items?*folder=sent*", lambda route: route.fulfill(body=body, **unavailable))
    kim.folder("sent").click()
    note = page.locator("#list-empty")
    expect(note).to_have_text("Could not load the list: the board is busy; try again shortly")
    expect(note).to_have_class(re.compile(r"\berror\b"))
    page.unroute("**/api/v1/board/items?*folder=sent*")
    empty = unique("Empty")
    assert api("nurse.kim").post("/api/v1/labels", json={"name": empty}).status_code == 201
    page.get_by_role("button", name="Refresh").click()
    page.locator("#folders [data-label]", has_text=empty).click()
    expect(note).to_have_text(f"Nothing in Label: {empty}.")
    expect(note).not_to_have_class(re.compile(r"\berror\b"))


def test_a_refused_event_stream_backs_off_instead_of_refreshing_in_a_loop(people):
    person = people()
    page = person.page
    refreshes: list[str] = []
    page.on("request", lambda r: refreshes.append(r.url) if "/app/session/refresh" in r.url else None)
    page.route(
        "**/app/events",
        lambda route: route.fulfill(status=401, content_type="application/json", body='{"code": "invalid_token"}'),
    )
    page.goto(f"{person.base_url}/")
    page.get_by_label("Username").fill("nurse.kim")
    page.get_by_label("Password").fill(DEMO_PASSWORD)
    streams = itertools.count(1)
    # Counted once the stream is tried a third time, after its back-off: a refresh loop would have run by then.
    with page.expect_request(lambda r: r.url.endswith("/app/events") and next(streams) == 3, timeout=15_000):
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#live-state")).to_have_text("Reconnecting…")  # refused twice: backing off
    assert len(refreshes) <= 2  # one as the page opened (no session yet), one for the stream; no loop


def test_two_tabs_reloaded_together_both_stay_signed_in(people):
    """Tabs share the refresh cookie; refreshing it twice at once would end the session as stolen."""
    first = people().sign_in("nurse.kim")
    second = first.context.new_page()
    second.goto(f"{first.base_url}/")
    expect(second.locator("#me")).to_have_text("Jordan Kim, RN")
    tabs = (first.page, second)
    for _ in range(3):
        with (
            first.page.expect_response("**/app/session/refresh?probe=1") as one,
            second.expect_response("**/app/session/refresh?probe=1") as two,
        ):
            for page in tabs:
                page.evaluate("setTimeout(() => location.reload(), 0)")
        assert (one.value.status, two.value.status) == (200, 200)
        for page in tabs:
            expect(page.locator("#me")).to_have_text("Jordan Kim, RN")
            expect(page.locator("#live-state")).to_have_text("Live")


def test_a_slow_answer_for_an_earlier_click_does_not_replace_the_item_chosen_after_it(people, api):
    first, second = unique("Slow one"), unique("Chosen one")
    for subject in (first, second):
        assert api("dr.reyes").send(to_staff_ids=["stf_riverbend_hall"], subject=subject).status_code == 201
    hall = people().sign_in("therapist.hall")
    page = hall.page
    slow_id = hall.row(first).get_attribute("data-id")
    slow_url = f"**/api/v1/board/items/{slow_id}"
    slow = held_request(page, slow_url, lambda: hall.row(first).locator(".row").click())
    hall.open_row(second)
    with page.expect_event("requestfinished", lambda r: r.url.endswith(f"/api/v1/board/items/{slow_id}")):
        slow.continue_()  # the slow answer, all of it, after the one chosen later
    # A later answer the page draws (Refresh, asked after the slow one came) proves it has handled the slow one.
    page.get_by_role("button", name="Refresh").click()
    expect(page.locator("#status")).to_have_text("Refreshed")
    expect(page.locator("#pane h2")).to_have_text(second)
