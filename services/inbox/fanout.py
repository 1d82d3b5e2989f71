"""Write, fan out, release: one record of truth shown on many boards, without multi-document
transactions. Messages (mailbox.py), delivered notices (delivery.py) and signature requests
(signatures.py) all work this way:

1. the record is written first, in one write, with a repair marker (`fanout_pending_at`) set and
   the events announcing it held in its outbox (`held_events`, `hold_events`);
2. the board items are brought in line with it, repeatably: deterministic ids, inserts that skip
   the items that exist, changes through InboxStore.change_item;
3. one write releases the held events and clears the marker (`Fanout.release`), guarded by the
   record's revision when it has one, so a record rewritten meanwhile keeps the marker of the
   newer revision until that revision's own pass finishes.

A crash between 1 and 3 leaves the marker set; the repair worker (`Fanout.run_repairs`) finishes
the records whose marker is older than REPAIR_AFTER_MS, oldest first. Steps 2 and 3 are
repeatable, so a record finished twice (by its writer and by the worker) ends the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from services.kit.errors import DomainError
from services.kit.events import Envelope
from services.kit.mongo import IndexSpec, now_ms
from services.kit.outbox import merge_update, outbox_fields, release_update, with_outbox
from services.kit.runtime import every

log = logging.getLogger(__name__)

MARKER = "fanout_pending_at"
REPAIR_AFTER_MS = 10_000  # a writer still at it is left alone this long
REPAIR_BATCH = 100
ATTEMPTS = 8


def held_events(envelopes: Iterable[Envelope]) -> dict:
    """Step 1, for an insert: the events announcing the record, held until `release`."""
    return outbox_fields(envelopes, ready=False)


def hold_events(update: dict, envelopes: list[Envelope]) -> dict:
    """Step 1, for an update: `update` plus the held events (if any)."""
    return with_outbox(update, envelopes, ready=False) if envelopes else update


def repair_index(collection: str, marker: str = MARKER) -> IndexSpec:
    """The index the repair worker's query is served from (named after the marker)."""
    return IndexSpec(collection, [(marker, 1)], name=marker.removesuffix("_at"))


def pending_records(collection: Collection, older_than_ms: int, limit: int = REPAIR_BATCH, marker: str = MARKER):
    """Records whose marker was set at or before `older_than_ms`, oldest first."""
    found = collection.find({marker: {"$lte": older_than_ms}}, projection={"_outbox": 0})
    return list(found.sort(marker, 1).limit(limit))


class Fanout:
    """Steps 2 and 3, and the repair worker, for one collection of records.

    - `bring_in_line(record)`: step 2 (the owner's board items for this record);
    - `revision`: the field guarding step 3 (None: unguarded);
    - `on_rewritten(record_id)`: asked when that guard met a newer revision; returns the record to
      finish next, or None when nothing is left to do (None: the newer writer finishes it);
    - `holds_events=False`: the record's events ride on its board items; step 3 clears the marker;
    - `find_pending(older_than_ms, limit)` and `finish(record)`: the repair worker's query and
      what it does with each record (by default `pending_records` and `complete`).
    """

    def __init__(
        self,
        collection: Collection,
        bring_in_line: Callable[[dict], None],
        *,
        what: str,
        marker: str = MARKER,
        revision: str | None = None,
        holds_events: bool = True,
        on_rewritten: Callable[[str], dict | None] | None = None,
        find_pending: Callable[[int, int], list[dict]] | None = None,
        finish: Callable[[dict], None] | None = None,
    ):
        self.collection = collection
        self.bring_in_line = bring_in_line
        self.what = what
        self.marker = marker
        self.revision = revision
        self.holds_events = holds_events
        self.on_rewritten = on_rewritten
        self.find_pending = find_pending or (lambda older, limit: pending_records(collection, older, limit, marker))
        self.finish = finish or self.complete

    def complete(self, record: dict | None) -> None:
        """Steps 2 and 3 for a record whose marker is set (nothing otherwise)."""
        for _ in range(ATTEMPTS):
            if record is None or self.marker not in record:
                return
            self.bring_in_line(record)
            if self.release(record) or self.on_rewritten is None:
                return
            record = self.on_rewritten(record["_id"])

    def _release_update(self) -> dict:
        unset = {"$unset": {self.marker: ""}}
        return merge_update(release_update(), unset) if self.holds_events else unset

    def release(self, record: dict) -> bool:
        """Step 3: release the held events and clear the marker in one write; False when the
        revision guard found the record rewritten meanwhile."""
        guard: dict = {"_id": {"$eq": record["_id"]}}
        if self.revision is not None:
            guard[self.revision] = {"$eq": record[self.revision]}
        return bool(self.collection.update_one(guard, self._release_update()).matched_count)

    def release_all(self, record_ids: list[str], revision: int) -> int:
        """Step 3 for records written together at one revision; how many were still at it."""
        guard = {"_id": {"$in": record_ids}, self.revision: {"$eq": revision}}
        return self.collection.update_many(guard, self._release_update()).matched_count

    def repair_pending(self, older_than_ms: int | None = None, limit: int = REPAIR_BATCH) -> int:
        """One repair pass over records pending since `older_than_ms` (default: REPAIR_AFTER_MS
        ago); returns how many it finished."""
        cutoff = now_ms() - REPAIR_AFTER_MS if older_than_ms is None else older_than_ms
        records = self.find_pending(cutoff, limit)
        for record in records:
            self.finish(record)
            log.info(
                "finished interrupted fan-out",
                extra={"collection": self.collection.name, "agency_id": record.get("agency_id")},
            )
        return len(records)

    def run_repairs(self, stop: threading.Event, interval_s: float) -> None:
        """The repair worker: a pass every `interval_s` until `stop`; a pass that meets an outage or
        a busy item is tried again next time."""
        every(stop, interval_s, self.repair_pending, f"{self.what} repair", errors=(PyMongoError, DomainError))
