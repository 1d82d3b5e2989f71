"""Inbox collections, indexes and query shapes.

Query shapes (all served from an index on nx-27017 and on MongoDB; see docs/storage.md):
- board page:   {"board": {"$eq": "<agency>|<staff>|<folder>"}} sort sort_key desc, limit n (+ "sort_key" $lt cursor)
- unread page:  {"unread_board": {"$eq": ...}} same sort
- one item:     {"_id": {"$eq": ...}}
- fan-out repair: {"fanout_pending_at": {"$lte": t}} sort fanout_pending_at
"""

from __future__ import annotations

from pymongo import DESCENDING, ReturnDocument
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.kit.events import Envelope
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import merge_update, release_update, with_outbox

MESSAGES = "messages"
BOARD_ITEMS = "board_items"
IDEMPOTENCY = "idempotency_keys"
ACCESS_DENIALS = "access_denials"
# Collections whose documents carry outbox events (the relay scans these).
OUTBOX_COLLECTIONS = (MESSAGES, BOARD_ITEMS, ACCESS_DENIALS)

INDEXES = [
    IndexSpec(BOARD_ITEMS, [("board", 1), ("sort_key", -1)], name="board_sort"),
    IndexSpec(BOARD_ITEMS, [("unread_board", 1), ("sort_key", -1)], name="unread_board_sort"),
    IndexSpec(MESSAGES, [("fanout_pending_at", 1)], name="fanout_pending"),
]


class InboxStore:
    def __init__(self, db: Database):
        self.db = db
        self.messages = db[MESSAGES]
        self.board_items = db[BOARD_ITEMS]
        self.idempotency = db[IDEMPOTENCY]
        self.access_denials = db[ACCESS_DENIALS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, INDEXES)

    # --- idempotent sends -------------------------------------------------
    def idempotency_record(self, key_id: str) -> dict | None:
        return self.idempotency.find_one({"_id": {"$eq": key_id}})

    def claim_idempotency_key(self, key_id: str, message_id: str, draft_digest: str) -> dict:
        """Bind the key to a message id and draft; returns the record bound first (ours or an earlier send's)."""
        record = {"_id": key_id, "message_id": message_id, "draft": draft_digest, "created_at": now_ms()}
        try:
            self.idempotency.insert_one(record)
            return record
        except DuplicateKeyError:
            return self.idempotency_record(key_id)

    # --- messages ---------------------------------------------------------
    def insert_message(self, doc: dict) -> bool:
        """Insert the message with its held events; False when it already exists (a retried send)."""
        try:
            self.messages.insert_one(doc)
            return True
        except DuplicateKeyError:
            return False

    def message(self, message_id: str) -> dict | None:
        return self.messages.find_one({"_id": {"$eq": message_id}}, projection={"_outbox": 0})

    def insert_board_items(self, items: list[dict]) -> None:
        """Insert board items, skipping ones that exist (fan-out is repeatable)."""
        if not items:
            return
        try:
            self.board_items.insert_many(items, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(err.get("code") != 11000 for err in errors):
                raise

    def finish_fanout(self, message_id: str) -> None:
        """Every board item exists: release the held events and clear the repair marker, in one write."""
        update = merge_update(release_update(), {"$unset": {"fanout_pending_at": ""}})
        self.messages.update_one({"_id": {"$eq": message_id}}, update)

    def pending_fanouts(self, older_than_ms: int, limit: int = 100) -> list[dict]:
        return list(
            self.messages.find({"fanout_pending_at": {"$lte": older_than_ms}}, projection={"_outbox": 0})
            .sort("fanout_pending_at", 1)
            .limit(limit)
        )

    def record_denial(self, doc: dict) -> None:
        """One document per refused read, carrying its audit event (written atomically with it)."""
        self.access_denials.insert_one(doc)

    # --- boards -----------------------------------------------------------
    def page(self, board: str, unread_only: bool, before: str | None, limit: int) -> list[dict]:
        field = "unread_board" if unread_only else "board"
        query: dict = {field: {"$eq": board}}
        if before is not None:
            query["sort_key"] = {"$lt": before}
        return list(self.board_items.find(query).sort("sort_key", DESCENDING).limit(limit))

    def item(self, item_id: str) -> dict | None:
        return self.board_items.find_one({"_id": {"$eq": item_id}}, projection={"_outbox": 0})

    def mark_read(self, item_id: str, read_at: int, events: list[Envelope]) -> dict | None:
        """Mark read and stage the audit events in the same single-document write."""
        update = with_outbox({"$set": {"unread_board": None, "read_at": read_at}}, events)
        return self.board_items.find_one_and_update(
            {"_id": {"$eq": item_id}}, update, return_document=ReturnDocument.AFTER, projection={"_outbox": 0}
        )

    def mark_unread(self, item_id: str, board: str) -> dict | None:
        """Mark the item on `board` unread; None when there is no such item on that board."""
        return self.board_items.find_one_and_update(
            {"_id": {"$eq": item_id}, "board": {"$eq": board}},
            {"$set": {"read_at": None, "unread_board": board}},
            return_document=ReturnDocument.AFTER,
            projection={"_outbox": 0},
        )
