"""Inbound Direct over real sockets: S/MIME built with the openssl CLI from the development
certificates (python -m services.cloud_comms.devcerts), sent with smtplib to the service's aiosmtpd
listener; MDNs received by a real aiosmtpd sink and opened with openssl."""

from __future__ import annotations

import base64
import datetime as dt
import os
import threading
from pathlib import Path

import pytest

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.cloud_comms import config, devcerts
from services.cloud_comms.direct.feature import DIRECT_MESSAGES, DirectMessaging
from services.cloud_comms.directory_client import CloudAddress
from services.cloud_comms.service import build
from services.kit.auth import Identity
from services.kit.embedded_mongo import free_port
from services.kit.errors import NotFound
from services.kit.events import unpack
from tests.cloud_direct_helpers import (
    CCDA,
    FINAL_DELIVERY_OPTION,
    PARTNER,
    PDF,
    RIVERBEND_INTAKE,
    Sink,
    direct_message,
    encrypt,
    inner_mime,
    open_mdn,
    openssl_identity,
    send,
    sign,
    with_headers,
)
from tests.waits import wait_until

STAFF = ("stf_reyes", "stf_nurse")
EC_PARTNER = "ec-sender@direct.partner.example"  # covered by the configured partner certificate
EC_ELSEWHERE = "ec-sender@direct.ecclinic.example"  # no configured certificate
SIGN_ONLY = "signer@direct.signonly.example"  # no configured certificate


class Directory:
    def __init__(self):
        self.addresses = {
            RIVERBEND_INTAKE: CloudAddress("direct", RIVERBEND_INTAKE, "agy_riverbend", "cad_intake", STAFF, "Intake"),
            "dr.reyes@direct.riverbend.example": CloudAddress(
                "direct", "dr.reyes@direct.riverbend.example", "agy_riverbend", "cad_reyes", (), "Dr Reyes"
            ),
        }

    def resolve_address(self, kind, address):
        return self.addresses.get(address.lower())


class ServiceIdentities:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:cloud-comms", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("direct-certs")
    devcerts.ensure(directory)
    # An untrusted signer (its own CA, not an anchor) and an expired one (the dev CA).
    rogue_ca, rogue_key = devcerts.make_ca("Rogue CA")
    cert, key = devcerts.issue(rogue_ca, rogue_key, devcerts.PARTNER)
    devcerts.write_identity(directory, "untrusted", cert, key)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate((directory / "ca.cert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key.pem").read_bytes(), None)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert, key = devcerts.issue(ca, ca_key, devcerts.PARTNER, days=1, not_before=old)
    devcerts.write_identity(directory, "expired", cert, key)
    other = devcerts.DevIdentity("other", "Other sender", ("someone@elsewhere.example",), "elsewhere.example")
    cert, key = devcerts.issue(ca, ca_key, other)
    devcerts.write_identity(directory, "other", cert, key)
    # Signers an MDN cannot be encrypted for (openssl): EC keys, an RSA key that may only sign.
    openssl_identity(directory, "ec-partner", EC_PARTNER, ec=True)
    openssl_identity(directory, "ec-elsewhere", EC_ELSEWHERE, ec=True)
    openssl_identity(directory, "sign-only", SIGN_ONLY, key_usage="digitalSignature")
    return directory


@pytest.fixture
def directs(mongo_client, db_name, certs):
    """cloud-comms (Direct only) with its listener, and the partner HISP's sink as its relay
    (refusing the addresses in `refuse`); `env`: more settings."""
    started = []

    def make(refuse: tuple[str, ...] = (), relay_running: bool = True, **env: str):
        smtp_port, sink_port = free_port(), free_port()
        master = base64.b64encode(os.urandom(32)).decode()
        settings = config.load(
            {
                "MONGO_URI": "mongodb://unused:1",
                "PHI_MASTER_KEYS": f"m:{master}",
                "AMQP_URL": "amqp://unused/",
                "CLOUD_DIRECT_CERTS_DIR": str(certs),
                "CLOUD_SMTP_PORT": str(smtp_port),
                "CLOUD_SMTP_RELAY": f"127.0.0.1:{sink_port}",
                "CLOUD_DIRECT_MAX_MESSAGE_BYTES": str(200 * 1024),
                "CLINIC_RUN_DIR": str(certs.parent),
                **env,
            }
        )
        db = mongo_client[db_name]
        comms = build(
            settings, db, directory=Directory(), service_tokens=ServiceIdentities(), features=(DirectMessaging,)
        )
        feature = comms.features[0]
        stop = threading.Event()
        ((name, run, ready),) = comms.listeners()
        thread = threading.Thread(target=run, args=(stop,), daemon=True)
        thread.start()
        assert ready(10)
        sink = Sink(sink_port, refuse)
        if relay_running:
            sink.__enter__()
        started.append((stop, thread, sink if relay_running else None))
        return feature, smtp_port, sink, db

    yield make
    for stop, thread, sink in started:
        if sink is not None:
            sink.__exit__()
        stop.set()
        thread.join(10)


