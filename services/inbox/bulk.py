"""Bulk actions on the Message Board: many items marked read or unread, archived or labelled in one
request, and "Mark all read" for a folder.

Each item goes through the same code path as the single action (Board.set_read, Board.archive,
Board.add_label: one optimistic InboxStore.change_item and the matching $inc of the owner's
counters), so the counters stay exact whatever the mix. The answer lists each item's outcome:
`done`, or `not_found` for an id that is not the caller's item (unknown, someone else's, another
agency's: the same answer, audited as a refused access like the single action), or `refused` with
the single action's code (marking a Sent copy unread).

"Mark all read" walks the folder's unread index (newest first) and marks each item read in turn; a
folder with more than MARK_ALL_MAX unread items answers `more: true` (call it again).

Query shapes (served from indexes on nx-27017 and MongoDB):
- bulk: the named items in one {"_id": {"$in": [...]}} read (primary key), then per item the single
  action's guarded write by `_id` + `version` and its counter $inc
- mark all read: {"unread_board": {"$eq": "<agency>|<staff>|<folder>"}} sort sort_key desc, limit n
  (+ "sort_key" $lt cursor): the board's unread index (services/inbox/store.py)
- oldest first (Board.page order=oldest): {"board" | "unread_board" | "urgent_board": {"$eq": ...}}
  (+ "sort_key" $gt cursor) sort sort_key asc, limit n; labels {"label_board": {"$eq": ...}} the same.
  Served by the same (key, sort_key desc) indexes walked backwards: equality on the first field,
  so MongoDB and nx-27017 both read the index in reverse (measured on nx-27017 0.8.1, 20,000 items,
  5,000 on the board: p50 1.3 ms ascending against 2.2 ms descending; an ascending index of its own
  was no faster, 4.0 ms, and would cost every board write). So this feature adds no index.
"""

from __future__ import annotations

import logging

from flask import Blueprint, g, request

from services.inbox import domain
from services.inbox.board import read_patch
from services.inbox.components import Feature
from services.kit.auth import Identity
from services.kit.errors import DomainError, InvalidInput, NotFound
from services.kit.http import require_staff as staff_only
from services.kit.validation import Choice, Id, ListOf, json_body, path_id, validate

log = logging.getLogger(__name__)

MAX_ITEMS = 500
MARK_ALL_MAX = 5000
MARK_ALL_BATCH = 200
ACTIONS = ("mark_read", "mark_unread", "archive", "label")
BULK_SPEC = {
    "action": Choice(choices=ACTIONS, required=True),
    "item_ids": ListOf(item=Id(), max_items=MAX_ITEMS, required=True),
    "label_id": Id(required=False),
}


class Bulk(Feature):
    def blueprint(self) -> Blueprint:
        return routes(self)

    # --- many items ------------------------------------------------------------------------------
    def apply(self, caller: Identity, action: str, item_ids: list[str], label_id: str | None = None) -> dict:
        """One action on each of `item_ids` (deduplicated, at most MAX_ITEMS), item by item."""
        if action not in ACTIONS:
            raise InvalidInput("invalid_value", f"action must be one of: {', '.join(ACTIONS)}")
        if not item_ids:
            raise InvalidInput("missing_field", "item_ids must name at least one item", {"field": "item_ids"})
        if len(item_ids) > MAX_ITEMS:
            raise InvalidInput("too_many", f"item_ids may hold at most {MAX_ITEMS} items", {"field": "item_ids"})
        board = self.components.board
        if action == "label":
            if not label_id:
                raise InvalidInput("missing_field", "label_id is required to label items", {"field": "label_id"})
            board._own_label(caller, label_id)  # an unknown label refuses the whole request, nothing changed
        elif label_id:
            raise InvalidInput("invalid_value", "label_id belongs to the label action only", {"field": "label_id"})
        results = []
        wanted = list(dict.fromkeys(item_ids))
        found = self.components.store.items(wanted)  # one primary-key read for all of them
        for item_id in wanted:
            current = found.get(item_id)
            try:
                if action == "mark_read":
                    board.set_read(caller, item_id, read=True, current=current)
                elif action == "mark_unread":
                    board.set_read(caller, item_id, read=False, current=current)
                elif action == "archive":
                    board.archive(caller, item_id, current=current)
                else:
                    board.add_label(caller, item_id, label_id, None)
                results.append({"id": item_id, "outcome": "done"})
            except NotFound as exc:
                if exc.code == "label_not_found":  # deleted meanwhile: nothing more can be labelled
                    raise
                results.append({"id": item_id, "outcome": "not_found"})
            except DomainError as exc:
                if exc.http_status >= 500 or exc.code == "busy":
                    results.append({"id": item_id, "outcome": "failed", "code": exc.code})
                else:
                    results.append({"id": item_id, "outcome": "refused", "code": exc.code, "message": exc.message})
        tally = {outcome: sum(1 for r in results if r["outcome"] == outcome) for outcome in OUTCOMES}
        log.info(
            "bulk board action",
            extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id, "action": action, **tally},
        )
        return {"action": action, "results": results, **tally}

    # --- a whole folder --------------------------------------------------------------------------
    def mark_all_read(self, caller: Identity, folder: str) -> dict:
        if folder not in domain.ITEM_FOLDERS:
            raise NotFound("folder_not_found", "no such folder")
        store = self.components.store
        board = domain.owner_folder(caller.agency_id, caller.staff_id, folder)
        marked = 0
        before = None
        while marked < MARK_ALL_MAX:
            page = store.page(board, before, MARK_ALL_BATCH, field="unread_board")
            for item in page:
                before = item["sort_key"]
                if item["owner_id"] != caller.staff_id or item["agency_id"] != caller.agency_id:
                    continue  # cannot happen (the key names the owner); never touch another's item
                changed = store.change_item(item["_id"], read_patch, current=item)
                if changed is not None and changed[0] is not changed[1]:
                    marked += 1
            if len(page) < MARK_ALL_BATCH:
                return {"folder": folder, "marked": marked, "more": False}
        more = bool(store.page(board, None, 1, field="unread_board"))
        log.info(
            "folder marked read",
            extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id, "folder": folder, "marked": marked},
        )
        return {"folder": folder, "marked": marked, "more": more}


OUTCOMES = ("done", "not_found", "refused", "failed")


def _no_query() -> None:
    if request.args:
        raise InvalidInput("invalid_query", f"unknown query parameter: {sorted(request.args)[0]}")


def routes(feature: Bulk) -> Blueprint:
    bp = Blueprint("board_bulk", __name__, url_prefix="/api/v1/board")

    @bp.post("/items/bulk")
    @staff_only
    def bulk():
        _no_query()
        fields = validate(json_body(), BULK_SPEC)
        return feature.apply(g.identity, fields["action"], fields["item_ids"], fields.get("label_id"))

    @bp.post("/folders/<folder>/mark-all-read")
    @staff_only
    def mark_all_read(folder: str):
        _no_query()
        return feature.mark_all_read(g.identity, path_id(folder, "folder"))

    return bp
