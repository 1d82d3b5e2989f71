"""Direct secure messaging: inbound S/MIME messages from partner HISPs onto the linked staff's
boards, the audited message view, and MDNs back to the sender; outbound messages composed on the
board (outbound.py), with the MDNs/DSNs about them recorded instead of stored as messages.

Storage: one `direct_messages` document per (agency, Message-ID, recipient address, sender), `_id`
derived from the four, so a resent message is stored (and delivered, and acknowledged) once. It
holds, sealed with the agency's key (kit PhiCipher, AAD = agency|id|field): `content` (subject,
from, to, date, text body, attachment list) and each attachment's bytes (`attachments[n]`,
base64 inside the seal). In clear: agency, recipient address and its directory id, linked staff,
the Message-ID, the sender address (MDN recipient), the signer's certificate (public; MDNs are
encrypted for it when no configured recipient certificate covers the sender), whether the sender
asked for final delivery (`final_delivery_requested`: then a `dispatched` MDN is sent), sizes and
the MDN states (mdn_worker.py). Its `board_item.delivery_requested.v1` event rides in the same
insert (kit outbox).

Refusals (not encrypted, undecryptable, unsigned, bad signature, untrusted/expired signer, signer
not matching From, malformed MIME) answer 554 with the reason, store nothing of the message and
are recorded by the store's `record_security_event` (one document and one log line per channel,
code, peer and minute, counting repeats: channel, code, reason, peer, envelope sender, recipient
addresses; never content).

A verified message whose signed content is a report (`multipart/report`, reports.py) is an MDN or
DSN about one of our outbound messages: it is recorded there (or dropped when it matches none),
answered 250, never stored as a message, never delivered to a board and never answered with an
MDN (RFC 3798). The one unencrypted message taken: a plain bounce from a mail server (an unsigned
`multipart/report; report-type=delivery-status` from the null sender `MAIL FROM:<>`) naming one
of our outbound messages; it may only fail recipients (outbound.record_bounce). Any other
unencrypted message is refused as above. Stored messages carry `triage_due_at` (= received_at) for the triage worker.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from email.message import EmailMessage
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Response, g, request
from pymongo.errors import DuplicateKeyError

from services.cloud_comms import audit, delivery
from services.cloud_comms.components import Feature
from services.cloud_comms.direct import compose, outbound, reports, smime
from services.cloud_comms.direct.mdn_worker import MdnWorker
from services.cloud_comms.direct.outbound import DIRECT_OUTBOUND, OutboundDirect
from services.cloud_comms.direct.smtp import DirectHandler, SmtpListener
from services.cloud_comms.direct.views import attachment_response, digest, iso
from services.kit.crypto import DecryptionError
from services.kit.errors import NotFound, PayloadTooLarge, Unavailable
from services.kit.http import require_staff
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.validation import idempotency_key_header, json_body, path_id

log = logging.getLogger(__name__)

DIRECT_MESSAGES = "direct_messages"
RESOURCE_TYPE = "direct_message"
ADDRESS = re.compile(r"^[^@\s<>]{1,64}@[A-Za-z0-9.-]{1,253}$")
INDEXES = [
    IndexSpec(DIRECT_MESSAGES, [("agency_id", 1), ("received_at", -1)], name="direct_by_agency"),
    IndexSpec(DIRECT_MESSAGES, [("mdn_processed", 1)], name="direct_mdn_processed"),
    IndexSpec(DIRECT_MESSAGES, [("mdn_dispatched", 1)], name="direct_mdn_dispatched"),
    IndexSpec(DIRECT_MESSAGES, [("mdn_failed", 1)], name="direct_mdn_failed"),
]


def message_doc_id(agency_id: str, message_id: str, address: str, sender: str) -> str:
    """One stored message per (agency, Message-ID, recipient address, sender): a resent message is
    the same document, and another sender reusing a Message-ID (a sloppy or hostile partner) is a
    message of its own, never silently taken for a repeat. Also the board item's source_ref."""
    return "dm_" + digest(agency_id, message_id, address.lower(), sender.lower())


# Characters a partner could use to break a line where a subject or file name is shown or reused
# (C0/C1 controls, DEL, the Unicode line and paragraph separators).
LINE_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def one_line(text: str) -> str:
    """`text` with every run of control characters and line separators made one space."""
    return LINE_BREAKERS.sub(" ", text).strip()


def safe_filename(name: str) -> str:
    """A partner's file name fit to show and to send on: one line, no path separators."""
    return one_line(name).replace("/", "_").replace("\\", "_")[:255] or "attachment"


