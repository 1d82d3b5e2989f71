"""Read receipts and recall: the sender of a staff message sees, per recipient, whether it was
delivered and when it was read, and may take it back from everyone who has not read it yet.

Receipts are kept on the message of record: the first read of a recipient's item (the one write
that sets its `first_read_at`, InboxStore.change_item) is followed by one `$set` of
`read_by.<recipient>` on the message, so the receipts of a message to the whole agency are one
primary-key read whatever the number of recipients; the list is paged over the message's
recipients (`cursor` = how many were shown), and the counts come from the same document.

A recall (within the agency's `recall_window_minutes` of the send) goes through the recipients'
items, batch by batch (`_id $in`, primary key): an unread item is removed with one delete guarded
by the version it was read at (InboxStore.recall_item), and uncounted from its owner's board; a
read item stays. A read racing the recall is a version-guarded write on the same item, so exactly
one of them wins per recipient: the read shows the message (and the recipient is listed back as
having read it), or the recall removes it (and the read answers 404). The message first notes that
a recall started (`recall_started_at`), so a retried or interrupted recall finishes even after the
window; the outcome (`recall`: when, by whom, recalled and already-read recipients) is written once
every item was handled, and the sender's Sent item is marked recalled. A recall is recorded as a
`phi.accessed.v1` event (action "recall") and logged without PHI.

Agency options (services/inbox/agency_options.py): `receipts` (default on: off hides read state
from senders) and `recall_window_minutes` (default 10, 0 turns recall off).
"""

from __future__ import annotations

import logging

from flask import Blueprint, g, request

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.inbox.fanout import MARKER
from services.inbox.mailbox import recall_summary
from services.inbox.store import READ_BY
from services.kit.auth import Identity
from services.kit.errors import Conflict, InvalidInput
from services.kit.http import require_staff as staff_only
from services.kit.mongo import now_ms
from services.kit.validation import path_id, query_int

log = logging.getLogger(__name__)

RECEIPTS_PAGE_MAX = 500
RECALL_BATCH = 500