@pytest.fixture
def direct(directs):
    return directs()


def staff(staff_id: str, agency: str = "agy_riverbend") -> Identity:
    return Identity(subject=staff_id, agency_id=agency, roles=frozenset({"staff"}))


def relay_published(db) -> None:
    """What the outbox relay does once the broker confirmed the delivery requests."""
    db[DIRECT_MESSAGES].update_many({}, {"$unset": {"_outbox": "", "_outbox_at": ""}})


def deliveries(doc: dict) -> list[inbox_pb2.DeliverItemRequest]:
    found = []
    for entry in (doc.get("_outbox") or {}).values():
        envelope = Envelope()
        envelope.ParseFromString(entry["env"])
        assert envelope.event_type == "board_item.delivery_requested.v1" and envelope.producer == "cloud-comms"
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)  # opens the sealed payload
        found.append(request)
    return found


def test_a_signed_encrypted_message_is_stored_sealed_delivered_viewable_and_acknowledged(direct, certs):
    feature, port, sink, db = direct
    message = direct_message(certs, message_id="<m1@direct.partner.example>", options=FINAL_DELIVERY_OPTION)
    assert send(port, message) == (250, b"ok")
    (doc,) = list(db[DIRECT_MESSAGES].find({}))
    assert doc["final_delivery_requested"] is True
    raw = repr(doc).encode()
    assert b"ClinicalDocument" not in raw and b"%PDF" not in raw and b"attached referral" not in raw
    assert base64.b64encode(CCDA)[:40] not in raw
    (request,) = deliveries(doc)
    assert request.kind == inbox_pb2.DELIVERED_KIND_CLOUD and request.source == "direct"
    assert list(request.recipients.staff_ids) == list(STAFF)
    assert request.title == "Direct: Referral"
    assert request.summary == "From sender@direct.partner.example · 2 attachments"
    assert request.links[0].url.endswith(f"/api/v1/cloud/direct/{doc['_id']}")

    view = feature.view(staff("stf_reyes"), doc["_id"])
    assert view["from"] == "sender@direct.partner.example" and view["subject"] == "Referral"
    assert view["text"].strip() == "Please see the attached referral."
    assert [(a["filename"], a["content_type"]) for a in view["attachments"]] == [
        ("referral.xml", "application/xml"),
        ("note.pdf", "application/pdf"),
    ]
    response = feature.attachment(staff("stf_reyes"), doc["_id"], 1)
    assert response.get_data() == PDF and response.mimetype == "application/pdf"
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert feature.attachment(staff("stf_nurse"), doc["_id"], 0).get_data() == CCDA
    for outsider in (staff("stf_other"), staff("stf_reyes", "agy_lakeside")):
        with pytest.raises(NotFound):
            feature.view(outsider, doc["_id"])
    audits = list(db["access_records"].find({}))
    assert {a["outcome"] for a in audits} == {"allowed", "denied"} and len(audits) == 5

    # processed once stored; dispatched once the relay published the delivery request.
    assert feature.mdn_pass() == 1
    wait_until(lambda: len(sink.messages) == 1)
    relay_published(db)
    assert feature.mdn_pass() == 1
    wait_until(lambda: len(sink.messages) == 2)
    assert feature.mdn_pass() == 0  # never twice
    first, second = (open_mdn(m, certs) for m in sink.messages)
    assert first["disposition"].endswith("; processed") and second["disposition"].endswith("; dispatched")
    assert first["original-message-id"] == "<m1@direct.partner.example>"
    assert first["final-recipient"] == f"rfc822; {RIVERBEND_INTAKE}"
    assert first["_to"] == "sender@direct.partner.example" and first["_from"] == RIVERBEND_INTAKE
    # Direct IG: only the dispatched MDN carries the final-delivery extension field.
    assert "x-direct-final-destination-delivery" in second and "x-direct-final-destination-delivery" not in first