def _is_attachment(part: EmailMessage) -> bool:
    if part.get_content_disposition() == "attachment" or part.get_filename():
        return True
    return part.get_content_maintype() not in ("text", "multipart", "message")


def extract(inner: EmailMessage) -> tuple[str, list[tuple[str, str, bytes]], str]:
    """(text body, [(filename, content type, bytes)], inner Subject or "") of the signed entity."""
    entity = inner
    if entity.get_content_type() == "message/rfc822":  # a wrapped message (headers protected)
        payload = entity.get_payload()
        entity = payload[0] if isinstance(payload, list) and payload else entity
    text, html = "", ""
    attachments: list[tuple[str, str, bytes]] = []
    for part in entity.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        try:
            data = part.get_payload(decode=True) or b""
        except Exception as exc:
            raise smime.Malformed("a MIME part cannot be decoded") from exc
        if _is_attachment(part):
            name = safe_filename(part.get_filename() or f"attachment-{len(attachments) + 1}")
            attachments.append((name, ctype, data))
        elif ctype == "text/plain" and not text:
            text = data.decode(part.get_content_charset() or "utf-8", "replace")
        elif ctype == "text/html" and not html:
            html = data.decode(part.get_content_charset() or "utf-8", "replace")
    return text or html, attachments, one_line(str(entity.get("Subject") or ""))


