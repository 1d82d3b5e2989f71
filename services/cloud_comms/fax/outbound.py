"""Sent faxes: the `outbound_faxes` documents, their states, the sender's board item and the
audited staff view.

A document per fax sent from the board: `_id` `fxo_<24 hex>`, the agency, who sent it (id and
name), the agency number it goes from (`from_number`, `address_id`: the agency's own, not PHI),
`recipient` sealed (kit PhiCipher: the number it goes to and the file name; the pair of a number
and a document is PHI, and nothing looks a fax up by its destination), the PDF sealed in
`fax_chunks` (pdf_store.py), what it was made from (`document`: ids only), and its state:

    status          queued -> sending -> inprogress -> success | failure | test
    history         [{status, at, detail}]: every change, retries included
    version         +1 with every write; the board item's source_version
    send_due_at     when the sender should take it (absent once the provider has it or it failed)
    send_claim      the token of the sender working on it ("" when none), send_attempts
    provider_fax_id the provider's id once it accepted the fax (index: its status callbacks)

`queued`: waiting for the sender (also between retries). `sending`: the provider accepted it.
`inprogress`, `success`, `failure`: as the provider reports them (failure also when the provider
refused it or could not be reached). `test`: the provider reported success for a fax sent with its
test API keys (`is_test`): nothing was transmitted, and it is never shown as sent. A status only
moves up in rank (queued < sending < inprogress < success | failure | test); a callback of a
lower or equal rank is ignored, and the first
final status stays (but a failure of ours, for a fax the provider never acknowledged, gives way to
what the provider then reports).

Every write is conditional on the version read, so a status callback and the sender (or two
replicas) never overwrite each other; each status change stages the sender's board item update
(`board_item.delivery_requested.v1`, source "fax-out", source_ref the id, source_version the
version) in the same write (kit outbox). A failure (or a test-mode "success") puts the item back
into the unread counts.

`_id` is random, or derived from (agency, sender, Idempotency-Key) when the request carried one:
a repeat of the request collides on the primary key and gets the first fax back. The PDF's pieces
are then written under an owner id of their own (`pdf_owner`), so a concurrent repeat never
overwrites the pieces of the fax that won.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from pymongo.errors import DuplicateKeyError

from clinic.events.v1.envelope_pb2 import Envelope
from services.cloud_comms import audit
from services.cloud_comms.delivery import delivery_requested
from services.cloud_comms.delivery import request as delivery_request
from services.cloud_comms.fax.pdf_store import SealedPdfs
from services.cloud_comms.fax.phaxio import SentStatus
from services.kit.auth import Identity
from services.kit.crypto import DecryptionError
from services.kit.errors import Unavailable
from services.kit.mongo import IndexSpec, now_ms
from services.kit.outbox import outbox_fields, with_outbox
from services.kit.validation import idempotency_key_reused

log = logging.getLogger(__name__)

OUTBOUND_FAXES = "outbound_faxes"
RESOURCE_TYPE = "outbound_fax"
SOURCE_FAX_OUT = "fax-out"
WRITE_ATTEMPTS = 8
RANK = {"queued": 0, "sending": 1, "inprogress": 2, "success": 3, "failure": 3, "test": 3}
# Final statuses that ask for the sender's attention (the item is unread again).
ATTENTION = ("failure", "test")
# The provider's statuses of a sent fax, in ours.
PROVIDER_STATUS = {
    "queued": "sending",
    "pendingbatch": "sending",
    "inprogress": "inprogress",
    "success": "success",
    "failure": "failure",
}
# The short status on the board item (inbox takes [A-Za-z0-9_-] only; the reason is in the summary).
ITEM_STATUS = {
    "queued": "queued",
    "sending": "sending",
    "inprogress": "in-progress",
    "success": "sent",
    "failure": "failed",
    "test": "test",
}
TEST_SUMMARY = "Test mode: not transmitted"
DETAIL = {
    "queued": "queued for sending",
    "sending": "accepted by the fax provider",
    "inprogress": "the provider is dialing",
    "success": "sent",
    "test": "test mode: the provider's test API keys transmit nothing",
}
INDEXES = [
    IndexSpec(OUTBOUND_FAXES, [("provider_fax_id", 1)], name="outbound_by_provider_fax_id"),
    IndexSpec(OUTBOUND_FAXES, [("send_due_at", 1)], name="outbound_send_due"),
    IndexSpec(OUTBOUND_FAXES, [("agency_id", 1), ("created_at", -1)], name="outbound_by_agency"),
]


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def idempotent_id(agency_id: str, staff_id: str, key: str) -> str:
    """The one fax a sender's Idempotency-Key names."""
    return "fxo_" + hashlib.sha256(f"{agency_id}\x1f{staff_id}\x1f{key}".encode()).hexdigest()[:24]


