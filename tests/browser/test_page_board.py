"""The Message Board page's reading and answering in a real browser, through the gateway: Reply,
Reply All and Forward in plain view with keyboard shortcuts and their help, Compose that does not
send on Enter and says what is wrong next to the field, one date style in the agency's time zone,
the conversation of an open message, the lab's full result in the reading pane, Sent listing its
recipients, announcements' acknowledgement list for their author, notification rows that name their
source, landmarks and focus after sign-in, the folder list behind a menu button at 400 px, and no
console error on a first visit. Two staff members in two browser contexts; axe-core clean."""

from __future__ import annotations

import re
import uuid

from hl7.client import MLLPClient
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_message_board import axe_violations
from tests.e2e.lab_messages import POTASSIUM_CRITICAL, POTASSIUM_TEST, oru
from tests.waits import wait_until

LIVE_S = 2.0
ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
KIM, REYES, CHEN = "stf_riverbend_kim", "stf_riverbend_reyes", "stf_riverbend_chen"


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:6]}"


def sent(api, username: str, **body) -> dict:
    reply = api(username).send(**body)
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_reply_reply_all_and_forward_are_in_plain_view_with_shortcuts_and_their_help(people, api):
    first, second = unique("Shortcut one"), unique("Shortcut two")
    sent(api, "dr.reyes", to_staff_ids=[KIM, CHEN], subject=first, body="Can you both cover the 2pm?")
    sent(api, "dr.reyes", to_staff_ids=[KIM], subject=second, body="And the 4pm?")
    kim = people().sign_in("nurse.kim")
    page = kim.page
    # After signing in the board has the keyboard, in the main landmark; the first Tab is not Sign out.
    expect(page.locator("#main")).to_be_focused()
    assert page.evaluate("document.activeElement.closest('main').id") == "board"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") != "signout"
    assert page.evaluate("document.querySelector('[role=toolbar]').closest('header') !== null")

    # j opens the first item (the newest), j the next, k the one before.
    page.locator("#main").focus()
    page.keyboard.press("j")
    expect(page.locator("#pane h2")).to_have_text(second)
    page.keyboard.press("j")
    expect(page.locator("#pane h2")).to_have_text(first)
    page.keyboard.press("k")
    expect(page.locator("#pane h2")).to_have_text(second)
    page.keyboard.press("j")
    expect(page.locator("#pane h2")).to_have_text(first)

    pane = page.locator("#pane")
    for name in ("Reply", "Reply All", "Forward"):
        expect(pane.get_by_role("button", name=name, exact=True)).to_be_visible()
    pane.get_by_role("button", name="More options").click()
    menu = page.get_by_role("menuitem")
    expect(menu.first).to_be_visible()
    assert "Reply" not in menu.all_text_contents() and "Mark as Unread" in menu.all_text_contents()
    page.keyboard.press("Escape")
    screenshot(page, "pane-answer-buttons")

    page.keyboard.press("?")
    help_dialog = page.locator("#help-dialog")
    expect(help_dialog).to_be_visible()
    for key, action in (("r", "Reply"), ("a", "Reply All"), ("f", "Forward"), ("j", "next"), ("k", "previous")):
        expect(help_dialog.locator("tr", has=page.locator(f"kbd:text-is('{key}')"))).to_contain_text(action)
    screenshot(page, "shortcuts-help")
    assert axe_violations(page) == []
    page.keyboard.press("Escape")
    expect(help_dialog).to_be_hidden()

    # a: Reply All, saying who it goes to, with the original quoted.
    pane.get_by_role("heading", name=first).click()
    page.keyboard.press("a")
    dialog = page.locator("#compose-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#compose-title")).to_have_text(f"Reply All: {first}")
    expect(page.locator("#compose-to")).to_contain_text("Dr. Elena Reyes")
    expect(page.locator("#compose-to")).to_contain_text("Dr. Wei Chen")
    expect(page.locator("#compose-to")).not_to_contain_text("Jordan Kim")
    expect(page.locator("#compose-original")).to_contain_text("Dr. Elena Reyes wrote:")
    expect(page.locator("#compose-original")).to_contain_text("Can you both cover the 2pm?")
    assert not ISO_TIME.search(page.locator("#compose-original").inner_text())
    screenshot(page, "reply-all-dialog")
    assert axe_violations(page) == []
    # A shortcut key typed into a field is text, not a shortcut.
    page.get_by_label("Message", exact=True).type("jar")
    expect(page.get_by_label("Message", exact=True)).to_have_value("jar")
    page.keyboard.press("Escape")

    # r: Reply, to the sender only; f: Forward, to colleagues still to be chosen.
    pane.get_by_role("heading", name=first).click()
    page.keyboard.press("r")
    expect(page.locator("#compose-title")).to_have_text(f"Reply: {first}")
    expect(page.locator("#compose-to")).to_have_text("To: Dr. Elena Reyes")
    page.keyboard.press("Escape")
    pane.get_by_role("heading", name=first).click()
    page.keyboard.press("f")
    expect(page.locator("#compose-title")).to_have_text("Forward")
    expect(page.locator("#recipient-input")).to_be_focused()
    expect(page.locator("#compose-original")).to_contain_text("Can you both cover the 2pm?")
    screenshot(page, "forward-dialog")
    page.keyboard.press("Escape")

    # The sender sees the reply sent with the visible button.
    reyes = people().sign_in("dr.reyes")
    pane.get_by_role("button", name="Reply", exact=True).click()
    page.get_by_label("Message", exact=True).fill("Yes, I can.")
    page.locator("#compose-send").click()
    expect(dialog).to_be_hidden()
    expect(reyes.row(f"Re: {first}")).to_be_visible(timeout=LIVE_S * 1000)


