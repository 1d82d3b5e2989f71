"""Outbound Direct over real parts: composed through cloud-comms' HTTP app (Flask test client) into
the real database, handed to a real aiosmtpd server acting as the relay, and checked independently
with `openssl cms -decrypt` (the partner's key) and `openssl cms -verify` (the trust anchors). The
MDNs and DSNs coming back are built with the openssl CLI (not the service's code) and sent with
smtplib to the service's own SMTP listener. Last, the development partner HISP
(services/direct_simulator) as the relay closes the loop with its own MDNs.

Directory is the one stand-in (a table of Direct addresses and their linked staff)."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import threading
import uuid
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.cloud_comms import config, devcerts
from services.cloud_comms.direct.feature import DIRECT_MESSAGES, DirectMessaging
from services.cloud_comms.direct.outbound import DIRECT_OUTBOUND, DIRECT_OUTBOUND_CHUNKS
from services.cloud_comms.directory_client import CloudAddress
from services.cloud_comms.http_api import create_app
from services.cloud_comms.service import build
from services.direct_simulator.__main__ import SimulatorSettings, load, partner
from services.kit.auth import Identity
from services.kit.embedded_mongo import free_port
from services.kit.events import unpack
from services.kit.settings import SettingsError
from tests.cloud_direct_helpers import (
    CCDA,
    PARTNER,
    PDF,
    RIVERBEND_INTAKE,
    RIVERBEND_REYES,
    Sink,
    direct_message,
    encrypt,
    openssl,
    partner_decrypts,
    send,
    sign,
    with_headers,
)
from tests.waits import together, wait_until

RIVERBEND = "agy_riverbend"
PARTNER_COLLEAGUE = "colleague@direct.partner.example"
NORTHSIDE_DOMAIN = "direct.northside.example"
NORTHSIDE_DOCTOR = f"dr.north@{NORTHSIDE_DOMAIN}"
EASTSIDE_DOMAIN = "direct.eastside.example"
EASTSIDE_NURSE = f"nurse@{EASTSIDE_DOMAIN}"
NORTH_HISP_DOMAIN = "mail.northhisp.example"
OUTBOUND_PATH = "/api/v1/cloud/direct/outbound"
FINAL_DELIVERY = "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"
FINAL_DELIVERY_FIELD = "X-DIRECT-FINAL-DESTINATION-DELIVERY:"
MASTER_KEYS: dict[str, str] = {}


class Directory:
    def __init__(self):
        self.addresses = {
            RIVERBEND_INTAKE: CloudAddress(
                "direct", RIVERBEND_INTAKE, RIVERBEND, "cad_intake", ("stf_wilson", "stf_thompson"), "Intake"
            ),
            RIVERBEND_REYES: CloudAddress("direct", RIVERBEND_REYES, RIVERBEND, "cad_reyes", ("stf_reyes",), "Reyes"),
        }

    def resolve_address(self, kind, address):
        return self.addresses.get(address.lower()) if kind == "direct" else None

    def linked_addresses(self, kind, agency_id, staff_id):
        return [
            a
            for a in self.addresses.values()
            if kind == "direct" and a.agency_id == agency_id and staff_id in a.staff_ids
        ]


class ServiceIdentities:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:cloud-comms", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


def staff(staff_id: str, name: str, agency: str = RIVERBEND) -> Identity:
    return Identity(subject=staff_id, agency_id=agency, roles=frozenset({"staff"}), name=name)


TOKENS = {
    "wilson": staff("stf_wilson", "Sam Wilson"),
    "thompson": staff("stf_thompson", "Pat Thompson"),
    "reyes": staff("stf_reyes", "Elena Reyes"),
    "baker": staff("stf_baker", "Lee Baker", "agy_lakeside"),
}


class TokenTable:
    def verify(self, token):
        return TOKENS[token]


class Relay(Sink):
    """The relay: a real aiosmtpd server keeping each transaction's envelope and content; it
    refuses the recipients in `refuse` with 550."""

    def __init__(self, port: int, refuse: tuple[str, ...] = ()):
        super().__init__(port, refuse)
        self.envelopes: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("direct-out-certs")
    devcerts.ensure(directory)
    rogue_ca, rogue_key = devcerts.make_ca("Rogue CA")
    cert, key = devcerts.issue(rogue_ca, rogue_key, devcerts.PARTNER)
    devcerts.write_identity(directory, "rogue", cert, key)
    # Northside's organizational certificate also covers its HISP's mail domain; Eastside's names
    # one address. Two signers at that HISP: one covering its own domain, one Eastside's too.
    ca_cert, ca_key = load_ca(directory)
    parties = [
        ("recipients/northside", devcerts.DevIdentity("n", "Northside", (), NORTHSIDE_DOMAIN), (NORTH_HISP_DOMAIN,)),
        ("recipients/eastside", devcerts.DevIdentity("e", "Eastside", (EASTSIDE_NURSE,), ""), ()),
        ("north-hisp", devcerts.DevIdentity("h", "North HISP", (), NORTH_HISP_DOMAIN), ()),
        ("north-hisp-east", devcerts.DevIdentity("x", "North HISP", (), NORTH_HISP_DOMAIN), (EASTSIDE_DOMAIN,)),
    ]
    for stem, identity, more_domains in parties:
        cert, key = issue_with_domains(ca_cert, ca_key, identity, more_domains)
        if stem.startswith("recipients/"):  # their certificates only: what we encrypt for
            (directory / f"{stem}.cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        else:
            devcerts.write_identity(directory, stem, cert, key)
    return directory


def issue_with_domains(ca_cert, ca_key, identity, more_domains: tuple[str, ...]):
    """A development certificate whose SAN also names `more_domains` (dNSName)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert, key = devcerts.issue(ca_cert, ca_key, identity)
    if not more_domains:
        return cert, key
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([*san, *(x509.DNSName(d) for d in more_domains)])
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(ca_key, hashes.SHA256()), key