class Receipts(Feature):
    """Receipts and recall, with their routes."""

    def __init__(self, components):
        super().__init__(components)

    def options(self, agency_id: str) -> dict:
        return self.components.options.get(agency_id)

    # --- the sender's message -----------------------------------------------------------------------
    def _own_sent(self, caller: Identity, message_id: str, action: str) -> dict:
        """A staff message the caller sent; anything else is 404 (audited), as for a message they
        cannot see."""
        message = self.components.store.message(message_id)
        if (
            message is None
            or message["agency_id"] != caller.agency_id
            or message.get("sender_kind", "staff") != "staff"
            or message["sender_id"] != caller.staff_id
            or message.get("kind", domain.KIND_MESSAGE) != domain.KIND_MESSAGE
        ):
            raise audit.refuse(self.components.store, caller, message_id, action)
        return message

    # --- receipts ------------------------------------------------------------------------------------
    def receipts(self, caller: Identity, message_id: str, cursor: str | None, limit: int) -> dict:
        message = self._own_sent(caller, message_id, "receipts")
        enabled = self.options(caller.agency_id)["receipts"]
        recipients = list(message.get("recipient_ids") or [])
        start = _offset(cursor, len(recipients))
        page = recipients[start : start + limit]
        read_by = message.get(READ_BY) or {}
        recall = message.get("recall") or {}
        recalled = set(recall.get("recalled") or [])
        delivered = MARKER not in message
        delivered_at = iso(message["sent_at"]) if delivered else None
        entries = [_entry(staff_id, read_by, recalled, delivered_at, enabled) for staff_id in page]
        read_count = sum(1 for staff_id in recipients if staff_id in read_by)
        counts = {
            "recipients": len(recipients),
            "delivered": len(recipients) - len(recalled) if delivered else 0,
            "recalled": len(recalled),
        }
        if enabled:
            counts["read"] = read_count
        body = {
            "message_id": message["_id"],
            "receipts": enabled,
            "sent_at": iso(message["sent_at"]),
            "to": {
                "staff_ids": message.get("to_staff_ids", []),
                "team_ids": message.get("to_team_ids", []),
                "whole_agency": bool(message.get("to_whole_agency")),
            },
            "counts": counts,
            "recipients": entries,
            "next_cursor": str(start + limit) if start + limit < len(recipients) else None,
        }
        body.update(self._recall_state(message))
        return body

    def _recall_state(self, message: dict) -> dict:
        """Whether the sender may still recall the message, and until when (or how it was recalled)."""
        if message.get("recall"):
            return {"recall": recall_summary(message["recall"]), "recallable_until": None}
        until = self._recall_until(message)
        return {"recall": None, "recallable_until": iso(until) if until > now_ms() else None}

    def _recall_until(self, message: dict) -> int:
        minutes = self.options(message["agency_id"])["recall_window_minutes"]
        return message["sent_at"] + minutes * 60_000

    # --- recall ------------------------------------------------------------------------------------
    def recall(self, caller: Identity, message_id: str) -> dict:
        message = self._own_sent(caller, message_id, "recall")
        if message.get("recall"):  # done already: the same answer
            return self._recall_answer(message["_id"], message["recall"])
        if not message.get("recall_started_at"):
            if now_ms() > self._recall_until(message):
                raise Conflict("recall_window_passed", "the time to recall this message has passed")
            if MARKER in message:
                raise Conflict("busy", "the message is still being delivered; try again")
            self.components.store.messages.update_one(
                {"_id": {"$eq": message["_id"]}}, {"$set": {"recall_started_at": now_ms()}}
            )
        outcome = self._take_back(message)
        recall = {"at": now_ms(), "by": caller.staff_id, **outcome}
        self.components.store.messages.update_one({"_id": {"$eq": message["_id"]}}, {"$set": {"recall": recall}})
        self._mark_sent_item(caller, message, recall["at"])
        audit.record_access(
            self.components.store,
            audit.accessed_event(caller, message["_id"], action="recall", patient_id=message.get("patient_id", "")),
            message["_id"],
            "recall",
            caller,
        )
        log.info(
            "message recalled",
            extra={
                "message_id": message["_id"],
                "agency_id": caller.agency_id,
                "staff_id": caller.staff_id,
                "recalled": len(outcome["recalled"]),
                "already_read": len(outcome["already_read"]),
            },
        )
        return self._recall_answer(message["_id"], recall)

    def _take_back(self, message: dict) -> dict:
        """Every recipient's item: removed when unread, left when read (who read it is listed)."""
        store = self.components.store
        folder = message.get("recipient_folder", domain.FOLDER_MESSAGES)
        read_by = message.get(READ_BY) or {}
        recalled: list[str] = []
        already_read: list[str] = []
        recipients = list(message.get("recipient_ids") or [])
        for start in range(0, len(recipients), RECALL_BATCH):
            batch = recipients[start : start + RECALL_BATCH]
            ids = {staff_id: domain.board_item_id(message["_id"], staff_id, folder) for staff_id in batch}
            found = store.items(list(ids.values()))
            for staff_id, item_id in ids.items():
                item = found.get(item_id)
                outcome = store.recall_item(item) if item is not None else "gone"
                if outcome == "read" or (outcome == "gone" and staff_id in read_by):
                    already_read.append(staff_id)
                else:
                    recalled.append(staff_id)
        return {"recalled": recalled, "already_read": already_read}

    def _mark_sent_item(self, caller: Identity, message: dict, at_ms: int) -> None:
        item_id = domain.board_item_id(message["_id"], caller.staff_id, domain.FOLDER_SENT)
        self.components.store.change_item(
            item_id, lambda item: None if item.get("recalled_at") else {"recalled_at": at_ms}
        )

    @staticmethod
    def _recall_answer(message_id: str, recall: dict) -> dict:
        return {
            "message_id": message_id,
            "recalled_at": iso(recall.get("at")),
            "recalled": list(recall.get("recalled") or []),
            "already_read": list(recall.get("already_read") or []),
        }

    # --- HTTP ------------------------------------------------------------------------------------------
    def blueprints(self) -> list:
        messages = Blueprint("receipts", __name__, url_prefix="/api/v1/messages")

        @messages.get("/<message_id>/receipts")
        @staff_only
        def receipts(message_id: str):
            unknown = sorted(set(request.args) - {"cursor", "limit"})
            if unknown:
                raise InvalidInput("invalid_query", f"unknown query parameter: {unknown[0]}")
            limit = query_int("limit", 100, 1, RECEIPTS_PAGE_MAX)
            return self.receipts(g.identity, path_id(message_id, "message"), request.args.get("cursor") or None, limit)

        @messages.post("/<message_id>/recall")
        @staff_only
        def recall(message_id: str):
            return self.recall(g.identity, path_id(message_id, "message"))

        return [messages]


def _entry(staff_id: str, read_by: dict, recalled: set, delivered_at: str | None, enabled: bool) -> dict:
    """One recipient's receipt: recalled, read (when receipts are on), delivered or still pending."""
    if staff_id in recalled:
        status = "recalled"
    elif enabled and staff_id in read_by:
        status = "read"
    else:
        status = "delivered" if delivered_at else "pending"
    entry = {"staff_id": staff_id, "status": status, "delivered_at": delivered_at if status != "recalled" else None}
    if enabled:
        entry["read_at"] = iso(read_by.get(staff_id))
    return entry


def _offset(cursor: str | None, total: int) -> int:
    """A receipts cursor: how many recipients earlier pages showed."""
    if cursor is None:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 9 or int(cursor) > total:
        raise InvalidInput("invalid_cursor", "the cursor is not valid")
    return int(cursor)
