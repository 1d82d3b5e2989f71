"""audit's own database (see docs/audit.md): the records, their chains and signed checkpoints.

- `audit_records`: one document per recorded event (services.audit.chain), inserted once and never
  changed: no code path of the service updates or deletes one (production also gives the service a
  database role without update and delete on it, docs/audit.md). Unique indexes: (chain, seq), so
  two writers can never put two records at one place of a chain, and event_id, so an event is
  recorded once however often it is delivered.
- `audit_checkpoints`: signed (chain, seq, hash, at), `_id` = the record id it covers.
- `audit_chains`: one document per chain, written before its first record: the list of chains the
  checkpoint pass walks and verification starts from.
- `access_records`: reads of the audit trail, each carrying its `phi.accessed.v1` (outbox).
- `processed_events`: the consumer's processed event ids (services.kit.processed_events).

Appending without transactions (nx-27017 has none): read the chain's head (the record with the
highest seq, an indexed lookup), build the next record from it and insert it. If another writer
(replica or thread) took that seq meanwhile, the insert fails on the (chain, seq) unique index and
the writer reads the head again. A record's `prev_hash` is the hash of the one record that holds
seq - 1, which nothing ever changes, so the chain cannot fork and, since every seq is head + 1, it
has no gaps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from services.audit import chain as chains
from services.audit.chain import Entry
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms

log = logging.getLogger(__name__)

RECORDS = "audit_records"
CHECKPOINTS = "audit_checkpoints"
CHAINS = "audit_chains"
ACCESS_RECORDS = "access_records"
# The identifier spaces each chain's patient references were made in (services.kit.patient_ref).
REF_SYSTEMS = "patient_ref_systems"
OUTBOX_COLLECTIONS = (ACCESS_RECORDS,)
# Query filters with an index of their own: (chain, <field>, at_key).
INDEXED_FILTERS = ("patient_id", "actor_id", "action", "resource_type")
APPEND_ATTEMPTS = 100  # a writer losing this many races in a row is retried by the bus instead
VERIFY_PAGE = 1000

INDEXES = [
    IndexSpec(RECORDS, [("event_id", ASCENDING)], unique=True, name="audit_event_once"),
    IndexSpec(RECORDS, [("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="audit_chain_seq"),
    IndexSpec(RECORDS, [("chain", ASCENDING), ("at_key", ASCENDING)], name="audit_by_time"),
    IndexSpec(RECORDS, [("chain", ASCENDING), ("rec_key", ASCENDING)], name="audit_by_recorded_time"),
    *(
        IndexSpec(RECORDS, [("chain", ASCENDING), (field, ASCENDING), ("at_key", ASCENDING)], name=f"audit_by_{field}")
        for field in INDEXED_FILTERS
    ),
    IndexSpec(CHECKPOINTS, [("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="checkpoint_chain_seq"),
    IndexSpec(REF_SYSTEMS, [("chain", ASCENDING)], name="ref_systems_by_chain"),
]

_HEAD = {"_id": 1, "seq": 1, "hash": 1}


class ChainBusy(Exception):
    """Other writers kept taking the next place of a chain; the event is retried later."""


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


GENESIS_HEAD = Head(0, chains.GENESIS)


@dataclass(frozen=True)
class Filters:
    """What an auditor asks for; every field is an exact match except the time ranges: when it
    happened [since, until) and when it was recorded [recorded_since, recorded_until)."""

    patient_id: str = ""
    # Any of these patients (a search by record number: one reference per identifier space and key).
    patient_ids: tuple[str, ...] = ()
    actor_id: str = ""
    action: str = ""
    resource_type: str = ""
    category: str = ""
    outcome: str = ""
    since: int | None = None
    until: int | None = None
    recorded_since: int | None = None
    recorded_until: int | None = None

    @property
    def sort_key(self) -> str:
        """The indexed key pages are sorted and cursored by: the recorded time's (`rec_key`) when the
        question is about recording time, else the occurred time's (`at_key`)."""
        return "rec_key" if self.recorded_since is not None or self.recorded_until is not None else "at_key"

    def query(self, chain: str, before: str | None = None) -> dict:
        """The filter on one chain (never another: the chain is always part of it), newest first
        from `before` (a cursor on `sort_key`)."""
        query: dict = {"chain": {"$eq": chain}}
        for field in ("patient_id", "actor_id", "action", "resource_type", "category", "outcome"):
            value = getattr(self, field)
            if value:
                query[field] = {"$eq": value}
        sort_key = self.sort_key
        for key, since, until in (
            ("at_key", self.since, self.until),
            ("rec_key", self.recorded_since, self.recorded_until),
        ):
            bound = _range(since, until, before if key == sort_key else None)
            if bound:
                query[key] = bound
        return query


def _range(since: int | None, until: int | None, before: str | None) -> dict:
    """A key range [since, min(until, before)) as a query operator (empty: no bound)."""
    bound: dict = {}
    if since is not None:
        bound["$gte"] = chains.time_bound(since)
    upper = [value for value in (before, None if until is None else chains.time_bound(until)) if value]
    if upper:
        bound["$lt"] = min(upper)
    return bound


