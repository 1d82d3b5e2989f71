"""Outbound Direct: a staff member composes (or replies to) a Direct message from the board; it is
signed with the `from` address's agency identity, encrypted for each recipient's certificate, sent
through CLOUD_SMTP_RELAY, and tracked per recipient by the MDNs (and DSNs) that come back.

Storage:
- `direct_outbound`, one document per message, `_id` "dmo_" + random. Sealed with the agency's key
  (kit PhiCipher, AAD agency|id|field): `content` (subject, text, attachment list). In clear: agency,
  `from` and its directory id, `to`, the Message-ID (MDNs name it), the replied-to message id and
  Message-ID, the creator (staff id, name), the recipient certificates (public; pinned when the
  message was accepted), per-recipient states, the trail, the aggregate status and `version`.
  Work markers are epoch-ms fields, present only while due: `send_due_at` (to be handed to the
  relay) and `mdn_due_at` (when unfinished recipients fail for want of an MDN).
- `direct_outbound_chunks`: each attachment in sealed pieces of 3 MiB (`_id`
  "<outbound id>.<attachment>.<piece>", field `attachment.<n>.<piece>`), written before the message
  document; a failed message insert removes them.

The message document is inserted together with the sender's board item (kit outbox:
`board_item.delivery_requested.v1`, source "direct-out", source_ref the outbound id); every state
change is one write guarded by `version` that bumps it and stages the item's update (same
source_ref, source_version = version, status = the aggregate; `mark_unread` when it turns failed).

Sending (worker `direct-outbound`, every CLOUD_DIRECT_MDN_PASS_S): a due message is claimed by a
conditional update of `send_due_at` (one replica wins), built and sealed (compose.py, outgoing.py)
and handed to the relay once. A relay that cannot be reached or answers 4xx: tried again 30 s
later, until CLOUD_DIRECT_MDN_TIMEOUT_S after composing, then failed. A 5xx (or a recipient the
relay refuses) fails those recipients. The one crash window: a process dying after the relay
accepted the message and before it recorded that leaves the claim; it is sent again after 5
minutes with the same Message-ID (a receiving HISP that deduplicates by Message-ID, as ours does,
stores it once). Without CLOUD_SMTP_RELAY nothing is sent: messages stay `queued`.

Tracking: reports.py reads an inbound MDN/DSN, `record_report` matches it to our message (same
agency, `Original-Message-ID`, sent to the address the message was sent from) and the recipients
it may speak for (an MDN: its verified sender; a signed DSN: a recipient that is its sender or in
its sender's domain, or covered by its signer's certificate, or whose pinned certificate covers
the DSN's sender), and tracking.py moves the recipients. `record_bounce` does the same for a plain
bounce from the null sender (feature.py), which may only fail recipients (`Action: failed`, status
5.x.x). `timeout_pass` fails recipients without their MDNs CLOUD_DIRECT_MDN_TIMEOUT_S after
sending.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import smtplib
import uuid
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Response
from pymongo.errors import DuplicateKeyError

from services.cloud_comms import audit, delivery
from services.cloud_comms.direct import compose, outgoing, smime, tracking
from services.cloud_comms.direct.outbound_request import ComposeRequest, parse, too_large
from services.cloud_comms.direct.recipients import RecipientCertificates, candidate
from services.cloud_comms.direct.reports import Report
from services.cloud_comms.direct.views import attachment_response, digest, iso
from services.kit.crypto import DecryptionError
from services.kit.errors import Forbidden, NotFound, Unavailable, Unprocessable
from services.kit.mongo import IndexSpec, now_ms
from services.kit.outbox import outbox_fields, with_outbox
from services.kit.validation import idempotency_key_reused, request_digest

log = logging.getLogger(__name__)

DIRECT_OUTBOUND = "direct_outbound"
DIRECT_OUTBOUND_CHUNKS = "direct_outbound_chunks"
RESOURCE_TYPE = "direct_outbound"
CHUNK_BYTES = 3 * 1024 * 1024
SENDING_LEASE_MS = 5 * 60 * 1000
RETRY_MS = 30 * 1000
BATCH = 20
MAX_TRAIL = 200
CAS_ATTEMPTS = 8
# Room for the JSON around the attachments' base64 (text of 100 KB, names, types).
BODY_SLACK_BYTES = 512 * 1024
INDEXES = [
    IndexSpec(DIRECT_OUTBOUND, [("message_id", 1), ("agency_id", 1)], name="direct_outbound_by_message_id"),
    IndexSpec(DIRECT_OUTBOUND, [("send_due_at", 1)], name="direct_outbound_send_due"),
    IndexSpec(DIRECT_OUTBOUND, [("mdn_due_at", 1)], name="direct_outbound_mdn_due"),
]
NOT_OUTBOX = {"_outbox": 0}


def _refusal(reply: tuple[int, bytes]) -> str:
    return f"the relay refused it ({reply[0]})"


def keyed_id(caller, key: str) -> str:
    """The message id an Idempotency-Key names: one per (agency, sender, key)."""
    return "dmo_" + digest(caller.agency_id, caller.staff_id, key)


class OutboundDirect:
    """Outbound messages of the DirectMessaging feature (`inbound`: identities, anchors, the
    inbound messages a reply or forward reads)."""

    def __init__(self, inbound):
        self.inbound = inbound
        self.components = inbound.components
        self.direct = self.components.settings.direct
        self.cipher = self.components.cipher
        db = self.components.store.db
        self.docs = db[DIRECT_OUTBOUND]
        self.chunks = db[DIRECT_OUTBOUND_CHUNKS]
        self.recipient_certs = RecipientCertificates(self.direct.recipient_certs_dir, inbound.anchors)
        self.max_body_bytes = self.direct.max_outbound_attachment_bytes * 4 // 3 + BODY_SLACK_BYTES

    # --- composing --------------------------------------------------------------------------------
    def compose(self, caller, body: dict, key: str | None = None) -> tuple[dict, bool]:
        """Check, seal and queue a message: (its view, True); nothing is written when anything is
        refused. With an Idempotency-Key `key` already used by the caller: (the first message's
        view, False), nothing sent again."""
        oid = keyed_id(caller, key) if key else "dmo_" + uuid.uuid4().hex
        digest = request_digest(body) if key else ""
        first = self._sent_before(caller, oid, digest) if key else None
        if first is not None:
            return first, False
        req = parse(body, self.direct.max_outbound_attachment_bytes)
        original = self._original(caller, req.in_reply_to) if req.in_reply_to else None
        if req.sender:
            sender = self._sender(caller, req.sender)
        elif original:
            sender = self._sender(caller, original[0]["address"])
        else:
            sender = self._only_linked_address(caller)
        to = req.to or (original[0]["sender"],)
        subject = req.subject or compose.reply_subject(original[1]["subject"])
        certs = self._certificates(to, original[0] if original else None)
        attachments = [(a.filename, a.content_type, a.data) for a in req.attachments] + self._forwards(caller, req)
        total = sum(len(data) for _, _, data in attachments)
        if total > self.direct.max_outbound_attachment_bytes:
            raise too_large(total, self.direct.max_outbound_attachment_bytes)
        try:
            doc = self._store(
                caller,
                req,
                oid,
                sender=sender,
                to=to,
                subject=subject,
                attachments=attachments,
                certs=certs,
                original=original,
                digest=digest,
            )
        except DuplicateKeyError:  # a concurrent repeat of the same Idempotency-Key stored it first
            first = self._sent_before(caller, oid, digest)
            if first is None:
                raise
            return first, False
        self._record_reads(caller, req)
        log.info("direct outbound queued", extra={"agency_id": caller.agency_id, "count": len(to)})
        return self._view(doc, {"subject": subject, "text": req.text, "attachments": self._meta(attachments)}), True

    def _sent_before(self, caller, oid: str, digest: str) -> dict | None:
        """The view of message `oid` when the caller sent it (an Idempotency-Key's repeat), audited
        as a read; else None. 409 `idempotency_key_reused` when the key was sent with another request."""
        doc = self.docs.find_one({"_id": {"$eq": oid}, "agency_id": {"$eq": caller.agency_id}}, projection=NOT_OUTBOX)
        if doc is None or doc["created_by"]["id"] != caller.staff_id:
            return None
        if doc.get("request_digest", digest) != digest:
            raise idempotency_key_reused()
        audit.record(self.components.store, caller, oid, resource_type=RESOURCE_TYPE)
        return self._view(doc, self._opened(doc))

    def _original(self, caller, doc_id: str) -> tuple[dict, dict]:
        """The message replied to (404 when not delivered to the caller, that refusal audited); the
        read itself is recorded by _record_reads once the reply is stored."""
        doc = self.inbound.readable(caller, doc_id)
        return doc, self.inbound.opened(doc)

    def _record_reads(self, caller, req: ComposeRequest) -> None:
        """The received messages and attachments a stored message read: only after every check
        passed and it was stored, so a refused send leaves no "allowed" access record."""
        store, kind = self.components.store, self.inbound.resource_type
        if req.in_reply_to:
            audit.record(store, caller, req.in_reply_to, resource_type=kind, action="reply")
        for message, index in req.forwards:
            audit.record(store, caller, f"{message}/attachments/{index}", resource_type=kind, action="forward")

    def _sender(self, caller, address: str):
        """Directory's entry for `address`, which the caller must be linked to (403 otherwise)."""
        resolved = None
        if self.inbound.identity_for(address) is not None:
            resolved = self.components.directory.resolve_address("direct", address)
        if resolved is None or resolved.agency_id != caller.agency_id or caller.staff_id not in resolved.staff_ids:
            raise Forbidden("not_linked", "you are not linked to this Direct address")
        return resolved

    def _only_linked_address(self, caller):
        """`from` left out of a new message: the one Direct address (of this HISP) linked to the
        caller; 422 `from_required` when several, 403 `not_linked` when none."""
        linked = self.components.directory.linked_addresses("direct", caller.agency_id, caller.staff_id)
        ours = [a for a in linked if caller.staff_id in a.staff_ids and self.inbound.identity_for(a.address)]
        if not ours:
            raise Forbidden("not_linked", "you are not linked to any Direct address")
        if len(ours) > 1:
            raise Unprocessable(
                "from_required", "you are linked to several Direct addresses: name one", {"field": "from"}
            )
        return ours[0]

    def _forwards(self, caller, req: ComposeRequest) -> list[tuple[str, str, bytes]]:
        return [self.inbound.attachment_data(caller, message, index, action=None) for message, index in req.forwards]

    def _certificates(self, to: tuple[str, ...], original: dict | None) -> list[x509.Certificate]:
        certs = []
        for address in to:
            extra = []
            if original is not None and address == original["sender"] and original.get("signer_cert"):
                extra = [candidate(original["signer_cert"].encode())]
            cert = self.recipient_certs.for_address(address, extra)
            if cert is None:
                raise Unprocessable(
                    "recipient_certificate_unknown",
                    f"no trusted certificate is configured for {address}",
                    {"address": address},
                )
            certs.append(cert)
        return certs

    @staticmethod
    def _meta(attachments) -> list[dict]:
        return [{"filename": n, "content_type": t, "size": len(d)} for n, t, d in attachments]

    def _store(self, caller, req, oid: str, *, sender, to, subject, attachments, certs, original, digest) -> dict:
        # The attachments' pieces are stored under an owner id of their own, so a concurrent repeat
        # of an Idempotency-Key never overwrites (nor, losing, removes) the first one's pieces.
        owner = f"{oid}-{uuid.uuid4().hex[:8]}"
        now = now_ms()
        agency_id = caller.agency_id
        content = {"subject": subject, "text": req.text, "attachments": self._meta(attachments)}
        recipients = tracking.new_recipients(to, now)
        status, detail = tracking.aggregate(recipients)
        doc = {
            "_id": oid,
            "agency_id": agency_id,
            "from": sender.address,
            "from_address_id": sender.address_id,
            "to": list(to),
            "message_id": email.utils.make_msgid(domain=sender.address.rpartition("@")[2]),
            "in_reply_to": req.in_reply_to,
            "in_reply_to_message_id": original[0]["message_id"] if original else "",
            "created_at": now,
            "created_by": {"id": caller.staff_id, "name": caller.name},
            "content": self.cipher.seal(agency_id, oid, "content", json.dumps(content)),
            "attachment_chunks": self._store_chunks(agency_id, owner, attachments),
            "chunk_owner": owner,
            "recipient_certs": [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs],
            "recipients": recipients,
            "trail": [{"at": now, "recipient": "", "state": "queued", "detail": "queued for sending"}],
            "status": status,
            "status_detail": detail,
            "version": 1,
            "send_due_at": now,
            "send_attempts": 0,
            "request_digest": digest,  # what an Idempotency-Key sent ("" without one)
        }
        event = self._item_event(doc, subject, mark_unread=False)
        try:
            self.docs.insert_one({**doc, **outbox_fields([event])})
        except Exception:
            for n, count in enumerate(doc["attachment_chunks"]):
                for piece in range(count):
                    self.chunks.delete_one({"_id": {"$eq": f"{owner}.{n}.{piece}"}})
            raise
        return doc

    def _store_chunks(self, agency_id: str, oid: str, attachments) -> list[int]:
        counts = []
        for n, (_, _, data) in enumerate(attachments):
            pieces = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
            for piece, chunk in enumerate(pieces):
                sealed = self.cipher.seal(
                    agency_id, oid, f"attachment.{n}.{piece}", base64.b64encode(chunk).decode("ascii")
                )
                self.chunks.insert_one(
                    {"_id": f"{oid}.{n}.{piece}", "outbound_id": oid, "agency_id": agency_id, "data": sealed}
                )
            counts.append(len(pieces))
        return counts

    def _attachment_bytes(self, doc: dict, n: int) -> bytes:
        owner = doc.get("chunk_owner", doc["_id"])
        pieces = []
        for piece in range(doc["attachment_chunks"][n]):
            chunk = self.chunks.find_one({"_id": {"$eq": f"{owner}.{n}.{piece}"}})
            if chunk is None:
                raise DecryptionError("an attachment piece is missing")
            field = f"attachment.{n}.{piece}"
            pieces.append(base64.b64decode(self.cipher.open(doc["agency_id"], owner, field, chunk["data"])))
        return b"".join(pieces)

    def _content(self, doc: dict) -> dict:
        return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "content", doc["content"]))

    # --- the board item ---------------------------------------------------------------------------
    def _item_event(self, doc: dict, subject: str, *, mark_unread: bool):
        to = doc["to"]
        count = len(doc["attachment_chunks"])
        attachments = f" · {count} attachment{'' if count == 1 else 's'}" if count else ""
        ref = f"{doc['_id']}-v{doc['version']}"
        request = delivery.request(
            source=delivery.SOURCE_DIRECT_OUT,
            source_ref=doc["_id"],
            delivery_id=ref,
            staff_ids=[doc["created_by"]["id"]],
            title=f"Direct to {to[0]}: {subject or '(no subject)'}"[:200],
            summary=f"To {', '.join(to)}{attachments} · {doc['status_detail']}"[:1000],
            url=f"{self.components.settings.public_url}/api/v1/cloud/direct/outbound/{doc['_id']}",
            link_label="Open message",
            source_version=doc["version"],
            status=doc["status"],
            mark_unread=mark_unread,
        )
        return delivery.delivery_requested(doc["agency_id"], request, ref)

    # --- state changes ----------------------------------------------------------------------------
    def _change(self, oid: str, changes_of: Callable[[dict], tuple[list, dict, list]]) -> bool:
        """Apply `changes_of(doc)` -> ([(address, state, detail)], fields to set, fields to unset)
        in one write guarded by `version`; a change that moves a recipient bumps the version and
        stages the item's update. Retried on a concurrent change."""
        for _ in range(CAS_ATTEMPTS):
            doc = self.docs.find_one({"_id": {"$eq": oid}}, projection=NOT_OUTBOX)
            if doc is None:
                return False
            changes, to_set, to_unset = changes_of(doc)
            at = now_ms()
            recipients, trail = tracking.apply(doc["recipients"], changes, at)
            to_set, to_unset = dict(to_set), set(to_unset)
            events = []
            if trail:
                status, detail = tracking.aggregate(recipients)
                updated = {**doc, "recipients": recipients, "status": status, "status_detail": detail}
                updated["version"] = doc["version"] + 1
                updated["trail"] = (doc["trail"] + trail)[-MAX_TRAIL:]
                to_set.update({k: updated[k] for k in ("recipients", "status", "status_detail", "version", "trail")})
                if not tracking.unfinished(recipients):
                    to_unset.add("mdn_due_at")
                    to_set.pop("mdn_due_at", None)
                subject = self._subject(doc)
                turned_failed = status == "failed" and doc["status"] != "failed"
                events.append(self._item_event(updated, subject, mark_unread=turned_failed))
            elif not to_set and not to_unset:
                return True
            update: dict = {"$set": to_set} if to_set else {}
            if to_unset:
                update["$unset"] = {k: "" for k in to_unset}
            result = self.docs.update_one(
                {"_id": {"$eq": oid}, "version": {"$eq": doc["version"]}}, with_outbox(update, events)
            )
            if result.modified_count == 1:
                return True
        log.warning("direct outbound change not applied: concurrent changes", extra={"code": "conflict"})
        return False

    def _subject(self, doc: dict) -> str:
        try:
            return self._content(doc)["subject"]
        except (DecryptionError, KeyError, ValueError):
            return ""

    # --- sending ----------------------------------------------------------------------------------
    def send_pass(self) -> int:
        """Claim and send the messages due; the number handed to the relay."""
        if not self.direct.relay_host:
            return 0
        now = now_ms()
        sent = 0
        due = self.docs.find({"send_due_at": {"$lte": now}}, projection={"send_due_at": 1}).sort("send_due_at", 1)
        for doc in list(due.limit(BATCH)):
            lease = now + SENDING_LEASE_MS
            claimed = self.docs.update_one(
                {"_id": {"$eq": doc["_id"]}, "send_due_at": {"$eq": doc["send_due_at"]}},
                {"$set": {"send_due_at": lease}},
            )
            if claimed.modified_count == 1:
                sent += self._send(doc["_id"], lease)
        return sent

    def _wire(self, doc: dict) -> bytes:
        content = self._content(doc)
        identity = self.inbound.identity_for(doc["from"])
        if identity is None:
            raise LookupError("no Direct identity covers the from address any more")
        attachments = [
            (a["filename"], a["content_type"], self._attachment_bytes(doc, n))
            for n, a in enumerate(content["attachments"])
        ]
        entity = compose.entity(content["text"], attachments, content["subject"])
        certs = [x509.load_pem_x509_certificate(pem.encode()) for pem in doc["recipient_certs"]]
        headers = compose.headers(
            sender=doc["from"],
            to=doc["to"],
            subject=content["subject"],
            message_id=doc["message_id"],
            date_ms=doc["created_at"],
            in_reply_to=doc.get("in_reply_to_message_id", ""),
        )
        return outgoing.message(headers, outgoing.sign_and_encrypt(entity, identity, certs))

    def _send(self, oid: str, lease: int) -> int:
        doc = self.docs.find_one({"_id": {"$eq": oid}}, projection=NOT_OUTBOX)
        if doc is None:
            return 0
        to = [r["address"] for r in doc["recipients"] if r["state"] == "queued"]
        try:
            refused = outgoing.send(
                self.direct.relay_host,
                self.direct.relay_port,
                envelope_from=doc["from"],
                to=to,
                message=self._wire(doc),
                local_hostname=self.inbound.hostname,
                tls=self.inbound.components.settings.smtp_tls.relay,
            )
        except smtplib.SMTPRecipientsRefused as exc:
            return self._refused(oid, to, exc.recipients)
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500:
                return self._refused(oid, to, {a: (exc.smtp_code, b"") for a in to})
            return self._retry(doc, lease, f"relay answered {exc.smtp_code}")
        except (smtplib.SMTPException, OSError) as exc:
            return self._retry(doc, lease, f"relay unavailable ({type(exc).__name__})")
        except (DecryptionError, LookupError, ValueError) as exc:
            log.warning("direct outbound cannot be built", extra={"error_type": type(exc).__name__})
            return self._failed_all(oid, to, "the message could not be prepared for sending")
        accepted = [a for a in to if a not in refused]
        self._change(oid, lambda d: self._sent_changes(d, accepted, refused))
        log.info("direct outbound sent", extra={"agency_id": doc["agency_id"], "count": len(accepted)})
        return 1

    def _sent_changes(self, doc: dict, accepted: list[str], refused: dict):
        changes = [(a, "sent", "handed to the relay") for a in accepted]
        changes += [(a, "failed", _refusal(r)) for a, r in refused.items()]
        due = now_ms() + int(self.direct.mdn_timeout_s * 1000)
        return changes, {"sent_at": now_ms(), "mdn_due_at": due}, ["send_due_at", "send_error"]

    def _refused(self, oid: str, to: list[str], refusals: dict) -> int:
        log.warning("direct outbound refused by the relay", extra={"count": len(refusals)})
        changes = [(a, "failed", _refusal(r)) for a, r in refusals.items() if a in to]
        self._change(oid, lambda d: (changes, {}, ["send_due_at", "send_error"]))
        return 0

    def _failed_all(self, oid: str, to: list[str], detail: str) -> int:
        self._change(oid, lambda d: ([(a, "failed", detail) for a in to], {}, ["send_due_at", "send_error"]))
        return 0

    def _retry(self, doc: dict, lease: int, reason: str) -> int:
        log.warning("direct outbound not sent, will retry: %s", reason, extra={"code": "relay_unavailable"})
        if now_ms() - doc["created_at"] > self.direct.mdn_timeout_s * 1000:
            label = tracking.duration(self.direct.mdn_timeout_s)
            to = [r["address"] for r in doc["recipients"] if r["state"] == "queued"]
            return self._failed_all(doc["_id"], to, f"could not be handed to the relay within {label}")
        self.docs.update_one(
            {"_id": {"$eq": doc["_id"]}, "send_due_at": {"$eq": lease}},
            {"$set": {"send_due_at": now_ms() + RETRY_MS, "send_error": reason}, "$inc": {"send_attempts": 1}},
        )
        return 0

    # --- notifications back -----------------------------------------------------------------------
    def timeout_pass(self) -> int:
        """Fail the recipients whose MDNs did not come in time; the number of messages changed."""
        now = now_ms()
        changed = 0
        due = self.docs.find({"mdn_due_at": {"$lte": now}}, projection={"_id": 1}).sort("mdn_due_at", 1)
        for doc in list(due.limit(BATCH * 5)):
            changed += self._change(doc["_id"], lambda current: self._overdue(current, now))
        return changed

    def _overdue(self, doc: dict, now: int):
        if doc.get("mdn_due_at", now + 1) > now:  # finished meanwhile
            return [], {}, []
        return tracking.overdue(doc["recipients"], self.direct.mdn_timeout_s), {}, ["mdn_due_at"]

    def _reported(self, report: Report, recipients: list) -> dict | None:
        """Our message a report names: same agency, its Message-ID, sent from the address the
        report came to."""
        for recipient in recipients if report.original_message_id else []:
            doc = self.docs.find_one(
                {"message_id": {"$eq": report.original_message_id}, "agency_id": {"$eq": recipient.agency_id}},
                projection={"_id": 1, "from": 1, "to": 1, "recipient_certs": 1},
            )
            if doc is not None and doc["from"] == recipient.address:
                return doc
        return None

    def _apply_report(self, doc: dict, changes: list, kind: str) -> None:
        self._change(doc["_id"], lambda _doc: (changes, {}, []))
        log.info("direct report recorded", extra={"code": kind, "count": len(changes)})

    def record_report(
        self, report: Report, sender: str, recipients: list, signer: x509.Certificate | None = None
    ) -> str:
        """Apply a verified MDN/DSN received at one of our addresses (`signer`: its verified
        signer certificate); the SMTP reply (250 matched or not)."""
        doc = self._reported(report, recipients)
        if doc is None:
            log.info("direct report unmatched", extra={"code": report.kind})
            return "250 2.0.0 notification accepted"
        self._apply_report(doc, report_changes(report, sender, doc, signer), report.kind)
        return "250 2.0.0 notification recorded"

    def record_bounce(self, report: Report, recipients: list) -> str:
        """Apply a plain (unsigned) DSN from the null sender: only its permanent failures (`Action:
        failed`, status 5.x.x) of the named message's recipients. "" when it names none of our
        messages (the caller refuses it)."""
        doc = self._reported(report, recipients)
        if doc is None:
            return ""
        to = [a.lower() for a in doc["to"]]
        changes = [
            (doc["to"][to.index(o.recipient)], "failed", o.detail)
            for o in report.outcomes
            if o.state == "failed" and o.status.startswith("5.") and o.recipient in to
        ]
        self._apply_report(doc, changes, "bounce")
        return "250 2.0.0 delivery status notification recorded"

    # --- the views --------------------------------------------------------------------------------
    def readable(self, caller, oid: str) -> dict:
        """The message, for its sender or staff linked to its `from` address; else 404 (audited)."""
        doc = self.docs.find_one({"_id": {"$eq": oid}, "agency_id": {"$eq": caller.agency_id}}, projection=NOT_OUTBOX)
        allowed = doc is not None and doc["created_by"]["id"] == caller.staff_id
        if doc is not None and not allowed:
            linked = self.components.directory.resolve_address("direct", doc["from"])
            allowed = (
                linked is not None and linked.agency_id == caller.agency_id and caller.staff_id in linked.staff_ids
            )
        if not allowed:
            raise audit.refuse(
                self.components.store, caller, oid, resource_type=RESOURCE_TYPE, code="direct_message_not_found"
            )
        return doc

    def _opened(self, doc: dict) -> dict:
        try:
            return self._content(doc)
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the message cannot be opened") from exc

    def view(self, caller, oid: str) -> dict:
        doc = self.readable(caller, oid)
        content = self._opened(doc)
        audit.record(self.components.store, caller, oid, resource_type=RESOURCE_TYPE)
        return self._view(doc, content)

    def _view(self, doc: dict, content: dict) -> dict:
        oid = doc["_id"]
        return {
            "id": oid,
            "message_id": doc["message_id"],
            "from": doc["from"],
            "to": doc["to"],
            "subject": content["subject"],
            "text": content["text"],
            "in_reply_to": doc["in_reply_to"] or None,
            "created_at": iso(doc["created_at"]),
            "created_by": doc["created_by"],
            "status": doc["status"],
            "status_detail": doc["status_detail"],
            "recipients": [
                {
                    "address": r["address"],
                    "status": r["state"],
                    "updated_at": iso(r["updated_at"]),
                    "detail": r["detail"],
                }
                for r in doc["recipients"]
            ],
            "trail": [{**t, "at": iso(t["at"])} for t in doc["trail"]],
            "attachments": [
                {**a, "index": n, "url": f"/api/v1/cloud/direct/outbound/{oid}/attachments/{n}"}
                for n, a in enumerate(content["attachments"])
            ],
        }

    def attachment(self, caller, oid: str, index: int) -> Response:
        doc = self.readable(caller, oid)
        content = self._opened(doc)
        if not 0 <= index < len(content["attachments"]):
            raise NotFound("attachment_not_found", "no such attachment")
        try:
            data = self._attachment_bytes(doc, index)
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the attachment cannot be opened") from exc
        audit.record(
            self.components.store, caller, f"{oid}/attachments/{index}", resource_type=RESOURCE_TYPE, action="download"
        )
        meta = content["attachments"][index]
        return attachment_response(data, meta["filename"], meta["content_type"])

    # --- the worker -------------------------------------------------------------------------------
    def run(self, stop_event) -> None:
        if not self.direct.relay_host:
            log.warning("no CLOUD_SMTP_RELAY: outbound Direct messages stay queued until one is configured")
        while not stop_event.is_set():
            try:
                self.send_pass()
                self.timeout_pass()
            except Exception:
                log.exception("direct outbound pass failed")
            stop_event.wait(self.direct.mdn_pass_s)


