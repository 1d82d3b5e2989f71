"""Coverage while away: a colleague receives a copy of what is addressed to a staff member during a
window, marked "covering for <name>", and the owner sees afterwards what came in and what was done.

    GET    /api/v1/board/coverage                         my coverage in force or scheduled (or null)
    PUT    /api/v1/board/coverage                         set it: {coverer_id, starts_at?, ends_at}
    DELETE /api/v1/board/coverage                         end it now
    GET    /api/v1/board/coverage/history                 my coverages, newest first
    GET    /api/v1/board/coverage/<coverage id>/summary   what came in during one, read / answered
    GET|PUT|DELETE /api/v1/board/coverage/staff/<staff id>   the same for a staff member (admins)

Stored in two collections: `coverages`, one document per window set (its history, its end, how many
copies it made), and `coverage_current`, one pointer per staff member (`_id` = `<agency>|<staff>`)
to the window in force or scheduled. Setting a window replaces the one in force (ended at once).

The copies are made where every board item is inserted (InboxStore.copies, called by every insert of
board items: message and portal fan-outs, deliveries such as lab results, signature requests and
their outcomes): for each item of a covered owner (received messages, portal messages, notices,
signature requests to sign and outcomes; never the owner's Sent copies, reminders or their own
requests), one `_id $in` read of the owners' pointers, and, while `starts_at <= clock.now_ms() <
ends_at`, a copy on the coverer's board with the id the coverer's own item would have (so the
coverer reads and answers it as if addressed to them, and a coverer who is also a recipient keeps
their own item), `covering_for` {staff_id, name}, `coverage_id` and `covered_item_id`. Copies are
inserted where missing and counted as they are inserted (InboxStore.apply_deltas), exactly once
however often a fan-out is repeated; an insert killed before its $inc is found by the drift check.

The end (the window's `ends_at`, or DELETE) marks the coverer's copies `coverage_ended_at` (one
`update_many` on the indexed `coverage_id`), drops the pointer and notes `ended_at`. The pass that
ends windows is judged by services/kit/clock (`clock.on_advance("coverage_end")` for tests, and a
background worker every COVERAGE_END_INTERVAL_S); it is repeatable and safe when two processes run
it: each step is an idempotent conditional write, and `end_pending_at` is unset last.

The automatic answer names the coverer: the Staff or Patient Auto-Reply is composed by the
auto-reply service and sent through inbox (SendMessage, `auto_reply`) as a Reply of the away
person; while their coverage is in force inbox adds one line, "<coverer> is covering for me until
<end> UTC.", to that answer (a wrapper around Mailbox.reply installed by this feature). So the
coverage is stored once, where deliveries need it, and no new call or event between the services
is needed.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid

from flask import Blueprint, g, request
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.kit import clock
from services.kit.auth import Identity
from services.kit.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from services.kit.http import require_staff as staff_only
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.runtime import every
from services.kit.security_events import SecurityLog
from services.kit.validation import Id, Instant, json_body, path_id, query_int, validate

log = logging.getLogger(__name__)

COVERAGES = "coverages"
CURRENT = "coverage_current"
PRODUCER = "inbox"
MAX_WINDOW_DAYS = 90  # a longer absence is a reassignment, not coverage
MAX_WINDOW_MS = MAX_WINDOW_DAYS * 24 * 3600 * 1000
COVERAGE_END_INTERVAL_S = 2.0
END_BATCH = 100
HISTORY_LIMIT = 50
# Kinds a coverer receives copies of (reminders are one's own; Sent copies are not addressed to one).
COVERED_KINDS = (
    domain.KIND_MESSAGE,
    domain.KIND_PORTAL_MESSAGE,
    domain.KIND_NOTICE,
    domain.KIND_SIGNATURE_REQUEST,
    domain.KIND_SIGNATURE_OUTCOME,
)
ANSWERABLE_KINDS = (domain.KIND_MESSAGE, domain.KIND_PORTAL_MESSAGE)
# Not carried onto a copy: the owner's own state of the item, its outbox events (announced once, for
# the owner), and markers other passes look for (deadline passes, team queue state), which are the
# owner's item's to carry.
ITEM_ONLY = ("placed_by", "first_read_at", "version", "labels", "request_version", "my_response")
NOT_COPIED_PREFIXES = ("_outbox", "queue_")
NOT_COPIED_SUFFIXES = ("_pending_at",)


def copied_field(name: str) -> bool:
    return not (name in ITEM_ONLY or name.startswith(NOT_COPIED_PREFIXES) or name.endswith(NOT_COPIED_SUFFIXES))


SET_SPEC = {
    "coverer_id": Id(required=True),
    "starts_at": Instant(required=False),
    "ends_at": Instant(required=True),
}

INDEXES = [
    IndexSpec("board_items", [("coverage_id", 1), ("sort_key", -1)], name="coverage_sort"),
    IndexSpec(COVERAGES, [("owner_key", 1), ("created_at", -1)], name="coverage_owner"),
    IndexSpec(COVERAGES, [("end_pending_at", 1)], name="coverage_end_pending"),
]


def in_force(pointer: dict | None, now: int) -> bool:
    """Whether a coverage pointer covers the instant `now` (start included, end excluded)."""
    return pointer is not None and pointer["starts_at"] <= now < pointer["ends_at"]


def is_covered(item: dict) -> bool:
    """Whether an item is of a kind a coverer receives a copy of."""
    if item.get("kind") not in COVERED_KINDS or item.get("covering_for"):
        return False
    if item.get("origin_folder") == domain.FOLDER_SENT:
        return False
    # One's own requests and messages to oneself are not addressed to one by someone else.
    return item.get("sender_id") != item.get("owner_id")


def coverage_copy(item: dict, pointer: dict) -> dict | None:
    """The coverer's copy of one item (None when the coverer sent it), unread or read as the
    owner's item is, in the same folder, with the id the coverer's own item would have."""
    coverer = pointer["coverer_id"]
    if item.get("sender_id") == coverer:
        return None
    folder = item["origin_folder"]
    copy_id = domain.board_item_id(item["ref_id"], coverer, folder)
    copy = {k: v for k, v in item.items() if copied_field(k)}
    unread = bool(item.get("unread_board")) or (not item.get("board") and not item.get("read_at"))
    copy.update(
        _id=copy_id,
        owner_id=coverer,
        labels={},
        version=1,
        sort_key=domain.sort_key(item["sent_at"], copy_id),
        read_at=None if unread else item.get("read_at"),
        covering_for={"staff_id": item["owner_id"], "name": pointer.get("owner_name", "")},
        coverage_id=pointer["coverage_id"],
        covered_item_id=item["_id"],
        **domain.item_keys(
            item["agency_id"],
            coverer,
            item.get("folder") if item.get("board") else None,
            unread,
            bool(item.get("urgent")),
        ),
    )
    return copy


def answer_line(pointer: dict) -> str:
    """The line an automatic answer gets while the coverage is in force."""
    until = dt.datetime.fromtimestamp(pointer["ends_at"] / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
    return f"{pointer.get('coverer_name') or 'A colleague'} is covering for me until {until} UTC."


def status(doc: dict, now: int) -> str:
    """scheduled, active, ended (its window passed) or cleared (ended early, or replaced)."""
    if doc.get("cleared_at") and doc["cleared_at"] < doc["ends_at"]:
        return "cleared"
    if now < doc["starts_at"]:
        return "scheduled"
    return "active" if now < doc["ends_at"] else "ended"


def view(doc: dict, now: int) -> dict:
    return {
        "id": doc["_id"],
        "staff_id": doc["owner_id"],
        "staff_name": doc.get("owner_name", ""),
        "coverer": {"staff_id": doc["coverer_id"], "name": doc.get("coverer_name", "")},
        "starts_at": iso(doc["starts_at"]),
        "ends_at": iso(doc["ends_at"]),
        "status": status(doc, now),
        "cleared_at": iso(doc.get("cleared_at")),
        "ended_at": iso(doc.get("ended_at")),
        "copies": int(doc.get("copies") or 0),
        "created_at": iso(doc.get("created_at")),
        "set_by": doc.get("created_by", ""),
    }


class Coverage(Feature):
    """Coverage windows, the copies they make, their end and the owner's summary."""

    def __init__(self, components):
        super().__init__(components)
        db = components.store.db
        self.coverages = db[COVERAGES]
        self.current = db[CURRENT]
        self.security = SecurityLog(db, service=PRODUCER)

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        store = self.components.store
        store.copies = self.copies
        store.on_copies = self.copies_placed
        self._wrap_summary()
        self._wrap_reply()
        clock.on_advance("coverage_end", self.end_due)

    def background(self):
        def run(stop: threading.Event) -> None:
            every(
                stop,
                COVERAGE_END_INTERVAL_S,
                lambda: self.end_due(clock.now_ms()),
                "coverage end",
                errors=(PyMongoError, DomainError),
            )

        return [("coverage-end", run)]

    # --- hooks ------------------------------------------------------------------------------------
    def copies(self, items: list[dict]) -> list[dict]:
        """InboxStore.copies: the coverers' copies of `items` whose owners are covered now."""
        candidates = [item for item in items if is_covered(item)]
        if not candidates:
            return []
        keys = list(dict.fromkeys(domain.owner_key(i["agency_id"], i["owner_id"]) for i in candidates))
        now = clock.now_ms()
        pointers = {
            doc["_id"]: doc
            for doc in self.current.find({"_id": {"$in": keys}})
            if in_force(doc, now)  # one primary-key read for every owner of the batch
        }
        if not pointers:
            return []
        out: dict[str, dict] = {}
        for item in candidates:
            pointer = pointers.get(domain.owner_key(item["agency_id"], item["owner_id"]))
            copy = coverage_copy(item, pointer) if pointer else None
            if copy is not None:
                out.setdefault(copy["_id"], copy)
        return list(out.values())

    def copies_placed(self, placed: list[dict]) -> None:
        """InboxStore.on_copies: count the copies on their coverage; a copy placed after its coverage
        ended (a fan-out that read the pointer just before the end) is marked ended at once."""
        per_coverage: dict[str, int] = {}
        for copy in placed:
            per_coverage[copy["coverage_id"]] = per_coverage.get(copy["coverage_id"], 0) + 1
        for coverage_id, count in per_coverage.items():
            doc = self.coverages.find_one_and_update(
                {"_id": {"$eq": coverage_id}}, {"$inc": {"copies": count}}, projection={"ended_at": 1}
            )
            if doc is not None and doc.get("ended_at"):
                self._mark_copies(coverage_id, doc["ended_at"])

    def _wrap_summary(self) -> None:
        """Board listings and the reading pane show whom a copy is for (`covering_for`)."""
        board = self.components.board
        summary = board.summary

        def with_coverage(caller: Identity, item: dict) -> dict:
            out = summary(caller, item)
            cover = item.get("covering_for")
            if cover:
                out["covering_for"] = {
                    "staff_id": cover.get("staff_id", ""),
                    "name": cover.get("name", ""),
                    "coverage_id": item.get("coverage_id"),
                    "ended": bool(item.get("coverage_ended_at")),
                    "ended_at": iso(item.get("coverage_ended_at")),
                }
            return out

        board.summary = with_coverage

    def _wrap_reply(self) -> None:
        """An automatic answer (auto_reply) of a covered staff member names the coverer."""
        mailbox = self.components.mailbox
        reply = mailbox.reply

        def reply_naming_coverer(caller: Identity, message_id: str, *, body: str, auto_reply: bool = False, **kw):
            if auto_reply:
                pointer = self.pointer(caller.agency_id, caller.staff_id)
                if in_force(pointer, clock.now_ms()):
                    body = f"{body}\n\n{answer_line(pointer)}"
            return reply(caller, message_id, body=body, auto_reply=auto_reply, **kw)

        mailbox.reply = reply_naming_coverer

    # --- reads ------------------------------------------------------------------------------------
    def pointer(self, agency_id: str, staff_id: str) -> dict | None:
        return self.current.find_one({"_id": {"$eq": domain.owner_key(agency_id, staff_id)}})

    def get(self, caller: Identity, staff_id: str) -> dict:
        pointer = self.pointer(caller.agency_id, staff_id)
        doc = self.coverages.find_one({"_id": {"$eq": pointer["coverage_id"]}}) if pointer else None
        return {"coverage": view(doc, clock.now_ms()) if doc else None}

    def history(self, caller: Identity, staff_id: str, limit: int) -> dict:
        found = self.coverages.find({"owner_key": {"$eq": domain.owner_key(caller.agency_id, staff_id)}})
        docs = list(found.sort("created_at", DESCENDING).limit(limit))
        now = clock.now_ms()
        return {"items": [view(doc, now) for doc in docs]}

    def summary(self, caller: Identity, coverage_id: str, cursor: str | None, limit: int) -> dict:
        """What came in during a coverage (the coverer's copies, newest first) and, per item,
        whether the coverer read it and answered it (a reply in its thread; null for kinds that
        cannot be answered). Shows titles, so it is audited as one listing."""
        doc = self.coverages.find_one({"_id": {"$eq": coverage_id}})
        if doc is None or doc["agency_id"] != caller.agency_id or caller.staff_id not in (doc["owner_id"],):
            raise audit.refuse(
                self.components.store,
                caller,
                coverage_id,
                "read",
                resource_type="coverage",
                code="coverage_not_found",
                message="no such coverage",
            )
        query: dict = {"coverage_id": {"$eq": coverage_id}}
        if cursor is not None:
            query["sort_key"] = {"$lt": domain.decode_cursor(cursor)}
        board_items = self.components.store.board_items
        found = board_items.find(query, projection={"_outbox": 0}).sort("sort_key", DESCENDING).limit(limit + 1)
        items = list(found)
        more = len(items) > limit
        items = items[:limit]
        out = [self._summary_item(caller, doc, item) for item in items]
        audit.record_list(self.components.store, caller, "coverage_summary", coverage_id, len(out))
        return {
            "coverage": view(doc, clock.now_ms()),
            "items": out,
            "next_cursor": domain.encode_cursor(items[-1]["sort_key"]) if more and items else None,
        }

    def _summary_item(self, caller: Identity, coverage: dict, copy: dict) -> dict:
        shown = self.components.board.summary(caller, copy)
        answered_at = None
        if copy.get("kind") in ANSWERABLE_KINDS and copy.get("thread_id"):
            answered_at = self._answered_at(copy, coverage["coverer_id"])
        read_at = copy.get("read_at") or copy.get("first_read_at")
        return {
            "item_id": copy.get("covered_item_id"),
            "kind": shown["kind"],
            "folder": copy.get("origin_folder"),
            "ref_id": shown["ref_id"],
            "title": shown["title"],
            "sender": shown["sender"],
            "sent_at": shown["sent_at"],
            "read_by_coverer": bool(read_at),
            "read_at": iso(read_at),
            "answered_by_coverer": bool(answered_at) if copy.get("kind") in ANSWERABLE_KINDS else None,
            "answered_at": iso(answered_at),
        }

    def _answered_at(self, copy: dict, coverer_id: str) -> int | None:
        """When the coverer first answered in the item's thread after it arrived (indexed thread read)."""
        for message in self.components.store.thread_messages(copy["thread_id"], 500):
            if message.get("sender_id") == coverer_id and message["sent_at"] >= copy["sent_at"]:
                if message.get("in_reply_to") and not message.get("auto_reply"):
                    return message["sent_at"]
        return None

    # --- changes ----------------------------------------------------------------------------------
    def _people(self, staff_ids: list[str]) -> dict:
        """Active staff of the caller's agency among `staff_ids` (directory answers in that agency only)."""
        found, _missing = self.components.directory.staff(staff_ids)
        return {m.staff_id: m for m in found if m.active}

    def set(self, caller: Identity, staff_id: str, body: dict) -> dict:
        fields = validate(body, SET_SPEC)
        coverer_id = fields["coverer_id"]
        if coverer_id == staff_id:
            raise InvalidInput("invalid_coverer", "a staff member cannot cover for themself", {"field": "coverer_id"})
        now = clock.now_ms()
        starts = fields.get("starts_at", now)
        ends = fields["ends_at"]
        if ends <= starts:
            raise InvalidInput("invalid_window", "ends_at must be after starts_at", {"field": "ends_at"})
        if ends <= now:
            raise InvalidInput("invalid_window", "ends_at has already passed", {"field": "ends_at"})
        if ends - starts > MAX_WINDOW_MS:
            raise InvalidInput(
                "invalid_window", f"a coverage lasts at most {MAX_WINDOW_DAYS} days", {"field": "ends_at"}
            )
        people = self._people(list(dict.fromkeys([staff_id, coverer_id])))
        if staff_id not in people:
            raise NotFound("staff_not_found", "no such staff member")
        if coverer_id not in people:
            raise InvalidInput(
                "unknown_coverer", "the coverer is not an active staff member of this agency", {"field": "coverer_id"}
            )
        owner_key = domain.owner_key(caller.agency_id, staff_id)
        previous = self.current.find_one({"_id": {"$eq": owner_key}})
        if previous is not None:
            self._clear(previous["coverage_id"], caller, now)
            self.current.delete_one({"_id": {"$eq": owner_key}, "coverage_id": {"$eq": previous["coverage_id"]}})
        doc = {
            "_id": f"cov_{uuid.uuid4().hex[:24]}",
            "agency_id": caller.agency_id,
            "owner_id": staff_id,
            "owner_key": owner_key,
            "owner_name": people[staff_id].display_name,
            "coverer_id": coverer_id,
            "coverer_name": people[coverer_id].display_name,
            "starts_at": starts,
            "ends_at": ends,
            "end_pending_at": ends,
            "copies": 0,
            "created_at": now_ms(),
            "created_by": caller.staff_id,
        }
        self.coverages.insert_one(doc)
        pointer = {k: doc[k] for k in ("owner_name", "coverer_id", "coverer_name", "starts_at", "ends_at")}
        pointer["coverage_id"] = doc["_id"]
        # The previous window's end dropped its pointer; this one is created, once: of two sets racing,
        # one wins and the other's window is ended at once (never left "active" with no pointer).
        try:
            self.current.insert_one({"_id": owner_key, **pointer})
            won = True
        except DuplicateKeyError:
            won = False
        if not won:
            self._clear(doc["_id"], caller, now)
            raise Conflict(
                "coverage_changed", "the coverage was changed at the same time by another request: try again"
            )
        self._audit(caller, staff_id, "coverage set")
        return {"coverage": view(doc, now)}

    def clear(self, caller: Identity, staff_id: str) -> None:
        pointer = self.pointer(caller.agency_id, staff_id)
        if pointer is None:
            raise NotFound("coverage_not_found", "no coverage is set")
        self._clear(pointer["coverage_id"], caller, clock.now_ms())
        self._audit(caller, staff_id, "coverage cleared")

    def _clear(self, coverage_id: str, caller: Identity, now: int) -> None:
        """End a coverage now (DELETE, or a new one replacing it): noted first, so the end pass
        finishes it should this request stop half-way."""
        doc = self.coverages.find_one_and_update(
            {"_id": {"$eq": coverage_id}, "ended_at": {"$eq": None}},
            {"$set": {"cleared_at": now, "cleared_by": caller.staff_id, "end_pending_at": now}},
        )
        if doc is not None:
            self._end({**doc, "cleared_at": now}, now)

    def end_due(self, now: int) -> int:
        """The end pass: coverages whose window ended (or that were cleared) by `now`, oldest first."""
        found = self.coverages.find({"end_pending_at": {"$lte": now}}).sort("end_pending_at", 1).limit(END_BATCH)
        ended = 0
        for doc in list(found):
            self._end(doc, now)
            ended += 1
        return ended

    def _end(self, doc: dict, now: int) -> None:
        """Note the end, mark the coverer's copies ended, drop the pointer if it is still this
        coverage's, then unset `end_pending_at`. Each step is repeatable. The end is noted before the
        copies are marked: a copy placed meanwhile is either there when they are marked, or finds
        the end noted when it is counted (`copies_placed`) and is marked then."""
        at = doc.get("ended_at") or min(doc["ends_at"], doc.get("cleared_at") or doc["ends_at"], now)
        self.coverages.update_one({"_id": {"$eq": doc["_id"]}}, {"$set": {"ended_at": at}})
        self._mark_copies(doc["_id"], at)
        self.current.delete_one({"_id": {"$eq": doc["owner_key"]}, "coverage_id": {"$eq": doc["_id"]}})
        self.coverages.update_one({"_id": {"$eq": doc["_id"]}}, {"$unset": {"end_pending_at": ""}})
        log.info(
            "coverage ended",
            extra={"agency_id": doc["agency_id"], "staff_id": doc["owner_id"], "coverage_id": doc["_id"]},
        )

    def _mark_copies(self, coverage_id: str, at: int) -> None:
        self.components.store.board_items.update_many(
            {"coverage_id": {"$eq": coverage_id}, "coverage_ended_at": {"$eq": None}},
            {"$set": {"coverage_ended_at": at}},
        )

    def _audit(self, caller: Identity, staff_id: str, what: str) -> None:
        self.security.record(
            "settings_changed",
            agency_id=caller.agency_id,
            actor_id=caller.staff_id,
            actor_kind="staff",
            outcome="succeeded",
            reason=what,
            target_type="coverage",
            target_id=domain.owner_key(caller.agency_id, staff_id),
        )
        log.info(what, extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id})

    # --- HTTP -------------------------------------------------------------------------------------
    def blueprint(self):
        routes = Blueprint("coverage", __name__, url_prefix="/api/v1/board/coverage")

        def admin_target(staff_id: str) -> str:
            if not g.identity.is_admin:
                raise Forbidden("forbidden", "this action needs the admin role")
            return path_id(staff_id, "staff member")

        @routes.get("")
        @staff_only
        def mine():
            return self.get(g.identity, g.identity.staff_id)

        @routes.put("")
        @staff_only
        def set_mine():
            return self.set(g.identity, g.identity.staff_id, json_body())

        @routes.delete("")
        @staff_only
        def clear_mine():
            self.clear(g.identity, g.identity.staff_id)
            return "", 204

        @routes.get("/history")
        @staff_only
        def my_history():
            return self.history(g.identity, g.identity.staff_id, query_int("limit", 20, 1, HISTORY_LIMIT))

        @routes.get("/<coverage_id>/summary")
        @staff_only
        def summary(coverage_id: str):
            path_id(coverage_id, "coverage")
            cursor = request.args.get("cursor")
            return self.summary(g.identity, coverage_id, cursor, query_int("limit", 50, 1, 100))

        @routes.get("/staff/<staff_id>")
        @staff_only
        def theirs(staff_id: str):
            target = admin_target(staff_id)
            if target not in self._people([target]):
                raise NotFound("staff_not_found", "no such staff member")
            return self.get(g.identity, target)

        @routes.put("/staff/<staff_id>")
        @staff_only
        def set_theirs(staff_id: str):
            return self.set(g.identity, admin_target(staff_id), json_body())

        @routes.delete("/staff/<staff_id>")
        @staff_only
        def clear_theirs(staff_id: str):
            self.clear(g.identity, admin_target(staff_id))
            return "", 204

        return routes
