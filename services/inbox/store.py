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
- counters:     update_one({"_id": {"$eq": "<agency>|<staff>"}}, {"$inc": delta + seq}, upsert=True)
- a fan-out pass's counters: update_one({"_id": {"$eq": owner}, "c_<pass>": {"$exists": False}},
                {"$inc": delta + seq, "$set": {"c_<pass>": t}}, upsert=True) (11000: counted already)
- pass tokens swept: update_one({"_id": {"$eq": owner}}, {"$unset": {"c_<pass>": ""}})
- drift repaired: update_one({"_id": {"$eq": owner}, "seq": {"$eq": s}}, {"$inc": correction + seq})
- boards in turn: counters {"_id": {"$gt": after}} sort _id, limit n (projection _id)
- first read (receipts): update_one({"_id": {"$eq": message}}, {"$set": {"read_by.<staff>": t}}), once per item
- recall: find_one_and_delete({"_id": {"$eq": item}, "version": {"$eq": v}}) (a read of the same version loses)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pymongo import DESCENDING, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from services.inbox import domain
from services.inbox.fanout import COUNTED_AT, pending_records, repair_index
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
COUNTER_BATCH = 1000
# A counter document holds, beside the counts (u_, t_, l_, lt_ fields: services/inbox/domain.py), `seq`,
# moved by every write that moves a count (the drift check's proof that nothing moved meanwhile),
# and one token `c_<pass>` per fan-out pass whose counts it holds, until that pass is swept.
SEQ = "seq"
TOKEN_PREFIX = "c_"  # noqa: S105 - a field name, not a secret
COUNT_PREFIXES = ("u_", "t_", "l_", "lt_")
PLACED_BY = "placed_by"  # on a board item: the fan-out pass that inserted it (and counts it)
# On a received message's item: when its owner first read it (never cleared by "mark unread"); the
# message's `read_by.<owner>` (read receipts) is written once, after the write that sets it.
FIRST_READ_AT = "first_read_at"
READ_BY = "read_by"
# Collections whose documents carry outbox events (the relay scans these).
OUTBOX_COLLECTIONS = (MESSAGES, BOARD_ITEMS, ACCESS_DENIALS)

INDEXES = [
    IndexSpec(BOARD_ITEMS, [("board", 1), ("sort_key", -1)], name="board_sort"),
    IndexSpec(BOARD_ITEMS, [("unread_board", 1), ("sort_key", -1)], name="unread_board_sort"),
    IndexSpec(BOARD_ITEMS, [("urgent_board", 1), ("sort_key", -1)], name="urgent_board_sort"),
    IndexSpec(BOARD_ITEMS, [("due_pending_at", 1)], name="due_pending"),
    repair_index(MESSAGES),
    repair_index(MESSAGES, COUNTED_AT),
    IndexSpec(MESSAGES, [("thread_id", 1), ("sent_at", 1)], name="thread_order"),
    IndexSpec(LABELS, [("owner", 1), ("name_key", 1)], name="owner_labels"),
    IndexSpec(LABELS, [("owner_name", 1)], name="owner_name_unique", unique=True),
    IndexSpec(LABEL_ITEMS, [("label_board", 1), ("sort_key", -1)], name="label_board_sort"),
]