class Stack:
    """cloud-comms (Direct only) over the test's database: HTTP test client, SMTP listener, relay."""

    def __init__(
        self,
        db,
        certs: Path,
        *,
        relay: bool = True,
        relay_running: bool = True,
        refuse: tuple[str, ...] = (),
        **env: str,
    ):
        self.db = db
        # One master key per database: the stacks of one test open each other's data.
        master = MASTER_KEYS.setdefault(db.name, base64.b64encode(os.urandom(32)).decode())
        self.relay_running = relay_running
        self.certs = certs
        self.smtp_port, self.relay_port = free_port(), free_port()
        relay_port = self.relay_port
        environ = {
            "MONGO_URI": "mongodb://unused:1",
            "PHI_MASTER_KEYS": f"m:{master}",
            "AMQP_URL": "amqp://unused/",
            "CLOUD_DIRECT_CERTS_DIR": str(certs),
            "CLOUD_SMTP_PORT": str(self.smtp_port),
            "CLOUD_COMMS_PUBLIC_URL": "https://clinic.example",
            "CLOUD_COMMS_MAX_REQUEST_BYTES": str(16 * 1024),
            "CLOUD_DIRECT_MAX_OUTBOUND_ATTACHMENT_BYTES": str(64 * 1024),
            "CLINIC_RUN_DIR": str(certs.parent),
            **env,
        }
        if relay:
            environ["CLOUD_SMTP_RELAY"] = f"127.0.0.1:{relay_port}"
        self.directory = Directory()
        comms = build(
            config.load(environ),
            db,
            directory=self.directory,
            service_tokens=ServiceIdentities(),
            features=(DirectMessaging,),
        )
        self.feature: DirectMessaging = comms.features[0]
        self.outbound = self.feature.outbound
        self.http = create_app(comms.components, TokenTable()).test_client()
        self.relay = Relay(relay_port, refuse)
        self._stop = threading.Event()
        ((_, run, ready),) = comms.listeners()
        self._thread = threading.Thread(target=run, args=(self._stop,), daemon=True)

    def start(self) -> Stack:
        self._thread.start()
        assert self.feature.smtp.ready(10)
        if self.relay_running:
            self.relay.__enter__()
        return self

    def stop(self) -> None:
        if self.relay_running:
            self.relay.__exit__()
        self._stop.set()
        self._thread.join(10)

    def post(self, who: str, body: dict, **headers: str):
        return self.http.post(OUTBOUND_PATH, json=body, headers={"Authorization": f"Bearer {who}", **headers})

    def get(self, who: str, path: str):
        return self.http.get(path, headers={"Authorization": f"Bearer {who}"})

    def doc(self, oid: str) -> dict:
        return self.db[DIRECT_OUTBOUND].find_one({"_id": oid})


@pytest.fixture
def stacks(mongo_client, db_name, certs):
    started: list[Stack] = []

    def make(**options) -> Stack:
        stack = Stack(mongo_client[db_name], certs, **options).start()
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.stop()


@pytest.fixture
def direct(stacks) -> Stack:
    return stacks()


def new_message(**overrides) -> dict:
    body = {
        "from": RIVERBEND_INTAKE,
        "to": [PARTNER],
        "subject": "Referral for Maria Lopez",
        "text": "Please see Maria Lopez on Tuesday; C-CDA attached.",
        "attachments": [
            {"filename": "referral.xml", "content_type": "application/xml", "content_base64": b64(CCDA)},
            {"filename": "note.pdf", "content_type": "application/pdf", "content_base64": b64(PDF)},
        ],
    }
    return {**body, **overrides}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def items(doc: dict) -> list[tuple[str, inbox_pb2.DeliverItemRequest]]:
    found = []
    for event_id, entry in (doc.get("_outbox") or {}).items():
        envelope = Envelope()
        envelope.ParseFromString(entry["env"])
        assert envelope.event_type == "board_item.delivery_requested.v1"
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)  # opens the sealed payload
        found.append((event_id, request))
    return sorted(found, key=lambda pair: pair[1].source_version)


def latest_item(doc: dict) -> inbox_pb2.DeliverItemRequest:
    return items(doc)[-1][1]


def opened_by_partner(raw: bytes, certs: Path) -> tuple[email.message.EmailMessage, bytes]:
    """(outer headers, verified inner entity) with the openssl CLI: decrypted with the partner's key,
    the signature checked against the anchors (S/MIME signing purpose)."""
    decrypted = partner_decrypts(raw, certs)
    verified = openssl("cms", "-verify", "-CAfile", str(certs / "anchors.pem"), data=decrypted)
    outer = email.message_from_bytes(raw, policy=email.policy.default)
    signed = email.message_from_bytes(decrypted, policy=email.policy.default)
    assert signed.get_content_type() == "multipart/signed"
    assert signed.get_param("protocol") == "application/pkcs7-signature"
    return outer, verified


def parts(entity: bytes) -> tuple[str, list[tuple[str, str, bytes]]]:
    inner = email.message_from_bytes(entity, policy=email.policy.default)
    text, files = "", []
    for part in inner.walk():
        if part.is_multipart():
            continue
        if part.get_filename():
            files.append((part.get_filename(), part.get_content_type(), part.get_payload(decode=True)))
        elif part.get_content_type() == "text/plain":
            text = part.get_content()
    return text, files