class DirectMessaging(Feature):
    outbox_collections = (DIRECT_MESSAGES, DIRECT_OUTBOUND)
    resource_type = RESOURCE_TYPE

    def __init__(self, components):
        super().__init__(components)
        settings = components.settings
        self.direct = settings.direct
        self.identities = [
            smime.Identity.load(Path(cert).read_bytes(), Path(key).read_bytes()) for cert, key in self.direct.identities
        ]
        self.anchors = smime.load_anchors(Path(self.direct.anchors_file).read_bytes())
        self.messages = components.store.db[DIRECT_MESSAGES]
        self.cipher = components.cipher
        self.hostname = self.direct.mdn_from.rpartition("@")[2] or "hisp.local"
        self.smtp = SmtpListener(
            DirectHandler(self.resolve_recipient, self.receive),
            settings.smtp_host,
            settings.smtp_port,
            max_message_bytes=self.direct.max_message_bytes,
            hostname=self.hostname,
            tls=settings.smtp_tls,
        )
        self.outbound = OutboundDirect(self)
        self.mdn_worker = MdnWorker(self)

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES + outbound.INDEXES)

    def listeners(self):
        return [("direct-smtp", self.smtp.run, self.smtp.ready)]

    def background(self):
        return [("direct-mdn", self.run_mdn), ("direct-outbound", self.outbound.run)]

    def identity_for(self, address: str) -> smime.Identity | None:
        return next((i for i in self.identities if i.covers(address)), None)

    # --- SMTP -------------------------------------------------------------------------------------
    def resolve_recipient(self, address: str):
        """The directory entry of a Direct address this HISP holds a certificate for, else None."""
        address = address.strip().lower()
        if not ADDRESS.fullmatch(address) or self.identity_for(address) is None:
            return None
        return self.components.directory.resolve_address("direct", address)

    def receive(self, mail_from: str, recipients: list, raw: bytes, peer: str) -> str:
        if not recipients:
            return "554 5.5.1 no valid recipients"
        addresses = [r.address for r in recipients]
        try:
            outer = smime.parse(raw)
            message_id = str(outer.get("Message-ID") or "").strip()
            if not message_id or len(message_id) > 998:
                raise smime.Malformed("a Message-ID header is required")
            opened = smime.open_message(outer, self.identities, self.anchors, addresses)
            report = reports.parse(opened.inner, str(outer.get("In-Reply-To") or ""))
            if report is None:
                text, attachments, inner_subject = extract(opened.inner)
        except smime.NotEncrypted as refused:
            bounce = self._bounce(mail_from, outer, recipients)
            if bounce:
                return bounce
            self._refused(refused, peer, mail_from, recipients)
            return refused.reply
        except smime.Refused as refused:
            self._refused(refused, peer, mail_from, recipients)
            return refused.reply
        sender = smime.from_address(outer)
        if report is not None:
            return self.outbound.record_report(report, sender, recipients, opened.signer)
        options = [str(v) for m in (outer, opened.inner) for v in m.get_all("Disposition-Notification-Options") or []]
        final_delivery = compose.asks_final_delivery(*options)
        subject = inner_subject or one_line(str(outer.get("Subject") or ""))
        to = [a for _, a in getaddresses([str(v) for v in outer.get_all("To") or []]) if a]
        date = str(outer.get("Date") or "")
        try:
            date = parsedate_to_datetime(date).isoformat() if date else ""
        except (TypeError, ValueError):
            pass
        signer_pem = opened.signer.public_bytes(serialization.Encoding.PEM).decode()
        created = 0
        for recipient in recipients:
            created += self._store(
                recipient,
                message_id,
                sender=sender,
                to=to,
                subject=subject,
                date=date,
                text=text,
                attachments=attachments,
                signer_pem=signer_pem,
                final_delivery=final_delivery,
            )
        log.info(
            "direct message stored" if created else "direct message repeated",
            extra={"count": created, "recipients": len(recipients)},
        )
        return "250 2.0.0 message accepted for delivery"

    def _bounce(self, mail_from: str, outer: EmailMessage, recipients: list) -> str:
        """The reply to a plain (unsigned, unencrypted) DSN from the null sender naming one of our
        outbound messages (it may only fail recipients); "" for anything else (refused)."""
        if mail_from.strip() not in ("", "<>"):
            return ""
        report = reports.parse(outer)
        if report is None or report.kind != "dsn" or not report.original_message_id:
            return ""
        return self.outbound.record_bounce(report, recipients)

    def _refused(self, refused: smime.Refused, peer: str, mail_from: str, recipients: list) -> None:
        agencies = sorted({r.agency_id for r in recipients})
        self.components.store.record_security_event(
            "direct",
            refused.kind,
            refused.reason,
            reply=refused.reply,
            peer=peer,
            mail_from=mail_from[:320],
            recipients=[r.address for r in recipients],
            agency_ids=agencies,
        )

    def _store(
        self, recipient, message_id, *, sender, to, subject, date, text, attachments, signer_pem, final_delivery
    ) -> int:
        agency_id = recipient.agency_id
        doc_id = message_doc_id(agency_id, message_id, recipient.address, sender)
        received = now_ms()
        staff_ids = list(recipient.staff_ids)
        content = {
            "subject": subject,
            "from": sender,
            "to": to,
            "date": date,
            "text": text,
            "attachments": [{"filename": n, "content_type": t, "size": len(b)} for n, t, b in attachments],
        }
        doc = {
            "_id": doc_id,
            "agency_id": agency_id,
            "address": recipient.address,
            "address_id": recipient.address_id,
            "staff_ids": staff_ids,
            "message_id": message_id,
            "sender": sender,
            "received_at": received,
            "triage_due_at": received,
            "attachment_count": len(attachments),
            "content": self.cipher.seal(agency_id, doc_id, "content", json.dumps(content)),
            "attachments": [
                self.cipher.seal(agency_id, doc_id, f"attachment.{n}", base64.b64encode(data).decode("ascii"))
                for n, (_, _, data) in enumerate(attachments)
            ],
            "signer_cert": signer_pem,
            "final_delivery_requested": final_delivery,
            "mdn_processed": "due",
            "mdn_dispatched": "waiting" if staff_ids else "none",
            "mdn_failed": "none" if staff_ids else "due",
            "failure": "" if staff_ids else "no staff is linked to the recipient address",
        }
        events = []
        if staff_ids:
            count = len(attachments)
            request = delivery.request(
                source=delivery.SOURCE_DIRECT,
                source_ref=doc_id,
                delivery_id=doc_id,
                staff_ids=staff_ids,
                title=f"Direct: {subject or '(no subject)'}"[:200],
                summary=f"From {sender} · {count} attachment{'' if count == 1 else 's'}",
                url=f"{self.components.settings.public_url}/api/v1/cloud/direct/{doc_id}",
                link_label="Open message",
            )
            events.append(delivery.delivery_requested(agency_id, request, doc_id))
        try:
            self.messages.insert_one({**doc, **outbox_fields(events)})
        except DuplicateKeyError:
            return 0
        return 1

    # --- MDNs (mdn_worker.py) -----------------------------------------------------------------------
    def run_mdn(self, stop_event: threading.Event) -> None:
        self.mdn_worker.run(stop_event)

    def mdn_pass(self) -> int:
        return self.mdn_worker.run_pass()

    # --- the message view -------------------------------------------------------------------------
    def readable(self, caller, doc_id: str) -> dict:
        """The message, if it was delivered to the caller; else 404 (the refusal audited)."""
        doc = self.messages.find_one(
            {"_id": {"$eq": doc_id}, "agency_id": {"$eq": caller.agency_id}}, projection={"_outbox": 0}
        )
        if doc is None or caller.staff_id not in doc.get("staff_ids", []):
            raise audit.refuse(
                self.components.store, caller, doc_id, resource_type=RESOURCE_TYPE, code="direct_message_not_found"
            )
        return doc

    def opened(self, doc: dict) -> dict:
        """The sealed content of a stored message."""
        try:
            return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "content", doc["content"]))
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the message cannot be opened") from exc

    def view(self, caller, doc_id: str) -> dict:
        doc = self.readable(caller, doc_id)
        content = self.opened(doc)
        audit.record(self.components.store, caller, doc_id, resource_type=RESOURCE_TYPE)
        return {
            "id": doc_id,
            "message_id": doc["message_id"],
            "from": content["from"],
            "to": content["to"],
            "subject": content["subject"],
            "date": content["date"],
            "received_at": iso(doc["received_at"]),
            "text": content["text"],
            "attachments": [
                {**a, "index": n, "url": f"/api/v1/cloud/direct/{doc_id}/attachments/{n}"}
                for n, a in enumerate(content["attachments"])
            ],
            "reply": {
                "from": doc["address"],
                "to": [content["from"] or doc["sender"]],
                "subject": compose.reply_subject(content["subject"]),
            },
        }

    def attachment_data(
        self, caller, doc_id: str, index: int, *, action: str | None = "download"
    ) -> tuple[str, str, bytes]:
        """(filename, content type, bytes) of one attachment of a message delivered to the caller
        (404 otherwise, audited); the read is audited with `action`, or not at all with None (a
        caller that records it once its own checks have passed: a forward)."""
        doc = self.readable(caller, doc_id)
        content = self.opened(doc)
        if not 0 <= index < len(doc.get("attachments", [])):
            raise NotFound("attachment_not_found", "no such attachment")
        meta = content["attachments"][index]
        try:
            data = self._attachment_bytes(doc, index)
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the attachment cannot be opened") from exc
        if action is not None:
            audit.record(
                self.components.store,
                caller,
                f"{doc_id}/attachments/{index}",
                resource_type=RESOURCE_TYPE,
                action=action,
            )
        return safe_filename(meta["filename"]), meta["content_type"], data

    def _attachment_bytes(self, doc: dict, index: int) -> bytes:
        return base64.b64decode(
            self.cipher.open(doc["agency_id"], doc["_id"], f"attachment.{index}", doc["attachments"][index])
        )

    def stored_attachments(self, doc: dict) -> list[tuple[str, str, bytes]]:
        """[(filename, content type, bytes)] of a stored message, for work no person asked for (the
        triage worker): not audited here. Raises DecryptionError / Unavailable when unreadable."""
        content = self.opened(doc)
        return [
            (meta["filename"], meta["content_type"], self._attachment_bytes(doc, n))
            for n, meta in enumerate(content["attachments"])
        ]

    def attachment(self, caller, doc_id: str, index: int) -> Response:
        filename, content_type, data = self.attachment_data(caller, doc_id, index)
        return attachment_response(data, filename, content_type)

    def compose(self, caller) -> tuple[dict, int]:
        """POST outbound: the body may be far larger than the service's JSON bodies; 202 with the new
        message, 200 with the first one for a repeated Idempotency-Key."""
        limit = self.outbound.max_body_bytes
        if (request.content_length or 0) > limit:
            raise PayloadTooLarge("payload_too_large", f"the request body exceeds {limit} bytes")
        request.max_content_length = limit
        key = idempotency_key_header()  # refused before the body is read
        view, created = self.outbound.compose(caller, json_body(), key)
        return view, 202 if created else 200

    def blueprint(self):
        staff = Blueprint("cloud_direct", __name__, url_prefix="/api/v1/cloud/direct")

        @staff.post("/outbound")
        @require_staff
        def compose():
            return self.compose(g.identity)

        @staff.get("/outbound/<message>")
        @require_staff
        def outbound_view(message: str):
            return self.outbound.view(g.identity, path_id(message, "message"))

        @staff.get("/outbound/<message>/attachments/<int:index>")
        @require_staff
        def outbound_attachment(message: str, index: int):
            return self.outbound.attachment(g.identity, path_id(message, "message"), index)

        @staff.get("/<message>")
        @require_staff
        def view(message: str):
            return self.view(g.identity, path_id(message, "message"))

        @staff.get("/<message>/attachments/<int:index>")
        @require_staff
        def attachment(message: str, index: int):
            return self.attachment(g.identity, path_id(message, "message"), index)

        return staff