def _covers(cert_names: tuple[frozenset[str], frozenset[str]], address: str) -> bool:
    emails, domains = cert_names
    return address in emails or address.rpartition("@")[2] in domains


def _dsn_may_speak_for(address: str, sender: str, pinned_pem: str, signer: x509.Certificate | None) -> bool:
    """A signed DSN speaks for a recipient when its sender is that recipient or in its domain, or
    the sender is covered by the certificate we encrypted for that recipient, or its signer's
    certificate covers the recipient."""
    if address == sender or address.rpartition("@")[2] == sender.rpartition("@")[2]:
        return True
    if pinned_pem and _covers(smime.cert_names(x509.load_pem_x509_certificate(pinned_pem.encode())), sender):
        return True
    return signer is not None and _covers(smime.cert_names(signer), address)


def report_changes(
    report: Report, sender: str, doc: dict, signer: x509.Certificate | None
) -> list[tuple[str, str, str]]:
    """The changes a verified report makes to `doc`'s recipients: an MDN for its (verified)
    sender only; a DSN for the recipients it may speak for (_dsn_may_speak_for)."""
    sender = sender.lower()
    to = [a.lower() for a in doc["to"]]
    pinned = doc.get("recipient_certs") or []
    changes = []
    for outcome in report.outcomes:
        address = (outcome.recipient or sender).lower()
        if address not in to:
            continue
        n = to.index(address)
        if report.kind == "mdn" and address != sender:
            continue
        if report.kind == "dsn" and not _dsn_may_speak_for(
            address, sender, pinned[n] if n < len(pinned) else "", signer
        ):
            continue
        changes.append((doc["to"][n], outcome.state, outcome.detail))
    return changes
