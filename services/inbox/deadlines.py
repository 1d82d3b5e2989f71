"""Deadlines of signature requests (`due_at`) and announcements (`acknowledge_by`): who has not
answered in time is reminded, and later their author gets the list.

A request or announcement with a deadline carries `deadline_step_at` (ms, by services.kit.clock)
and `deadline_stage`: the next thing the deadline pass has to do and when.

1. `remind`, at the deadline: each signer who has not responded (each staff member who has not
   acknowledged, the author left out) gets a reminder in their Reminders folder;
2. `report`, `overdue_report_minutes` (agency option) later: the author gets one reminder listing
   the names of who still has not (names only); nothing when everyone has answered by then.

The reminders are ordinary reminder items (kind `reminder`, due at once): they show in the board's
Reminders folder and in GET /api/v1/reminders, open, snooze and complete like one the staff member
set, and link to the request or announcement by its id. A closed request (complete or declined),
an expired announcement, or one that no longer asks for acknowledgement ends its deadline.

Each step is repeatable and safe with two processes: the items have deterministic ids (an insert
that finds one skips it, and only what an insert placed is counted, so counters stay exact), and the
step is advanced by a write guarded by the `deadline_step_at` read (the loser changes nothing). A
crash between the items and the step leaves the step due, and the next pass places what is missing.

The pass runs from the feature's background loop (`INBOX_DEADLINE_INTERVAL_S`, default 2 s) and,
under the test clock, after each advance of it (`clock.on_advance("deadlines", ...)`). It finds due
steps through an index on `deadline_step_at` (a range on one indexed field) and reads who
acknowledged an announcement through the state documents' `ack_key` index (an `$eq`).
"""

from __future__ import annotations

import contextlib
import logging
import threading

from services.inbox import domain
from services.inbox.components import Components, Feature
from services.inbox.delivery_rules import delivered_event
from services.kit import clock
from services.kit.events import failure_summary
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.runtime import every
from services.kit.service_identity import acting_as

log = logging.getLogger(__name__)

REQUESTS = "signature_requests"
ANNOUNCEMENTS = "announcements"
ANNOUNCEMENT_STATES = "announcement_states"
STEP_AT = "deadline_step_at"
STAGE = "deadline_stage"
STAGE_REMIND = "remind"
STAGE_REPORT = "report"
BATCH = 100
MAX_NAMES = 50  # names listed in one report; the rest are counted

INDEXES = [
    IndexSpec(REQUESTS, [(STEP_AT, 1)], name="deadline_step"),
    IndexSpec(ANNOUNCEMENTS, [(STEP_AT, 1)], name="deadline_step"),
]

SIGNATURE = "signature"
ANNOUNCEMENT = "announcement"


# --- pure rules ---------------------------------------------------------------------------------


def first_step(deadline_ms: int | None) -> dict:
    """The fields a new request or announcement with a deadline carries (none without one)."""
    if deadline_ms is None:
        return {}
    return {STEP_AT: deadline_ms, STAGE: STAGE_REMIND}


def next_step(stage: str, deadline_ms: int, report_minutes: int) -> tuple[str, int] | None:
    """After `stage`, the next stage and when it is due; None when the deadline is done."""
    if stage == STAGE_REMIND:
        return STAGE_REPORT, deadline_ms + report_minutes * 60_000
    return None


def deadline_ref(target_id: str, staff_id: str, stage: str) -> str:
    """The id of one deadline reminder (one per target, person and stage, so repeatable)."""
    return "dln_" + domain.digest(target_id, staff_id, stage)[:24]


def pending_signers(doc: dict) -> list[str]:
    """The signers who have not responded, in request order; none once the request is closed."""
    from services.inbox.signatures import CLOSED, doc_status

    if doc_status(doc) in CLOSED:
        return []
    return [sid for sid in doc["signer_ids"] if not doc["signers"][sid].get("responded_at")]


