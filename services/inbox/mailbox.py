"""The mailbox of record: send, list, read and mark unread, scoped to the caller.

A send is one message document (encrypted subject and body, recipients and the
held `message.delivered` events) followed by a repeatable fan-out of board
items, counted on their owners' boards once per send (the pass's token); the
events are released only once every board item exists and is counted. A crash
in between leaves `fanout_pending_at` set, and the repair loop finishes the job,
counters included (services/inbox/fanout.py). Replies, forwards and
patient-portal messages are sends too.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from clinic.inbox.v1 import inbox_pb2
from services.inbox import audit, domain
from services.inbox.board import Board, ItemFilter, iso, unread_patch
from services.inbox.directory_client import Resolution
from services.inbox.fanout import MARKER, Fanout, held_events
from services.inbox.schemas import PRIORITY_TO_PB
from services.inbox.store import InboxStore
from services.kit.auth import Identity
from services.kit.crypto import PhiCipher
from services.kit.errors import Conflict, InvalidInput
from services.kit.events import new_envelope
from services.kit.faults import crash_point
from services.kit.logs import correlation_id_var
from services.kit.mongo import now_ms

log = logging.getLogger(__name__)

PRODUCER = "inbox"


@dataclass(frozen=True)
class SendResult:
    message_id: str
    recipient_ids: list[str]
    created: bool
    thread_id: str = ""


class Mailbox:
    def __init__(self, store: InboxStore, cipher: PhiCipher, resolve, board: Board | None = None):
        self.store = store
        self.cipher = cipher
        self.resolve = resolve  # Callable[[Addressing], Resolution]
        self.board = board or Board(store, cipher)
        # Replies to a message of another kind (a patient-portal message) are handled by its module:
        # kind -> reply(caller, original_message, body, links, priority, idempotency_key, *, auto_reply)
        # -> SendResult.
        self.reply_handlers: dict = {}
        # The team queues (services/inbox/team_queue.py), when that feature is attached: the queue
        # fields of members' items, the queue state shown with a message, the thread messages shared
        # with fellow members, and a member's reply handling the item for all.
        self.queue = None
        self.board.details[domain.KIND_MESSAGE] = self.detail
        self.fanout = Fanout(
            store.messages,
            self._place_items,
            what="fan-out",
            # Looked up per call: tests stand in for the store's query.
            find_pending=lambda older_than_ms, limit: self.store.pending_fanouts(older_than_ms, limit),  # noqa: PLW0108
            counters=store,
            owners=self.owners,
            point="inbox.fanout",
        )

    # --- send -------------------------------------------------------------
    def send(
        self,
        caller: Identity,
        draft: domain.Draft,
        idempotency_key: str | None = None,
        *,
        thread_id: str | None = None,
        in_reply_to: str | None = None,
        auto_reply: bool = False,
        about: dict | None = None,
    ) -> SendResult:
        """`about`: the message this one answers or forwards, whose patient it keeps (if any)."""
        if draft.addressing.is_empty():
            raise InvalidInput("no_recipients", "address the message to a colleague, a team or the whole agency")
        message_id = domain.new_message_id()
        key_digest = draft_digest = None
        if idempotency_key:
            # A retry is answered from what was stored, before any call to directory.
            key_digest = domain.digest(caller.agency_id, caller.staff_id, idempotency_key)
            draft_digest = domain.digest(
                domain.draft_digest(draft), thread_id or "", in_reply_to or "", *(["auto"] if auto_reply else [])
            )
            claimed = self.store.idempotency_record(key_digest)
            if claimed is not None:
                replay = self.replay(claimed, draft_digest)
                if replay is not None:
                    return self._existing(replay)
                message_id = claimed["message_id"]  # claimed, then interrupted before the message was written
        resolution: Resolution = self.resolve(draft.addressing)
        recipients = domain.final_recipients(resolution.require_known(), draft.addressing, caller.staff_id)
        if key_digest is not None:
            claimed = self.store.claim_idempotency_key(key_digest, message_id, draft_digest)
            replay = self.replay(claimed, draft_digest)
            if replay is not None:
                return self._existing(replay)
            message_id = claimed["message_id"]

        doc = self.compose(
            caller,
            draft,
            recipients,
            message_id,
            thread_id=thread_id,
            in_reply_to=in_reply_to,
            auto_reply=auto_reply,
            extra=self.patient_fields(caller.agency_id, about, message_id),
        )
        if not self.store.insert_message(doc):  # a concurrent retry wrote it first
            existing = self.store.message(message_id)
            self.complete_fanout(existing)
            return self._existing(existing)
        self.complete_fanout(doc)
        crash_point("inbox.send.before_answer")
        log.info(
            "message sent",
            extra={
                "message_id": message_id,
                "agency_id": caller.agency_id,
                "staff_id": caller.staff_id,
                "recipients": len(recipients),
            },
        )
        return SendResult(message_id, recipients, created=True, thread_id=doc["thread_id"])

    def replay(self, claimed: dict, draft_digest: str) -> dict | None:
        """The message an earlier send under this idempotency key wrote (its fan-out finished), or
        None when that send was interrupted before writing it; a different draft is a conflict."""
        if claimed["draft"] != draft_digest:
            raise Conflict("idempotency_key_reused", "this Idempotency-Key was used for a different message")
        existing = self.store.message(claimed["message_id"])
        if existing is not None:
            self.complete_fanout(existing)
        return existing

    @staticmethod
    def _existing(message: dict) -> SendResult:
        return SendResult(message["_id"], message["recipient_ids"], created=False, thread_id=message["thread_id"])

    def compose(
        self,
        caller: Identity,
        draft: domain.Draft,
        recipients: list[str],
        message_id: str,
        *,
        thread_id: str | None = None,
        in_reply_to: str | None = None,
        auto_reply: bool = False,
        extra: dict | None = None,
    ) -> dict:
        """The message document: encrypted content, recipients and the held delivery events.
        `extra` sets or overrides fields before the events are built (a portal message's kind,
        sender, patient and folder)."""
        sent_at = now_ms()
        agency = caller.agency_id
        doc = {
            "_id": message_id,
            "kind": domain.KIND_MESSAGE,
            "agency_id": agency,
            "thread_id": thread_id or message_id,
            "in_reply_to": in_reply_to,
            "auto_reply": int(auto_reply),
            "sender_kind": "staff",
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
            MARKER: sent_at,
            **(extra or {}),
        }
        doc.update(held_events([self.delivered_event(doc, staff_id) for staff_id in recipients]))
        return doc

    def patient_fields(self, agency_id: str, original: dict | None, message_id: str) -> dict:
        """The patient a message is about, carried from `original` (a reply or forward keeps it):
        the id, and the name sealed anew under the new message (None when the original has none)."""
        if not original or not original.get("patient_id"):
            return {}
        fields = {"patient_id": original["patient_id"]}
        name = self.patient_name(agency_id, original)
        if name is not None:
            fields["patient_name"] = self.cipher.seal(agency_id, message_id, "patient_name", name)
        return fields

    def patient_name(self, agency_id: str, message: dict) -> str | None:
        sealed = message.get("patient_name")
        return None if sealed is None else self.cipher.open(agency_id, message["_id"], "patient_name", sealed)

    def patient_view(self, caller: Identity, message: dict) -> dict | None:
        """Whom a message is about, for the reading pane and threads: the patient's id and name; None
        for a message about no patient."""
        if not message.get("patient_id"):
            return None
        patient = {"id": message["patient_id"]}
        name = self.patient_name(caller.agency_id, message)
        if name is not None:
            patient["name"] = name
        return patient

    def delivered_event(self, doc: dict, recipient_id: str):
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
            board_kind=doc.get("recipient_folder", domain.FOLDER_MESSAGES),
            to_whole_agency=bool(doc["to_whole_agency"]),
            team_ids=doc["to_team_ids"],
            auto_reply=bool(doc.get("auto_reply")),
            sender_kind=doc.get("sender_kind", "staff"),
            patient_id=doc.get("patient_id") or "",
            in_reply_to=doc.get("in_reply_to") or "",
        )
        return new_envelope(
            "message.delivered.v1",
            payload,
            agency_id=doc["agency_id"],
            producer=PRODUCER,
            correlation_id=correlation_id_var.get(),
            event_id=f"{doc['_id']}-{recipient_id}-delivered",
        )

    def complete_fanout(self, doc: dict) -> None:
        """Every recipient's item and the sender's Sent copy, then the events released (once)."""
        self.fanout.complete(doc)

    def _place_items(self, doc: dict) -> None:
        """Every board item of the message, inserted where missing, then counted once per send
        (whether this attempt or an earlier one inserted them)."""
        folder = doc.get("recipient_folder", domain.FOLDER_MESSAGES)
        queued = self.queue.placed_fields(doc) if self.queue is not None else {}
        items = [{**domain.board_item(doc, staff_id, folder), **queued} for staff_id in doc["recipient_ids"]]
        if doc.get("sender_kind", "staff") == "staff":
            items.append(domain.board_item(doc, doc["sender_id"], domain.FOLDER_SENT))
        self.fanout.count(self.store.place_items({self.fanout.pass_key(doc): items}).placed)

    @staticmethod
    def owners(doc: dict) -> list[str]:
        """The boards a message is counted on (its recipients', and its staff sender's Sent)."""
        staff_ids = list(doc.get("recipient_ids") or [])
        if doc.get("sender_kind", "staff") == "staff":
            staff_ids.append(doc["sender_id"])
        return [domain.owner_key(doc["agency_id"], staff_id) for staff_id in dict.fromkeys(staff_ids)]

    def repair_fanouts(self, stop: threading.Event, interval_s: float = 5.0) -> None:
        """Finish sends interrupted between the message write and the board items."""
        self.fanout.run_repairs(stop, interval_s)

    # --- read -------------------------------------------------------------
    def page(self, caller: Identity, folder: str, unread_only: bool, cursor: str | None, limit: int) -> dict:
        page = self.board.page(caller, folder, ItemFilter(unread=unread_only), cursor, limit, audit_as="message_list")
        # The messages API names messages by message id; the board item id rides along.
        for item in page["items"]:
            item["item_id"], item["id"] = item["id"], item.get("message_id") or item["ref_id"]
            item["subject"] = item["title"]
        return page

    def _find_item(self, caller: Identity, message_id: str) -> dict | None:
        """The caller's item for a message: received (in any folder it was moved to) or sent."""
        ids = [
            domain.board_item_id(message_id, caller.staff_id, folder)
            for folder in (domain.FOLDER_MESSAGES, domain.FOLDER_PORTAL, domain.FOLDER_SENT)
        ]
        found = self.store.items(ids)  # one primary-key read for the three places it can be
        for item_id in ids:
            item = found.get(item_id)
            if item is not None and item["agency_id"] == caller.agency_id and item["owner_id"] == caller.staff_id:
                return item
        return None

    def _visible_message(self, caller: Identity, message_id: str, action: str) -> tuple[dict, dict]:
        item = self._find_item(caller, message_id)
        message = self.store.message(message_id) if item is not None else None
        if message is None or message["agency_id"] != caller.agency_id:
            raise audit.refuse(self.store, caller, message_id, action)
        return item, message

    def open_content(self, caller: Identity, message: dict) -> dict:
        agency = caller.agency_id
        message_id = message["_id"]
        return {
            "subject": self.cipher.open(agency, message_id, "subject", message["subject"]),
            "body": self.cipher.open(agency, message_id, "body", message["body"]),
            "links": json.loads(self.cipher.open(agency, message_id, "links", message["links"])),
        }

    def read(self, caller: Identity, message_id: str) -> dict:
        item, message = self._visible_message(caller, message_id, "read")
        # Open everything first: a read is marked and audited only once its content can be shown.
        content = self.open_content(caller, message)
        event = audit.accessed_event(caller, message_id, patient_id=message.get("patient_id", ""))
        changed = self.store.change_item(
            item["_id"],
            lambda it: {"read_at": it.get("read_at") or now_ms(), "unread_board": None},
            lambda b, a: [event],
            current=item,
        )
        if changed is None:  # deleted from the board meanwhile: nothing shown, so nothing to audit as read
            raise audit.refuse(self.store, caller, message_id, "read")
        return self._view(caller, changed[1], message, content)

    def _view(self, caller: Identity, item: dict, message: dict, content: dict) -> dict:
        return {
            **self.board.summary(caller, item),
            **self._message_fields(caller, item, message, content),
            "id": message["_id"],
            "read_at": iso(item.get("read_at")),
        }

    def _message_fields(self, caller: Identity, item: dict, message: dict, content: dict) -> dict:
        """What a message shows beyond its board item's summary: its content, addressing, the
        patient it is about and (to its sender) whether it was recalled."""
        fields = {
            "item_id": item["_id"],
            "subject": content["subject"],
            "body": content["body"],
            "links": content["links"],
            "to": {
                "staff_ids": message.get("to_staff_ids", []),
                "team_ids": message.get("to_team_ids", []),
                "whole_agency": bool(message.get("to_whole_agency")),
            },
            "in_reply_to": message.get("in_reply_to"),
            "auto_reply": bool(message.get("auto_reply")),
            "patient": self.patient_view(caller, message),
        }
        if fields["patient"] is not None:  # how the agency names the patient field ("Client")
            fields["patient_term"] = self.board.patient_term(caller)
        if message.get("sender_id") == caller.staff_id and message.get("recall"):
            fields["recall"] = recall_summary(message["recall"])
        queue = self.queue.view(message) if self.queue is not None else None
        if queue is not None:  # a team's shared item: open, claimed (by whom) or done
            fields["queue"] = queue
        return fields

    def detail(self, caller: Identity, item: dict) -> dict:
        """The reading-pane content of a message item (Board.open_item); audited."""
        return self.detail_of(caller, item, self.store.message(item["ref_id"]))

    def detail_of(self, caller: Identity, item: dict, message: dict | None) -> dict:
        """detail() for a message already read (None: gone)."""
        if message is None or message["agency_id"] != caller.agency_id:
            raise audit.refuse(self.store, caller, item["ref_id"], "read")
        content = self.open_content(caller, message)
        audit.record_read(self.store, caller, message["_id"], patient_id=message.get("patient_id", ""))
        return self._message_fields(caller, item, message, content)

    def mark_unread(self, caller: Identity, message_id: str) -> dict:
        item = self._find_item(caller, message_id)
        if item is None or item.get("origin_folder") == domain.FOLDER_SENT:
            raise audit.refuse(self.store, caller, message_id, "mark_unread")
        if self.store.change_item(item["_id"], unread_patch, current=item) is None:
            raise audit.refuse(self.store, caller, message_id, "mark_unread")
        return {"id": message_id, "read": False}

    # --- threads, replies and forwards -------------------------------------------
    def thread(self, caller: Identity, thread_id: str, limit: int = 500) -> dict:
        """Every message of a thread the caller sent or received, oldest first."""
        docs = self.store.thread_messages(thread_id, limit)
        # A member of a team queue in the thread also sees what fellow members wrote there.
        shared = self.queue.shared_in_thread(caller, docs) if self.queue is not None else set()
        visible = [
            d
            for d in docs
            if d["agency_id"] == caller.agency_id
            and (d["sender_id"] == caller.staff_id or _still_received(d, caller.staff_id) or d["_id"] in shared)
        ]
        if not visible:
            raise audit.refuse(
                self.store, caller, thread_id, "read_thread", code="thread_not_found", message="no such thread"
            )
        out = []
        for message in visible:
            content = self.open_content(caller, message)
            out.append(
                {
                    "id": message["_id"],
                    "sender": {
                        "id": message["sender_id"],
                        "name": message.get("sender_name", ""),
                        "kind": message.get("sender_kind", "staff"),
                    },
                    "subject": content["subject"],
                    "body": content["body"],
                    "links": content["links"],
                    "sent_at": iso(message["sent_at"]),
                    "in_reply_to": message.get("in_reply_to"),
                    "auto_reply": bool(message.get("auto_reply")),
                    "patient": self.patient_view(caller, message),
                    "recalled_at": iso((message.get("recall") or {}).get("at")),
                }
            )
        # One audit event per message body shown, recorded in one write.
        events = [
            audit.accessed_event(caller, m["_id"], action="read_thread", patient_id=m.get("patient_id", ""))
            for m in visible
        ]
        audit.record_access(self.store, events, thread_id, "read_thread", caller)
        return {"thread_id": thread_id, "messages": out}

    def reply(
        self,
        caller: Identity,
        message_id: str,
        *,
        body: str,
        links: tuple[str, ...] = (),
        priority: str = "normal",
        idempotency_key: str | None = None,
        reply_all: bool = False,
        auto_reply: bool = False,
    ) -> SendResult:
        _, original = self._visible_message(caller, message_id, "reply_all" if reply_all else "reply")
        handler = self.reply_handlers.get(original.get("kind", domain.KIND_MESSAGE))
        if handler is not None:
            if reply_all:
                raise Conflict("reply_all_not_allowed", "Reply All is not available for this message; use Reply")
            result = handler(caller, original, body, links, priority, idempotency_key, auto_reply=auto_reply)
            return self._replied(caller, original, result, auto_reply)
        subject = self.cipher.open(caller.agency_id, original["_id"], "subject", original["subject"])
        if reply_all:
            addressing = domain.reply_all_addressing(original, caller.staff_id)
            if addressing.is_empty():
                addressing = domain.reply_addressing(original, caller.staff_id)
        else:
            addressing = domain.reply_addressing(original, caller.staff_id)
        draft = domain.Draft(
            addressing=addressing,
            subject=domain.prefixed_subject("Re:", subject),
            body=body,
            priority=priority,
            links=links,
        )
        result = self.send(
            caller,
            draft,
            idempotency_key,
            thread_id=original["thread_id"],
            in_reply_to=original["_id"],
            auto_reply=auto_reply,
            about=original,
        )
        return self._replied(caller, original, result, auto_reply)

    def _replied(self, caller: Identity, original: dict, result: SendResult, auto_reply: bool) -> SendResult:
        """A member's own reply to a team's item handles it for every member (an automatic answer
        does not)."""
        if self.queue is not None and not auto_reply:
            self.queue.replied(caller, original, result.message_id)
        return result

    def forward(
        self,
        caller: Identity,
        message_id: str,
        *,
        addressing: domain.Addressing,
        note: str,
        links: tuple[str, ...] = (),
        priority: str = "normal",
        idempotency_key: str | None = None,
        max_body: int = 20_000,
    ) -> SendResult:
        _, original = self._visible_message(caller, message_id, "forward")
        content = self.open_content(caller, original)
        body = domain.quoted_forward(
            note,
            original.get("sender_name", ""),
            domain.quoted_time(original["sent_at"]),
            content["subject"],
            content["body"],
        )
        if len(body) > max_body:
            raise InvalidInput(
                "body_too_long", "the forwarded message would be longer than a message may be", {"max": max_body}
            )
        draft = domain.Draft(
            addressing=addressing,
            subject=domain.prefixed_subject("Fwd:", content["subject"]),
            body=body,
            priority=priority,
            links=tuple(dict.fromkeys([*links, *content["links"]]))[:10],
        )
        result = self.send(caller, draft, idempotency_key, about=original)
        if result.created:  # once per forward made: not for one refused (unknown recipients) or replayed
            audit.record_access(
                self.store,
                audit.accessed_event(
                    caller, original["_id"], action="forward", patient_id=original.get("patient_id", "")
                ),
                original["_id"],
                "forward",
                caller,
            )
        return result


def _still_received(message: dict, staff_id: str) -> bool:
    """A recipient sees a message in its thread unless it was recalled from them."""
    if staff_id not in message.get("recipient_ids", []):
        return False
    return staff_id not in ((message.get("recall") or {}).get("recalled") or [])


def recall_summary(recall: dict) -> dict:
    """A recall as its sender sees it on the message: when, and how many it reached in time."""
    return {
        "recalled_at": iso(recall.get("at")),
        "recalled": len(recall.get("recalled") or []),
        "already_read": len(recall.get("already_read") or []),
    }