def report_entity(
    kind: str, original: str, value: str, recipient: str = PARTNER, header: str = "", *, final: bool | None = None
) -> bytes:
    """A multipart/report (MDN: `value` = the disposition type; DSN: `value` = the Status code).
    A dispatched MDN carries the IG's final-delivery field unless `final` is False."""
    boundary = "rep_" + uuid.uuid4().hex
    if kind == "mdn":
        fields = [
            "Reporting-UA: hisp.partner.example; partner HISP",
            f"Final-Recipient: rfc822; {recipient}",
            f"Original-Message-ID: {original}",
            f"Disposition: automatic-action/MDN-sent-automatically; {value}",
        ]
        if final or (final is None and value == "dispatched"):
            fields.append(FINAL_DELIVERY_FIELD)
        report_type, part_type = "disposition-notification", "message/disposition-notification"
    else:
        fields = [
            "Reporting-MTA: dns; mx.direct.partner.example",
            f"X-Original-Message-ID: {original}" if not header else "Arrival-Date: Mon, 2 Mar 2026 10:00:00 +0000",
            "",
            f"Final-Recipient: rfc822; {recipient}",
            "Action: failed",
            f"Status: {value}",
        ]
        report_type, part_type = "delivery-status", "message/delivery-status"
    lines = [
        f'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain",
        "",
        "Notification.",
        f"--{boundary}",
        f"Content-Type: {part_type}",
        "",
        *fields,
        "",
    ]
    if header:
        lines += [f"--{boundary}", "Content-Type: text/rfc822-headers", "", f"Message-ID: {header}", ""]
    lines.append(f"--{boundary}--")
    return ("\r\n".join(lines) + "\r\n").encode()


def report_message(
    certs: Path, entity: bytes, *, sender: str = PARTNER, signer: str = "partner-hisp", extra: tuple = ()
) -> bytes:
    """The report signed by `signer` and encrypted for Riverbend's certificate (openssl CLI)."""
    enveloped = encrypt(sign(entity, certs, signer), certs / "agency-riverbend.cert.pem")
    return with_headers(enveloped, to=RIVERBEND_INTAKE, sender=sender, subject="Notification", extra=extra)


def composed_and_sent(direct: Stack, **overrides) -> dict:
    answer = direct.post("wilson", new_message(**overrides))
    assert answer.status_code == 202, answer.get_json()
    assert direct.outbound.send_pass() == 1
    return direct.doc(answer.get_json()["id"])


def test_a_composed_message_is_sealed_queued_then_signed_encrypted_and_sent_once(direct, certs):
    answer = direct.post("wilson", new_message())
    assert answer.status_code == 202, answer.get_json()
    view = answer.get_json()
    assert view["status"] == "queued" and view["from"] == RIVERBEND_INTAKE and view["to"] == [PARTNER]
    assert view["created_by"] == {"id": "stf_wilson", "name": "Sam Wilson"}
    assert [(a["filename"], a["size"]) for a in view["attachments"]] == [
        ("referral.xml", len(CCDA)),
        ("note.pdf", len(PDF)),
    ]
    assert [r["status"] for r in view["recipients"]] == ["queued"]

    doc = direct.doc(view["id"])
    stored = repr({k: v for k, v in doc.items() if k != "_outbox"}).encode()
    stored += b"".join(bytes(c["data"]) for c in direct.db[DIRECT_OUTBOUND_CHUNKS].find())
    for secret in (b"Maria Lopez", b"ClinicalDocument", b"%PDF", b64(CCDA)[:40].encode()):
        assert secret not in stored
    ((event_id, item),) = items(doc)
    assert event_id == f"{view['id']}-v1" and item.kind == inbox_pb2.DELIVERED_KIND_CLOUD
    assert (item.source, item.source_ref, item.source_version) == ("direct-out", view["id"], 1)
    assert list(item.recipients.staff_ids) == ["stf_wilson"]
    assert item.title == f"Direct to {PARTNER}: Referral for Maria Lopez"
    assert item.status == "queued" and not item.mark_unread
    assert item.links[0].url == f"https://clinic.example{OUTBOUND_PATH}/{view['id']}"

    assert direct.outbound.send_pass() == 1
    assert direct.outbound.send_pass() == 0  # never twice
    ((mail_from, rcpt_tos, raw),) = direct.relay.envelopes
    assert (mail_from, rcpt_tos) == (RIVERBEND_INTAKE, [PARTNER])
    outer, entity = opened_by_partner(raw, certs)
    assert (outer["From"], outer["To"], outer["Subject"]) == (RIVERBEND_INTAKE, PARTNER, "Referral for Maria Lopez")
    assert outer["Message-ID"] == view["message_id"]
    assert outer["Disposition-Notification-Options"] == FINAL_DELIVERY
    assert outer["Disposition-Notification-To"] == RIVERBEND_INTAKE
    assert outer.get_content_type() == "application/pkcs7-mime"
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Maria Lopez" in head and b"Maria Lopez" not in body  # only the outer Subject is in clear
    text, files = parts(entity)
    assert text.strip() == "Please see Maria Lopez on Tuesday; C-CDA attached."
    assert files == [("referral.xml", "application/xml", CCDA), ("note.pdf", "application/pdf", PDF)]

    doc = direct.doc(view["id"])
    assert doc["status"] == "sent" and "send_due_at" not in doc and doc["mdn_due_at"] > doc["sent_at"]
    item = latest_item(doc)
    assert (item.status, item.source_version, item.mark_unread) == ("sent", 2, False)


def test_processed_then_dispatched_mdns_move_the_item_and_are_never_messages(direct, certs):
    doc = composed_and_sent(direct)
    mid = doc["message_id"]
    assert send(direct.smtp_port, report_message(certs, report_entity("mdn", mid, "processed"))) == (250, b"ok")
    doc = direct.doc(doc["_id"])
    assert doc["status"] == "processed" and latest_item(doc).status == "processed"
    assert send(direct.smtp_port, report_message(certs, report_entity("mdn", mid, "dispatched"))) == (250, b"ok")
    # a repeated processed MDN changes nothing
    assert send(direct.smtp_port, report_message(certs, report_entity("mdn", mid, "processed"))) == (250, b"ok")

    doc = direct.doc(doc["_id"])
    assert doc["status"] == "dispatched" and "mdn_due_at" not in doc and doc["version"] == 4
    item = latest_item(doc)
    assert (item.status, item.source_version, item.mark_unread) == ("dispatched", 4, False)
    view = direct.get("wilson", f"{OUTBOUND_PATH}/{doc['_id']}").get_json()
    assert view["status"] == "dispatched" and view["status_detail"] == "delivered to every recipient"
    assert [(t["recipient"], t["state"]) for t in view["trail"]] == [
        ("", "queued"),
        (PARTNER, "sent"),
        (PARTNER, "processed"),
        (PARTNER, "dispatched"),
    ]
    assert view["recipients"][0]["status"] == "dispatched"
    # never a board message, never an MDN back
    assert direct.db[DIRECT_MESSAGES].count_documents({}) == 0
    assert direct.feature.mdn_pass() == 0
    assert len(direct.relay.envelopes) == 1
    assert direct.outbound.timeout_pass() == 0