def name_list(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    more = len(names) - MAX_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def reminder_text(kind: str, title: str) -> str:
    if kind == SIGNATURE:
        return f"Signature due: {title}"
    return f"Please acknowledge: {title}"


def report_text(kind: str, names: list[str], title: str) -> str:
    verb = "signed" if kind == SIGNATURE else "acknowledged"
    return f"Not yet {verb} ({len(names)}): {name_list(names)} | {title}"


# --- the feature ------------------------------------------------------------------------------------


class Deadlines(Feature):
    def __init__(self, components: Components, interval_s: float | None = None):
        super().__init__(components)
        db = components.store.db
        self.requests = db[REQUESTS]
        self.announcements = db[ANNOUNCEMENTS]
        self.states = db[ANNOUNCEMENT_STATES]
        configured = getattr(components.settings, "deadline_interval_s", 2.0)
        self.interval_s = configured if interval_s is None else interval_s

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        clock.on_advance("deadlines", self.run_pass)

    def background(self):
        if self.interval_s <= 0:
            return []
        return [("deadlines", self._run)]

    def _run(self, stop: threading.Event) -> None:
        every(stop, self.interval_s, self.run_pass, "deadline")

    # --- the pass ------------------------------------------------------------------------------------
    def run_pass(self, now: int | None = None) -> dict:
        """Every step due by `now` (the deadline clock): how many reminders and reports it placed."""
        now = clock.now_ms() if now is None else now
        done = {"reminded": 0, "reported": 0}
        for collection, step in ((self.requests, self._signature_step), (self.announcements, self._announcement_step)):
            due = collection.find({STEP_AT: {"$lte": now}}, projection={"_outbox": 0}).sort(STEP_AT, 1).limit(BATCH)
            for doc in list(due):
                try:
                    self._advance(collection, doc, now, step, done)
                except Exception as exc:  # one record's trouble (directory down, ...) must not stop the others
                    log.warning(
                        "deadline step failed (%s); the next pass tries again",
                        failure_summary(exc),
                        extra={"agency_id": doc.get("agency_id"), "error_type": type(exc).__name__},
                    )
        if done["reminded"] or done["reported"]:
            log.info("deadline reminders placed", extra=done)
        return done

    def _advance(self, collection, doc: dict, now: int, step, done: dict) -> None:
        """Run the record's due steps in order (a report due at once follows its reminders)."""
        options = self.components.options.get(doc["agency_id"]) if self.components.options else {}
        report_minutes = options.get("overdue_report_minutes", 60)
        while doc.get(STEP_AT) is not None and doc[STEP_AT] <= now:
            stage = doc.get(STAGE) or STAGE_REMIND
            placed, finished = step(doc, stage)
            done["reminded" if stage == STAGE_REMIND else "reported"] += placed
            following = None if finished else next_step(stage, self._deadline(doc), report_minutes)
            guard = {"_id": {"$eq": doc["_id"]}, STEP_AT: {"$eq": doc[STEP_AT]}}
            if following is None:
                collection.update_one(guard, {"$unset": {STEP_AT: "", STAGE: ""}})
                return
            if not collection.update_one(guard, {"$set": {STEP_AT: following[1], STAGE: following[0]}}).matched_count:
                return  # another process moved it on
            doc = {**doc, STEP_AT: following[1], STAGE: following[0]}

    @staticmethod
    def _deadline(doc: dict) -> int:
        return doc.get("due_at") or doc.get("acknowledge_by") or doc[STEP_AT]

    # --- signature requests -----------------------------------------------------------------------
    def _signature_step(self, doc: dict, stage: str) -> tuple[int, bool]:
        """(items placed, whether the deadline is done)."""
        pending = pending_signers(doc)
        if not pending:
            return 0, True
        agency = doc["agency_id"]
        title = self.components.cipher.open(agency, doc["_id"], "title", doc["title"])
        sender = (doc["requester_id"], doc.get("requester_name", ""))
        if stage == STAGE_REMIND:
            text = reminder_text(SIGNATURE, title)
            items = [self._item(agency, sid, doc["_id"], stage, text=text, sender=sender) for sid in pending]
            return len(self.components.store.insert_board_items(items)), False
        names = self._names(agency, pending)
        text = report_text(SIGNATURE, names, title)
        item = self._item(agency, doc["requester_id"], doc["_id"], stage, text=text, sender=("", ""))
        return len(self.components.store.insert_board_items([item])), True

    # --- announcements ----------------------------------------------------------------------------
    def _announcement_step(self, doc: dict, stage: str) -> tuple[int, bool]:
        from services.inbox.announcements import is_active

        if not doc.get("ack_required") or not is_active(doc, clock.now_ms()):
            return 0, True
        agency = doc["agency_id"]
        pending = self._not_acknowledged(doc)
        if not pending:
            return 0, True
        title = self.components.cipher.open(agency, doc["_id"], "title", doc["title"])
        sender = (doc["posted_by"], doc.get("posted_by_name", ""))
        if stage == STAGE_REMIND:
            text = reminder_text(ANNOUNCEMENT, title)
            items = [self._item(agency, sid, doc["_id"], stage, text=text, sender=sender) for sid in pending]
            return len(self.components.store.insert_board_items(items)), False
        names = self._names(agency, pending)
        text = report_text(ANNOUNCEMENT, names, title)
        item = self._item(agency, doc["posted_by"], doc["_id"], stage, text=text, sender=("", ""))
        return len(self.components.store.insert_board_items([item])), True

    def _not_acknowledged(self, doc: dict) -> list[str]:
        """The agency's active staff (directory, as inbox for the agency) without the author and
        those who acknowledged (the state documents' `ack_key` index)."""
        acknowledged = {
            state["staff_id"]
            for state in self.states.find({"ack_key": {"$eq": doc["_id"]}}, projection={"staff_id": 1})
        }
        with self._acting_for(doc["agency_id"]):
            staff = self.components.directory.resolve(domain.Addressing(whole_agency=True)).staff_ids
        done = acknowledged | {doc["posted_by"]}
        return [sid for sid in staff if sid not in done]

    # --- helpers ------------------------------------------------------------------------------------
    def _acting_for(self, agency_id: str):
        tokens = self.components.service_tokens
        if tokens is None:  # a test's directory stand-in answers without an identity
            return contextlib.nullcontext()
        return acting_as(tokens.identity(agency_id))

    def _names(self, agency_id: str, staff_ids: list[str]) -> list[str]:
        """Display names, in the given order (an id when directory does not know the person)."""
        with self._acting_for(agency_id):
            records, _missing = self.components.directory.staff(list(staff_ids))
        names = {record.staff_id: record.display_name for record in records}
        return [names.get(sid) or sid for sid in staff_ids]

    def _item(self, agency: str, owner: str, target_id: str, stage: str, *, text: str, sender: tuple[str, str]) -> dict:
        """A reminder due at once, on `owner`'s Reminders folder, with its delivered event."""
        now = now_ms()
        ref = deadline_ref(target_id, owner, stage)
        cipher = self.components.cipher
        item = domain.new_item(
            agency_id=agency,
            owner_id=owner,
            folder=domain.FOLDER_REMINDERS,
            kind=domain.KIND_REMINDER,
            ref_id=ref,
            at_ms=now,
            unread=True,
            title=cipher.seal(agency, ref, "title", text),
            link=cipher.seal(agency, ref, "link", target_id),
            remind_at=now,
            created_at=now,
            arrived_at=now,
            reminder_owner=domain.owner_key(agency, owner),
            created_key=domain.sort_key(now, ref),
            deadline_of=target_id,
            deadline_stage=stage,
            sender_id=sender[0],
            sender_name=sender[1],
        )
        item.update(outbox_fields([delivered_event(item, True, now)]))
        return item
