"""The erx-bridge database: collections, indexes and every query shape (services/erx_bridge/README.md,
"Storage", lists them with the index serving each).

- `erx_items`: one document per vendor item (`_id` = domain.item_id), its content sealed, its
  keyed content digest, state, version and its held delivery event (kit outbox) in the same write.
- `erx_prescribers`: one per prescriber (`<agency>|<staff>`): the sync lease, the counts seen last
  and how many syncs since the last full check.
- `erx_syncs`: one per sync (manual or scheduled), its progress; `erx_sync_slots`: one running
  sync per (agency, scope, staff), so asking twice returns the running one.
- `erx_schedule`: one per agency, when its next scheduled sync is due (one replica claims it).
- `access_records`: reads of PHI (reports, single sign-on to a patient) with their
  `phi.accessed.v1` events (outbox).
"""

from __future__ import annotations

import uuid

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from services.kit.mongo import IndexSpec, ensure_indexes, now_ms

ITEMS = "erx_items"
PRESCRIBERS = "erx_prescribers"
SYNCS = "erx_syncs"
SYNC_SLOTS = "erx_sync_slots"
SCHEDULE = "erx_schedule"
ACCESS_RECORDS = "access_records"
# Collections whose documents carry outbox events (the relay watches them).
OUTBOX_COLLECTIONS = (ITEMS, ACCESS_RECORDS)

INDEXES = [
    IndexSpec(ITEMS, [("open_key", 1)], name="items_open_by_prescriber_kind"),
    IndexSpec(ITEMS, [("agency_open", 1)], name="items_open_by_agency_kind"),
    IndexSpec(SYNCS, [("agency_id", 1), ("started_at", -1)], name="syncs_by_agency"),
    IndexSpec(ACCESS_RECORDS, [("agency_id", 1), ("at", -1)], name="access_by_agency"),
]


