"""Team queues with claim: a message (or a patient-portal message) addressed to a team is one shared
queue item for the team's members, who can claim it, release it or mark it done; a reply by any
member marks it handled for all and is shown in the thread to every member.

Which messages are queue items: a staff message addressed to teams only (no colleague by name, not
the whole agency), and a portal message in a thread opened to a team. The queue's members are the
message's recipients (resolved from the team when it was sent; a recall takes a member out).

One record per queue (`team_queues`, `_id` = the message id) holds the state: `open`, `claimed`
(`claimed_by`, its name, `claimed_at`) or `done` (`done_by`, `done_at`, `done_via` the reply that
handled it), and `rev`. Every change is one conditional update of that one document guarded by the
`rev` it was read at, so of two members claiming at once exactly one wins; the other reads the
record again and is answered 409 `already_claimed` naming who holds it. The record is created at
the first action (an insert that a concurrent one may win; both then go on from the stored one).

The members' board items stay one per member (as every message's do) and are linked to the record:
each carries `queue_state`, `queue_claimed_by(_name)` and `queue_rev` (the record's revision it
shows), and is brought in line after every change through InboxStore.change_item, so each owner's
counters move by exactly the item's change (services/inbox/fanout.py discipline):
- claimed: every member but the claimer has the item taken out of their unread count
  (`unread_board` cleared, `queue_hid_at` noting it; `read_at` untouched: nobody read it, and read
  receipts stay true);
- done (or replied to): taken out of every member's unread count;
- open again (released): the items the claim took out come back unread (those their owner opened
  meanwhile stay read).
An item shows a newer revision only (`queue_rev`), so a late pass never undoes a newer one. The
change sets `sync_pending_at` in the same write, cleared (guarded by `rev`) once every item is in
line; the repair worker finishes the records whose marker is older than REPAIR_AFTER_MS (a crash
in between). A count moved by hand meanwhile is the drift check's, as for any item change.

Every claim, release and done is recorded as a `phi.accessed.v1` event (resource the message,
action `claim` / `release` / `done`); refusals to non-members are 404, audited as denied.
"""

from __future__ import annotations

import logging
import threading

from flask import Blueprint, g, request
from pymongo.errors import DuplicateKeyError, PyMongoError

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.inbox.fanout import MARKER as FANOUT_MARKER
from services.inbox.fanout import REPAIR_AFTER_MS
from services.inbox.store import REMOVE
from services.kit.auth import Identity
from services.kit.errors import Conflict, DomainError
from services.kit.http import require_staff as staff_only
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.runtime import every
from services.kit.validation import json_body, path_id, validate

log = logging.getLogger(__name__)

QUEUES = "team_queues"
MARKER = "sync_pending_at"
INDEXES = [IndexSpec(QUEUES, [(MARKER, 1)], name="team_queue_sync_pending")]
REPAIR_BATCH = 100
REPAIR_INTERVAL_S = 5.0
ATTEMPTS = 8

OPEN = "open"
CLAIMED = "claimed"
DONE = "done"
ACTIONS = ("claim", "release", "done")


# --- pure rules ---------------------------------------------------------------------------------------
def is_queue_message(message: dict) -> bool:
    """Whether a message is a team's shared queue item: addressed to teams only (a portal message:
    its thread opened to a team, whoever else replied there)."""
    if not message.get("to_team_ids") or message.get("to_whole_agency"):
        return False
    if message.get("sender_kind", "staff") == "patient":
        return True
    return message.get("kind", domain.KIND_MESSAGE) == domain.KIND_MESSAGE and not message.get("to_staff_ids")


def members(message: dict) -> list[str]:
    """The queue's members: the message's recipients, less those it was recalled from."""
    recalled = set((message.get("recall") or {}).get("recalled") or [])
    return [staff_id for staff_id in message.get("recipient_ids") or [] if staff_id not in recalled]


def new_record(message: dict) -> dict:
    return {
        "_id": message["_id"],
        "agency_id": message["agency_id"],
        "folder": message.get("recipient_folder", domain.FOLDER_MESSAGES),
        "members": members(message),
        "state": OPEN,
        "claimed_by": "",
        "claimed_by_name": "",
        "claimed_at": None,
        "done_by": "",
        "done_by_name": "",
        "done_at": None,
        "done_via": "",
        "rev": 0,
        "created_at": now_ms(),
    }