@pytest.mark.parametrize(
    ("options", "dispositions"),
    [
        ("", ["processed"]),
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,false", ["processed"]),
        ("signed-receipt-protocol=optional,pkcs7-signature", ["processed"]),
        ("x-direct-final-destination-delivery=Required,TRUE", ["dispatched", "processed"]),
    ],
)
def test_dispatched_is_sent_only_when_the_sender_asked_for_final_delivery(direct, certs, options, dispositions):
    feature, port, sink, db = direct
    assert send(port, direct_message(certs, options=options)) == (250, b"ok")
    assert feature.mdn_pass() == 1
    relay_published(db)
    assert feature.mdn_pass() == len(dispositions) - 1
    assert feature.mdn_pass() == 0
    wait_until(lambda: len(sink.messages) == len(dispositions))
    assert sorted(open_mdn(m, certs)["disposition"].rpartition("; ")[2] for m in sink.messages) == dispositions
    (doc,) = list(db[DIRECT_MESSAGES].find({}))
    assert doc["mdn_dispatched"] == ("sent" if len(dispositions) == 2 else "none")


def test_the_same_message_id_twice_is_one_item_and_one_set_of_mdns(direct, certs):
    feature, port, sink, db = direct
    for _ in range(2):
        assert send(port, direct_message(certs, message_id="<same@direct.partner.example>"))[0] == 250
    assert db[DIRECT_MESSAGES].count_documents({}) == 1
    assert feature.mdn_pass() == 1


def test_another_sender_reusing_a_message_id_is_a_message_of_its_own(direct, certs):
    feature, port, sink, db = direct
    same = "<reused@direct.partner.example>"
    assert send(port, direct_message(certs, message_id=same))[0] == 250
    elsewhere = direct_message(certs, message_id=same, signer="other", sender="someone@elsewhere.example")
    assert send(port, elsewhere, sender="someone@elsewhere.example")[0] == 250
    docs = list(db[DIRECT_MESSAGES].find({}))
    assert sorted(d["sender"] for d in docs) == sorted(["someone@elsewhere.example", PARTNER])
    assert len({d["_id"] for d in docs}) == 2 and all(deliveries(d) for d in docs)


def test_opaque_signed_data_is_accepted(direct, certs):
    feature, port, sink, db = direct
    assert send(port, direct_message(certs, opaque=True))[0] == 250
    assert db[DIRECT_MESSAGES].count_documents({}) == 1


def test_an_address_with_no_linked_staff_gets_a_failed_mdn(direct, certs):
    feature, port, sink, db = direct
    to = "dr.reyes@direct.riverbend.example"
    assert send(port, direct_message(certs, to=to), to=[to])[0] == 250
    (doc,) = list(db[DIRECT_MESSAGES].find({}))
    assert deliveries(doc) == []
    assert feature.mdn_pass() == 2  # processed, failed
    wait_until(lambda: len(sink.messages) == 2)
    dispositions = sorted(open_mdn(m, certs)["disposition"].rpartition("; ")[2] for m in sink.messages)
    assert dispositions == ["failed/error", "processed"]


def refused(db) -> list[dict]:
    return list(db["security_events"].find({}))


def refusal_counts(db) -> dict[str, int]:
    """Refusals by code (the store counts repeats of a minute in one document)."""
    counts: dict[str, int] = {}
    for event in refused(db):
        counts[event["code"]] = counts.get(event["code"], 0) + event.get("count", 1)
    return counts


def test_refusals_store_nothing_and_the_listener_keeps_serving(direct, certs):
    feature, port, sink, db = direct
    # unknown recipient
    code, text = send(port, direct_message(certs), to=["nobody@direct.riverbend.example"])
    assert code == 550 and b"5.1.1" in text
    # not encrypted: a signed-only message
    plain = with_headers(sign(inner_mime(), certs), to=RIVERBEND_INTAKE)
    code, text = send(port, plain)
    assert code == 554 and b"5.7.1" in text and b"not encrypted" in text
    # tampered signature: one byte of the signed content changed before encryption
    signed = sign(inner_mime(text="Original text"), certs).replace(b"Original text", b"Altered  text")
    code, text = send(port, with_headers(encrypt(signed, certs / "agency-riverbend.cert.pem"), to=RIVERBEND_INTAKE))
    assert code == 554 and b"5.7.7" in text
    # untrusted signer, expired signer, signer not matching From
    code, text = send(port, direct_message(certs, signer="untrusted"))
    assert code == 554 and b"trusted anchor" in text
    code, text = send(port, direct_message(certs, signer="expired"))
    assert code == 554 and b"expired" in text
    code, text = send(port, direct_message(certs, signer="other"))
    assert code == 554 and b"From address" in text
    # encrypted but not signed
    unsigned = with_headers(encrypt(inner_mime(), certs / "agency-riverbend.cert.pem"), to=RIVERBEND_INTAKE)
    code, text = send(port, unsigned)
    assert code == 554 and b"not signed" in text
    # malformed MIME: an S/MIME part whose body is not base64 CMS
    broken = (
        b"From: sender@direct.partner.example\r\nTo: intake@direct.riverbend.example\r\nMessage-ID: <b@x>\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"!!!! not base64 ****\r\n"
    )
    code, text = send(port, broken)
    assert code == 554 and b"5.6.0" in text
    # oversized (200 KiB limit)
    big = direct_message(certs, inner=inner_mime(text="x" * 300_000, attachments=False))
    code, _ = send(port, big)
    assert code == 552
    assert db[DIRECT_MESSAGES].count_documents({}) == 0
    assert refusal_counts(db) == {
        "not_encrypted": 1,
        "bad_signature": 1,
        "untrusted_signer": 2,
        "signer_mismatch": 1,
        "not_signed": 1,
        "malformed": 1,
    }
    assert all("Referral" not in repr(e) for e in refused(db))
    # and still serving
    assert send(port, direct_message(certs))[0] == 250
    assert db[DIRECT_MESSAGES].count_documents({}) == 1