class ErxStore:
    def __init__(self, db: Database):
        self.db = db
        self.items = db[ITEMS]
        self.prescribers = db[PRESCRIBERS]
        self.syncs = db[SYNCS]
        self.slots = db[SYNC_SLOTS]
        self.schedule = db[SCHEDULE]
        self.access_records = db[ACCESS_RECORDS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, INDEXES)

    # --- items ---------------------------------------------------------------------------------
    def open_items(self, key: str) -> list[dict]:
        """A prescriber's open items of one kind (domain.open_key), without their outbox."""
        return list(self.items.find({"open_key": {"$eq": key}}, projection={"_outbox": 0}))

    def agency_open_items(self, key: str, limit: int) -> list[dict]:
        """An agency's open items of one kind (domain.agency_open_key)."""
        return list(self.items.find({"agency_open": {"$eq": key}}, projection={"_outbox": 0}).limit(limit))

    def holds_open(self, key: str) -> bool:
        return self.items.find_one({"open_key": {"$eq": key}}, projection={"_id": 1}) is not None

    def item(self, iid: str) -> dict | None:
        return self.items.find_one({"_id": {"$eq": iid}}, projection={"_outbox": 0})

    def insert_item(self, doc: dict) -> bool:
        """False when the item exists already (another prescriber's, resolved, or a concurrent sync)."""
        try:
            self.items.insert_one(doc)
            return True
        except DuplicateKeyError:
            return False

    def update_item(self, iid: str, version: int, update: dict) -> bool:
        """One change of an item, guarded by the version read: False when it changed meanwhile."""
        result = self.items.update_one({"_id": {"$eq": iid}, "version": {"$eq": version}}, update)
        return result.matched_count == 1

    # --- prescribers: the lease and the counts seen last ------------------------------------------
    def take_lease(self, key: str, holder: str, lease_ms: int, fields: dict) -> dict | None:
        """The prescriber's document with the lease taken for `holder`, or None when another sync
        holds it. Taken only when it lapsed (`lease_until` < now), or by creating the document."""
        now = now_ms()
        until = now + lease_ms
        taken = self.prescribers.find_one_and_update(
            {"_id": {"$eq": key}, "lease_until": {"$lt": now}},
            {"$set": {"lease_until": until, "lease_holder": holder, **fields}},
            return_document=ReturnDocument.AFTER,
        )
        if taken is not None:
            return taken
        doc = {"_id": key, "lease_until": until, "lease_holder": holder, "syncs": 0, "since_full": 0, **fields}
        try:
            self.prescribers.insert_one(doc)
        except DuplicateKeyError:
            return None
        return doc

    def renew_lease(self, key: str, holder: str, lease_ms: int) -> bool:
        result = self.prescribers.update_one(
            {"_id": {"$eq": key}, "lease_holder": {"$eq": holder}}, {"$set": {"lease_until": now_ms() + lease_ms}}
        )
        return result.matched_count == 1

    def release_lease(self, key: str, holder: str, update: dict | None = None) -> None:
        """Give the lease back (lease_until 0), recording what the sync learnt in the same write."""
        update = dict(update or {})
        update.setdefault("$set", {})["lease_until"] = 0
        self.prescribers.update_one({"_id": {"$eq": key}, "lease_holder": {"$eq": holder}}, update)

    def prescriber(self, key: str) -> dict | None:
        return self.prescribers.find_one({"_id": {"$eq": key}})

    # --- syncs -------------------------------------------------------------------------------------
    def claim_slot(self, slot: str, sync_id: str, until_ms: int) -> str | None:
        """Make `sync_id` the running sync of `slot`; the running one's id when another holds it."""
        now = now_ms()
        claimed = self.slots.find_one_and_update(
            {"_id": {"$eq": slot}, "until": {"$lt": now}},
            {"$set": {"sync_id": sync_id, "until": until_ms}},
        )
        if claimed is not None:
            return None
        try:
            self.slots.insert_one({"_id": slot, "sync_id": sync_id, "until": until_ms})
            return None
        except DuplicateKeyError:
            pass
        current = self.slots.find_one({"_id": {"$eq": slot}})
        if current is None or current.get("until", 0) < now:
            return self.claim_slot(slot, sync_id, until_ms)
        return current.get("sync_id")

    def free_slot(self, slot: str, sync_id: str) -> None:
        self.slots.update_one({"_id": {"$eq": slot}, "sync_id": {"$eq": sync_id}}, {"$set": {"until": 0}})

    def insert_sync(self, doc: dict) -> None:
        self.syncs.insert_one(doc)

    def sync(self, sync_id: str) -> dict | None:
        return self.syncs.find_one({"_id": {"$eq": sync_id}})

    def update_sync(self, sync_id: str, update: dict) -> dict | None:
        return self.syncs.find_one_and_update({"_id": {"$eq": sync_id}}, update, return_document=ReturnDocument.AFTER)

    def finish_sync(self, sync_id: str, status: str) -> bool:
        """Mark a running sync finished, once (the last prescriber's worker and a stale check may race)."""
        result = self.syncs.update_one(
            {"_id": {"$eq": sync_id}, "status": {"$eq": "running"}},
            {"$set": {"status": status, "finished_at": now_ms()}},
        )
        return result.matched_count == 1

    # --- the schedule ------------------------------------------------------------------------------
    def claim_schedule(self, agency_id: str, next_at_ms: int, first_at_ms: int) -> bool:
        """True when this replica claims the agency's due scheduled sync (and sets the next one); the
        agency's first schedule is created due at `first_at_ms` and not claimed."""
        now = now_ms()
        claimed = self.schedule.find_one_and_update(
            {"_id": {"$eq": agency_id}, "next_at": {"$lte": now}}, {"$set": {"next_at": next_at_ms, "claimed_at": now}}
        )
        if claimed is not None:
            return True
        try:
            self.schedule.insert_one({"_id": agency_id, "next_at": first_at_ms})
        except DuplicateKeyError:
            pass
        return False

    # --- access records ----------------------------------------------------------------------------
    def record_access(self, doc: dict) -> None:
        self.access_records.insert_one(doc)


def new_sync_id() -> str:
    return "sync_" + uuid.uuid4().hex
