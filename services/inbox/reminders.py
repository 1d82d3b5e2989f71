"""Reminders a staff member sets for themself: hidden until due, then unread in Reminders; snooze, complete.

A reminder is one board item of kind `reminder` owned by its creator. Until its time comes it is
hidden (no folder, so it is in no listing and no counter) and carries `due_pending_at`; the due
worker finds it through the index on that field and makes it visible and unread in one optimistic
item write, together with its `board_item.delivered.v1` event (outbox). The write re-checks
`due_pending_at` and is guarded by the item's version, so several inbox replicas running the
worker count each arrival exactly once. Snoozing hides it again with a new `due_pending_at`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, g, request
from pymongo import DESCENDING

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Components, Feature
from services.inbox.delivery_rules import delivered_event
from services.inbox.http_api import idempotency_key, only_query, staff_only
from services.inbox.idempotency import IdempotentCreate
from services.inbox.store import BOARD_ITEMS, REMOVE
from services.kit.auth import Identity
from services.kit.errors import Conflict, InvalidInput
from services.kit.events import Envelope
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.runtime import every
from services.kit.validation import (
    Id,
    Instant,
    Link,
    Spec,
    Str,
    json_body,
    path_id,
    query_int,
    validate,
)

log = logging.getLogger(__name__)

TEXT_MAX_CHARS = 1000
MAX_SNOOZE_MINUTES = 7 * 24 * 60
DUE_BATCH = 200

# A staff member's reminders, newest first, pending ones included (they are in no board listing).
INDEXES = [IndexSpec(BOARD_ITEMS, [("reminder_owner", 1), ("created_key", -1)], name="reminder_owner_created")]

# How a reminder that is not the caller's is refused (404, audited).
NOT_FOUND = {"resource_type": "reminder", "code": "reminder_not_found", "message": "no such reminder"}

STATE_PENDING = "pending"
STATE_DUE = "due"
STATE_SNOOZED = "snoozed"
STATE_COMPLETED = "completed"


# --- pure rules ---------------------------------------------------------------------------------


def new_reminder_id() -> str:
    return f"rem_{uuid.uuid4().hex[:24]}"


def reminder_state(item: dict) -> str:
    if item.get("completed_at"):
        return STATE_COMPLETED
    if item.get("due_pending_at") is not None:
        return STATE_SNOOZED if item.get("snoozed_at") else STATE_PENDING
    return STATE_DUE


def due_patch(item: dict, now: int) -> dict | None:
    """The reminder arrives: visible and unread in Reminders, sorted as arrived at its due time.
    None when it is not (or no longer) due, so a second worker changes nothing."""
    due = item.get("due_pending_at")
    if item.get("kind") != domain.KIND_REMINDER or due is None or due > now or item.get("completed_at"):
        return None
    keys = domain.item_keys(item["agency_id"], item["owner_id"], domain.FOLDER_REMINDERS, unread=True, urgent=False)
    return {
        **keys,
        "due_pending_at": REMOVE,
        "read_at": None,
        "sent_at": due,
        "sort_key": domain.sort_key(due, item["_id"]),
        "arrived_at": item.get("arrived_at") or due,
    }


def snooze_patch(item: dict, until: int, now: int) -> dict:
    """Hide the reminder again until `until`."""
    if item.get("completed_at"):
        raise Conflict("reminder_completed", "a completed reminder cannot be snoozed")
    keys = domain.item_keys(item["agency_id"], item["owner_id"], None, unread=False, urgent=False)
    return {**keys, "due_pending_at": until, "remind_at": until, "snoozed_at": now}


def complete_patch(item: dict, now: int) -> dict | None:
    """Done: read, and never due again (a pending one stays hidden)."""
    if item.get("completed_at"):
        return None
    return {"completed_at": now, "read_at": item.get("read_at") or now, "unread_board": None, "due_pending_at": REMOVE}


# --- request fields -------------------------------------------------------------------------------


@dataclass
class Minutes(Spec):
    required: bool = False
    maximum: int = MAX_SNOOZE_MINUTES

    def clean(self, path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput("invalid_type", f"{path} must be a whole number", {"field": path})
        if not 1 <= value <= self.maximum:
            raise InvalidInput("invalid_value", f"{path} must be between 1 and {self.maximum}", {"field": path})
        return value


@dataclass
class ItemLink(Str):
    """What a reminder points at: an http(s) link, or the id of a patient or board item."""

    max_len: int = 2048

    def clean(self, path: str, value: Any) -> str:
        text = super().clean(path, value)
        if ":" in text:
            return Link().clean(path, text)
        if not Id().pattern.fullmatch(text):
            raise InvalidInput("invalid_link", f"{path} must be an http(s) URL or an id", {"field": path})
        return text


CREATE_SPEC = {
    "text": Str(max_len=TEXT_MAX_CHARS),
    "remind_at": Instant(),
    "link": ItemLink(required=False),
}
SNOOZE_SPEC = {"until": Instant(required=False), "minutes": Minutes()}


# --- the feature ------------------------------------------------------------------------------------


class Reminders(Feature):
    def __init__(self, components: Components, due_interval_s: float = 1.0):
        super().__init__(components)
        self.due_interval_s = due_interval_s

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        self.components.board.details[domain.KIND_REMINDER] = self.detail

    def background(self):
        return [("reminders-due", self.run_due)]

    # --- create, list, snooze, complete ---------------------------------------------------------
    def create(self, caller: Identity, text: str, remind_at: int, link: str | None = None) -> dict:
        """A new reminder: hidden until `remind_at`, or on the board at once when that has passed."""
        return self.create_once(caller, text, remind_at, link)[0]

    def create_once(
        self, caller: Identity, text: str, remind_at: int, link: str | None = None, idempotency_key: str | None = None
    ) -> tuple[dict, bool]:
        """`create` under the caller's Idempotency-Key (services/inbox/idempotency.py): (the reminder,
        whether this call made it). A repeat of the request answers the reminder the first one made."""
        self.components.board.require_compose(caller, domain.COMPOSE_REMINDER)
        keyed = IdempotentCreate(self.components.store, caller, idempotency_key, "reminder", text, remind_at, link)
        earlier = keyed.earlier()
        stored = self._stored(caller, earlier) if earlier else None
        if stored is not None:
            return self.view(caller, stored), False
        reminder_id = keyed.claim(new_reminder_id())
        item = self._new_item(caller, reminder_id, text, remind_at, link)
        if not self.components.store.insert_board_items([item]):  # a concurrent repeat wrote it first
            return self.view(caller, self._stored(caller, reminder_id) or item), False
        log.info("reminder set", extra={"staff_id": caller.staff_id, "agency_id": caller.agency_id})
        return self.view(caller, item), True

    def _stored(self, caller: Identity, reminder_id: str) -> dict | None:
        """The caller's reminder `reminder_id` as stored (its item's id is derived from it)."""
        item_id = domain.board_item_id(reminder_id, caller.staff_id, domain.FOLDER_REMINDERS)
        return self.components.store.item(item_id)

    def _new_item(self, caller: Identity, reminder_id: str, text: str, remind_at: int, link: str | None) -> dict:
        """The reminder's board item: hidden until `remind_at`, or visible and unread (with its
        delivery event) when that has passed."""
        now = now_ms()
        agency, cipher = caller.agency_id, self.components.cipher
        due_now = remind_at <= now
        fields = {
            "title": cipher.seal(agency, reminder_id, "title", text),
            "remind_at": remind_at,
            "created_at": now,
            "reminder_owner": domain.owner_key(agency, caller.staff_id),
            "created_key": domain.sort_key(now, reminder_id),
        }
        if link is not None:
            fields["link"] = cipher.seal(agency, reminder_id, "link", link)
        if due_now:
            fields["arrived_at"] = now
        else:
            fields["due_pending_at"] = remind_at
        item = domain.new_item(
            agency_id=agency,
            owner_id=caller.staff_id,
            folder=domain.FOLDER_REMINDERS,
            kind=domain.KIND_REMINDER,
            ref_id=reminder_id,
            at_ms=now,
            unread=True,
            visible=due_now,
            **fields,
        )
        if due_now:
            item.update(outbox_fields([delivered_event(item, True, now)]))
        return item

    def page(self, caller: Identity, cursor: str | None, limit: int) -> dict:
        """The caller's reminders in every state, newest first; recorded as one listing (audit)."""
        query: dict = {"reminder_owner": {"$eq": domain.owner_key(caller.agency_id, caller.staff_id)}}
        if cursor:
            query["created_key"] = {"$lt": domain.decode_cursor(cursor)}
        found = (
            self.components.store.board_items.find(query, projection={"_outbox": 0})
            .sort("created_key", DESCENDING)
            .limit(limit + 1)
        )
        docs = list(found)
        more = len(docs) > limit
        docs = docs[:limit]
        shown = [self.view(caller, doc) for doc in docs]
        audit.record_list(self.components.store, caller, "reminder_list", domain.FOLDER_REMINDERS, len(shown))
        return {
            "reminders": shown,
            "next_cursor": domain.encode_cursor(docs[-1]["created_key"]) if more else None,
        }

    def snooze(self, caller: Identity, item_id: str, until: int | None, minutes: int | None) -> dict:
        if (until is None) == (minutes is None):
            raise InvalidInput("invalid_value", "give either until or minutes")
        now = now_ms()
        until = until if until is not None else now + minutes * 60_000
        if until <= now:
            raise InvalidInput("invalid_time", "until must be in the future", {"field": "until"})
        item = self.own(caller, item_id, "snooze")
        return self._change(caller, item, lambda it: snooze_patch(it, until, now))

    def complete(self, caller: Identity, item_id: str) -> dict:
        item = self.own(caller, item_id, "complete")
        return self._change(caller, item, lambda it: complete_patch(it, now_ms()))

    def _change(self, caller: Identity, item: dict, change) -> dict:
        """Apply `change` to the reminder `own` just read (read again only if it changed meanwhile)."""
        changed = self.components.store.change_item(item["_id"], change, current=item)
        if changed is None:
            raise self._refuse(caller, item["_id"], "change")
        return self.view(caller, changed[1])

    def own(self, caller: Identity, item_id: str, action: str) -> dict:
        return self.components.board.own_item(caller, item_id, action, kind=domain.KIND_REMINDER, **NOT_FOUND)

    def _refuse(self, caller: Identity, item_id: str, action: str):
        return audit.refuse(self.components.store, caller, item_id, action, **NOT_FOUND)

    # --- views -------------------------------------------------------------------------------------
    def view(self, caller: Identity, item: dict) -> dict:
        agency, cipher = caller.agency_id, self.components.cipher
        link = item.get("link")
        return {
            "id": item["_id"],
            "text": cipher.open(agency, item["ref_id"], "title", item["title"]),
            "link": cipher.open(agency, item["ref_id"], "link", link) if link is not None else None,
            "state": reminder_state(item),
            "remind_at": iso(item.get("remind_at")),
            "created_at": iso(item.get("created_at")),
            "completed_at": iso(item.get("completed_at")),
            "folder": item.get("folder"),
            "read": bool(item.get("read_at")),
        }

    def detail(self, caller: Identity, item: dict) -> dict:
        """The reading pane of a reminder (Board.open_item); audited."""
        shown = self.view(caller, item)
        audit.record_read(self.components.store, caller, item["_id"], resource_type="reminder")
        return {key: shown[key] for key in ("text", "link", "state", "remind_at", "completed_at")}

    # --- the due worker ------------------------------------------------------------------------------
    def deliver_due(self, now: int | None = None) -> int:
        """Make every reminder whose time has come visible; returns how many this call delivered."""
        now = now_ms() if now is None else now
        store = self.components.store
        due = (
            store.board_items.find(
                {"due_pending_at": {"$lte": now}, "kind": {"$eq": domain.KIND_REMINDER}}, projection={"_id": 1}
            )
            .sort("due_pending_at", 1)
            .limit(DUE_BATCH)
        )
        delivered = 0
        for doc in list(due):
            try:
                changed = store.change_item(doc["_id"], lambda it: due_patch(it, now), _arrival_events)
            except Conflict:  # another replica keeps changing it; the next pass looks again
                continue
            if changed is not None and changed[0] is not changed[1]:
                delivered += 1
        return delivered

    def run_due(self, stop: threading.Event) -> None:
        every(stop, self.due_interval_s, self._due_pass, "reminder")

    def _due_pass(self) -> None:
        count = self.deliver_due()
        if count:
            log.info("reminders came due", extra={"count": count})

    # --- routes ---------------------------------------------------------------------------------------
    def blueprint(self):
        bp = Blueprint("reminders", __name__, url_prefix="/api/v1/reminders")

        @bp.post("")
        @staff_only
        def create():
            key = idempotency_key()
            fields = validate(json_body(), CREATE_SPEC)
            made, created = self.create_once(g.identity, fields["text"], fields["remind_at"], fields.get("link"), key)
            return made, 201 if created else 200

        @bp.get("")
        @staff_only
        def page():
            only_query("cursor", "limit")
            return self.page(g.identity, request.args.get("cursor") or None, query_int("limit", 20, 1, 100))

        @bp.post("/<item_id>/snooze")
        @staff_only
        def snooze(item_id: str):
            item_id = path_id(item_id, "reminder")
            fields = validate(json_body(), SNOOZE_SPEC)
            return self.snooze(g.identity, item_id, fields.get("until"), fields.get("minutes"))

        @bp.post("/<item_id>/complete")
        @staff_only
        def complete(item_id: str):
            return self.complete(g.identity, path_id(item_id, "reminder"))

        return bp


def _arrival_events(before: dict, after: dict) -> list[Envelope]:
    return [delivered_event(after, before.get("arrived_at") is None, after["sent_at"])]