def test_enter_in_the_subject_does_not_send_and_errors_are_in_plain_words_next_to_the_field(people, api):
    kim = people().sign_in("nurse.kim")
    page = kim.page
    subject = unique("Not yet")
    page.get_by_role("button", name="Compose").click()
    page.get_by_label("Subject").fill(subject)
    page.get_by_label("Subject").press("Enter")
    expect(page.locator("#compose-dialog")).to_be_visible()
    expect(page.locator("#compose-send")).to_be_enabled()
    page.get_by_label("Message", exact=True).fill("Draft")
    page.locator("#compose-send").click()
    # No recipient: said below the recipient field, which gets the focus.
    error = page.locator("#recipient-input-error")
    expect(error).to_have_text("Add at least one colleague or team, or choose Whole agency.")
    expect(page.locator("#recipient-input")).to_be_focused()
    expect(page.locator("#recipient-input")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#recipient-input")).to_have_attribute("aria-describedby", "recipient-input-error")
    expect(page.locator("#compose-error")).to_be_hidden()
    screenshot(page, "compose-field-error")
    assert axe_violations(page) == []
    page.get_by_label("Add a colleague or team").fill("Nobody Atall")
    page.get_by_label("Add a colleague or team").press("Enter")
    expect(error).to_contain_text("No colleague or team is called “Nobody Atall”")
    page.get_by_label("Add a colleague or team").fill("Dr. Wei Chen")
    page.get_by_label("Add a colleague or team").press("Enter")
    expect(page.locator("#compose-dialog .chip", has_text="Dr. Wei Chen")).to_be_visible()
    expect(error).to_have_count(0)
    page.get_by_label("Subject").fill("")
    page.locator("#compose-send").click()
    expect(page.locator("#compose-subject-error")).to_have_text("Write a subject, so the message can be found later.")
    expect(page.get_by_label("Subject")).to_be_focused()
    page.get_by_label("Subject").fill(subject)
    page.get_by_label("Subject").press("Enter")  # still not sent
    expect(page.locator("#compose-dialog")).to_be_visible()
    assert not [i for i in api("dr.chen").items(folder="messages", limit=100)["items"] if i["title"] == subject]
    page.locator("#compose-send").click()
    expect(page.locator("#compose-dialog")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("Sent")
    wait_until(
        lambda: [i for i in api("dr.chen").items(folder="messages", limit=100)["items"] if i["title"] == subject]
    )


def test_dates_are_in_one_style_in_the_agencys_time_zone_and_sent_lists_recipients(people, api):
    subject = unique("Dates")
    original = sent(api, "dr.reyes", to_staff_ids=[KIM], subject=subject, body="Original text")
    forwarded = api("nurse.kim").post(
        f"/api/v1/messages/{original['id']}/forward", json={"to_staff_ids": [CHEN], "body": "See below."}
    )
    assert forwarded.status_code == 201, forwarded.text
    chen = people().sign_in("dr.chen")
    page = chen.page
    zone = page.evaluate("import('/static/js/dom.js').then((m) => m.displayTimeZone())")
    assert zone == "America/Chicago"  # Riverbend's time zone, not the browser's
    chen.open_row(subject)
    pane = page.locator("#pane")
    expect(pane).to_contain_text("---------- Forwarded message ----------")
    text = pane.inner_text()
    assert not ISO_TIME.search(text), text  # the quoted "Sent:" line too
    assert re.search(r"Sent: \w{3} \d{1,2}, \d{4}, \d{1,2}:\d{2}\s?[AP]M C[SD]T", text), text
    screenshot(page, "dates-agency-zone")

    kim = people().sign_in("nurse.kim")
    kim.folder("sent").click()
    row = kim.row(subject)
    expect(row.locator(".who")).to_have_text("To: Dr. Wei Chen")  # not "Jordan Kim, RN"
    screenshot(kim.page, "sent-recipients")


def test_an_open_message_shows_its_conversation_collapsed_and_expandable(people, api):
    subject = unique("Thread")
    original = sent(api, "dr.reyes", to_staff_ids=[KIM], subject=subject, body="First question")
    reply = api("nurse.kim").post(f"/api/v1/messages/{original['id']}/reply", json={"body": "First answer"})
    assert reply.status_code == 201, reply.text
    reyes = people().sign_in("dr.reyes")
    reyes.open_row(f"Re: {subject}")
    thread = reyes.page.locator("#pane .thread")
    expect(thread.locator("h3")).to_have_text("Conversation (2 messages)")
    earlier = thread.locator("details")
    expect(earlier).to_have_count(1)
    expect(earlier).not_to_have_attribute("open", "")
    expect(earlier.locator(".thread-body")).to_be_hidden()
    expect(earlier.locator("summary")).to_contain_text("Dr. Elena Reyes")
    screenshot(reyes.page, "thread-collapsed")
    earlier.locator("summary").click()
    expect(earlier.locator(".thread-body")).to_have_text("First question")
    assert not ISO_TIME.search(thread.inner_text())
    screenshot(reyes.page, "thread-expanded")
    assert axe_violations(reyes.page) == []


def test_the_lab_full_result_opens_in_the_reading_pane(people, web_stack):
    mrn = "MRN-" + uuid.uuid4().hex[:8]
    with MLLPClient("127.0.0.1", web_stack.config.ports.notifications_mllp) as client:
        client.send_message(oru(patient=mrn, observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST))
    kim = people().sign_in("nurse.kim")
    page = kim.page
    kim.folder("lab").click()
    row = kim.row("Lab result: Potassium (final)")
    expect(row).to_be_visible(timeout=15_000)
    # The row names its source and says "1 critical", never the value.
    expect(row.locator(".who")).to_have_text("Lab")
    expect(row.locator(".fact")).to_have_text("1 critical")
    expect(row).not_to_contain_text("6.9")
    expect(row).to_have_class(re.compile(r"\burgent\b"))
    assert row.evaluate("el => getComputedStyle(el.querySelector('.row')).boxShadow") != "none"
    row.locator(".row").click()
    pane = page.locator("#pane")
    expect(pane.locator(".body")).to_have_text(f"Client {mrn}: 1 critical")  # Riverbend's word for a patient
    button = pane.get_by_role("button", name="Full result")
    expect(pane.get_by_role("link", name="Full result")).to_have_count(0)
    with page.expect_response("**/api/v1/lab/results/*") as answer:
        button.click()
    assert answer.value.status == 200
    table = pane.locator(".lab-result table")
    observation = table.locator("tbody tr").first
    expect(observation).to_contain_text("6.9")
    expect(observation).to_contain_text("mmol/L")
    expect(observation).to_contain_text("3.5-5.1")
    expect(observation).to_contain_text("Critical")
    expect(observation).to_have_class(re.compile(r"\burgent\b"))
    expect(button).to_have_attribute("aria-expanded", "true")
    expect(pane.locator(".lab-result")).to_contain_text("Observed: Nov 26, 2026, 7:30 AM")  # not "202611260730"
    screenshot(page, "lab-full-result")
    assert axe_violations(page) == []


def test_the_author_of_an_announcement_sees_who_acknowledged_and_the_toast_says_posted(people, api):
    admin = people().sign_in("admin")
    kim = people().sign_in("nurse.kim")
    title = unique("Fire exits")
    page = admin.page
    page.get_by_role("button", name="Compose").click()
    page.get_by_label("Kind").select_option(label="Announcement")
    page.get_by_label("Title").fill(title)
    page.get_by_label("Message", exact=True).fill("Keep them clear.")
    page.get_by_label("Acknowledgement required").check()
    page.locator("#compose-send").click()
    expect(page.locator("#status")).to_have_text("Posted")
    kim.folder("announcements").click()
    kim.open_row(title)
    expect(kim.page.locator("#pane .badge.agency")).to_have_text("Whole agency")
    kim.page.get_by_role("button", name="Acknowledge", exact=True).click()
    expect(kim.page.locator("#pane")).to_contain_text("Acknowledged")

    admin.folder("announcements").click()
    admin.open_row(title)
    pane = page.locator("#pane")
    expect(pane.get_by_role("button", name="Acknowledge", exact=True)).to_have_count(0)
    expect(pane.get_by_role("list", name="Acknowledged", exact=True)).to_contain_text("Jordan Kim, RN")
    expect(pane.get_by_role("list", name="Not yet acknowledged")).to_contain_text("Dr. Elena Reyes")
    screenshot(page, "announcement-acknowledgements")
    assert axe_violations(page) == []


def test_at_400_px_the_folders_are_behind_a_menu_button_and_a_first_visit_logs_no_error(people):
    person = people({"width": 400, "height": 800})
    page = person.page
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{person.base_url}/")
    expect(page.get_by_label("Username")).to_be_visible()
    assert errors == []  # no session yet: not an error
    person.sign_in("nurse.kim")
    toggle = page.get_by_role("button", name="Folders")
    expect(toggle).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(page.locator("#folders")).to_be_hidden()
    box = page.locator("#list-title").bounding_box()
    assert box and box["y"] < 800  # the list is on the first screen
    screenshot(page, "narrow-folders-collapsed")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(person.folder("sent")).to_be_visible()
    screenshot(page, "narrow-folders-open")
    assert axe_violations(page) == []
    person.folder("sent").click()
    expect(page.locator("#folders")).to_be_hidden()
    expect(page.locator("#list-title")).to_have_text("Sent")
    assert errors == []


def test_at_400_px_the_more_options_menu_stays_on_screen(people, api):
    subject = unique("Narrow menu")
    sent(api, "dr.reyes", to_staff_ids=[KIM], subject=subject, body="Check the menu.")
    person = people({"width": 400, "height": 700})
    page = person.page
    person.sign_in("nurse.kim")
    person.open_row(subject)
    toggle = page.locator("#pane").get_by_role("button", name="More options")
    toggle.scroll_into_view_if_needed()
    toggle.click()
    menu = page.locator("#more-options-menu")
    expect(menu).to_be_visible()
    box, button = menu.bounding_box(), toggle.bounding_box()
    assert box and button
    assert box["x"] >= 0 and box["x"] + box["width"] <= 400  # not past either edge
    assert 0 <= box["y"] and box["y"] + box["height"] <= 700  # within the window, above or below its button
    assert box["y"] >= button["y"] + button["height"] or box["y"] + box["height"] <= button["y"]  # never over it
    screenshot(page, "narrow-more-options")
    assert axe_violations(page) == []
