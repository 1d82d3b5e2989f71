"""Outbound Direct through the whole stack: a staff member composes (or replies) through the
gateway; cloud-comms signs and encrypts it with the stack's development certificates and hands it
to the relay (a real aiosmtpd server on CLOUD_SMTP_SINK_PORT), where openssl decrypts it with the
partner's key and verifies it against the anchors. MDNs built with the openssl CLI and sent with
smtplib to the stack's SMTP listener move the sender's board item: sent -> processed ->
dispatched, or failed (back among the unread)."""

from __future__ import annotations

import uuid

import pytest

from tests.cloud_direct_helpers import PARTNER, PDF, RIVERBEND_INTAKE, direct_message, send
from tests.e2e.conftest import CLOUD_SMTP_SINK_PORT
from tests.integration.test_cloud_direct_outbound import (
    FINAL_DELIVERY,
    OUTBOUND_PATH,
    Relay,
    b64,
    opened_by_partner,
    parts,
    postfix_bounce,
    report_entity,
    report_message,
)
from tests.integration.test_cloud_direct_outbound import PARTNER_COLLEAGUE as COLLEAGUE
from tests.waits import wait_until


@pytest.fixture(scope="module")
def relay(stack):
    with Relay(CLOUD_SMTP_SINK_PORT) as running:
        yield running


def relayed(relay: Relay, message_id: str) -> tuple[str, list[str], bytes] | None:
    return next((e for e in list(relay.envelopes) if f"Message-ID: {message_id}".encode() in e[2]), None)


def own_item(client, subject: str) -> dict | None:
    """The sender's board item of the outbound message with this (unique) subject, from the list
    only: opening an item marks it read."""
    title = f"Direct to {PARTNER}: {subject}"
    return next((i for i in client.items(folder="cloud", limit=100)["items"] if i["title"] == title), None)


def item_with_status(client, subject: str, status: str) -> dict | None:
    item = own_item(client, subject)
    return item if item is not None and item.get("status") == status else None


def test_a_composed_message_is_sent_sealed_and_its_mdns_shown_on_the_item(
    stack, certs, relay, smtp_port, wilson, reyes
):
    subject = f"Referral {uuid.uuid4().hex[:8]}"
    body = {
        "from": RIVERBEND_INTAKE,
        "to": [PARTNER],
        "subject": subject,
        "text": "Please see the attached referral.",
        "attachments": [{"filename": "referral.pdf", "content_type": "application/pdf", "content_base64": b64(PDF)}],
    }
    answer = wilson.post(OUTBOUND_PATH, json=body)
    assert answer.status_code == 202, answer.text
    view = answer.json()
    assert view["status"] == "queued" and view["id"].startswith("dmo_")

    mail_from, rcpt_tos, raw = wait_until(lambda: relayed(relay, view["message_id"]), timeout=20)
    assert (mail_from, rcpt_tos) == (RIVERBEND_INTAKE, [PARTNER])
    outer, entity = opened_by_partner(raw, certs)
    assert outer["Subject"] == subject and outer["Disposition-Notification-Options"] == FINAL_DELIVERY
    assert outer["Disposition-Notification-To"] == RIVERBEND_INTAKE
    text, files = parts(entity)
    assert text.strip() == "Please see the attached referral." and files == [("referral.pdf", "application/pdf", PDF)]

    item = wait_until(lambda: item_with_status(wilson, view["subject"], "sent"), timeout=20)
    assert item["title"] == f"Direct to {PARTNER}: {subject}"
    assert own_item(reyes, subject) is None  # only the sender's board
    detail = wilson.get(f"/api/v1/board/items/{item['id']}").json()
    assert detail["links"][0]["url"].endswith(f"{OUTBOUND_PATH}/{view['id']}")

    # A dispatched without the final-delivery field is not a delivery; with it, it is.
    unconfirmed = report_message(certs, report_entity("mdn", view["message_id"], "dispatched", final=False))
    assert send(smtp_port, unconfirmed) == (250, b"ok")
    wait_until(lambda: item_with_status(wilson, view["subject"], "processed"), timeout=20)
    for disposition in ("processed", "dispatched"):
        mdn = report_message(certs, report_entity("mdn", view["message_id"], disposition))
        assert send(smtp_port, mdn) == (250, b"ok")
        wait_until(lambda d=disposition: item_with_status(wilson, view["subject"], d), timeout=20)
    shown = wilson.get(f"{OUTBOUND_PATH}/{view['id']}").json()
    assert shown["status"] == "dispatched"
    assert [t["state"] for t in shown["trail"]] == ["queued", "sent", "processed", "dispatched"]
    assert shown["trail"][2]["detail"] == "dispatched notification received without final-delivery confirmation"
    attachment = wilson.get(shown["attachments"][0]["url"])
    assert attachment.status_code == 200 and attachment.content == PDF