def mdn_states(db) -> dict:
    (doc,) = list(db[DIRECT_MESSAGES].find({}))
    return {k: v for k, v in doc.items() if k.startswith("mdn_") and not k.endswith("_at")}


def test_an_mdn_goes_encrypted_for_the_configured_certificate_when_the_signer_is_ec(direct, certs):
    feature, port, sink, db = direct
    message = direct_message(certs, signer="ec-partner", sender=EC_PARTNER, options=FINAL_DELIVERY_OPTION)
    assert send(port, message, sender=EC_PARTNER) == (250, b"ok")
    assert feature.mdn_pass() == 1
    relay_published(db)
    assert feature.mdn_pass() == 1
    wait_until(lambda: len(sink.messages) == 2)
    opened = [open_mdn(m, certs) for m in sink.messages]  # the partner's configured key decrypts them
    assert [m["_to"] for m in opened] == [EC_PARTNER, EC_PARTNER]
    assert mdn_states(db)["mdn_processed"] == "sent"


@pytest.mark.parametrize(("signer", "sender"), [("ec-elsewhere", EC_ELSEWHERE), ("sign-only", SIGN_ONLY)])
def test_without_a_certificate_to_encrypt_for_the_mdns_are_abandoned_not_retried(direct, certs, signer, sender):
    feature, port, sink, db = direct
    message = direct_message(certs, signer=signer, sender=sender, options=FINAL_DELIVERY_OPTION)
    assert send(port, message, sender=sender) == (250, b"ok")
    assert feature.mdn_pass() == 0
    relay_published(db)
    for _ in range(3):
        assert feature.mdn_pass() == 0
    states = mdn_states(db)
    assert states["mdn_processed"] == "abandoned" and states["mdn_dispatched"] == "abandoned"
    assert states["mdn_processed_error"] == "no certificate of the original sender can be encrypted for"
    assert sink.messages == []


def test_a_permanent_relay_refusal_abandons_the_mdns_at_once(directs, certs):
    feature, port, sink, db = directs(refuse=("sender@direct.partner.example",))
    assert send(port, direct_message(certs, options=FINAL_DELIVERY_OPTION)) == (250, b"ok")
    assert feature.mdn_pass() == 0
    relay_published(db)
    assert feature.mdn_pass() == 0
    states = mdn_states(db)
    assert (states["mdn_processed"], states["mdn_dispatched"]) == ("abandoned", "abandoned")
    assert states["mdn_processed_error"] == "the relay refused it (550)"
    assert sink.messages == []


def test_an_unreachable_relay_is_retried_up_to_the_attempts_limit(directs, certs):
    feature, port, sink, db = directs(relay_running=False, CLOUD_DIRECT_MDN_MAX_ATTEMPTS="2")
    assert send(port, direct_message(certs)) == (250, b"ok")
    assert feature.mdn_pass() == 0
    states = mdn_states(db)
    assert (states["mdn_processed"], states["mdn_processed_attempts"]) == ("due", 1)
    assert feature.mdn_pass() == 0  # not before its time
    # 30 s later (the retry delay, moved back here instead of waited for):
    db[DIRECT_MESSAGES].update_many({}, {"$inc": {"mdn_processed_at": -31_000}})
    assert feature.mdn_pass() == 0
    states = mdn_states(db)
    assert states["mdn_processed"] == "abandoned"
    assert states["mdn_processed_error"] == "not sent after 2 attempts (ConnectionRefusedError)"
    assert feature.mdn_pass() == 0
