"""Cloud Communications actions on the Message Board page, in a real browser through the gateway of a
whole stack: a Direct message delivered over SMTP (S/MIME built with the openssl CLI) is read and
answered from the page, and its sent item shows each recipient's state as the partner HISP's MDNs
(sent back over SMTP) arrive; a fax from the simulator is sent on from the page and its sent item
says "Delivered" after the simulator's status callbacks; a triage suggestion is confirmed with one
click and corrected through the patient search. Keyboard, axe-core and CSP checks along the way."""

from __future__ import annotations

import email
import email.policy
import random
import re
import uuid
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Page, expect

from services.fax_simulator.pdf import sample_pdf
from services.launcher import free_port
from tests.browser.conftest import screenshot
from tests.browser.test_message_board import axe_violations
from tests.cloud_direct_helpers import (
    CCDA,
    PARTNER,
    RIVERBEND_INTAKE,
    Sink,
    direct_message,
    encrypt,
    send,
    sign,
    with_headers,
)
from tests.waits import wait_until

RIVERBEND_FAX = "+15555550100"
SINK_PORT = free_port()  # the partner HISP: where cloud-comms relays outbound Direct messages and MDNs
ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
STATUS_S = 30_000  # ms: a state the page learns by asking again every 3 s


@pytest.fixture(scope="module")
def stack_env() -> dict[str, str]:
    """cloud-comms relays to this module's partner HISP sink, and looks for MDNs to send often."""
    return {"CLOUD_SMTP_RELAY": f"127.0.0.1:{SINK_PORT}", "CLOUD_DIRECT_MDN_PASS_S": "0.2"}


@pytest.fixture(scope="module")
def partner_hisp(web_stack) -> Iterator[Sink]:
    with Sink(SINK_PORT) as running:
        yield running


def sign_in(people, username: str):
    person = people().sign_in(username)
    person.folder("cloud").click()
    expect(person.page.locator("#list-title")).to_have_text("Cloud Communications")
    return person


def open_item(person, title: str) -> None:
    row = person.row(title).first
    expect(row).to_be_visible(timeout=20_000)  # delivered through inbox, shown by the live stream
    row.locator(".row").click()
    expect(person.page.locator("#pane article h2")).to_have_text(title)
    expect(person.page.locator("#pane section.cloud")).not_to_have_attribute("aria-busy", "true")


def no_raw_times(page: Page) -> None:
    assert not ISO.search(page.locator("#pane").inner_text()), page.locator("#pane").inner_text()


