"""The mailbox of record: send, list, read and mark unread, scoped to the caller.

A send is one message document (encrypted subject and body, recipients and the
held `message.delivered` events) followed by a repeatable fan-out of board
items; the events are released only once every board item exists. A crash in
between leaves `fanout_pending_at` set, and the repair loop finishes the job.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from pymongo.errors import PyMongoError

from clinic.audit.v1 import audit_pb2
from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.inbox.directory_client import Resolution
from services.inbox.schemas import PRIORITY_TO_PB
from services.inbox.store import InboxStore
from services.kit.auth import Identity
from services.kit.crypto import PhiCipher
from services.kit.errors import Conflict, InvalidInput, NotFound
from services.kit.events import failure_summary, new_envelope
from services.kit.logs import correlation_id_var
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields

log = logging.getLogger(__name__)

PRODUCER = "inbox"
FANOUT_REPAIR_AFTER_MS = 10_000


@dataclass(frozen=True)
class SendResult:
    message_id: str
    recipient_ids: list[str]
    created: bool


class Mailbox:
    def __init__(self, store: InboxStore, cipher: PhiCipher, resolve):
        self.store = store
        self.cipher = cipher
        self.resolve = resolve  # Callable[[Addressing], Resolution]

    # --- send -------------------------------------------------------------
    def send(self, caller: Identity, draft: domain.Draft, idempotency_key: str | None = None) -> SendResult:
        if draft.addressing.is_empty():
            raise InvalidInput("no_recipients", "address the message to a colleague, a team or the whole agency")
        message_id = domain.new_message_id()
        key_digest = draft_digest = None
        if idempotency_key:
            # A retry is answered from what was stored, before any call to directory.
            key_digest = domain.digest(caller.agency_id, caller.staff_id, idempotency_key)
            draft_digest = domain.draft_digest(draft)
            claimed = self.store.idempotency_record(key_digest)
            if claimed is not None:
                replay = self._replay(claimed, draft_digest)
                if replay is not None:
                    return replay
                message_id = claimed["message_id"]  # claimed, then interrupted before the message was written
        resolution: Resolution = self.resolve(draft.addressing)
        if resolution.missing_staff_ids or resolution.missing_team_ids:
            raise InvalidInput(
                "unknown_recipients",
                "some recipients do not exist in your agency",
                {"staff_ids": resolution.missing_staff_ids, "team_ids": resolution.missing_team_ids},
            )
        recipients = domain.final_recipients(resolution.staff_ids, draft.addressing, caller.staff_id)
        if key_digest is not None:
            claimed = self.store.claim_idempotency_key(key_digest, message_id, draft_digest)
            replay = self._replay(claimed, draft_digest)
            if replay is not None:
                return replay
            message_id = claimed["message_id"]

        doc = self.compose(caller, draft, recipients, message_id)
        if not self.store.insert_message(doc):  # a concurrent retry wrote it first
            return self._existing(self.store.message(message_id))
        self._complete_fanout(doc)
        log.info(
            "message sent",
            extra={
                "message_id": message_id,
                "agency_id": caller.agency_id,
                "staff_id": caller.staff_id,
                "recipients": len(recipients),
            },
        )
        return SendResult(message_id, recipients, created=True)

    def _replay(self, claimed: dict, draft_digest: str) -> SendResult | None:
        """The earlier send under this key, if its message exists; a different draft is a conflict."""
        if claimed["draft"] != draft_digest:
            raise Conflict("idempotency_key_reused", "this Idempotency-Key was used for a different message")
        existing = self.store.message(claimed["message_id"])
        return self._existing(existing) if existing is not None else None

    def _existing(self, message: dict) -> SendResult:
        self._complete_fanout(message)
        return SendResult(message["_id"], message["recipient_ids"], created=False)

    def compose(self, caller: Identity, draft: domain.Draft, recipients: list[str], message_id: str) -> dict:
        """The message document: encrypted content, recipients and the held delivery events."""
        sent_at = now_ms()
        agency = caller.agency_id
        doc = {
            "_id": message_id,
            "agency_id": agency,
            "thread_id": message_id,
            "sender_id": caller.staff_id,
            "sender_name": caller.name,
            "to_staff_ids": list(draft.addressing.staff_ids),
            "to_team_ids": list(draft.addressing.team_ids),
            "to_whole_agency": int(draft.addressing.whole_agency),
            "recipient_ids": recipients,
            "priority": draft.priority,
            "subject": self.cipher.seal(agency, message_id, "subject", draft.subject),
            "body": self.cipher.seal(agency, message_id, "body", draft.body),
            # Links to charts can name a patient: sealed like the body.
            "links": self.cipher.seal(agency, message_id, "links", json.dumps(list(draft.links))),
            "sent_at": sent_at,
            "fanout_pending_at": sent_at,
        }
        doc.update(outbox_fields([self._delivered_event(doc, staff_id) for staff_id in recipients], ready=False))
        return doc

    def _delivered_event(self, doc: dict, recipient_id: str):
        sent_at = Timestamp()
        sent_at.FromMilliseconds(doc["sent_at"])
        payload = inbox_pb2.MessageDelivered(
            message_id=doc["_id"],
            thread_id=doc["thread_id"],
            agency_id=doc["agency_id"],
            sender_staff_id=doc["sender_id"],
            recipient_staff_id=recipient_id,
            priority=PRIORITY_TO_PB[doc["priority"]],
            sent_at=sent_at,
            board_kind=domain.FOLDER_MESSAGES,
            to_whole_agency=bool(doc["to_whole_agency"]),
            team_ids=doc["to_team_ids"],
        )
        return new_envelope(
            "message.delivered.v1",
            payload,
            agency_id=doc["agency_id"],
            producer=PRODUCER,
            correlation_id=correlation_id_var.get(),
            event_id=f"{doc['_id']}-{recipient_id}-delivered",
        )

    def _complete_fanout(self, doc: dict) -> None:
        if "fanout_pending_at" not in doc:
            return
        items = [domain.board_item(doc, staff_id, domain.FOLDER_MESSAGES) for staff_id in doc["recipient_ids"]]
        items.append(domain.board_item(doc, doc["sender_id"], domain.FOLDER_SENT))
        for start in range(0, len(items), 1000):
            self.store.insert_board_items(items[start : start + 1000])
        self.store.finish_fanout(doc["_id"])

    def repair_fanouts(self, stop: threading.Event, interval_s: float = 5.0) -> None:
        """Finish sends interrupted between the message write and the board items."""
        while not stop.wait(interval_s):
            try:
                for doc in self.store.pending_fanouts(now_ms() - FANOUT_REPAIR_AFTER_MS):
                    self._complete_fanout(doc)
                    log.info("finished interrupted fan-out", extra={"message_id": doc["_id"]})
            except PyMongoError as exc:  # a failover or outage: the next pass tries again
                log.warning(
                    "fan-out repair pass failed (%s)", failure_summary(exc), extra={"error_type": type(exc).__name__}
                )

    # --- read -------------------------------------------------------------
    def page(self, caller: Identity, folder: str, unread_only: bool, cursor: str | None, limit: int) -> dict:
        board = domain.owner_folder(caller.agency_id, caller.staff_id, folder)
        before = domain.decode_cursor(cursor) if cursor else None
        docs = self.store.page(board, unread_only, before, limit + 1)
        more = len(docs) > limit
        docs = docs[:limit]
        items = [
            self._summary(d, self.cipher.open(caller.agency_id, d["message_id"], "subject", d["subject"])) for d in docs
        ]
        next_cursor = domain.encode_cursor(docs[-1]["sort_key"]) if more and docs else None
        return {"items": items, "next_cursor": next_cursor}

    @staticmethod
    def _summary(item: dict, subject: str) -> dict:
        return {
            "id": item["message_id"],
            "thread_id": item["thread_id"],
            "folder": item["folder"],
            "sender": {"id": item["sender_id"], "name": item.get("sender_name", "")},
            "recipient_count": item.get("recipient_count", 0),
            "subject": subject,
            "priority": item["priority"],
            "sent_at": iso(item["sent_at"]),
            "read": bool(item.get("read_at")),
        }

    def _find_item(self, caller: Identity, message_id: str) -> dict | None:
        for folder in (domain.FOLDER_MESSAGES, domain.FOLDER_SENT):
            item = self.store.item(domain.board_item_id(message_id, caller.staff_id, folder))
            if item is not None and item["agency_id"] == caller.agency_id:
                return item
        return None

    def _refuse(self, caller: Identity, message_id: str, action: str) -> NotFound:
        """Record the refused access (who tried what, never whether it exists) and return the 404."""
        event = self._accessed_event(caller, message_id, action=action, outcome="denied")
        self.store.record_denial(
            {
                "_id": event.event_id,
                "agency_id": caller.agency_id,
                "actor_id": caller.subject,
                "resource_id": message_id,
                "action": action,
                "at": now_ms(),
                **outbox_fields([event]),
            }
        )
        log.info("message access refused", extra={"staff_id": caller.subject, "agency_id": caller.agency_id})
        return NotFound("message_not_found", "no such message")

    def read(self, caller: Identity, message_id: str) -> dict:
        item = self._find_item(caller, message_id)
        message = self.store.message(message_id) if item is not None else None
        if message is None:
            raise self._refuse(caller, message_id, "read")
        agency = caller.agency_id
        # Open everything first: a read is marked and audited only once its content can be shown.
        subject = self.cipher.open(agency, message_id, "subject", message["subject"])
        body = self.cipher.open(agency, message_id, "body", message["body"])
        links = json.loads(self.cipher.open(agency, message_id, "links", message["links"]))
        read_at = item.get("read_at") or now_ms()
        item = self.store.mark_read(item["_id"], read_at, [self._accessed_event(caller, message_id)]) or item
        return {
            **self._summary(item, subject),
            "body": body,
            "links": links,
            "to": {
                "staff_ids": message.get("to_staff_ids", []),
                "team_ids": message.get("to_team_ids", []),
                "whole_agency": bool(message.get("to_whole_agency")),
            },
            "read_at": iso(item["read_at"]),
        }

    def _accessed_event(self, caller: Identity, message_id: str, action: str = "read", outcome: str = "allowed"):
        accessed_at = Timestamp()
        accessed_at.GetCurrentTime()
        payload = audit_pb2.PhiAccessed(
            agency_id=caller.agency_id,
            actor_id=caller.subject,
            actor_kind=caller.kind,
            resource_type="message",
            resource_id=message_id,
            action=action,
            outcome=outcome,
            accessed_at=accessed_at,
            service=PRODUCER,
        )
        return new_envelope(
            "phi.accessed.v1",
            payload,
            agency_id=caller.agency_id,
            producer=PRODUCER,
            correlation_id=correlation_id_var.get(),
        )

    def mark_unread(self, caller: Identity, message_id: str) -> dict:
        item_id = domain.board_item_id(message_id, caller.staff_id, domain.FOLDER_MESSAGES)
        board = domain.owner_folder(caller.agency_id, caller.staff_id, domain.FOLDER_MESSAGES)
        if self.store.mark_unread(item_id, board) is None:
            raise self._refuse(caller, message_id, "mark_unread")
        return {"id": message_id, "read": False}


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
