"""Inbox collections, indexes and query shapes.

Query shapes (all served from an index on nx-27017 and on MongoDB; see docs/storage.md):
- board page:   {"board": {"$eq": "<agency>|<staff>|<folder>"}} sort sort_key desc, limit n (+ "sort_key" $lt cursor)
- unread page:  {"unread_board": {"$eq": ...}} same sort
- one item:     {"_id": {"$eq": ...}}
- urgent page:  {"urgent_board": {"$eq": ...}} same sort
- label page:   label_items {"label_board": {"$eq": "<agency>|<staff>|label:<id>"}} same sort, then items by _id $in
- labels:       {"owner": {"$eq": "<agency>|<staff>"}} sort name_key (a keyed hash: sorted by name after opening)
- label rewrite: update_one({"_id": {"$eq": id}, "name_key": {"$eq": old}}, {"$set": sealed name and keys})
- fan-out repair: {"fanout_pending_at": {"$lte": t}} sort fanout_pending_at
- one item change: update_one({"_id": {"$eq": id}, "version": {"$eq": v}}, {"$set": ...}) (optimistic)
- counters:     update_one({"_id": {"$eq": "<agency>|<staff>"}}, {"$inc": delta}, upsert=True)
"""

from __future__ import annotations

from collections.abc import Callable

from pymongo import DESCENDING, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from services.inbox import domain
from services.inbox.fanout import pending_records, repair_index
from services.kit.errors import Conflict
from services.kit.events import Envelope
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import with_outbox

MESSAGES = "messages"
BOARD_ITEMS = "board_items"
IDEMPOTENCY = "idempotency_keys"
ACCESS_DENIALS = "access_denials"
COUNTERS = "board_counters"
LABELS = "labels"
LABEL_ITEMS = "label_items"
PREFS = "board_prefs"
MIGRATIONS = "migrations"
REMOVE = object()  # in a patch: unset this field
INSERT_BATCH = 1000
# Collections whose documents carry outbox events (the relay scans these).
OUTBOX_COLLECTIONS = (MESSAGES, BOARD_ITEMS, ACCESS_DENIALS)

INDEXES = [
    IndexSpec(BOARD_ITEMS, [("board", 1), ("sort_key", -1)], name="board_sort"),
    IndexSpec(BOARD_ITEMS, [("unread_board", 1), ("sort_key", -1)], name="unread_board_sort"),
    IndexSpec(BOARD_ITEMS, [("urgent_board", 1), ("sort_key", -1)], name="urgent_board_sort"),
    IndexSpec(BOARD_ITEMS, [("due_pending_at", 1)], name="due_pending"),
    repair_index(MESSAGES),
    IndexSpec(MESSAGES, [("thread_id", 1), ("sent_at", 1)], name="thread_order"),
    IndexSpec(LABELS, [("owner", 1), ("name_key", 1)], name="owner_labels"),
    IndexSpec(LABELS, [("owner_name", 1)], name="owner_name_unique", unique=True),
    IndexSpec(LABEL_ITEMS, [("label_board", 1), ("sort_key", -1)], name="label_board_sort"),
]


