"""Write, fan out, release: one record of truth shown on many boards, without multi-document
transactions. Messages (mailbox.py), delivered notices (delivery.py) and signature requests
(signatures.py) all work this way:

1. the record is written first, in one write, with a repair marker (`fanout_pending_at`) set and
   the events announcing it held in its outbox (`held_events`, `hold_events`);
2. the board items are brought in line with it, repeatably: deterministic ids, inserts that skip
   the items that exist, changes through InboxStore.change_item. New items are placed by a *pass*
   (the record at one revision, `pass_key`): each is marked with it (`placed_by`,
   InboxStore.place_items), and the pass counts the items it placed, inserted by this attempt or
   an earlier one, on their owners' boards once (`Fanout.count`): each board's $inc carries the
   pass's token in the same write and applies only while the token is absent
   (InboxStore.count_passes), so the first attempt and a repair, or two repairs at once, move a
   board's counters exactly once; an item another pass placed is that pass's to count;
3. one write releases the held events and clears the marker (`Fanout.release`), guarded by the
   record's revision when it has one, so a record rewritten meanwhile keeps the marker of the
   newer revision until that revision's own pass finishes. With counters, it also notes when
   (`counted_at`): the pass's tokens are swept from its boards TOKEN_KEEP_MS later
   (`sweep_counted`), long after any attempt of that pass could still be running.

A crash between 1 and 3 leaves the marker set; the repair worker (`Fanout.run_repairs`) finishes
the records whose marker is older than REPAIR_AFTER_MS, oldest first. Steps 2 and 3 are
repeatable, so a record finished twice (by its writer and by the worker) ends the same, counters
included. What a token cannot cover (an item changed or deleted by a pass, then a crash before its
$inc; a pass rewritten by a newer revision before its repair) is found and repaired by the drift
check (services/inbox/counter_check.py).

Fault tests crash a process at `<point>.after_items` (items written, counters not moved) and
`<point>.after_counters` (counted, not released) through services.kit.faults.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from services.kit.errors import DomainError
from services.kit.events import Envelope
from services.kit.faults import crash_point
from services.kit.mongo import IndexSpec, now_ms
from services.kit.outbox import merge_update, outbox_fields, release_update, with_outbox
from services.kit.runtime import every

log = logging.getLogger(__name__)

MARKER = "fanout_pending_at"
COUNTED_AT = "counted_at"  # when a pass was released: its tokens are swept TOKEN_KEEP_MS later
COUNTED_REV = "counted_rev"  # ... the revision that pass wrote (its pass key)
REPAIR_AFTER_MS = 10_000  # a writer still at it is left alone this long
TOKEN_KEEP_MS = 60_000  # a released pass's tokens stay this long: no attempt of it runs longer
SWEEP_ROUNDS = 20  # sweep batches per repair pass at most (2,000 released records)
REPAIR_BATCH = 100
ATTEMPTS = 8


class PassCounters(Protocol):
    """Where a pass counts its items (InboxStore)."""

    def count_passes(self, passes: dict[str, list[dict]]) -> None: ...

    def sweep_passes(self, passes_by_owner: dict[str, list[str]]) -> None: ...


def pass_key(record_id: str, revision: int | None) -> str:
    """One fan-out pass: a record at one revision (0: a record without revisions)."""
    return f"{record_id}|{int(revision or 0)}"


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

    - `bring_in_line(record)`: step 2 (the owner's board items for this record), counting the
      items its pass placed through `count` when the fan-out has `counters`;
    - `counters` and `owners(record)`: where passes count (InboxStore) and whose boards a record's
      pass counted on (owner keys), to sweep its tokens;
    - `point`: the name of this fan-out's crash points (services.kit.faults);
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
        counters: PassCounters | None = None,
        owners: Callable[[dict], list[str]] | None = None,
        point: str | None = None,
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
        self.counters = counters
        self.owners = owners
        self.point = point or f"inbox.{what}"

    def complete(self, record: dict | None) -> None:
        """Steps 2 and 3 for a record whose marker is set (nothing otherwise)."""
        for _ in range(ATTEMPTS):
            if record is None or self.marker not in record:
                return
            self.bring_in_line(record)
            if self.release(record) or self.on_rewritten is None:
                return
            record = self.on_rewritten(record["_id"])

    def pass_key(self, record: dict) -> str:
        return pass_key(record["_id"], record.get(self.revision) if self.revision else None)

    def count(self, placed: dict[str, list[dict]]) -> None:
        """Count what passes placed (pass key -> items), in one counter write per board; the end of
        step 2, with a crash point either side of it."""
        crash_point(f"{self.point}.after_items")
        passes = {key: items for key, items in placed.items() if items}
        if passes and self.counters is not None:
            self.counters.count_passes(passes)
        crash_point(f"{self.point}.after_counters")

    def _release_update(self, revision: int | None) -> dict:
        update: dict = {"$unset": {self.marker: ""}}
        if self.holds_events:
            update = merge_update(release_update(), update)
        if self.counters is not None:
            update = merge_update(update, {"$set": {COUNTED_AT: now_ms(), COUNTED_REV: int(revision or 0)}})
        return update

    def release(self, record: dict) -> bool:
        """Step 3: release the held events and clear the marker in one write; False when the
        revision guard found the record rewritten meanwhile."""
        guard: dict = {"_id": {"$eq": record["_id"]}}
        revision = None
        if self.revision is not None:
            revision = record[self.revision]
            guard[self.revision] = {"$eq": revision}
        return bool(self.collection.update_one(guard, self._release_update(revision)).matched_count)

    def release_all(self, record_ids: list[str], revision: int) -> int:
        """Step 3 for records written together at one revision; how many were still at it."""
        guard = {"_id": {"$in": record_ids}, self.revision: {"$eq": revision}}
        return self.collection.update_many(guard, self._release_update(revision)).matched_count

    def repair_pending(self, older_than_ms: int | None = None, limit: int = REPAIR_BATCH) -> int:
        """One repair pass over records pending since `older_than_ms` (default: REPAIR_AFTER_MS
        ago), then a sweep of released passes' tokens; returns how many records it finished."""
        cutoff = now_ms() - REPAIR_AFTER_MS if older_than_ms is None else older_than_ms
        records = self.find_pending(cutoff, limit)
        for record in records:
            self.finish(record)
            log.info(
                "finished interrupted fan-out",
                extra={"collection": self.collection.name, "agency_id": record.get("agency_id")},
            )
        for _ in range(SWEEP_ROUNDS):
            if self.sweep_counted() < REPAIR_BATCH:
                break
        return len(records)

    def sweep_counted(self, older_than_ms: int | None = None, limit: int = REPAIR_BATCH) -> int:
        """Drop the tokens of passes released at or before `older_than_ms` (default TOKEN_KEEP_MS
        ago) from their boards, one write per board for the whole batch; how many records."""
        if self.counters is None or self.owners is None:
            return 0
        cutoff = now_ms() - TOKEN_KEEP_MS if older_than_ms is None else older_than_ms
        found = self.collection.find({COUNTED_AT: {"$lte": cutoff}}, projection={"_outbox": 0})
        records = list(found.sort(COUNTED_AT, 1).limit(limit))
        if not records:
            return 0
        by_owner: dict[str, list[str]] = {}
        for record in records:
            key = pass_key(record["_id"], record.get(COUNTED_REV))
            for owner in self.owners(record):
                by_owner.setdefault(owner, []).append(key)
        self.counters.sweep_passes(by_owner)
        # A record released again meanwhile (a newer revision) keeps its newer note.
        guard = {"_id": {"$in": [record["_id"] for record in records]}, COUNTED_AT: {"$lte": cutoff}}
        self.collection.update_many(guard, {"$unset": {COUNTED_AT: "", COUNTED_REV: ""}})
        return len(records)

    def stalled(self) -> bool:
        """Whether some record has been pending longer than a repair waits (a crashed pass not yet
        finished: its boards' counts may still move)."""
        cutoff = now_ms() - REPAIR_AFTER_MS
        return self.collection.find_one({self.marker: {"$lte": cutoff}}, projection={"_id": 1}) is not None

    def run_repairs(self, stop: threading.Event, interval_s: float) -> None:
        """The repair worker: a pass every `interval_s` until `stop`; a pass that meets an outage or
        a busy item is tried again next time."""
        every(stop, interval_s, self.repair_pending, f"{self.what} repair", errors=(PyMongoError, DomainError))