def test_a_failed_mdn_and_a_dsn_fail_their_recipients_and_mark_the_item_unread(direct, certs):
    doc = composed_and_sent(direct, to=[PARTNER, PARTNER_COLLEAGUE])
    (_, rcpt_tos, _) = direct.relay.envelopes[0]
    assert rcpt_tos == [PARTNER, PARTNER_COLLEAGUE]
    mid = doc["message_id"]
    failed = report_entity("mdn", mid, "failed/error")
    assert send(direct.smtp_port, report_message(certs, failed))[0] == 250
    doc = direct.doc(doc["_id"])
    assert [r["state"] for r in doc["recipients"]] == ["failed", "sent"]
    assert doc["status"] == "failed" and doc["status_detail"].startswith(f"{PARTNER}: failure notification")
    item = latest_item(doc)
    assert item.status == "failed" and item.mark_unread

    # A DSN from the partner's postmaster (same domain) about the colleague, naming our message in
    # the returned headers.
    dsn = report_entity("dsn", "", "5.1.1", recipient=PARTNER_COLLEAGUE, header=mid)
    postmaster = "postmaster@direct.partner.example"
    assert send(direct.smtp_port, report_message(certs, dsn, sender=postmaster), sender=postmaster)[0] == 250
    doc = direct.doc(doc["_id"])
    assert [r["detail"] for r in doc["recipients"]][1] == "delivery status notification: failed (5.1.1)"
    assert [r["state"] for r in doc["recipients"]] == ["failed", "failed"] and "mdn_due_at" not in doc
    assert not latest_item(doc).mark_unread  # already failed: no second alert
    assert direct.db[DIRECT_MESSAGES].count_documents({}) == 0


def test_without_mdns_in_time_the_recipients_fail(stacks, certs):
    direct = stacks(CLOUD_DIRECT_MDN_TIMEOUT_S="1")
    doc = composed_and_sent(direct, to=[PARTNER, PARTNER_COLLEAGUE])
    assert send(direct.smtp_port, report_message(certs, report_entity("mdn", doc["message_id"], "processed")))[0] == 250
    assert wait_until(direct.outbound.timeout_pass, timeout=10) == 1
    doc = direct.doc(doc["_id"])
    assert [(r["state"], r["detail"]) for r in doc["recipients"]] == [
        ("failed", "no dispatched notification within 1 s"),
        ("failed", "no processed notification within 1 s"),
    ]
    assert "mdn_due_at" not in doc and latest_item(doc).mark_unread
    assert direct.outbound.timeout_pass() == 0


def test_unmatched_foreign_and_forged_reports(direct, certs):
    doc = composed_and_sent(direct)
    before = direct.doc(doc["_id"])["version"]
    unknown = report_entity("mdn", "<nothing-we-sent@direct.riverbend.example>", "processed")
    assert send(direct.smtp_port, report_message(certs, unknown)) == (250, b"ok")
    # Signed by a certificate of a CA that is not an anchor: refused like any message.
    forged = report_message(certs, report_entity("mdn", doc["message_id"], "dispatched"), signer="rogue")
    code, text = send(direct.smtp_port, forged)
    assert code == 554 and b"trusted anchor" in text
    assert direct.db["security_events"].count_documents({"code": "untrusted_signer"}) == 1
    # A DSN from another domain may not fail the partner's recipient.
    other = devcerts.DevIdentity("other", "Other HISP", ("postmaster@elsewhere.example",), "elsewhere.example")
    ca_cert, ca_key = load_ca(certs)
    cert, key = devcerts.issue(ca_cert, ca_key, other)
    devcerts.write_identity(certs, "other", cert, key)
    dsn = report_entity("dsn", doc["message_id"], "5.1.1")
    foreign = report_message(certs, dsn, sender="postmaster@elsewhere.example", signer="other")
    assert send(direct.smtp_port, foreign, sender="postmaster@elsewhere.example")[0] == 250
    doc = direct.doc(doc["_id"])
    assert doc["version"] == before and doc["status"] == "sent"
    assert direct.db[DIRECT_MESSAGES].count_documents({}) == 0


def load_ca(certs: Path):
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((certs / "ca.cert.pem").read_bytes())
    return ca, serialization.load_pem_private_key((certs / "ca.key.pem").read_bytes(), None)