def transition(record: dict, action: str, caller: Identity, at_ms: int, via: str = "") -> dict | None:
    """The fields `action` by `caller` sets on the record, None when it changes nothing (asked again);
    a Conflict when it is not allowed in the record's state."""
    state, holder = record.get("state", OPEN), record.get("claimed_by") or ""
    if state == DONE:
        if action == "done":
            return None
        raise Conflict("already_done", "this team item was already handled", {"queue": queue_view(record)})
    if state == CLAIMED and holder != caller.staff_id:
        if action == "done" and via:  # a reply by any member handles it, whoever claimed it
            pass
        else:
            name = record.get("claimed_by_name") or holder
            raise Conflict(
                "already_claimed",
                f"claimed by {name}",
                {"claimed_by": {"id": holder, "name": record.get("claimed_by_name", "")}},
            )
    if action == "claim":
        if state == CLAIMED:
            return None  # the caller holds it already
        return {"state": CLAIMED, "claimed_by": caller.staff_id, "claimed_by_name": caller.name, "claimed_at": at_ms}
    if action == "release":
        if state == OPEN:
            return None
        return {"state": OPEN, "claimed_by": "", "claimed_by_name": "", "claimed_at": None}
    return {"state": DONE, "done_by": caller.staff_id, "done_by_name": caller.name, "done_at": at_ms, "done_via": via}


def hidden_for(record: dict, owner_id: str) -> bool:
    """Whether the queue's state keeps the item out of this member's unread count."""
    state = record.get("state", OPEN)
    return state == DONE or (state == CLAIMED and record.get("claimed_by") != owner_id)


def item_patch(item: dict, record: dict, at_ms: int) -> dict | None:
    """What brings one member's item in line with the record (None: it shows this revision or a
    newer one already). Only the unread key moves; `read_at` (the owner's own reading) never."""
    rev = int(record.get("rev") or 0)
    shown = item.get("queue_rev")
    if shown is not None and int(shown) >= rev:
        return None
    patch: dict = {
        "queue_state": record.get("state", OPEN),
        "queue_claimed_by": record.get("claimed_by") or "",
        "queue_claimed_by_name": record.get("claimed_by_name") or "",
        "queue_rev": rev,
    }
    if hidden_for(record, item["owner_id"]):
        if item.get("unread_board"):
            patch["unread_board"] = None
            patch["queue_hid_at"] = at_ms
    elif item.get("queue_hid_at"):
        patch["queue_hid_at"] = REMOVE
        if not item.get("read_at") and item.get("board"):
            patch["unread_board"] = item["board"]
    return patch


def placed_fields(message: dict) -> dict:
    """The queue fields a member's item is placed with (the queue open, before any record)."""
    if not is_queue_message(message):
        return {}
    return {"queue_state": OPEN, "queue_claimed_by": "", "queue_claimed_by_name": "", "queue_rev": 0}


def _person(staff_id: str, name: str) -> dict | None:
    return {"id": staff_id, "name": name} if staff_id else None


def queue_view(record: dict) -> dict:
    """A queue's state as answers show it."""
    return {
        "state": record.get("state", OPEN),
        "claimed_by": _person(record.get("claimed_by") or "", record.get("claimed_by_name") or ""),
        "claimed_at": iso(record.get("claimed_at")),
        "done_by": _person(record.get("done_by") or "", record.get("done_by_name") or ""),
        "done_at": iso(record.get("done_at")),
        "handled_by_reply": record.get("done_via") or None,
    }


def shared_in_thread(staff_id: str, agency_id: str, docs: list[dict]) -> set[str]:
    """Messages of a thread shown to `staff_id` because they are a member of a team queue in it: every
    staff message a fellow member sent there (a reply to the patient or to the sender)."""
    fellows: set[str] = set()
    for doc in docs:
        if doc["agency_id"] == agency_id and is_queue_message(doc) and staff_id in members(doc):
            fellows.update(members(doc))
    if not fellows:
        return set()
    return {
        doc["_id"]
        for doc in docs
        if doc["agency_id"] == agency_id
        and doc.get("sender_kind", "staff") == "staff"
        and doc.get("sender_id") in fellows
    }