class InboxStore:
    def __init__(self, db: Database):
        self.db = db
        self.messages = db[MESSAGES]
        self.board_items = db[BOARD_ITEMS]
        self.idempotency = db[IDEMPOTENCY]
        self.access_denials = db[ACCESS_DENIALS]
        self.counters = db[COUNTERS]
        self.labels = db[LABELS]
        self.label_items = db[LABEL_ITEMS]
        self.prefs_col = db[PREFS]

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

    def insert_board_items(self, items: list[dict]) -> list[dict]:
        """Insert board items (in batches), skipping ones that exist (fan-out is repeatable), and count
        the new ones. Returns the items this call inserted."""
        inserted: list[dict] = []
        for start in range(0, len(items), INSERT_BATCH):
            batch = items[start : start + INSERT_BATCH]
            failed: set[int] = set()
            try:
                self.board_items.insert_many(batch, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(err.get("code") != 11000 for err in errors):
                    raise
                failed = {err["index"] for err in errors}
            inserted += [item for index, item in enumerate(batch) if index not in failed]
        self.apply_deltas([(item, domain.counter_delta(None, item)) for item in inserted])
        return inserted

    def pending_fanouts(self, older_than_ms: int, limit: int = 100) -> list[dict]:
        """Messages whose fan-out was interrupted (services/inbox/fanout.py), oldest first."""
        return pending_records(self.messages, older_than_ms, limit)

    def thread_messages(self, thread_id: str, limit: int) -> list[dict]:
        return list(
            self.messages.find({"thread_id": {"$eq": thread_id}}, projection={"_outbox": 0})
            .sort("sent_at", 1)
            .limit(limit)
        )

    def record_access(self, doc: dict) -> None:
        """One document per access that changes no state (a refused one, or a read of content that
        has no read state of its own), carrying its audit events (written atomically with it)."""
        self.access_denials.insert_one(doc)

    # --- boards -----------------------------------------------------------
    def page(self, board: str, before: str | None, limit: int, field: str = "board") -> list[dict]:
        """One page of a board, newest first; `field` picks the listing (board, unread_board, urgent_board)."""
        query: dict = {field: {"$eq": board}}
        if before is not None:
            query["sort_key"] = {"$lt": before}
        return list(self.board_items.find(query, projection={"_outbox": 0}).sort("sort_key", DESCENDING).limit(limit))

    def item(self, item_id: str) -> dict | None:
        return self.board_items.find_one({"_id": {"$eq": item_id}}, projection={"_outbox": 0})

    def items(self, item_ids: list[str]) -> dict[str, dict]:
        if not item_ids:
            return {}
        found = self.board_items.find({"_id": {"$in": item_ids}}, projection={"_outbox": 0})
        return {doc["_id"]: doc for doc in found}

    def change_item(
        self,
        item_id: str,
        change: Callable[[dict], dict | None],
        events: Callable[[dict, dict], list[Envelope]] | None = None,
        attempts: int = 8,
        current: dict | None = None,
    ) -> tuple[dict, dict] | None:
        """Apply `change(item) -> patch` to one item as an optimistic single-document write and move
        its owner's counters by the difference. The patch maps fields to new values (REMOVE unsets);
        a None patch changes nothing. `events(before, after)` are staged in the same write (outbox).
        `current` is the item as the caller just read it (saves a read; a clash reads it again).
        Returns (before, after), or None when the item does not exist."""
        before = current
        for _ in range(attempts):
            before = before or self.item(item_id)
            if before is None:
                return None
            patch = change(before)
            if not patch:
                return before, before
            after = {k: v for k, v in before.items() if patch.get(k) is not REMOVE}
            after.update({k: v for k, v in patch.items() if v is not REMOVE})
            after["version"] = before.get("version", 0) + 1
            update: dict = {"$set": {k: v for k, v in patch.items() if v is not REMOVE} | {"version": after["version"]}}
            unset = {k: "" for k, v in patch.items() if v is REMOVE}
            if unset:
                update["$unset"] = unset
            staged = events(before, after) if events else []
            if staged:
                update = with_outbox(update, staged)
            # A missing version (an item written before versions) matches None.
            guard = {"_id": {"$eq": item_id}, "version": {"$eq": before.get("version")}}
            if self.board_items.update_one(guard, update).matched_count:
                self.apply_deltas([(after, domain.counter_delta(before, after))])
                return before, after
            before = None  # changed meanwhile: read it again
        raise Conflict("busy", "the item is being changed by another request; try again")

    def delete_item(self, item_id: str, owner_id: str) -> dict | None:
        """Remove one item from its owner's board (never the message itself) and uncount it."""
        before = self.board_items.find_one_and_delete(
            {"_id": {"$eq": item_id}, "owner_id": {"$eq": owner_id}}, projection={"_outbox": 0}
        )
        if before is None:
            return None
        self.apply_deltas([(before, domain.counter_delta(before, None))])
        if before.get("labels"):
            self.label_items.delete_many(
                {"_id": {"$in": [label_entry_id(label_id, item_id) for label_id in before["labels"]]}}
            )
        return before

    def migrate_legacy_items(self) -> int:
        """Rewrite board items from before item kinds, versions and counters (ids
        "<message>.<staff>.<folder>") in today's shape, counted, keeping their read state, and drop
        the old ones. Runs once per database (a marker records it); replicas starting together
        both finishing it is harmless (inserts are repeatable, deletes idempotent)."""
        if self.db[MIGRATIONS].find_one({"_id": {"$eq": "board_items_v2"}}) is not None:
            return 0
        legacy = list(self.board_items.find({"kind": {"$eq": None}}, projection={"_outbox": 0}))
        messages = {m["_id"]: m for m in self.messages.find({"_id": {"$in": [o.get("message_id") for o in legacy]}})}
        rewritten = []
        for old in legacy:
            message = messages.get(old.get("message_id"))
            if message is not None and old.get("folder") in domain.ITEM_FOLDERS:
                item = domain.board_item(message, old["owner_id"], old["folder"])
                if old.get("read_at"):
                    item.update(read_at=old["read_at"], unread_board=None)
                rewritten.append(item)
        self.insert_board_items(rewritten)
        self.board_items.delete_many({"_id": {"$in": [old["_id"] for old in legacy]}})
        moved = len(legacy)
        try:
            self.db[MIGRATIONS].insert_one({"_id": "board_items_v2", "at": now_ms(), "moved": moved})
        except DuplicateKeyError:
            pass
        return moved

    # --- counters -----------------------------------------------------------
    def apply_deltas(self, changes: list[tuple[dict, dict[str, int]]]) -> None:
        """$inc each owner's counter document by the summed deltas of their items."""
        per_owner: dict[str, dict[str, int]] = {}
        for item, delta in changes:
            if delta:
                key = domain.owner_key(item["agency_id"], item["owner_id"])
                per_owner[key] = domain.add_deltas(per_owner.get(key, {}), delta)
        ops = [UpdateOne({"_id": {"$eq": key}}, {"$inc": delta}, upsert=True) for key, delta in per_owner.items()]
        for start in range(0, len(ops), 1000):
            self.counters.bulk_write(ops[start : start + 1000], ordered=False)

    def counter_doc(self, owner: str) -> dict:
        return self.counters.find_one({"_id": {"$eq": owner}}) or {}

    def reset_counters(self, owner: str, values: dict[str, int]) -> None:
        """Replace an owner's counters (the recount tool)."""
        self.counters.replace_one({"_id": {"$eq": owner}}, {"_id": owner, **values}, upsert=True)

    def owner_items(self, agency_id: str, owner_id: str, folders, batch: int = 1000):
        """Every visible item of one board, folder by folder (the recount tool; not a request path)."""
        for folder in folders:
            board = domain.owner_folder(agency_id, owner_id, folder)
            before = None
            while True:
                page = self.page(board, before, batch)
                yield from page
                if len(page) < batch:
                    break
                before = page[-1]["sort_key"]

    # --- labels ---------------------------------------------------------------
    # A label's `name` is sealed and `name_key` / `owner_name` are keyed hashes
    # (services/inbox/label_names.py); nothing here sees a name in clear.
    def insert_label(self, doc: dict) -> bool:
        try:
            self.labels.insert_one(doc)
            return True
        except DuplicateKeyError:
            return False

    def label(self, label_id: str) -> dict | None:
        return self.labels.find_one({"_id": {"$eq": label_id}})

    def label_by_name(self, owner: str, name_key: str) -> dict | None:
        return self.labels.find_one({"owner_name": {"$eq": f"{owner}|{name_key}"}})

    def owner_labels(self, owner: str, limit: int = 500) -> list[dict]:
        """At most `limit` of the owner's labels, in an order that is stable but not by name (the
        key is a hash): callers sort by name once the names are opened."""
        return list(self.labels.find({"owner": {"$eq": owner}}).sort("name_key", 1).limit(limit))

    def rename_label(self, label_id: str, owner: str, fields: dict) -> bool:
        """Write the label's new name fields; False when another label of the owner has that name."""
        return self._write_label_name({"_id": {"$eq": label_id}, "owner": {"$eq": owner}}, fields)

    def rewrite_label_name(self, label_id: str, old_name_key: str | None, fields: dict) -> bool:
        """Store a label's name in today's shape (sealed, hashed with the active key) unless it
        changed since it was read (a rename wrote a new key). False when it was not written: it
        changed meanwhile, or another label of the owner already holds that key."""
        return self._write_label_name({"_id": {"$eq": label_id}, "name_key": {"$eq": old_name_key}}, fields)

    def _write_label_name(self, guard: dict, fields: dict) -> bool:
        """One $set of a label's sealed name and its keys; False when nothing matched `guard` or the
        owner's unique key is another label's. nx-27017 answers a unique-key clash of a write that
        holds bytes with a serialisation error (the document unchanged) instead of a duplicate-key
        one: such an error counts as the clash only when another label does hold the key."""
        try:
            return self.labels.update_one(guard, {"$set": fields}).matched_count == 1
        except DuplicateKeyError:
            return False
        except WriteError:
            holder = self.labels.find_one({"owner_name": {"$eq": fields["owner_name"]}}, projection={"_id": 1})
            if holder is not None and holder["_id"] != guard["_id"]["$eq"]:
                return False
            raise

    def delete_label(self, label_id: str) -> None:
        self.labels.delete_one({"_id": {"$eq": label_id}})

    def add_label_entry(self, label_id: str, label_board: str, item: dict) -> None:
        entry = {"_id": label_entry_id(label_id, item["_id"]), "label_board": label_board}
        entry |= {"item_id": item["_id"], "sort_key": item["sort_key"]}
        try:
            self.label_items.insert_one(entry)
        except DuplicateKeyError:
            pass

    def remove_label_entry(self, label_id: str, item_id: str) -> None:
        self.label_items.delete_one({"_id": {"$eq": label_entry_id(label_id, item_id)}})

    def label_page(self, label_board: str, before: str | None, limit: int) -> list[dict]:
        query: dict = {"label_board": {"$eq": label_board}}
        if before is not None:
            query["sort_key"] = {"$lt": before}
        return list(self.label_items.find(query).sort("sort_key", DESCENDING).limit(limit))

    def unset_counters(self, owner: str, fields: list[str]) -> None:
        self.counters.update_one({"_id": {"$eq": owner}}, {"$unset": {f: "" for f in fields}})

    # --- preferences ------------------------------------------------------------
    def prefs(self, owner: str) -> dict:
        return self.prefs_col.find_one({"_id": {"$eq": owner}}) or {}

    def set_section(self, owner: str, section: str, expanded: bool) -> None:
        self.prefs_col.update_one({"_id": {"$eq": owner}}, {"$set": {f"x_{section}": int(expanded)}}, upsert=True)


def label_entry_id(label_id: str, item_id: str) -> str:
    return f"{label_id}|{item_id}"