def test_a_reply_defaults_to_the_original_and_forwards_its_attachments(direct, certs):
    original_id = "<orig-1@direct.partner.example>"
    assert send(direct.smtp_port, direct_message(certs, message_id=original_id, subject="Lab results")) == (250, b"ok")
    (inbound,) = direct.db[DIRECT_MESSAGES].find({})
    assert inbound["triage_due_at"] == inbound["received_at"]
    assert direct.feature.stored_attachments(inbound) == [
        ("referral.xml", "application/xml", CCDA),
        ("note.pdf", "application/pdf", PDF),
    ]
    inbound_view = direct.get("wilson", f"/api/v1/cloud/direct/{inbound['_id']}").get_json()
    assert inbound_view["reply"] == {"from": RIVERBEND_INTAKE, "to": [PARTNER], "subject": "Re: Lab results"}

    body = {
        "in_reply_to": inbound["_id"],
        "text": "Received, thank you.",
        "forward_attachments": [{"message": inbound["_id"], "index": 1}],
    }
    answer = direct.post("thompson", body)
    assert answer.status_code == 202, answer.get_json()
    view = answer.get_json()
    assert (view["from"], view["to"], view["subject"]) == (RIVERBEND_INTAKE, [PARTNER], "Re: Lab results")
    assert view["in_reply_to"] == inbound["_id"]
    assert [a["filename"] for a in view["attachments"]] == ["note.pdf"]
    actions = {a.get("action") for a in direct.db["access_records"].find({})}
    assert {"reply", "forward"} <= actions

    assert direct.outbound.send_pass() == 1
    outer, entity = opened_by_partner(direct.relay.envelopes[-1][2], certs)
    assert outer["In-Reply-To"] == original_id and outer["References"] == original_id
    text, files = parts(entity)
    assert text.strip() == "Received, thank you." and files == [("note.pdf", "application/pdf", PDF)]
    # The sender and the staff linked to the address see it; others do not.
    assert direct.get("wilson", f"{OUTBOUND_PATH}/{view['id']}").status_code == 200
    pdf = direct.get("wilson", f"{OUTBOUND_PATH}/{view['id']}/attachments/0")
    assert pdf.status_code == 200 and pdf.data == PDF and pdf.headers["Content-Disposition"].startswith("attachment")
    for outsider in ("reyes", "baker"):
        refused = direct.get(outsider, f"{OUTBOUND_PATH}/{view['id']}")
        assert refused.status_code == 404 and refused.get_json()["code"] == "direct_message_not_found"
    # Replying to a message not delivered to the caller.
    refused = direct.post("reyes", {"in_reply_to": inbound["_id"], "text": "x", "from": RIVERBEND_REYES})
    assert refused.status_code == 404 and refused.get_json()["code"] == "direct_message_not_found"


def test_a_partners_line_breaks_in_names_are_kept_out_and_refused_sends_record_no_reads(direct, certs):
    boundary = "b_" + uuid.uuid4().hex
    inner = (
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "Subject: =?utf-8?q?Lab=0D=0ABcc=3A_x=40y.example?=\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        f"--{boundary}\r\nContent-Type: application/pdf\r\n"
        "Content-Disposition: attachment; filename*=utf-8''..%2F..%2Fevil%0D%0AX-Evil%3A%201.pdf\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{base64.b64encode(PDF).decode()}\r\n--{boundary}--\r\n"
    ).encode()
    assert send(direct.smtp_port, direct_message(certs, inner=inner)) == (250, b"ok")
    (inbound,) = direct.db[DIRECT_MESSAGES].find({})
    view = direct.get("wilson", f"/api/v1/cloud/direct/{inbound['_id']}").get_json()
    assert view["subject"] == "Lab Bcc: x@y.example"
    assert view["attachments"][0]["filename"] == ".._.._evil X-Evil: 1.pdf"
    (item,) = [request for _, request in items(inbound)]
    assert "\r" not in item.title and "\n" not in item.title

    # A reply that is refused (no certificate for the address) records no read of the original
    # nor of the forwarded attachment; the forward that is sent does, once.
    forward = {"message": inbound["_id"], "index": 0}
    refused = direct.post(
        "wilson",
        {
            "in_reply_to": inbound["_id"],
            "to": ["nobody@unknown.example"],
            "text": "x",
            "forward_attachments": [forward],
        },
    )
    assert refused.status_code == 422
    assert direct.db["access_records"].count_documents({"action": {"$in": ["reply", "forward"]}}) == 0
    sent = direct.post("wilson", {"in_reply_to": inbound["_id"], "text": "x", "forward_attachments": [forward]})
    assert sent.status_code == 202, sent.get_json()
    assert sorted(a["action"] for a in direct.db["access_records"].find({"action": {"$in": ["reply", "forward"]}})) == [
        "forward",
        "reply",
    ]
    assert direct.outbound.send_pass() == 1
    _, entity = opened_by_partner(direct.relay.envelopes[-1][2], certs)
    assert [name for name, _, _ in parts(entity)[1]] == [".._.._evil X-Evil: 1.pdf"]


def test_an_idempotency_key_makes_a_repeated_send_return_the_first_message(direct):
    key = {"Idempotency-Key": "page-retry-0001"}
    first = direct.post("wilson", new_message(), **key)
    assert first.status_code == 202, first.get_json()
    again = direct.post("wilson", new_message(), **key)
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["subject"] == "Referral for Maria Lopez"
    # The same key with another request is not a repeat: refused, nothing sent.
    changed = direct.post("wilson", new_message(subject="Changed on retry"), **key)
    assert changed.status_code == 409 and changed.get_json()["code"] == "idempotency_key_reused"
    # Concurrent repeats: one message, the others answered with it.
    answers = together(*[lambda: direct.post("wilson", new_message(), **{"Idempotency-Key": "burst"})] * 3)
    assert sorted(a.status_code for a in answers) == [200, 200, 202]
    assert len({a.get_json()["id"] for a in answers}) == 1
    # The same key from someone else is their own message; a bad key is refused before anything.
    other = direct.post("thompson", new_message(), **key)
    assert other.status_code == 202 and other.get_json()["id"] != first.get_json()["id"]
    bad = direct.post("wilson", new_message(), **{"Idempotency-Key": "x" * 129})
    assert bad.status_code == 400 and bad.get_json()["code"] == "invalid_idempotency_key"
    assert direct.db[DIRECT_OUTBOUND].count_documents({}) == 3
    assert direct.outbound.send_pass() == 3
    view = direct.get("wilson", f"{OUTBOUND_PATH}/{first.get_json()['id']}/attachments/1")
    assert view.status_code == 200 and view.data == PDF