# --- Direct -----------------------------------------------------------------------------------------
def mdn(certs, original_message_id: str, disposition: str) -> bytes:
    """The partner HISP's MDN for our message, signed with its certificate and encrypted for Riverbend."""
    boundary = f"report_{uuid.uuid4().hex}"
    # A final-delivery dispatched carries the Direct IG's extension field (else it is not Delivered).
    final = "X-DIRECT-FINAL-DESTINATION-DELIVERY:\r\n" if disposition == "dispatched" else ""
    report = (
        f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nYour message was {disposition}.\r\n"
        f"--{boundary}\r\nContent-Type: message/disposition-notification\r\n\r\n"
        "Reporting-UA: direct.partner.example; partner HISP\r\n"
        f"Original-Recipient: rfc822;{PARTNER}\r\nFinal-Recipient: rfc822;{PARTNER}\r\n"
        f"Original-Message-ID: {original_message_id}\r\n"
        f"Disposition: automatic-action/MDN-sent-automatically; {disposition}\r\n{final}\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    enveloped = encrypt(sign(report, certs), certs / "agency-riverbend.cert.pem")
    return with_headers(enveloped, to=RIVERBEND_INTAKE, subject=f"{disposition.title()}: your message")


def relayed_to_partner(sink: Sink, message_id: str) -> bool:
    for raw in list(sink.messages):
        if email.message_from_bytes(raw, policy=email.policy.default).get("Message-ID", "").strip() == message_id:
            return True
    return False


def test_a_direct_message_is_answered_from_the_page_and_its_delivery_followed(people, api, web_stack, partner_hisp):
    certs = web_stack.cloud_direct_certs
    subject = f"Referral {uuid.uuid4().hex[:6]}"
    assert send(web_stack.config.ports.cloud_comms_smtp, direct_message(certs, subject=subject)) == (250, b"ok")

    person = sign_in(people, "intake.wilson")
    page = person.page
    open_item(person, f"Direct: {subject}")
    pane = page.locator("#pane")
    expect(pane).to_contain_text("Please see the attached referral.")
    expect(pane).to_contain_text(f"From: {PARTNER}")
    no_raw_times(page)
    assert axe_violations(page) == []

    # The attachment comes with the bearer token, under its own name.
    with page.expect_download() as download:
        pane.get_by_role("button", name="Download referral.xml").click()
    assert download.value.suggested_filename == "referral.xml"
    assert open(download.value.path(), "rb").read() == CCDA

    reply = pane.get_by_role("button", name="Reply", exact=True)
    reply.click()
    dialog = page.locator("#direct-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("From")).to_have_value(RIVERBEND_INTAKE)
    expect(dialog.get_by_label("To", exact=True)).to_have_value(PARTNER)
    expect(dialog.get_by_label("Subject")).to_have_value(f"Re: {subject}")
    expect(dialog.get_by_label("Message")).to_be_focused()
    assert axe_violations(page) == []
    page.keyboard.type("Thank you, we will schedule the intake this week.")
    screenshot(page, "cloud-direct-reply")
    outbound = lambda r: r.method == "POST" and r.url.endswith("/api/v1/cloud/direct/outbound")  # noqa: E731
    with page.expect_request(outbound) as sending:
        dialog.get_by_role("button", name="Send").click()
    # A retry after a lost answer is safe: the page names each send with an Idempotency-Key.
    assert re.fullmatch(r"[0-9a-f]{32}", sending.value.headers.get("idempotency-key", ""))
    expect(dialog).to_be_hidden()
    expect(page.locator("#status")).to_contain_text(f"Direct message to {PARTNER} queued for sending")

    sent_title = f"Direct to {PARTNER}: Re: {subject}"
    open_item(person, sent_title)
    status = pane.locator(".cloud-status")
    expect(status).to_have_text(re.compile(r"Status: (Sent|Received by their system|Delivered)"), timeout=STATUS_S)

    wilson = api("intake.wilson")
    sent_item = next(i for i in wilson.items(folder="cloud", limit=100)["items"] if i["title"] == sent_title)
    link = wilson.get(f"/api/v1/board/items/{sent_item['id']}").json()["links"][0]["url"]
    outbound = wilson.get(link[link.index("/api/v1/cloud/") :]).json()
    assert outbound["in_reply_to"] and outbound["text"] == "Thank you, we will schedule the intake this week."
    wait_until(lambda: relayed_to_partner(partner_hisp, outbound["message_id"]), timeout=20, message="relayed")
    expect(status).to_have_text("Status: Sent", timeout=STATUS_S)

    smtp = web_stack.config.ports.cloud_comms_smtp
    assert send(smtp, mdn(certs, outbound["message_id"], "processed")) == (250, b"ok")
    recipient = pane.locator("ul.recipients li", has_text=PARTNER)
    expect(recipient).to_contain_text("Received by their system", timeout=STATUS_S)
    assert send(smtp, mdn(certs, outbound["message_id"], "dispatched")) == (250, b"ok")
    expect(status).to_have_text("Status: Delivered", timeout=STATUS_S)
    expect(recipient).to_contain_text("Delivered")
    states = pane.locator("ol.trail .state")
    expect(states.filter(has_text=re.compile("^Received by their system$"))).to_have_count(1)
    expect(states.filter(has_text=re.compile("^Delivered$"))).to_have_count(1)
    no_raw_times(page)
    assert axe_violations(page) == []
    screenshot(page, "cloud-direct-sent")
    assert person.csp_violations() == []


def test_a_new_direct_message_to_an_address_without_a_certificate_is_refused_in_words(people):
    person = sign_in(people, "intake.wilson")
    page = person.page
    page.get_by_role("button", name="New Direct message").click()
    dialog = page.locator("#direct-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("heading")).to_have_text("New Direct message")
    dialog.get_by_label("To", exact=True).fill("not an address")
    dialog.get_by_label("Subject").fill("Records request")
    dialog.get_by_label("Message").fill("Please send the discharge summary.")
    dialog.get_by_role("button", name="Send").click()
    expect(dialog.locator("#direct-error")).to_contain_text("is not a Direct address")

    dialog.get_by_label("To", exact=True).fill("records@direct.nowhere.example")
    dialog.get_by_label("Attach files (10 MB in all)").set_input_files(
        files=[{"name": "request.txt", "mimeType": "text/plain", "buffer": b"Discharge summary, please."}]
    )
    expect(dialog.locator("#direct-file-list")).to_contain_text("request.txt")
    dialog.get_by_role("button", name="Send").click()
    expect(dialog.locator("#direct-error")).to_contain_text("No trusted certificate for that address")
    expect(dialog).to_be_visible()
    assert axe_violations(page) == []
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(dialog.locator("input, textarea")).to_have_count(0)  # nothing typed stays in the page
    expect(page.get_by_role("button", name="New Direct message")).to_be_focused()
    assert person.csp_violations() == []


def test_a_direct_message_is_forwarded_with_the_attachments_chosen(people, api, web_stack, partner_hisp):
    certs = web_stack.cloud_direct_certs
    subject = f"Lab results {uuid.uuid4().hex[:6]}"
    assert send(web_stack.config.ports.cloud_comms_smtp, direct_message(certs, subject=subject)) == (250, b"ok")
    person = sign_in(people, "intake.thompson")
    page = person.page
    open_item(person, f"Direct: {subject}")
    page.locator("#pane").get_by_role("button", name="Forward").click()
    dialog = page.locator("#direct-dialog")
    expect(dialog.get_by_role("heading")).to_have_text(f"Forward: {subject}")
    expect(dialog.get_by_label("Subject")).to_have_value(f"Fwd: {subject}")
    expect(dialog.get_by_label("Message")).to_have_value(
        re.compile("Forwarded message.*Please see the attached referral", re.S)
    )
    expect(dialog.get_by_label("referral.xml")).to_be_checked()
    dialog.get_by_label("note.pdf").uncheck()
    dialog.get_by_label("To", exact=True).fill(PARTNER)
    dialog.get_by_role("button", name="Send").click()
    expect(dialog).to_be_hidden()

    open_item(person, f"Direct to {PARTNER}: Fwd: {subject}")
    pane = page.locator("#pane")
    expect(pane.get_by_role("button", name="Download referral.xml")).to_be_visible()
    expect(pane.get_by_role("button", name="Download note.pdf")).to_have_count(0)
    with page.expect_download() as download:
        pane.get_by_role("button", name="Download referral.xml").click()
    assert open(download.value.path(), "rb").read() == CCDA
    expect(pane.locator(".cloud-status")).to_have_text(re.compile(r"Status: (Queued|Sent)"))
    assert person.csp_violations() == []


def test_a_pdf_attachment_of_a_direct_message_is_faxed(people, web_stack):
    certs = web_stack.cloud_direct_certs
    subject = f"Consult note {uuid.uuid4().hex[:6]}"
    assert send(web_stack.config.ports.cloud_comms_smtp, direct_message(certs, subject=subject)) == (250, b"ok")
    person = sign_in(people, "intake.wilson")
    page = person.page
    open_item(person, f"Direct: {subject}")
    page.locator("#pane").get_by_role("button", name="Send Fax").click()
    dialog = page.locator("#fax-dialog")
    expect(dialog.get_by_label("note.pdf")).to_be_checked()
    to = f"+1555200{random.randrange(10**4):04d}"  # an exchange Send Fax allows (not N11, not 555)
    dialog.get_by_label("To (fax number)").fill(to)
    dialog.get_by_role("button", name="Send fax").click()
    expect(dialog).to_be_hidden()
    open_item(person, f"Fax to {to}")
    expect(page.locator("#pane .cloud-status")).to_have_text("Status: Delivered", timeout=STATUS_S)
    assert person.csp_violations() == []


# --- faxes -------------------------------------------------------------------------------------------
def inbound_fax(web_stack, pages: int = 1, **fields) -> str:
    caller = f"+1555{random.randrange(10**6, 10**7)}"
    reply = requests.post(
        f"{web_stack.fax_simulator_url}/simulator/inbound",
        json={"from": caller, "to": RIVERBEND_FAX, "pages": pages, **fields},
        timeout=60,
    )
    assert reply.status_code == 201 and reply.json()["answers"] == [200], reply.text
    return caller


def test_a_received_fax_is_viewed_and_sent_on_until_delivered(people, web_stack):
    caller = inbound_fax(web_stack, pages=2)
    person = sign_in(people, "intake.wilson")
    page = person.page
    open_item(person, f"Fax from {caller}")
    pane = page.locator("#pane")
    expect(pane).to_contain_text("Pages: 2")
    no_raw_times(page)

    # The PDF opens in a tab of its own, fetched with the token (a blob: address, no token in it).
    with person.context.expect_page() as opened:
        pane.get_by_role("button", name="View PDF").click()
    expect(opened.value).to_have_url(re.compile(r"^blob:"))
    opened.value.close()

    pane.get_by_role("button", name="Send Fax").click()
    dialog = page.locator("#fax-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("To (fax number)")).to_be_focused()
    expect(dialog.get_by_label("From")).to_have_value(RIVERBEND_FAX)
    expect(dialog.get_by_label("This fax (2 pages)")).to_be_checked()
    page.keyboard.type("12")
    dialog.get_by_role("button", name="Send fax").click()
    expect(dialog.locator("#fax-error")).to_contain_text("not a valid fax number")
    to = f"+1555200{random.randrange(10**4):04d}"  # an exchange Send Fax allows (not N11, not 555)
    dialog.get_by_label("To (fax number)").fill(to)
    assert axe_violations(page) == []
    screenshot(page, "cloud-fax-send")
    dialog.get_by_role("button", name="Send fax").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#status")).to_contain_text(f"Fax to {to} queued for sending")

    open_item(person, f"Fax to {to}")
    expect(pane.locator(".cloud-status")).to_have_text("Status: Delivered", timeout=STATUS_S)
    expect(pane).to_contain_text(f"To: {to}")
    expect(pane).to_contain_text("by Chris Wilson")
    expect(pane.locator("ol.trail .state").filter(has_text=re.compile("^Delivered$"))).to_have_count(1)
    no_raw_times(page)
    assert axe_violations(page) == []
    screenshot(page, "cloud-fax-sent")
    assert person.csp_violations() == []


# --- triage ------------------------------------------------------------------------------------------
def test_a_triage_suggestion_is_confirmed_with_one_click_and_corrected(people, api, web_stack):
    caller = inbound_fax(web_stack)
    person = sign_in(people, "intake.thompson")
    page = person.page
    open_item(person, f"Fax from {caller}")
    triage = page.locator("#pane section.triage")
    suggestion = triage.locator(".triage-suggestion")
    expect(suggestion).to_have_text(
        re.compile(r"Suggested client: Maria Lopez · DOB 03/12/1984 · MRN RB100234 — \d+% match \(.*MRN\)"),
        timeout=STATUS_S,
    )
    expect(triage).to_contain_text("Document type: Referral")
    assert axe_violations(page) == []
    screenshot(page, "cloud-triage-suggested")

    confirm = triage.get_by_role("button", name="Confirm")
    confirm.focus()
    page.keyboard.press("Enter")
    outcome = triage.locator(".triage-outcome")
    expect(outcome).to_have_text(re.compile(r"^Confirmed by Dana Thompson at \d{1,2}:\d{2}"))
    expect(outcome).to_be_focused()
    expect(triage).to_contain_text("Client: Maria Lopez · DOB 03/12/1984 · MRN RB100234")

    triage.get_by_role("button", name="Correct…").click()
    dialog = page.locator("#triage-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Find a client (name or MRN)").fill("Carter")
    page.keyboard.press("Enter")
    carter = dialog.get_by_label(re.compile(r"^James Carter · DOB 11/02/1975 · MRN RB100871"))
    expect(carter).to_be_visible()
    carter.check()
    dialog.get_by_label("Document type").select_option(label="Lab report")
    assert axe_violations(page) == []
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    expect(triage).to_contain_text("Client: James Carter · DOB 11/02/1975 · MRN RB100871")
    expect(triage).to_contain_text("Document type: Lab report")
    expect(outcome).to_have_text(re.compile(r"^Confirmed by Dana Thompson at "))
    no_raw_times(page)
    screenshot(page, "cloud-triage-confirmed")

    fax_path = triage.get_attribute("data-document")
    view = api("intake.thompson").get(f"/api/v1/cloud/triage/{fax_path}").json()
    assert view["state"] == "confirmed"
    assert (view["confirmed"]["patient"]["mrn"], view["confirmed"]["document_type"]) == ("RB100871", "lab_report")
    assert view["confirmed"]["by"]["name"] == "Dana Thompson" and view["confirmed"]["automatic"] is False
    assert person.csp_violations() == []


def test_a_fax_naming_two_patients_says_so_before_anyone_confirms(people, web_stack):
    text = "LAB REPORT\nPatient: Maria Lopez\nDOB: 03/12/1984\nMRN: RB100234\n\nPatient: James Carter\nDOB: 11/02/1975"
    caller = inbound_fax(web_stack, text=text)
    person = sign_in(people, "intake.wilson")
    page = person.page
    open_item(person, f"Fax from {caller}")
    triage = page.locator("#pane section.triage")
    reasons = triage.get_by_role("list", name="Check before confirming")
    expect(reasons).to_contain_text("More than one patient is named in this document", timeout=STATUS_S)
    expect(triage.locator(".triage-suggestion")).to_contain_text("Suggested client:")
    assert axe_violations(page) == []


def test_an_uploaded_pdf_is_faxed_from_the_folder(people, web_stack):
    person = sign_in(people, "intake.wilson")
    page = person.page
    page.get_by_role("button", name="Send a fax").click()
    dialog = page.locator("#fax-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Upload a PDF")).to_be_checked()
    number = f"555 {random.randrange(100, 1000)} {random.randrange(1000, 10000)}"
    dialog.get_by_label("To (fax number)").fill(number)
    dialog.get_by_label("PDF to upload (20 MB at most)").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a pdf"}]
    )
    dialog.get_by_role("button", name="Send fax").click()
    expect(dialog.locator("#fax-error")).to_have_text("Not sent: Only PDF documents can be faxed.")
    dialog.get_by_label("PDF to upload (20 MB at most)").set_input_files(
        files=[{"name": "records.pdf", "mimeType": "application/pdf", "buffer": sample_pdf(3)}]
    )
    expect(dialog.locator("#fax-error")).to_be_hidden()
    dialog.get_by_role("button", name="Send fax").click()
    expect(dialog).to_be_hidden()

    e164 = "+1" + number.replace(" ", "")
    open_item(person, f"Fax to {e164}")
    pane = page.locator("#pane")
    expect(pane.locator(".cloud-status")).to_have_text("Status: Delivered", timeout=STATUS_S)
    expect(pane).to_contain_text("Pages: 3")
    assert person.csp_violations() == []
