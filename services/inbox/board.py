"""One person's Message Board: the folder tree with its counters, pages with filters, the state of
each item (read, unread, archived, deleted), labels and the expand/collapse state of sections.

Every item change is one optimistic single-document write (InboxStore.change_item) followed by the
matching $inc of the owner's counters, so the tree is two primary-key reads and a short label list
whatever the size of the board. Anything that is not the caller's answers 404 (and is audited as a
refused access), never 403.

Listings show PHI (subjects, titles, summaries, label names), so every page and every answer that
names labels is recorded as one `phi.accessed.v1` event in one insert (services/inbox/audit.py).
Label names are stored sealed, unique through a keyed hash (services/inbox/label_names.py), so the
label list is sorted by name here, once the names are opened.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from pymongo import ASCENDING

from services.inbox import audit, domain
from services.inbox.label_names import LabelNames
from services.inbox.store import REMOVE, SEQ, InboxStore, counts_of, tokens_of
from services.kit.auth import Identity
from services.kit.crypto import PhiCipher
from services.kit.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from services.kit.mongo import now_ms

log = logging.getLogger(__name__)

# What counting an item reads (a recount reads whole boards: only the fields its contribution needs).
COUNT_PROJECTION = {"folder": 1, "board": 1, "unread_board": 1, "labels": 1, "sort_key": 1}
MAX_SCAN_BATCHES = 10  # a filtered page reads at most this many index batches, then returns a cursor
# Sections of the folder tree that can be expanded or collapsed: the label list under Messages,
# the notification folders as a group, and any folder.
SECTION_IDS = ("labels", "notifications", *domain.FOLDERS)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def collect(fetch, accept, before: str | None, limit: int, batch: int) -> tuple[list[dict], str | None]:
    """Fill a page newest first from an index (`fetch(before, n)` -> documents with `sort_key`),
    keeping what `accept` takes; stops after a bounded number of batches and hands back a cursor,
    so a sparse filter never scans a whole board. Returns (page, next cursor or None)."""
    out: list[dict] = []
    cursor = before
    for _ in range(MAX_SCAN_BATCHES):
        docs = fetch(cursor, batch)
        for doc in docs:
            cursor = doc["sort_key"]
            if accept(doc):
                out.append(doc)
                if len(out) > limit:
                    return out[:limit], out[limit - 1]["sort_key"]
        if len(docs) < batch:
            return out, None
    return out, cursor


@dataclass(frozen=True)
class Observation:
    """One board's stored counters beside a recount of its items (Board.observe). `busy`: a count
    moved while the items were read (no conclusion); `recounted` None: more items than allowed."""

    seq: int | None
    stored: dict[str, int]
    recounted: dict[str, int] | None
    items_read: int
    busy: bool
    tokens: dict[str, int]

    @property
    def drift(self) -> dict[str, int]:
        """stored - recounted (empty when they agree, or when nothing can be concluded)."""
        if self.busy or self.recounted is None:
            return {}
        return domain.add_deltas(self.stored, {k: -v for k, v in self.recounted.items()})


ORDERS = ("newest", "oldest", "urgent")
# Urgent first is two passes over indexes, each newest first: the urgent items (urgent_board), then
# the rest (board, urgent ones skipped). Its cursor names the pass: "u" or "r" + a key cursor ("r"
# alone: the rest from its start).
URGENT_PASS, REST_PASS = "u", "r"


@dataclass
class ItemFilter:
    unread: bool = False
    urgent: bool = False
    label_id: str | None = None
    kind: str | None = None
    order: str = "newest"
    not_urgent: bool = False  # the second pass of "urgent first"

    def accepts(self, item: dict) -> bool:
        if self.unread and not item.get("unread_board"):
            return False
        if self.urgent and not item.get("urgent_board"):
            return False
        if self.not_urgent and item.get("urgent_board"):
            return False
        if self.kind and item.get("kind") != self.kind:
            return False
        return not (self.label_id and self.label_id not in (item.get("labels") or {}))


@dataclass
class Board:
    store: InboxStore
    cipher: PhiCipher
    # Folder -> unread count for folders not made of the owner's items (announcements).
    extra_unread: dict[str, Callable[[Identity], int]] = field(default_factory=dict)
    # Item kind -> detail(caller, item) -> dict: the kind's own content for the reading pane
    # (opening it is audited by the provider).
    details: dict[str, Callable[[Identity, dict], dict]] = field(default_factory=dict)
    # The caller's agency's word for a patient ("Client", ...), from directory.
    terminology: Callable[[Identity], str] | None = None

    # --- the tree -----------------------------------------------------------
    def tree(self, caller: Identity) -> dict:
        owner = domain.owner_key(caller.agency_id, caller.staff_id)
        counters = self.store.counter_doc(owner)
        prefs = self.store.prefs(owner)
        patient = self._patient_term(caller)
        folders = []
        for folder in domain.FOLDERS:
            if folder in self.extra_unread:
                unread = self.extra_unread[folder](caller)
                total = None
            else:
                unread = max(0, int(counters.get(domain.unread_field(folder), 0)))
                total = max(0, int(counters.get(domain.total_field(folder), 0)))
            entry = {"id": folder, "name": domain.folder_name(folder, patient), "unread": unread}
            if total is not None:
                entry["total"] = total
            folders.append(entry)
        labels = self._labels(owner, counters)
        self._record_labels_shown(caller, labels)
        sections = {section: bool(prefs.get(f"x_{section}", 1)) for section in SECTION_IDS}
        return {
            "folders": folders,
            "labels": labels,
            "sections": sections,
            "compose": domain.composable(caller.roles),
        }

    def patient_term(self, caller: Identity) -> str:
        """The caller's agency's word for a patient ("Patient" when directory cannot say)."""
        return self._patient_term(caller)

    def _patient_term(self, caller: Identity) -> str:
        if self.terminology is None:
            return "Patient"
        try:
            return self.terminology(caller) or "Patient"
        except DomainError as exc:  # directory unavailable: the tree still answers, in default words
            log.warning("agency terminology unavailable (%s)", exc.code)
            return "Patient"

    def set_section(self, caller: Identity, section: str, expanded: bool) -> dict:
        if section not in SECTION_IDS:
            raise NotFound("section_not_found", "no such section")
        self.store.set_section(domain.owner_key(caller.agency_id, caller.staff_id), section, expanded)
        return {"section": section, "expanded": expanded}

    # --- pages ----------------------------------------------------------------
    def page(
        self,
        caller: Identity,
        folder: str,
        filters: ItemFilter,
        cursor: str | None,
        limit: int,
        *,
        audit_as: str = "board_list",
    ) -> dict:
        """One page of a folder (or of a label), recorded as a listing of that folder (resource type
        `audit_as`) or of that label (`label_items`)."""
        if folder not in domain.ITEM_FOLDERS:
            raise InvalidInput("invalid_query", f"folder must be one of: {', '.join(domain.ITEM_FOLDERS)}")
        if filters.order not in ORDERS:
            raise InvalidInput("invalid_query", f"order must be one of: {', '.join(ORDERS)}")
        board = domain.owner_folder(caller.agency_id, caller.staff_id, folder)
        label_id = self._own_label(caller, filters.label_id)["_id"] if filters.label_id else None

        def fetcher(field_name: str, ascending: bool = False):
            if label_id:
                return self._label_fetch(caller, label_id, ascending)
            return self._board_fetch(board, field_name, ascending)

        # A label listing is across folders only when asked for without a folder; with one, it is narrowed.
        narrow = None if filters.label_id and folder == domain.FOLDER_MESSAGES else folder
        field_name = "urgent_board" if filters.urgent else "unread_board" if filters.unread else "board"
        if filters.order == "urgent" and not filters.urgent:
            items, next_cursor = self._urgent_first(fetcher, filters, narrow, cursor, limit)
        else:
            before = domain.decode_cursor(cursor) if cursor else None
            fetch = fetcher(field_name, ascending=filters.order == "oldest")
            items, next_key = self._collect(fetch, filters, narrow, before, limit)
            next_cursor = domain.encode_cursor(next_key) if next_key else None
        shown = [self.summary(caller, item) for item in items]
        if filters.label_id:
            audit.record_list(self.store, caller, "label_items", filters.label_id, len(shown))
        else:
            audit.record_list(self.store, caller, audit_as, folder, len(shown))
        return {"items": shown, "next_cursor": next_cursor}

    def _urgent_first(self, fetcher, filters: ItemFilter, folder: str | None, cursor: str | None, limit: int):
        """Urgent items newest first, then the others newest first; (items, next cursor)."""
        phase, before = URGENT_PASS, None
        if cursor:
            phase, rest = cursor[:1], cursor[1:]
            if phase not in (URGENT_PASS, REST_PASS) or (phase == URGENT_PASS and not rest):
                raise InvalidInput("invalid_cursor", "the cursor is not valid")
            before = domain.decode_cursor(rest) if rest else None
        items: list[dict] = []
        if phase == URGENT_PASS:
            urgent = ItemFilter(unread=filters.unread, urgent=True, label_id=filters.label_id, kind=filters.kind)
            items, next_key = self._collect(fetcher("urgent_board"), urgent, folder, before, limit)
            if next_key:
                return items, URGENT_PASS + domain.encode_cursor(next_key)
            before = None
            if len(items) >= limit:
                return items, REST_PASS
        rest = ItemFilter(unread=filters.unread, label_id=filters.label_id, kind=filters.kind, not_urgent=True)
        field_name = "unread_board" if filters.unread else "board"
        more, next_key = self._collect(fetcher(field_name), rest, folder, before, limit - len(items))
        return items + more, REST_PASS + domain.encode_cursor(next_key) if next_key else None

    def _board_fetch(self, board: str, field_name: str, ascending: bool):
        if not ascending:
            return lambda after, n: self.store.page(board, after, n, field=field_name)

        def fetch(after, n):
            query: dict = {field_name: {"$eq": board}}
            if after is not None:
                query["sort_key"] = {"$gt": after}
            found = self.store.board_items.find(query, projection={"_outbox": 0})
            return list(found.sort("sort_key", ASCENDING).limit(n))

        return fetch

    def label_page(self, caller: Identity, label_id: str, cursor: str | None, limit: int, unread: bool) -> dict:
        label = self._own_label(caller, label_id)
        before = domain.decode_cursor(cursor) if cursor else None
        items, next_key = self._collect(
            self._label_fetch(caller, label["_id"]),
            ItemFilter(unread=unread, label_id=label["_id"]),
            None,
            before,
            limit,
        )
        shown = [self.summary(caller, item) for item in items]
        audit.record_list(self.store, caller, "label_items", label["_id"], len(shown))
        return {
            "label": {"id": label["_id"], "name": self._label_name(label)},
            "items": shown,
            "next_cursor": domain.encode_cursor(next_key) if next_key else None,
        }

    def _label_fetch(self, caller: Identity, label_id: str, ascending: bool = False):
        key = domain.label_board(caller.agency_id, caller.staff_id, label_id)

        def entries_after(after, n):
            if not ascending:
                return self.store.label_page(key, after, n)
            query: dict = {"label_board": {"$eq": key}}
            if after is not None:
                query["sort_key"] = {"$gt": after}
            return list(self.store.label_items.find(query).sort("sort_key", ASCENDING).limit(n))

        def fetch(after, n):
            entries = entries_after(after, n)
            found = self.store.items([e["item_id"] for e in entries])
            # Keep the entry order and page by the entry's key (an item's own key can move later, as a
            # reminder's does when it comes due); an entry whose item is gone still advances the cursor.
            return [
                {**found[e["item_id"]], "sort_key": e["sort_key"]}
                if e["item_id"] in found
                else {"sort_key": e["sort_key"], "_gone": True}
                for e in entries
            ]

        return fetch

    @staticmethod
    def _collect(fetch, filters: ItemFilter, folder: str | None, before: str | None, limit: int):
        """A page of visible items in `folder` (None: any) that pass the filters the index does not."""
        sparse = filters.kind or filters.label_id or (filters.unread and filters.urgent) or filters.not_urgent

        def accept(doc: dict) -> bool:
            if doc.get("_gone") or not doc.get("board"):
                return False
            return (folder is None or doc.get("folder") == folder) and filters.accepts(doc)

        return collect(fetch, accept, before, limit, batch=max(limit + 1, 50) if sparse else limit + 1)

    def summary(self, caller: Identity, item: dict) -> dict:
        agency = caller.agency_id
        if item.get("subject") is not None:
            title = self.cipher.open(agency, item.get("message_id") or item["ref_id"], "subject", item["subject"])
        elif item.get("title") is not None:
            title = self.cipher.open(agency, item["ref_id"], "title", item["title"])
        else:
            title = ""
        due_at = item.get("due_at")
        out = {
            "id": item["_id"],
            "kind": item.get("kind", domain.KIND_MESSAGE),
            "folder": item["folder"],
            "ref_id": item.get("ref_id") or item.get("message_id"),
            "title": title,
            "sender": {"id": item.get("sender_id", ""), "name": item.get("sender_name", "")},
            "urgent": bool(item.get("urgent")),
            "read": bool(item.get("read_at")),
            "labels": sorted(item.get("labels") or {}),
            "sent_at": iso(item["sent_at"]),
            "auto_reply": bool(item.get("auto_reply")),
        }
        if item.get("origin_folder") == domain.FOLDER_SENT or item.get("to_whole_agency"):
            # Whom a Sent copy went to (a row names them, not its sender), and a whole-agency mark.
            out["to"] = {
                "staff_ids": list(item.get("to_staff_ids") or []),
                "team_ids": list(item.get("to_team_ids") or []),
                "whole_agency": bool(item.get("to_whole_agency")),
            }
        for key in ("thread_id", "message_id", "priority", "severity", "status", "recipient_count", "sender_kind"):
            if item.get(key) is not None:
                out[key] = item[key]
        if item.get("summary") is not None:
            out["summary"] = self.cipher.open(agency, item["ref_id"], "summary", item["summary"])
        if due_at is not None:
            out["due_at"] = iso(due_at)
            out["overdue"] = due_at < now_ms() and not item.get("resolved_at") and not item.get("completed_at")
        if item.get("resolved_at"):
            out["resolved_at"] = iso(item["resolved_at"])
        if item.get("folder") == domain.FOLDER_ARCHIVE:
            out["archived_from"] = item.get("origin_folder")
        if item.get("recalled_at"):
            out["recalled_at"] = iso(item["recalled_at"])
        if item.get("queue_state"):  # a team's shared item (services/inbox/team_queue.py)
            claimer = item.get("queue_claimed_by") or ""
            out["queue"] = {
                "state": item["queue_state"],
                "claimed_by": {"id": claimer, "name": item.get("queue_claimed_by_name") or ""} if claimer else None,
            }
        return out

    # --- one item ---------------------------------------------------------------
    def own_item(
        self,
        caller: Identity,
        item_id: str,
        action: str,
        *,
        kind: str | None = None,
        resource_type: str = "board_item",
        code: str = "item_not_found",
        message: str = "no such item",
        current: dict | None = None,
    ) -> dict:
        """The caller's own item (of `kind`, when given); anything else is a 404, audited as refused.
        `current`: the item as just read with others (bulk actions; a stale copy only costs a retry
        of the guarded write)."""
        item = current if current is not None else self.store.item(item_id)
        if (
            item is None
            or item["agency_id"] != caller.agency_id
            or item["owner_id"] != caller.staff_id
            or (kind is not None and item.get("kind") != kind)
        ):
            raise audit.refuse(
                self.store, caller, item_id, action, resource_type=resource_type, code=code, message=message
            )
        return item

    def open_item(self, caller: Identity, item_id: str) -> dict:
        """The reading pane: the item with its kind's content; opening marks it read."""
        item = self.own_item(caller, item_id, "read")
        provider = self.details.get(item.get("kind", domain.KIND_MESSAGE))
        detail = provider(caller, item) if provider else {}
        if not item.get("read_at"):
            changed = self.store.change_item(item["_id"], read_patch, current=item)
            # Not changed: read meanwhile (shown as it is now), or taken back by a recall racing this
            # read, which the recall won: then it is gone, and so is the answer (404).
            item = changed[1] if changed else self.own_item(caller, item_id, "read")
        out = {**detail, **self.summary(caller, item)}
        if "queue" in detail:  # the queue's own record says more than the item's copy of it
            out["queue"] = detail["queue"]
        return out

    def set_read(self, caller: Identity, item_id: str, read: bool, current: dict | None = None) -> dict:
        item = self.own_item(caller, item_id, "mark_read" if read else "mark_unread", current=current)
        if not read and item.get("origin_folder") == domain.FOLDER_SENT:
            # Unread is a recipient's state (as for POST /messages/<id>/unread); Sent counts none.
            raise Conflict("not_received", "only a message you received can be marked unread")
        changed = self.store.change_item(item["_id"], read_patch if read else unread_patch, current=item)
        if changed is None:
            raise NotFound("item_not_found", "no such item")
        return self.summary(caller, changed[1])

    def archive(self, caller: Identity, item_id: str, current: dict | None = None) -> dict:
        item = self.own_item(caller, item_id, "archive", current=current)
        if not item.get("board"):
            raise Conflict("not_on_board", "the item is not on the board yet (a reminder before its time)")
        changed = self.store.change_item(item["_id"], lambda it: _move_patch(it, domain.FOLDER_ARCHIVE), current=item)
        if changed is None:
            raise NotFound("item_not_found", "no such item")
        return self.summary(caller, changed[1])

    def restore(self, caller: Identity, item_id: str) -> dict:
        item = self.own_item(caller, item_id, "restore")
        if item.get("folder") != domain.FOLDER_ARCHIVE:
            raise Conflict("not_archived", "the item is not in the archive")
        changed = self.store.change_item(item["_id"], lambda it: _move_patch(it, it.get("origin_folder")), current=item)
        if changed is None:
            raise NotFound("item_not_found", "no such item")
        return self.summary(caller, changed[1])

    def delete(self, caller: Identity, item_id: str) -> None:
        item = self.own_item(caller, item_id, "delete")
        self.store.delete_item(item["_id"], caller.staff_id)
        log.info(
            "board item deleted",
            extra={"staff_id": caller.staff_id, "agency_id": caller.agency_id, "item_id": item["_id"]},
        )

    # --- labels -------------------------------------------------------------------
    def labels(self, caller: Identity) -> list[dict]:
        owner = domain.owner_key(caller.agency_id, caller.staff_id)
        labels = self._labels(owner, self.store.counter_doc(owner))
        self._record_labels_shown(caller, labels)
        return labels

    def _record_labels_shown(self, caller: Identity, labels: list[dict]) -> None:
        """Label names are PHI (a patient's name can be one): an answer naming any is a listing."""
        if labels:
            audit.record_list(self.store, caller, "label_list", "labels", len(labels))

    def _labels(self, owner: str, counters: dict) -> list[dict]:
        """The owner's labels with their counts, by name regardless of case (sorted here: the stored
        key is a hash)."""
        named = [(self._label_name(label), label["_id"]) for label in self.store.owner_labels(owner)]
        named.sort(key=lambda pair: (domain.label_key(pair[0]), pair[0], pair[1]))
        return [
            {
                "id": label_id,
                "name": name,
                "unread": max(0, int(counters.get(domain.label_unread_field(label_id), 0))),
                "total": max(0, int(counters.get(domain.label_total_field(label_id), 0))),
            }
            for name, label_id in named
        ]

    @cached_property
    def label_names(self) -> LabelNames:
        """Sealing and keyed hashes of label names (made on first use: the recount tool has no cipher)."""
        return LabelNames(self.cipher)

    def _label_name(self, label: dict) -> str:
        """A stored label's name in clear. A document not in today's shape (a name stored in clear,
        or a key made with a previous master key) is rewritten, unless it changed meanwhile."""
        opened = self.label_names.open(label)
        if opened.rewrite is not None:
            self.store.rewrite_label_name(label["_id"], label.get("name_key"), opened.rewrite)
        return opened.name

    def _settle_labels(self, owner: str) -> None:
        """Bring the owner's labels to today's shape before a name is looked up or claimed, so the
        unique key of every one of them is comparable with the new one."""
        for label in self.store.owner_labels(owner):
            if self.label_names.stale(label):
                self._label_name(label)

    def create_label(self, caller: Identity, raw_name: str) -> dict:
        name, _ = domain.label_name(raw_name)
        owner = domain.owner_key(caller.agency_id, caller.staff_id)
        self._settle_labels(owner)
        return self._insert_label(caller, owner, name)

    def _insert_label(self, caller: Identity, owner: str, name: str) -> dict:
        label_id = domain.new_label_id()
        label = {
            "_id": label_id,
            "agency_id": caller.agency_id,
            "owner_id": caller.staff_id,
            "owner": owner,
            **self.label_names.fields(caller.agency_id, owner, label_id, name),
            "created_at": now_ms(),
        }
        if not self.store.insert_label(label):
            raise Conflict("label_exists", "you already have a label with that name")
        return {"id": label_id, "name": name, "unread": 0, "total": 0}

    def _own_label(self, caller: Identity, label_id: str) -> dict:
        label = self.store.label(label_id)
        if label is None or label["owner"] != domain.owner_key(caller.agency_id, caller.staff_id):
            raise NotFound("label_not_found", "no such label")
        return label

    def rename_label(self, caller: Identity, label_id: str, raw_name: str) -> dict:
        label = self._own_label(caller, label_id)
        name, _ = domain.label_name(raw_name)
        self._settle_labels(label["owner"])
        fields = self.label_names.fields(caller.agency_id, label["owner"], label["_id"], name)
        if not self.store.rename_label(label["_id"], label["owner"], fields):
            raise Conflict("label_exists", "you already have a label with that name")
        return {"id": label["_id"], "name": name}

    def delete_label(self, caller: Identity, label_id: str) -> None:
        """Take the label off every item (the items stay), then drop the label and its counters."""
        label = self._own_label(caller, label_id)
        key = domain.label_board(caller.agency_id, caller.staff_id, label["_id"])
        while True:
            entries = self.store.label_page(key, None, 500)
            if not entries:
                break
            for entry in entries:
                self.store.change_item(entry["item_id"], lambda it, lid=label["_id"]: _without_label(it, lid))
                self.store.remove_label_entry(label["_id"], entry["item_id"])
        self.store.delete_label(label["_id"])
        self.store.unset_counters(
            label["owner"], [domain.label_unread_field(label["_id"]), domain.label_total_field(label["_id"])]
        )

    def add_label(self, caller: Identity, item_id: str, label_id: str | None, new_name: str | None) -> dict:
        """Apply an existing label, or ("Add Label") create one by name (or reuse the owner's label of
        that name) and apply it in one step."""
        if bool(label_id) == bool(new_name):
            raise InvalidInput("invalid_value", "give either label_id or name")
        item = self.own_item(caller, item_id, "label")
        if label_id:
            label = self._own_label(caller, label_id)
            name = self._label_name(label)
        else:
            name, key = domain.label_name(new_name)
            owner = domain.owner_key(caller.agency_id, caller.staff_id)
            self._settle_labels(owner)
            label = self.store.label_by_name(owner, self.label_names.index.key(caller.agency_id, key))
            if label is None:
                created = self._insert_label(caller, owner, name)
                label = self._own_label(caller, created["id"])
            else:
                name = self._label_name(label)
        item = self._apply_label(caller, item, label)
        return {**self.summary(caller, item), "label": {"id": label["_id"], "name": name}}

    def remove_label(self, caller: Identity, item_id: str, label_id: str) -> dict:
        item = self.own_item(caller, item_id, "unlabel")
        return self.summary(caller, self._drop_label(item, self._own_label(caller, label_id)))

    def move_label(self, caller: Identity, item_id: str, from_label_id: str, to_label_id: str) -> dict:
        """Move a message from one label to another: the target is applied first, so it is never
        without either."""
        item = self.own_item(caller, item_id, "label")
        source = self._own_label(caller, from_label_id)
        target = self._own_label(caller, to_label_id)
        if source["_id"] not in (item.get("labels") or {}):
            raise NotFound("label_not_applied", "the item does not carry that label")
        if source["_id"] == target["_id"]:
            return self.summary(caller, item)
        item = self._apply_label(caller, item, target)
        return self.summary(caller, self._drop_label(item, source))

    def _apply_label(self, caller: Identity, item: dict, label: dict) -> dict:
        """The label's entry first (so a listing never misses the item), then the item; returns it."""
        self.store.add_label_entry(
            label["_id"], domain.label_board(caller.agency_id, caller.staff_id, label["_id"]), item
        )
        changed = self.store.change_item(item["_id"], lambda it: _with_label(it, label["_id"]), current=item)
        if changed is None:
            self.store.remove_label_entry(label["_id"], item["_id"])
            raise NotFound("item_not_found", "no such item")
        return changed[1]

    def _drop_label(self, item: dict, label: dict) -> dict:
        if label["_id"] not in (item.get("labels") or {}):
            raise NotFound("label_not_applied", "the item does not carry that label")
        changed = self.store.change_item(item["_id"], lambda it: _without_label(it, label["_id"]), current=item)
        self.store.remove_label_entry(label["_id"], item["_id"])
        return changed[1] if changed else item

    # --- recount (operations) ----------------------------------------------------------
    def recount(self, agency_id: str, owner_id: str) -> dict[str, int]:
        """The counters as the items say they should be (reads the whole board: a maintenance
        tool and the drift check, never a request path)."""
        counts, _ = self.recount_within(agency_id, owner_id, None)
        return counts or {}

    def recount_within(self, agency_id: str, owner_id: str, max_items: int | None) -> tuple[dict[str, int] | None, int]:
        """(the recount, items read); the recount is None when the board holds more than
        `max_items` visible items (reading stops there)."""
        counts: dict[str, int] = {}
        read = 0
        for item in self.store.owner_items(agency_id, owner_id, domain.ITEM_FOLDERS, projection=COUNT_PROJECTION):
            read += 1
            if max_items is not None and read > max_items:
                return None, read
            for key, value in domain.contribution(item).items():
                counts[key] = counts.get(key, 0) + value
        return {key: value for key, value in counts.items() if value}, read

    def stored_counts(self, agency_id: str, owner_id: str) -> dict[str, int]:
        return counts_of(self.store.counter_doc(domain.owner_key(agency_id, owner_id)))

    def observe(self, agency_id: str, owner_id: str, max_items: int | None = None) -> Observation:
        """The stored counters, a recount, and the counters again: when no count moved meanwhile
        (`seq` the same before and after), the two can be compared."""
        owner = domain.owner_key(agency_id, owner_id)
        before = self.store.counter_doc(owner)
        recounted, read = self.recount_within(agency_id, owner_id, max_items)
        after = self.store.counter_doc(owner) if recounted is not None else before
        busy = before.get(SEQ) != after.get(SEQ)
        return Observation(after.get(SEQ), counts_of(after), recounted, read, busy, tokens_of(after))

    def repair_counts(self, agency_id: str, owner_id: str, attempts: int = 8) -> dict[str, int]:
        """Move the stored counters to a recount; returns what differed (stored - recounted). The
        correction is one $inc guarded by `seq`, so a count moved meanwhile is never overwritten
        (the board is observed again)."""
        owner = domain.owner_key(agency_id, owner_id)
        for _ in range(attempts):
            observed = self.observe(agency_id, owner_id)
            if observed.busy:
                continue
            drift = observed.drift
            if not drift or self.store.correct_counters(owner, observed.seq, {k: -v for k, v in drift.items()}):
                return drift
        raise Conflict("busy", "the board's counters kept moving during the recount; try again")

    # --- compose permissions ----------------------------------------------------------
    @staticmethod
    def require_compose(caller: Identity, kind: str) -> None:
        if not domain.may_compose(caller.roles, kind):
            raise Forbidden("compose_not_allowed", f"your roles do not allow composing {kind.replace('_', ' ')}s")


# --- patches (pure: item -> fields to change) -----------------------------------------------------


def read_patch(item: dict) -> dict | None:
    if item.get("read_at"):
        return None
    return {"read_at": now_ms(), "unread_board": None}


def unread_patch(item: dict) -> dict | None:
    if not item.get("read_at") and (item.get("unread_board") or not item.get("board")):
        return None
    return {"read_at": None, "unread_board": item.get("board")}


def _move_patch(item: dict, folder: str | None) -> dict | None:
    if not folder or item.get("folder") == folder or not item.get("board"):
        return None
    keys = domain.item_keys(
        item["agency_id"], item["owner_id"], folder, unread=not item.get("read_at"), urgent=bool(item.get("urgent"))
    )
    keys["archived_at"] = now_ms() if folder == domain.FOLDER_ARCHIVE else REMOVE
    return keys


def _with_label(item: dict, label_id: str) -> dict | None:
    labels = dict(item.get("labels") or {})
    if label_id in labels:
        return None
    labels[label_id] = now_ms()
    return {"labels": labels}


def _without_label(item: dict, label_id: str) -> dict | None:
    labels = dict(item.get("labels") or {})
    if labels.pop(label_id, None) is None:
        return None
    return {"labels": labels}