def test_a_new_message_without_from_goes_from_the_callers_one_linked_address(direct):
    body = {k: v for k, v in new_message().items() if k != "from"}
    sent = direct.post("reyes", body)
    assert sent.status_code == 202 and sent.get_json()["from"] == RIVERBEND_REYES
    direct.directory.addresses["second@direct.riverbend.example"] = CloudAddress(
        "direct", "second@direct.riverbend.example", RIVERBEND, "cad_second", ("stf_reyes",), "Second"
    )
    several = direct.post("reyes", body)
    assert several.status_code == 422 and several.get_json()["code"] == "from_required"


@pytest.mark.parametrize(
    ("who", "changes", "status", "code"),
    [
        ("reyes", {}, 403, "not_linked"),
        ("wilson", {"from": RIVERBEND_REYES}, 403, "not_linked"),
        ("baker", {}, 403, "not_linked"),
        ("wilson", {"from": "nobody@direct.riverbend.example"}, 403, "not_linked"),
        ("wilson", {"to": ["someone@direct.unknown.example"]}, 422, "recipient_certificate_unknown"),
        ("wilson", {"to": ["not an address"]}, 400, "invalid_address"),
        ("wilson", {"to": [f"a{n}@direct.partner.example" for n in range(11)]}, 400, "too_many"),
        ("wilson", {"to": None}, 400, "missing_field"),
        ("baker", {"from": None}, 403, "not_linked"),  # no from, and linked to no address here
        ("wilson", {"subject": "Hi\r\nBcc: someone@else.example"}, 400, "invalid_value"),
        ("wilson", {"subject": "x" * 201}, 400, "too_long"),
        ("wilson", {"text": "x" * (100 * 1024 + 1)}, 400, "too_long"),
        ("wilson", {"unknown": 1}, 400, "unknown_field"),
        ("wilson", {"in_reply_to": "dm_nothing"}, 404, "direct_message_not_found"),
        ("wilson", {"forward_attachments": [{"message": "dm_nothing", "index": 0}]}, 404, "direct_message_not_found"),
        (
            "wilson",
            {"attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "@@@"}]},
            400,
            "invalid_base64",
        ),
        (
            "wilson",
            {"attachments": [{"filename": "a", "content_type": "multipart/mixed", "content_base64": ""}]},
            400,
            "invalid_value",
        ),
        (
            "wilson",
            {
                "attachments": [
                    {
                        "filename": "big.pdf",
                        "content_type": "application/pdf",
                        "content_base64": b64(b"x" * (64 * 1024 + 1)),
                    }
                ]
            },
            413,
            "attachments_too_large",
        ),
    ],
)
def test_refusals_write_nothing(direct, who, changes, status, code):
    body = {k: v for k, v in {**new_message(), **changes}.items() if v is not None}
    answer = direct.post(who, body)
    assert answer.status_code == status, answer.get_json()
    assert answer.get_json()["code"] == code
    assert direct.db[DIRECT_OUTBOUND].count_documents({}) == 0
    assert direct.db[DIRECT_OUTBOUND_CHUNKS].count_documents({}) == 0


def test_bodies_larger_than_the_service_json_limit_are_taken_up_to_the_outbound_limit(direct):
    # 48 KiB of attachments: far above CLOUD_COMMS_MAX_REQUEST_BYTES (16 KiB), within the 64 KiB.
    big = {"filename": "scan.pdf", "content_type": "application/pdf", "content_base64": b64(PDF + b"0" * 48 * 1024)}
    answer = direct.post("wilson", new_message(attachments=[big]))
    assert answer.status_code == 202, answer.get_json()
    too_big = direct.post("wilson", new_message(text="x" * 100, attachments=[big] * 12))
    assert too_big.status_code == 413 and too_big.get_json()["code"] == "payload_too_large"
    assert direct.db[DIRECT_OUTBOUND].count_documents({}) == 1


def test_a_refusing_relay_fails_the_recipient_and_an_absent_one_is_retried(stacks, certs):
    direct = stacks(refuse=(PARTNER_COLLEAGUE,))
    doc = composed_and_sent(direct, to=[PARTNER, PARTNER_COLLEAGUE])
    assert [(r["state"], r["detail"]) for r in doc["recipients"]] == [
        ("sent", "handed to the relay"),
        ("failed", "the relay refused it (550)"),
    ]
    unreachable = stacks(relay_running=False)
    answer = unreachable.post("wilson", new_message())
    assert unreachable.outbound.send_pass() == 0
    doc = unreachable.doc(answer.get_json()["id"])
    assert doc["status"] == "queued" and doc["send_error"].startswith("relay unavailable")
    assert doc["send_attempts"] == 1 and doc["send_due_at"] > doc["created_at"] + 20_000


def test_without_a_relay_messages_stay_queued(stacks):
    direct = stacks(relay=False)
    answer = direct.post("wilson", new_message())
    assert answer.status_code == 202
    assert direct.outbound.send_pass() == 0 and direct.outbound.timeout_pass() == 0
    assert direct.doc(answer.get_json()["id"])["status"] == "queued"


def recipient_states(direct: Stack, oid: str) -> list[tuple[str, str]]:
    return [(r["state"], r["detail"]) for r in direct.doc(oid)["recipients"]]


def test_a_dispatched_mdn_without_the_final_delivery_field_is_not_delivered(stacks, certs):
    direct = stacks(CLOUD_DIRECT_MDN_TIMEOUT_S="1")
    doc = composed_and_sent(direct)
    unconfirmed = report_entity("mdn", doc["message_id"], "dispatched", final=False)
    assert send(direct.smtp_port, report_message(certs, unconfirmed)) == (250, b"ok")
    assert recipient_states(direct, doc["_id"]) == [
        ("processed", "dispatched notification received without final-delivery confirmation")
    ]
    assert direct.doc(doc["_id"])["status"] == "processed"
    assert wait_until(direct.outbound.timeout_pass, timeout=10) == 1
    assert recipient_states(direct, doc["_id"]) == [("failed", "no dispatched notification within 1 s")]


def test_mdns_as_other_hisps_write_them_are_read(direct, certs):
    """A base64-encoded notification part naming our message without angle brackets; one with no
    Original-Message-ID, naming it by the MDN's In-Reply-To; `processed/warning,error` fails."""
    first = composed_and_sent(direct)
    bare = first["message_id"].strip("<>")
    fields = (
        f"Reporting-UA: mx.direct.partner.example; HISP\r\nFinal-Recipient: rfc822;{PARTNER}\r\n"
        f"Original-Message-ID: {bare}\r\nDisposition: automatic-action/MDN-sent-automatically;"
        f" processed (ok); x-note=1\r\n"
    )
    entity = (
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="r"\r\n\r\n'
        "--r\r\nContent-Type: text/plain\r\n\r\nProcessed.\r\n"
        "--r\r\nContent-Type: message/disposition-notification\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{base64.encodebytes(fields.encode()).decode()}\r\n--r--\r\n"
    ).encode()
    assert send(direct.smtp_port, report_message(certs, entity)) == (250, b"ok")
    assert recipient_states(direct, first["_id"]) == [("processed", "processed notification received")]

    second = composed_and_sent(direct)
    no_original = report_entity("mdn", "", "processed/warning,error").replace(b"Original-Message-ID: \r\n", b"")
    answer = report_message(certs, no_original, extra=(("In-Reply-To", second["message_id"]),))
    assert send(direct.smtp_port, answer) == (250, b"ok")
    assert recipient_states(direct, second["_id"]) == [
        ("failed", "failure notification received (processed/warning,error)")
    ]


def postfix_bounce(original: bytes, *, status: str = "5.1.1", action: str = "failed") -> bytes:
    """What Postfix sends back (MAIL FROM:<>): its Final-Recipient rewritten to the internal
    mailbox, the address we sent to in Original-Recipient, the whole message returned."""
    b = "3F1A2B3C4D.1772445600/relay.riverbend.example"
    return (
        (
            "From: MAILER-DAEMON@relay.riverbend.example (Mail Delivery System)\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\nTo: {RIVERBEND_INTAKE}\r\n"
            "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{b}"\r\n'
            "Content-Transfer-Encoding: 8bit\r\nMessage-Id: <20260302100000.3F1A2B3C4D@relay.riverbend.example>\r\n"
            "Date: Mon,  2 Mar 2026 10:00:00 +0000 (UTC)\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n"
            f"--{b}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "This is the mail system at host relay.riverbend.example.\r\n\r\nI'm sorry to have to inform you"
            " that your message could not\r\nbe delivered to one or more recipients.\r\n\r\n"
            f"--{b}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; relay.riverbend.example\r\nX-Postfix-Queue-ID: 3F1A2B3C4D\r\n"
            f"X-Postfix-Sender: rfc822; {RIVERBEND_INTAKE}\r\n"
            "Arrival-Date: Mon,  2 Mar 2026 09:59:58 +0000 (UTC)\r\n\r\n"
            "Final-Recipient: rfc822; colleague@mailstore.partner.internal\r\n"
            f"Original-Recipient: rfc822;{PARTNER_COLLEAGUE}\r\nAction: {action}\r\nStatus: {status}\r\n"
            "Remote-MTA: dns; mx.direct.partner.example\r\nDiagnostic-Code: smtp; 550 5.1.1"
            " <colleague@mailstore.partner.internal>: Recipient address rejected: User unknown\r\n\r\n"
            f"--{b}\r\nContent-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        + original
        + f"\r\n--{b}--\r\n".encode()
    )


def exchange_ndr(original_headers: bytes) -> bytes:
    """An Exchange non-delivery report (MAIL FROM:<>) returning the original headers only."""
    b = "_000_NDR_EXCH01"
    return (
        (
            f"From: postmaster@exchange.partner.example\r\nTo: {RIVERBEND_INTAKE}\r\n"
            "Subject: Undeliverable: Referral\r\n"
            "Message-ID: <ndr-1@EXCH01.exchange.partner.example>\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"\r\n\r\n'
            f'--{b}\r\nContent-Type: multipart/alternative; boundary="alt"\r\n\r\n'
            "--alt\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nYour message couldn't be delivered.\r\n"
            "--alt\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n<p>Your message couldn't be delivered.</p>\r\n"
            "--alt--\r\n\r\n"
            f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns;EXCH01.exchange.partner.example\r\nReceived-From-MTA: dns;relay.riverbend.example\r\n"
            "Arrival-Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n\r\n"
            f"Original-Recipient: rfc822;{PARTNER.upper()}\r\nFinal-Recipient: rfc822;{PARTNER.upper()}\r\n"
            "Action: failed\r\nStatus: 5.1.10\r\nDiagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound;"
            " Recipient not found by SMTP address lookup\r\nX-Display-Name: Sender\r\n\r\n"
            f"--{b}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        ).encode()
        + original_headers
        + f"\r\n--{b}--\r\n".encode()
    )


def security_event_count(direct: Stack, code: str) -> int:
    return sum(e.get("count", 1) for e in direct.db["security_events"].find({"code": code}))


def test_plain_bounces_from_the_null_sender_fail_their_recipients(direct, certs):
    doc = composed_and_sent(direct, to=[PARTNER, PARTNER_COLLEAGUE])
    original = direct.relay.envelopes[0][2]
    # A delay (4.x.x) changes nothing; a hard bounce fails the recipient Postfix named originally.
    assert send(direct.smtp_port, postfix_bounce(original, status="4.4.7", action="delayed"), sender="")[0] == 250
    assert send(direct.smtp_port, postfix_bounce(original, status="4.4.7"), sender="")[0] == 250
    assert [s for s, _ in recipient_states(direct, doc["_id"])] == ["sent", "sent"]
    assert send(direct.smtp_port, postfix_bounce(original), sender="") == (250, b"ok")
    assert recipient_states(direct, doc["_id"])[1] == ("failed", "delivery status notification: failed (5.1.1)")
    headers = original.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert send(direct.smtp_port, exchange_ndr(headers), sender="") == (250, b"ok")
    assert recipient_states(direct, doc["_id"])[0] == ("failed", "delivery status notification: failed (5.1.10)")
    assert direct.db["security_events"].count_documents({}) == 0
    assert direct.db[DIRECT_MESSAGES].count_documents({}) == 0


def test_other_plain_reports_stay_refused(direct, certs):
    doc = composed_and_sent(direct, to=[PARTNER, PARTNER_COLLEAGUE])
    original = direct.relay.envelopes[0][2]
    # Not from the null sender.
    code, text = send(direct.smtp_port, postfix_bounce(original), sender="postmaster@direct.partner.example")
    assert code == 554 and b"not encrypted" in text
    # Naming no message of ours.
    unknown = original.replace(doc["message_id"].encode(), b"<someone-else@direct.riverbend.example>")
    code, _ = send(direct.smtp_port, postfix_bounce(unknown), sender="")
    assert code == 554
    # An unsigned MDN, even from the null sender.
    plain_mdn = with_headers(report_entity("mdn", doc["message_id"], "failed/error"), to=RIVERBEND_INTAKE)
    code, _ = send(direct.smtp_port, plain_mdn, sender="")
    assert code == 554
    assert security_event_count(direct, "not_encrypted") == 3
    assert [s for s, _ in recipient_states(direct, doc["_id"])] == ["sent", "sent"]


def test_a_signed_dsn_speaks_for_recipients_its_certificates_cover(direct, certs):
    doc = composed_and_sent(direct, to=[NORTHSIDE_DOCTOR, EASTSIDE_NURSE])
    postmaster = f"postmaster@{NORTH_HISP_DOMAIN}"
    both = [report_entity("dsn", doc["message_id"], "5.1.1", recipient=r) for r in (NORTHSIDE_DOCTOR, EASTSIDE_NURSE)]

    # Signed by the HISP for its own domain only: the doctor's (Northside's) certificate covers
    # the HISP's domain, the nurse's does not.
    for entity in both:
        message = report_message(certs, entity, sender=postmaster, signer="north-hisp")
        assert send(direct.smtp_port, message, sender=postmaster)[0] == 250
    assert [s for s, _ in recipient_states(direct, doc["_id"])] == ["failed", "sent"]

    # Signed by a certificate covering Eastside's domain too: it speaks for the nurse.
    message = report_message(certs, both[1], sender=postmaster, signer="north-hisp-east")
    assert send(direct.smtp_port, message, sender=postmaster)[0] == 250
    assert [s for s, _ in recipient_states(direct, doc["_id"])] == ["failed", "failed"]


# --- the development partner HISP ---------------------------------------------------------------
FAILING = "fail-desk@direct.partner.example"
NO_DISPATCH = "nodispatch@direct.partner.example"


@pytest.fixture
def looped(stacks, certs):
    direct = stacks(relay_running=False)
    settings = SimulatorSettings("127.0.0.1", 0, direct.relay_port, str(certs), "127.0.0.1", direct.smtp_port, 0.05)
    hisp = partner(settings)
    controller = Controller(hisp, hostname="127.0.0.1", port=direct.relay_port)
    controller.start()
    yield direct, hisp
    hisp.stop()
    controller.stop()


def states(direct, oid: str) -> list[str]:
    return [r["state"] for r in direct.doc(oid)["recipients"]]


def test_the_simulator_answers_each_recipient_with_mdns(looped):
    direct, hisp = looped
    answer = direct.post("wilson", new_message(to=[PARTNER, FAILING, NO_DISPATCH]))
    assert answer.status_code == 202, answer.get_json()
    oid = answer.get_json()["id"]
    assert direct.outbound.send_pass() == 1
    wait_until(lambda: states(direct, oid) == ["dispatched", "failed", "processed"], timeout=20)
    assert direct.doc(oid)["status"] == "failed"
    events = hisp.state()
    assert [e["kind"] for e in events][0] == "message" and events[0]["final_delivery"] is True
    mdns = sorted((e["recipient"], e["state"], e["outcome"]) for e in events if e["kind"] == "mdn")
    assert mdns == [
        (FAILING, "failed", "sent"),
        (NO_DISPATCH, "processed", "sent"),
        (PARTNER, "dispatched", "sent"),
        (PARTNER, "processed", "sent"),
    ]
    assert direct.db[DIRECT_MESSAGES].count_documents({}) == 0


def test_our_mdns_reach_the_simulator_as_reports_and_foreign_mail_is_refused(looped, certs):
    direct, hisp = looped
    assert send(direct.smtp_port, direct_message(certs, message_id="<t1@direct.partner.example>")) == (250, b"ok")
    assert direct.feature.mdn_pass() == 1
    report = wait_until(lambda: next((e for e in hisp.state() if e["kind"] == "report"), None), timeout=10)
    assert (report["sender"], report["original"], report["states"]) == (
        RIVERBEND_INTAKE,
        "<t1@direct.partner.example>",
        ["processed"],
    )
    # Not for the partner: refused at RCPT; not encrypted for the partner: refused at DATA.
    assert send(direct.relay_port, b"Subject: x\r\n\r\nx\r\n", to=["someone@elsewhere.example"])[0] == 550
    code, text = send(direct.relay_port, direct_message(certs), to=[PARTNER])
    assert code == 554 and b"cannot decrypt" in text


def test_the_simulator_is_for_development_only():
    with pytest.raises(SettingsError) as refused:
        load({"CLINIC_MODE": "production"})
    assert "development and tests only" in str(refused.value)
    with pytest.raises(SettingsError):
        load({"DIRECT_SIMULATOR_HOST": "0.0.0.0"})
    settings = load({"DIRECT_SIMULATOR_HISP": "127.0.0.1:2600", "DIRECT_SIMULATOR_STEP_S": "0.5"})
    assert (settings.hisp_host, settings.hisp_port, settings.smtp_port, settings.step_s) == (
        "127.0.0.1",
        2600,
        2526,
        0.5,
    )
