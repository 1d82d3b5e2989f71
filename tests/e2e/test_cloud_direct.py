"""Inbound Direct through the whole stack: S/MIME built with the openssl CLI from the stack's
development certificates (the partner HISP's signing certificate, Riverbend's Direct certificate),
sent with smtplib to cloud-comms' SMTP listener, read by the linked staff through the gateway, and
the MDNs received by a real SMTP sink (the partner HISP) and opened with openssl."""

from __future__ import annotations

import base64
import uuid

import pytest
import requests

from services.cloud_comms import devcerts
from tests.cloud_direct_helpers import (
    CCDA,
    FINAL_DELIVERY_OPTION,
    PDF,
    RIVERBEND_INTAKE,
    Sink,
    direct_message,
    encrypt,
    inner_mime,
    open_mdn,
    openssl,
    send,
    sign,
    with_headers,
)
from tests.e2e.conftest import CLOUD_SMTP_SINK_PORT
from tests.waits import wait_until


@pytest.fixture(scope="module")
def sink(stack):
    with Sink(CLOUD_SMTP_SINK_PORT) as running:
        yield running


def cloud_item(client, title: str) -> dict | None:
    return next((i for i in client.items(folder="cloud", limit=100)["items"] if i["title"] == title), None)


def mdns_for(sink: Sink, certs, message_id: str) -> list[dict]:
    found = []
    for raw in list(sink.messages):
        fields = open_mdn(raw, certs)
        if fields.get("original-message-id") == message_id:
            found.append(fields)
    return found


def test_a_direct_message_reaches_the_linked_staff_sealed_and_acknowledged(
    stack, certs, sink, smtp_port, wilson, reyes, outsider, cloud_db
):
    subject = f"Referral {uuid.uuid4().hex[:8]}"
    message_id = f"<{uuid.uuid4().hex}@direct.partner.example>"
    message = direct_message(certs, subject=subject, message_id=message_id, options=FINAL_DELIVERY_OPTION)
    assert send(smtp_port, message) == (250, b"ok")
    assert send(smtp_port, message) == (250, b"ok")  # resent: still one item

    item = wait_until(lambda: cloud_item(wilson, f"Direct: {subject}"), timeout=20)
    assert item["summary"] == "From sender@direct.partner.example · 2 attachments"
    detail = wilson.get(f"/api/v1/board/items/{item['id']}").json()
    url = detail["links"][0]["url"]
    path = url[url.index("/api/v1/cloud/direct/") :]
    view = wilson.get(path)
    assert view.status_code == 200, view.text
    body = view.json()
    assert (body["from"], body["subject"]) == ("sender@direct.partner.example", subject)
    assert body["text"].strip() == "Please see the attached referral."
    assert [a["filename"] for a in body["attachments"]] == ["referral.xml", "note.pdf"]
    xml = wilson.get(body["attachments"][0]["url"])
    assert xml.status_code == 200 and xml.content == CCDA and xml.headers["Content-Type"].startswith("application/xml")
    pdf = wilson.get(body["attachments"][1]["url"])
    assert pdf.content == PDF and pdf.headers["Content-Disposition"].startswith("attachment")
    # Not linked to the address, another agency, no token: 404 / 401.
    assert reyes.get(path).status_code == 404
    assert outsider.get(path).status_code == 404
    assert requests.get(f"{stack.gateway_url}{path}", timeout=10).status_code == 401

    docs = list(cloud_db.direct_messages.find({"message_id": {"$eq": message_id}}))
    assert len(docs) == 1
    stored = repr(docs[0]).encode()
    assert b"ClinicalDocument" not in stored and b"%PDF" not in stored and subject.encode() not in stored
    assert base64.b64encode(CCDA)[:40] not in stored
    assert sum(1 for i in wilson.items(folder="cloud", limit=100)["items"] if i["title"] == f"Direct: {subject}") == 1

    mdns = wait_until(lambda: (m := mdns_for(sink, certs, message_id)) and len(m) >= 2 and m, timeout=20)
    dispositions = sorted(m["disposition"].rpartition("; ")[2] for m in mdns)
    assert dispositions == ["dispatched", "processed"]
    final = {m["disposition"].rpartition("; ")[2]: "x-direct-final-destination-delivery" in m for m in mdns}
    assert final == {"dispatched": True, "processed": False}
    assert all(m["final-recipient"] == f"rfc822; {RIVERBEND_INTAKE}" for m in mdns)