def summary(doc: dict) -> str:
    """The board item's summary for the document's state: never the document's content."""
    status = doc["status"]
    if status == "failure":
        return f"Failed: {doc.get('failure_reason') or 'unknown reason'}"
    if status == "test":
        return TEST_SUMMARY
    if status == "success":
        pages = doc.get("pages") or 0
        return f"Sent · {pages} page{'' if pages == 1 else 's'}" if pages else "Sent"
    return {"queued": "Queued for sending", "sending": "Accepted by the fax provider"}.get(status, "Sending now")


@dataclass(frozen=True)
class Change:
    """One transition: the new status (None: unchanged), the history detail (written when the
    status changes or a detail is given), other fields to set and fields to remove."""

    status: str | None = None
    detail: str = ""
    fields: dict = field(default_factory=dict)
    unset: tuple[str, ...] = ()


class OutboundFaxes:
    def __init__(self, components, pdfs: SealedPdfs):
        self.components = components
        self.faxes = components.store.db[OUTBOUND_FAXES]
        self.pdfs = pdfs
        self.cipher = components.cipher

    # --- creating ---------------------------------------------------------------------------------
    def create(  # noqa: PLR0913 - who, from where, to whom, what
        self,
        caller: Identity,
        address,
        *,
        to_number: str,
        pdf: bytes,
        filename: str,
        document: dict,
        fid: str | None = None,
        digest: str = "",
    ) -> tuple[dict, bool]:
        """Store a fax to send (queued, due now) with the sender's board item: (its view, created).
        `fid` given (an Idempotency-Key's): a fax stored under it already is returned instead
        (created False). Not audited here: the caller records the accesses once it is stored."""
        owner = fid + "_" + secrets.token_hex(4) if fid else None
        fid = fid or "fxo_" + secrets.token_hex(12)
        owner = owner or fid
        agency_id = caller.agency_id
        chunks = self.pdfs.put(agency_id, owner, pdf)
        now = now_ms()
        recipient = {"to_number": to_number, "filename": filename}
        doc = {
            "_id": fid,
            "agency_id": agency_id,
            "direction": "sent",
            "provider": self.components.settings.fax.provider,
            "created_by": caller.staff_id,
            "created_by_name": caller.name,
            "from_number": address.address,
            "address_id": address.address_id,
            "recipient": self.cipher.seal(agency_id, fid, "recipient", json.dumps(recipient)),
            "document": document,
            "pdf_bytes": len(pdf),
            "pdf_chunks": chunks,
            "pdf_owner": owner,
            "pages": None,
            "status": "queued",
            "status_at": now,
            "failure_reason": None,
            "history": [{"status": "queued", "at": now, "detail": DETAIL["queued"]}],
            "version": 1,
            "send_due_at": now,
            "send_claim": "",
            "send_attempts": 0,
            "provider_fax_id": "",
            "created_at": now,
            "request_digest": digest,  # what an Idempotency-Key sent ("" without one)
        }
        try:
            self.faxes.insert_one({**doc, **outbox_fields([self._item(doc, to_number)])})
        except DuplicateKeyError:  # a concurrent repeat with the same Idempotency-Key won
            self.pdfs.delete(owner)
            first = self.sent_by(caller, fid, digest)
            if first is None:
                raise
            return first, False
        log.info("fax queued for sending", extra={"agency_id": agency_id, "item_id": fid})
        return self._view(doc, recipient), True

    def sent_by(self, caller: Identity, fid: str, digest: str | None = None) -> dict | None:
        """The view of the fax `fid` if the caller sent it (an Idempotency-Key's repeat), else None;
        409 `idempotency_key_reused` when `digest` is given and the key was sent with another request."""
        doc = self.faxes.find_one(
            {"_id": {"$eq": fid}, "agency_id": {"$eq": caller.agency_id}, "created_by": {"$eq": caller.staff_id}},
            projection={"_outbox": 0},
        )
        if doc is None:
            return None
        if digest is not None and doc.get("request_digest", digest) != digest:
            raise idempotency_key_reused()
        return self._view(doc, self.recipient(doc))

    def _item(self, doc: dict, to_number: str) -> Envelope:
        """The sender's board item in the document's state, for its version."""
        fid, version = doc["_id"], doc["version"]
        item = delivery_request(
            source=SOURCE_FAX_OUT,
            source_ref=fid,
            delivery_id=f"{fid}_v{version}",
            staff_ids=[doc["created_by"]],
            title=f"Fax to {to_number}",
            summary=summary(doc),
            url=f"{self.components.settings.public_url}/api/v1/cloud/faxes/outbound/{fid}",
            link_label="Open fax",
            source_version=version,
        )
        item.status = ITEM_STATUS[doc["status"]]
        item.mark_unread = doc["status"] in ATTENTION
        return delivery_requested(doc["agency_id"], item, f"{fid}_v{version}")

    def recipient(self, doc: dict) -> dict:
        """The sealed {to_number, filename}; Unavailable when it does not open."""
        try:
            return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "recipient", doc["recipient"]))
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the fax cannot be opened") from exc

    def stored_pdf(self, doc: dict) -> bytes:
        return self.pdfs.get(doc["agency_id"], doc.get("pdf_owner") or doc["_id"], doc["pdf_chunks"])

    # --- changing ---------------------------------------------------------------------------------
    def find(self, fid: str) -> dict | None:
        return self.faxes.find_one({"_id": {"$eq": fid}}, projection={"_outbox": 0})

    def transition(self, fid: str, decide: Callable[[dict], Change | None]) -> tuple[dict | None, bool]:
        """Apply `decide(current document)` (None: nothing to do) as one write conditional on the
        version read, re-reading when another write came first; (document after, written)."""
        for _ in range(WRITE_ATTEMPTS):
            doc = self.find(fid)
            change = None if doc is None else decide(doc)
            if change is None:
                return doc, False
            update, after = self._update(doc, change)
            written = self.faxes.update_one({"_id": {"$eq": fid}, "version": {"$eq": doc["version"]}}, update)
            if written.matched_count:
                return after, True
        raise Unavailable("busy", "the fax is being changed by another request; try again")

    def _update(self, doc: dict, change: Change) -> tuple[dict, dict]:
        now = now_ms()
        to_set = {**change.fields, "version": doc["version"] + 1}
        moved = change.status is not None and change.status != doc["status"]
        if moved:
            to_set.update(status=change.status, status_at=now)
        after = {**doc, **to_set}
        for name in change.unset:
            after.pop(name, None)
        update: dict = {"$set": to_set}
        if change.unset:
            update["$unset"] = {name: "" for name in change.unset}
        if moved or change.detail:
            # The whole list is set (the write is conditional on the version read): nx-27017 stores
            # a $push-ed document as a string.
            entry = {"status": after["status"], "at": now, "detail": change.detail or DETAIL.get(after["status"], "")}
            to_set["history"] = after["history"] = [*doc.get("history", []), entry]
        if moved:
            update = with_outbox(update, [self._item(after, self.recipient(doc)["to_number"])])
        return update, after

    def apply_status(self, sent: SentStatus) -> dict:
        """A provider status callback: the fax found by the provider's id (or, before the sender
        recorded that id, by our tag on it), its status raised when the new one ranks higher."""
        provider = self.components.settings.fax.provider
        found = self.faxes.find_one(
            {"provider_fax_id": {"$eq": sent.fax_id}, "provider": {"$eq": provider}}, projection={"_id": 1}
        )
        if found is None and sent.outbound_id:
            found = self.faxes.find_one({"_id": {"$eq": sent.outbound_id}}, projection={"_id": 1})
        if found is None:
            log.warning("status callback for a fax not sent from here", extra={"code": "unknown_fax"})
            return {"id": None, "status": None, "applied": False}
        status = PROVIDER_STATUS[sent.status]
        if status == "success" and sent.is_test:
            status = "test"  # the provider's test keys: nothing was transmitted

        def decide(doc: dict) -> Change | None:
            if doc.get("provider_fax_id") not in ("", sent.fax_id):
                return None  # another fax's callback
            # Our own failure (the provider never answered) gives way to what the provider reports.
            given_up = doc["status"] == "failure" and not doc.get("provider_fax_id")
            if RANK[status] <= RANK[doc["status"]] and not given_up:
                return None  # a repeat, or late (lower or equal rank)
            fields: dict = {"provider_fax_id": sent.fax_id, "failure_reason": sent.failure_reason or None}
            if sent.pages:
                fields["pages"] = sent.pages
            return Change(status, sent.failure_reason, fields, ("send_due_at",))

        doc, applied = self.transition(found["_id"], decide)
        if applied:
            log.info("sent fax status", extra={"agency_id": doc["agency_id"], "item_id": doc["_id"], "code": status})
        return {"id": found["_id"], "status": doc["status"] if doc else None, "applied": applied}

    # --- the staff view -----------------------------------------------------------------------------
    def readable(self, caller: Identity, fid: str) -> dict:
        """The fax for its sender and the staff linked to its number now; else an audited 404."""
        doc = self.faxes.find_one(
            {"_id": {"$eq": fid}, "agency_id": {"$eq": caller.agency_id}}, projection={"_outbox": 0}
        )
        if doc is not None and (doc["created_by"] == caller.staff_id or self._linked(caller, doc["from_number"])):
            return doc
        raise audit.refuse(
            self.components.store, caller, fid, resource_type=RESOURCE_TYPE, code="outbound_fax_not_found"
        )

    def _linked(self, caller: Identity, number: str) -> bool:
        address = self.components.directory.resolve_address("fax", number)
        return address is not None and address.agency_id == caller.agency_id and caller.staff_id in address.staff_ids

    def view(self, caller: Identity, fid: str) -> dict:
        doc = self.readable(caller, fid)
        recipient = self.recipient(doc)
        audit.record(self.components.store, caller, fid, resource_type=RESOURCE_TYPE)
        return self._view(doc, recipient)

    def pdf(self, caller: Identity, fid: str) -> bytes:
        doc = self.readable(caller, fid)
        content = self.stored_pdf(doc)
        audit.record(self.components.store, caller, fid, resource_type=RESOURCE_TYPE, action="download")
        return content

    @staticmethod
    def _view(doc: dict, recipient: dict) -> dict:
        fid = doc["_id"]
        return {
            "id": fid,
            "direction": "sent",
            "to_number": recipient["to_number"],
            "from_number": doc["from_number"],
            "filename": recipient["filename"],
            "status": doc["status"],
            "failure_reason": doc.get("failure_reason"),
            "pages": doc.get("pages") or None,
            "created_at": iso(doc["created_at"]),
            "created_by": {"id": doc["created_by"], "name": doc.get("created_by_name", "")},
            "history": [{"status": h["status"], "at": iso(h["at"]), "detail": h["detail"]} for h in doc["history"]],
            "pdf_url": f"/api/v1/cloud/faxes/outbound/{fid}/pdf",
        }