@dataclass(frozen=True)
class Placement:
    """What `place_items` found: the items it inserted, the ones that were there already (as
    stored), and per pass the items whose count is that pass's (placed by it, now or before)."""

    inserted: set[str]
    existing: dict[str, dict]
    placed: dict[str, list[dict]]


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
        # Items that arrive with items for someone else (coverage while away: services/inbox/coverage.py):
        # `copies(items) -> extra items`, inserted and counted after `items` by every insert of board
        # items (so messages, portal messages, deliveries and signature requests alike); None: none.
        self.copies: Callable[[list[dict]], list[dict]] | None = None
        self.on_copies: Callable[[list[dict]], None] | None = None  # told which copies were inserted
        # Told of every item an insert was asked for, new or there already, copies included (search
        # postings, services/inbox/search.py, which are repeatable); None: nobody is told.
        self.on_items: Callable[[list[dict]], None] | None = None
        # Told of an announcement's words when it is posted or edited (search; services/inbox/search.py).
        self.on_announcement: Callable[[dict, str, str], None] | None = None

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

    def insert_board_items(self, items: list[dict], *, count: bool = True) -> list[dict]:
        """Insert board items (in batches), skipping ones that exist (fan-out is repeatable), and count
        the new ones. Returns the items this call inserted. `count=False`: a fan-out pass counts its
        items itself, once whoever inserted them (`count_passes`). Then the copies `copies` asks for
        (coverage), inserted where missing and counted as they are inserted."""
        inserted = self._insert_missing(items)
        if count:
            self.apply_deltas([(item, domain.counter_delta(None, item)) for item in inserted])
        copies: list[dict] = []
        if self.copies is not None and items:
            copies = self.copies(items)
            if copies:
                placed = self._insert_missing(copies)
                self.apply_deltas([(item, domain.counter_delta(None, item)) for item in placed])
                if placed and self.on_copies is not None:
                    self.on_copies(placed)
        if self.on_items is not None and items:
            self.on_items(items + copies)
        return inserted

    def _insert_missing(self, items: list[dict]) -> list[dict]:
        """Insert board items in batches, skipping those that exist; the ones inserted."""
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
        return inserted

    def place_items(self, passes: dict[str, list[dict]]) -> Placement:
        """Insert the items of fan-out passes (pass key -> items) where missing, each marked with
        the pass that placed it, in one insert; the items that were there already are read back
        (one `_id $in` read, none when every item is new) to tell which of them an earlier attempt
        of the same pass placed. Nothing is counted here: the pass counts what it placed
        (`count_passes`)."""
        marked = [(key, {**item, PLACED_BY: key}) for key, items in passes.items() for item in items]
        inserted = {item["_id"] for item in self.insert_board_items([item for _, item in marked], count=False)}
        missing = [item["_id"] for _, item in marked if item["_id"] not in inserted]
        existing: dict[str, dict] = {}
        for start in range(0, len(missing), INSERT_BATCH):
            existing.update(self.items(missing[start : start + INSERT_BATCH]))
        placed: dict[str, list[dict]] = {}
        for key, item in marked:
            stored = existing.get(item["_id"])
            if item["_id"] in inserted or (stored is not None and stored.get(PLACED_BY) == key):
                placed.setdefault(key, []).append(item)
        return Placement(inserted, existing, placed)

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
            first_read = _first_read(before, patch)
            if first_read:
                patch = {**patch, FIRST_READ_AT: first_read}
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
                if first_read:
                    self.note_read(before["message_id"], before["owner_id"], first_read)
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

    def note_read(self, message_id: str, staff_id: str, at_ms: int) -> None:
        """The message's read receipt of one recipient (written once: after the item's first read)."""
        self.messages.update_one({"_id": {"$eq": message_id}}, {"$set": {f"{READ_BY}.{staff_id}": at_ms}})

    def recall_item(self, item: dict, attempts: int = 8) -> str:
        """Take a recipient's unread item off their board, unless it was read first: one delete
        guarded by the version read, so of a read and a recall racing exactly one wins. Returns
        "recalled", "read" (left in place) or "gone" (not on the board)."""
        current: dict | None = item
        for _ in range(attempts):
            if current is None:
                return "gone"
            if current.get("read_at") or current.get(FIRST_READ_AT):
                return "read"
            guard = {"_id": {"$eq": current["_id"]}, "version": {"$eq": current.get("version")}}
            removed = self.board_items.find_one_and_delete(guard, projection={"_outbox": 0})
            if removed is not None:
                self.apply_deltas([(removed, domain.counter_delta(removed, None))])
                if removed.get("labels"):
                    entries = [label_entry_id(label_id, removed["_id"]) for label_id in removed["labels"]]
                    self.label_items.delete_many({"_id": {"$in": entries}})
                return "recalled"
            current = self.item(current["_id"])  # changed meanwhile: decide on what it is now
        raise Conflict("busy", "the item is being changed by another request; try again")

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
        ops = [
            UpdateOne({"_id": {"$eq": key}}, {"$inc": {**delta, SEQ: 1}}, upsert=True)
            for key, delta in per_owner.items()
        ]
        for start in range(0, len(ops), COUNTER_BATCH):
            self.counters.bulk_write(ops[start : start + COUNTER_BATCH], ordered=False)

    def count_passes(self, passes: dict[str, list[dict]]) -> None:
        """Count the items of fan-out passes (pass key -> the items it places) on their owners'
        boards, once per (pass, board) whoever calls it and however often: each board's $inc sets
        the pass's token in the same write and only applies while the token is absent. One write
        per board for all the passes together; a board that already holds some of them (a
        repair, or a race creating its document) is done pass by pass."""
        per_owner: dict[str, dict[str, dict[str, int]]] = {}  # owner -> token -> delta
        for key, items in passes.items():
            token = count_token(key)
            for item in items:
                delta = domain.counter_delta(None, item)
                if delta:
                    tokens = per_owner.setdefault(domain.owner_key(item["agency_id"], item["owner_id"]), {})
                    tokens[token] = domain.add_deltas(tokens.get(token, {}), delta)
        plan = list(per_owner.items())
        now = now_ms()
        failed = self._bulk_counters(
            [UpdateOne(*_token_update(owner, tokens, now), upsert=True) for owner, tokens in plan]
        )
        for index in failed:
            self._count_one_by_one(*plan[index], now)

    def _count_one_by_one(self, owner: str, tokens: dict[str, dict[str, int]], now: int) -> None:
        """A board whose guarded write found a token (or lost the race to create its document):
        apply the passes it does not hold yet, one write each."""
        for _ in range(8):
            held = self.counter_doc(owner)
            missing = {token: delta for token, delta in tokens.items() if token not in held}
            if not missing:
                return
            token, delta = next(iter(missing.items()))
            try:
                self.counters.update_one(*_token_update(owner, {token: delta}, now), upsert=True)
            except DuplicateKeyError:
                continue
        raise Conflict("busy", "the board's counters are being changed by another request; try again")

    def _bulk_counters(self, ops: list[UpdateOne]) -> list[int]:
        """Run guarded counter upserts; the indexes of those whose guard failed (duplicate key)."""
        failed: list[int] = []
        for start in range(0, len(ops), COUNTER_BATCH):
            try:
                self.counters.bulk_write(ops[start : start + COUNTER_BATCH], ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(err.get("code") != 11000 for err in errors):
                    raise
                failed += [start + err["index"] for err in errors]
        return failed

    def sweep_passes(self, passes_by_owner: dict[str, list[str]]) -> None:
        """Drop the tokens of released passes (owner key -> pass keys) from their boards."""
        self.sweep_tokens({owner: [count_token(key) for key in keys] for owner, keys in passes_by_owner.items()})

    def sweep_tokens(self, tokens_by_owner: dict[str, list[str]]) -> None:
        """Drop pass tokens (they hold no count, so `seq` stays)."""
        ops = [
            UpdateOne({"_id": {"$eq": owner}}, {"$unset": dict.fromkeys(tokens, "")})
            for owner, tokens in tokens_by_owner.items()
            if tokens
        ]
        for start in range(0, len(ops), COUNTER_BATCH):
            self.counters.bulk_write(ops[start : start + COUNTER_BATCH], ordered=False)

    def counter_doc(self, owner: str) -> dict:
        return self.counters.find_one({"_id": {"$eq": owner}}) or {}

    def correct_counters(self, owner: str, seq: int | None, correction: dict[str, int]) -> bool:
        """Move an owner's counts by `correction` unless any count moved since `seq` was read
        (False then: nothing written)."""
        guard = {"_id": {"$eq": owner}, SEQ: {"$eq": seq}}
        return bool(self.counters.update_one(guard, {"$inc": {**correction, SEQ: 1}}).matched_count)

    def counter_owners(self, after: str, limit: int) -> list[str]:
        """Owner keys of counter documents after `after`, in key order (the drift check's turn)."""
        found = self.counters.find({"_id": {"$gt": after}}, projection={"_id": 1}).sort("_id", 1).limit(limit)
        return [doc["_id"] for doc in found]

    def owner_items(self, agency_id: str, owner_id: str, folders, batch: int = 1000, projection: dict | None = None):
        """Every visible item of one board, folder by folder (counting; not a request path)."""
        for folder in folders:
            board = domain.owner_folder(agency_id, owner_id, folder)
            before = None
            while True:
                query: dict = {"board": {"$eq": board}}
                if before is not None:
                    query["sort_key"] = {"$lt": before}
                found = self.board_items.find(query, projection=projection or {"_outbox": 0})
                page = list(found.sort("sort_key", DESCENDING).limit(batch))
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


def _first_read(before: dict, patch: dict) -> int | None:
    """When a patch is the first read of a received message item, its time (receipts); else None."""
    read_at = patch.get("read_at")
    if not read_at or read_at is REMOVE or before.get("read_at") or before.get(FIRST_READ_AT):
        return None
    if before.get("kind") != domain.KIND_MESSAGE or before.get("origin_folder") == domain.FOLDER_SENT:
        return None
    return read_at if before.get("message_id") and before.get("owner_id") else None


def label_entry_id(label_id: str, item_id: str) -> str:
    return f"{label_id}|{item_id}"


def count_token(pass_key: str) -> str:
    """The counter-document field that says a fan-out pass's counts are in (flat, fixed length)."""
    return TOKEN_PREFIX + domain.digest(pass_key)[:16]


def counts_of(doc: dict) -> dict[str, int]:
    """The counts of a counter document (no `_id`, `seq` or tokens), zeros left out."""
    return {k: int(v) for k, v in doc.items() if k.startswith(COUNT_PREFIXES) and int(v)}


def tokens_of(doc: dict) -> dict[str, int]:
    """The pass tokens a counter document holds, with when each was set."""
    return {k: int(v or 0) for k, v in doc.items() if k.startswith(TOKEN_PREFIX)}


def _token_update(owner: str, tokens: dict[str, dict[str, int]], now: int) -> tuple[dict, dict]:
    """(filter, update): one board's counts for passes it holds no token of, with those tokens, in
    one write (an upsert: 11000 when a token is there already)."""
    guard: dict = {"_id": {"$eq": owner}}
    guard.update({token: {"$exists": False} for token in tokens})
    delta = domain.add_deltas(*tokens.values())
    return guard, {"$inc": {**delta, SEQ: 1}, "$set": dict.fromkeys(tokens, now)}