def test_refused_messages_and_the_listener_keeps_serving(stack, certs, sink, smtp_port, cloud_db):
    before = cloud_db.direct_messages.count_documents({})
    code, text = send(smtp_port, direct_message(certs), to=["nobody@direct.riverbend.example"])
    assert code == 550 and b"5.1.1" in text
    code, text = send(smtp_port, with_headers(sign(inner_mime(), certs), to=RIVERBEND_INTAKE))
    assert code == 554 and b"not encrypted" in text
    signed = sign(inner_mime(text="Original text"), certs).replace(b"Original text", b"Altered  text")
    code, text = send(
        smtp_port, with_headers(encrypt(signed, certs / "agency-riverbend.cert.pem"), to=RIVERBEND_INTAKE)
    )
    assert code == 554 and b"5.7.7" in text
    # A signer the stack does not trust: a certificate of a CA that is not an anchor.
    rogue_ca, rogue_key = devcerts.make_ca("Rogue CA")
    cert, key = devcerts.issue(rogue_ca, rogue_key, devcerts.PARTNER)
    rogue_dir = stack.run_dir / "rogue-direct"
    rogue_dir.mkdir(exist_ok=True)
    devcerts.write_identity(rogue_dir, "rogue", cert, key)
    untrusted = with_headers(
        encrypt(
            openssl(
                "cms",
                "-sign",
                "-signer",
                str(rogue_dir / "rogue.cert.pem"),
                "-inkey",
                str(rogue_dir / "rogue.key.pem"),
                "-md",
                "sha256",
                data=inner_mime(),
            ),
            certs / "agency-riverbend.cert.pem",
        ),
        to=RIVERBEND_INTAKE,
    )
    code, text = send(smtp_port, untrusted)
    assert code == 554 and b"trusted anchor" in text
    broken = (
        b"From: sender@direct.partner.example\r\nTo: intake@direct.riverbend.example\r\nMessage-ID: <b@x>\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\n!!!! not base64\r\n"
    )
    code, text = send(smtp_port, broken)
    assert code == 554 and b"5.6.0" in text
    big = b"From: a@b.example\r\n\r\n" + b"x" * (11 * 1024 * 1024)
    code, _ = send(smtp_port, big)
    assert code == 552
    assert cloud_db.direct_messages.count_documents({}) == before
    assert send(smtp_port, direct_message(certs))[0] == 250


def test_a_sender_not_asking_for_final_delivery_gets_processed_only(stack, certs, sink, smtp_port, wilson, cloud_db):
    subject = f"Referral {uuid.uuid4().hex[:8]}"
    message_id = f"<{uuid.uuid4().hex}@direct.partner.example>"
    assert send(smtp_port, direct_message(certs, subject=subject, message_id=message_id)) == (250, b"ok")
    wait_until(lambda: cloud_item(wilson, f"Direct: {subject}"), timeout=20)
    mdns = wait_until(lambda: mdns_for(sink, certs, message_id), timeout=20)
    # Delivered to the board and its outbox relayed: dispatched would be due now, were it asked for.
    wait_until(
        lambda: cloud_db.direct_messages.find_one({"message_id": {"$eq": message_id}, "mdn_dispatched": "none"}),
        timeout=20,
    )
    assert [m["disposition"].rpartition("; ")[2] for m in mdns_for(sink, certs, message_id)] == ["processed"]
    assert mdns[0]["final-recipient"] == f"rfc822; {RIVERBEND_INTAKE}"