def test_a_reply_defaults_to_the_original_and_a_failed_mdn_brings_the_item_back_unread(
    stack, certs, relay, smtp_port, wilson
):
    original_id = f"<{uuid.uuid4().hex}@direct.partner.example>"
    subject = f"Lab results {uuid.uuid4().hex[:8]}"
    assert send(smtp_port, direct_message(certs, subject=subject, message_id=original_id)) == (250, b"ok")
    inbound = wait_until(
        lambda: next(
            (i for i in wilson.items(folder="cloud", limit=100)["items"] if i["title"] == f"Direct: {subject}"), None
        ),
        timeout=20,
    )
    link = wilson.get(f"/api/v1/board/items/{inbound['id']}").json()["links"][0]["url"]
    dm_id = link.rsplit("/", 1)[1]
    shown = wilson.get(f"/api/v1/cloud/direct/{dm_id}").json()
    assert shown["reply"] == {"from": RIVERBEND_INTAKE, "to": [PARTNER], "subject": f"Re: {subject}"}

    answer = wilson.post(OUTBOUND_PATH, json={"in_reply_to": dm_id, "text": "Thank you, received."})
    assert answer.status_code == 202, answer.text
    view = answer.json()
    assert (view["from"], view["to"], view["subject"]) == (RIVERBEND_INTAKE, [PARTNER], f"Re: {subject}")
    _, _, raw = wait_until(lambda: relayed(relay, view["message_id"]), timeout=20)
    outer, _ = opened_by_partner(raw, certs)
    assert outer["In-Reply-To"] == original_id

    item = wait_until(lambda: item_with_status(wilson, view["subject"], "sent"), timeout=20)
    assert wilson.post(f"/api/v1/board/items/{item['id']}/read").status_code in (200, 204)
    failed = report_message(certs, report_entity("mdn", view["message_id"], "failed/error"))
    assert send(smtp_port, failed) == (250, b"ok")
    item = wait_until(lambda: item_with_status(wilson, view["subject"], "failed"), timeout=20)
    assert item["read"] is False


def test_refusals_through_the_gateway(stack, certs, smtp_port, wilson, reyes, outsider):
    body = {"from": RIVERBEND_INTAKE, "to": [PARTNER], "subject": "Hello", "text": "Hi"}
    for client, status, code in ((reyes, 403, "not_linked"), (outsider, 403, "not_linked")):
        answer = client.post(OUTBOUND_PATH, json=body)
        assert (answer.status_code, answer.json()["code"]) == (status, code)
    answer = wilson.post(OUTBOUND_PATH, json={**body, "to": ["someone@direct.nowhere.example"]})
    assert (answer.status_code, answer.json()["code"]) == (422, "recipient_certificate_unknown")
    answer = wilson.post(OUTBOUND_PATH, json={**body, "to": ["not-an-address"]})
    assert (answer.status_code, answer.json()["code"]) == (400, "invalid_address")
    huge = {"filename": "big.pdf", "content_type": "application/pdf", "content_base64": b64(b"0" * (11 * 1024 * 1024))}
    answer = wilson.post(OUTBOUND_PATH, json={**body, "attachments": [huge]})
    assert answer.status_code == 413
    assert wilson.get(f"{OUTBOUND_PATH}/dmo_unknown").status_code == 404

    # A "dispatched" MDN signed by a certificate the stack does not trust is refused.
    from services.cloud_comms import devcerts

    rogue_ca, rogue_key = devcerts.make_ca("Rogue CA")
    cert, key = devcerts.issue(rogue_ca, rogue_key, devcerts.PARTNER)
    devcerts.write_identity(certs, "rogue-mdn", cert, key)
    forged = report_message(
        certs, report_entity("mdn", "<any@direct.riverbend.example>", "dispatched"), signer="rogue-mdn"
    )
    code, text = send(smtp_port, forged)
    assert code == 554 and b"trusted anchor" in text


def test_a_plain_bounce_from_the_relay_fails_the_message(stack, certs, relay, smtp_port, wilson, cloud_db):
    subject = f"Referral {uuid.uuid4().hex[:8]}"
    body = {"from": RIVERBEND_INTAKE, "to": [PARTNER, COLLEAGUE], "subject": subject, "text": "Hello."}
    answer = wilson.post(OUTBOUND_PATH, json=body)
    assert answer.status_code == 202, answer.text
    view = answer.json()
    _, _, raw = wait_until(lambda: relayed(relay, view["message_id"]), timeout=20)
    wait_until(lambda: item_with_status(wilson, subject, "sent"), timeout=20)
    before = cloud_db.security_events.count_documents({})
    assert send(smtp_port, postfix_bounce(raw), sender="") == (250, b"ok")  # MAIL FROM:<>
    item = wait_until(lambda: item_with_status(wilson, subject, "failed"), timeout=20)
    assert item["read"] is False
    shown = wilson.get(f"{OUTBOUND_PATH}/{view['id']}").json()
    assert [(r["address"], r["status"]) for r in shown["recipients"]] == [(PARTNER, "sent"), (COLLEAGUE, "failed")]
    assert cloud_db.security_events.count_documents({}) == before