class AuditStore:
    def __init__(self, db: Database):
        self.db = db
        self.records = db[RECORDS]
        self.checkpoints = db[CHECKPOINTS]
        self.chains = db[CHAINS]
        self.access_records = db[ACCESS_RECORDS]
        self.ref_systems = db[REF_SYSTEMS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, INDEXES)

    # --- appending ---------------------------------------------------------------------------------
    def head(self, chain: str) -> Head:
        """The chain's last record (GENESIS_HEAD before its first)."""
        found = list(self.records.find({"chain": {"$eq": chain}}, _HEAD).sort("seq", DESCENDING).limit(1))
        return Head(found[0]["seq"], found[0]["hash"]) if found else GENESIS_HEAD

    def append(self, entry: Entry) -> dict:
        return self.append_all([entry])[0]

    def append_all(self, entries: Sequence[Entry]) -> list[dict]:
        """Record each entry once, in order, at the end of its chain; the records (an entry recorded
        before: the record that holds it). Reads each chain's head once, and again after losing a race."""
        heads: dict[str, Head] = {}
        return [self._append(entry, heads) for entry in entries]

    def _append(self, entry: Entry, heads: dict[str, Head]) -> dict:
        chain = entry.chain
        for _ in range(APPEND_ATTEMPTS):
            head = heads.get(chain) or self.head(chain)
            if head.seq == 0:
                self._register(chain, entry.agency_id)
            record = chains.new_record(entry, head.seq + 1, head.hash, now_ms())
            try:
                self.records.insert_one(record)
            except DuplicateKeyError:
                heads.pop(chain, None)
                existing = self.records.find_one({"event_id": {"$eq": entry.event_id}})
                if existing is not None:
                    return existing  # recorded before (a redelivery, or another replica had it)
                continue  # another writer took this seq: read the head again
            heads[chain] = Head(record["seq"], record["hash"])
            return record
        raise ChainBusy(chain)

    def _register(self, chain: str, agency_id: str) -> None:
        try:
            self.chains.insert_one({"_id": chain, "agency_id": agency_id, "created_at": now_ms()})
        except DuplicateKeyError:
            pass

    # --- checkpoints -------------------------------------------------------------------------------
    def add_checkpoint(self, checkpoint: dict) -> bool:
        """Store a signed checkpoint; False when one for that record exists (another replica's)."""
        try:
            self.checkpoints.insert_one(checkpoint)
        except DuplicateKeyError:
            return False
        return True

    def last_checkpoint(self, chain: str) -> dict | None:
        found = list(self.checkpoints.find({"chain": {"$eq": chain}}).sort("seq", DESCENDING).limit(1))
        return found[0] if found else None

    def checkpoints_of(self, chain: str) -> list[dict]:
        return list(self.checkpoints.find({"chain": {"$eq": chain}}).sort("seq", ASCENDING))

    def checkpoint_page(self, chain: str, limit: int, before_seq: int | None = None) -> list[dict]:
        query: dict = {"chain": {"$eq": chain}}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        return list(self.checkpoints.find(query).sort("seq", DESCENDING).limit(limit))

    # --- reading -----------------------------------------------------------------------------------
    def registered_chains(self) -> list[str]:
        return sorted(doc["_id"] for doc in self.chains.find({}, {"_id": 1}))

    def all_chains(self) -> list[str]:
        """Every chain anything points at: registered, checkpointed, or holding records (a chain
        whose registration was removed is still found). A scan: for verification, not requests."""
        found = set(self.registered_chains())
        found.update(self.checkpoints.distinct("chain"))
        found.update(self.records.distinct("chain"))
        return sorted(c for c in found if isinstance(c, str))

    def chain_records(self, chain: str) -> Iterator[dict]:
        """A chain's records in seq order, read a page at a time by the (chain, seq) index."""
        after = 0
        while True:
            query = {"chain": {"$eq": chain}, "seq": {"$gt": after}}
            page = list(self.records.find(query).sort("seq", ASCENDING).limit(VERIFY_PAGE))
            yield from page
            if len(page) < VERIFY_PAGE:
                return
            after = page[-1]["seq"]

    def page(
        self, chain: str, filters: Filters, limit: int, before: str | None = None
    ) -> tuple[list[dict], str | None]:
        """Up to `limit` records of `chain` matching `filters`, newest first, and the cursor of the
        next page (None on the last). `filters.patient_ids`: one indexed query per patient (equality
        each, no `$in`), merged by the sort key, which is unique within a chain."""
        key = filters.sort_key
        if filters.patient_ids:
            merged: dict = {}
            for patient_id in dict.fromkeys(filters.patient_ids):
                one = replace(filters, patient_id=patient_id, patient_ids=())
                for doc in self.records.find(one.query(chain, before)).sort(key, DESCENDING).limit(limit + 1):
                    merged[doc[key]] = doc
            found = [merged[k] for k in sorted(merged, reverse=True)[: limit + 1]]
        else:
            found = list(self.records.find(filters.query(chain, before)).sort(key, DESCENDING).limit(limit + 1))
        if len(found) > limit:
            return found[:limit], found[limit - 1][key]
        return found, None

    # --- patient identifier spaces ----------------------------------------------------------------
    def note_ref_system(self, chain: str, system: str) -> None:
        """Remember that `chain`'s records name patients by references made in `system` (kept once)."""
        try:
            self.ref_systems.insert_one({"_id": f"{chain}|{system}", "chain": chain, "system": system, "at": now_ms()})
        except DuplicateKeyError:
            pass

    def ref_systems_of(self, chain: str) -> list[str]:
        """The identifier spaces `chain`'s patient references were made in (a handful per agency)."""
        return sorted(doc["system"] for doc in self.ref_systems.find({"chain": {"$eq": chain}}, {"system": 1}))

    def record_access(self, doc: dict) -> None:
        self.access_records.insert_one(doc)