# --- the feature ---------------------------------------------------------------------------------------
class TeamQueue(Feature):
    """The queue records, the members' items kept in line with them, and the routes."""

    def __init__(self, components):
        super().__init__(components)
        self.queues = components.store.db[QUEUES]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        self.components.mailbox.queue = self

    # --- hooks the mailbox calls ---------------------------------------------------------------------
    @staticmethod
    def placed_fields(message: dict) -> dict:
        return placed_fields(message)

    def view(self, message: dict) -> dict | None:
        """The queue state shown with a message (None: not a queue item)."""
        if not is_queue_message(message):
            return None
        record = self.queues.find_one({"_id": {"$eq": message["_id"]}})
        return queue_view(record or new_record(message))

    @staticmethod
    def shared_in_thread(caller: Identity, docs: list[dict]) -> set[str]:
        return shared_in_thread(caller.staff_id, caller.agency_id, docs)

    def replied(self, caller: Identity, original: dict, reply_id: str) -> None:
        """A member's reply handles the item for every member."""
        if not is_queue_message(original) or caller.staff_id not in members(original):
            return
        try:
            self._change(caller, original, "done", via=reply_id)
            self._audit(caller, original, "done")
        except DomainError as exc:  # the reply stands; the item stays as it was (the member can mark it done)
            log.warning("team item not marked handled by a reply (%s)", exc.code, extra={"message_id": original["_id"]})

    # --- actions -------------------------------------------------------------------------------------
    def _member_message(self, caller: Identity, message_id: str, action: str) -> dict:
        """The message if the caller is one of its recipients (404 otherwise, audited); 409 when it is
        not a team's queue item."""
        message = self.components.store.message(message_id)
        if message is None or message["agency_id"] != caller.agency_id or caller.staff_id not in members(message):
            raise audit.refuse(self.components.store, caller, message_id, action)
        if not is_queue_message(message):
            raise Conflict("not_a_team_item", "only a message addressed to a team can be claimed, released or done")
        if FANOUT_MARKER in message:  # some members' items may not be on their boards yet
            raise Conflict("busy", "the message is still being delivered; try again")
        return message

    def act(self, caller: Identity, message_id: str, action: str) -> dict:
        message = self._member_message(caller, message_id, action)
        record = self._change(caller, message, action)
        self._audit(caller, message, action)
        log.info(
            "team item %s",
            action,
            extra={"message_id": message["_id"], "agency_id": caller.agency_id, "staff_id": caller.staff_id},
        )
        return {"message_id": message["_id"], **queue_view(record)}

    def _audit(self, caller: Identity, message: dict, action: str) -> None:
        event = audit.accessed_event(caller, message["_id"], action=action, patient_id=message.get("patient_id", ""))
        audit.record_access(self.components.store, event, message["_id"], action, caller)

    def _record(self, message: dict) -> dict:
        record = self.queues.find_one({"_id": {"$eq": message["_id"]}})
        if record is not None:
            return record
        record = new_record(message)
        try:
            self.queues.insert_one(record)
        except DuplicateKeyError:
            record = self.queues.find_one({"_id": {"$eq": message["_id"]}})
        return record

    def _change(self, caller: Identity, message: dict, action: str, via: str = "") -> dict:
        """One conditional write of the record (guarded by the revision read), then the members'
        items brought in line; the record as it stands after."""
        record = self._record(message)
        for _ in range(ATTEMPTS):
            at = now_ms()
            fields = transition(record, action, caller, at, via)
            if fields is None:
                if MARKER in record:
                    self.sync(record)
                return record
            rev = int(record.get("rev") or 0)
            update = {"$set": {**fields, "rev": rev + 1, MARKER: at}}
            guard = {"_id": {"$eq": record["_id"]}, "rev": {"$eq": rev}}
            if self.queues.update_one(guard, update).matched_count:
                record = {**record, **fields, "rev": rev + 1, MARKER: at}
                self.sync(record)
                return record
            record = self.queues.find_one({"_id": {"$eq": record["_id"]}})  # changed meanwhile: decide again
        raise Conflict("busy", "the team item is being changed by another request; try again")

    def sync(self, record: dict) -> None:
        """Every member's item in line with the record, then its marker cleared (unless a newer
        revision was written meanwhile: that one's pass clears it)."""
        store = self.components.store
        at = now_ms()
        for staff_id in record.get("members") or []:
            item_id = domain.board_item_id(record["_id"], staff_id, record.get("folder", domain.FOLDER_MESSAGES))
            store.change_item(item_id, lambda item: item_patch(item, record, at))
        self.queues.update_one({"_id": {"$eq": record["_id"]}, "rev": {"$eq": record["rev"]}}, {"$unset": {MARKER: ""}})

    def repair_pending(self, older_than_ms: int | None = None, limit: int = REPAIR_BATCH) -> int:
        """Finish the records whose items were left out of line (a crash after the record's write)."""
        cutoff = now_ms() - REPAIR_AFTER_MS if older_than_ms is None else older_than_ms
        found = list(self.queues.find({MARKER: {"$lte": cutoff}}).sort(MARKER, 1).limit(limit))
        for record in found:
            self.sync(record)
        return len(found)

    def run_repairs(self, stop: threading.Event) -> None:
        every(stop, REPAIR_INTERVAL_S, self.repair_pending, "team queue repair", errors=(PyMongoError, DomainError))

    def background(self) -> list:
        return [("team-queue-repair", self.run_repairs)]

    # --- HTTP ----------------------------------------------------------------------------------------
    def blueprint(self):
        queue = Blueprint("team_queue", __name__, url_prefix="/api/v1/messages")

        def route(action: str):
            @staff_only
            def view(message_id: str):
                if request.get_data(cache=True):
                    validate(json_body(), {})  # nothing to send: any field is refused
                return self.act(g.identity, path_id(message_id, "message"), action)

            view.__name__ = f"{action}_team_item"
            queue.add_url_rule(f"/<message_id>/{action}", view.__name__, view, methods=["POST"])

        for action in ACTIONS:
            route(action)
        return queue
