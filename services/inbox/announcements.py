"""Agency Announcement: one document per announcement, read and acknowledgement state per staff member.

An announcement is stored ONCE for its agency (encrypted title and body, author, expiry, whether
an acknowledgement is required) with its `announcement.posted.v1` event in the same insert. Posting
therefore resolves no staff and writes one document whatever the size of the agency. What each
staff member did with it lives in a state document of its own, created lazily the first time they
read or acknowledge it (`_id` = "<announcement id>|<staff id>").

Index keys (see docs/storage.md for why each is an `$eq` plus an indexed sort):
- `agency_key` = agency id, always: the admin's listing with expired announcements.
- `active_key` = agency id while the announcement is not expired, None once it is: the staff
  listing and the folder's unread count. An announcement whose `expires_at` passed is retired
  (its `active_key` cleared) by the first listing or count that sees it, so the active index
  holds only the few live announcements.
- state `ack_key` = announcement id once acknowledged: the admin's acknowledged list.

The unread count of the folder is the active announcements (the newest ACTIVE_LIMIT) minus the
ones the caller has read, found by one `_id $in` lookup of the caller's state documents: its cost
depends on neither the agency's size nor the caller's board. An author's own announcement counts
as read for them.

An announcement that asks for acknowledgement may name an `acknowledge_by` time (in the future, at or
before its expiry): who has not acknowledged by then is reminded, and the author later gets the list
(services/inbox/deadlines.py, which reads the state documents through the `ack_key` index).

Only agency admins (compose permission "announcement") create, edit, expire and see who has
acknowledged; everyone in the agency lists and reads the active ones. Announcements are not
messages: there is no reply route here, and /api/v1/messages/<announcement id>/reply (or
reply-all) answers 404 because no message of that id is on anyone's board.
"""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, g, request
from google.protobuf.timestamp_pb2 import Timestamp
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from clinic.inbox.v1 import inbox_pb2
from services.inbox import audit, domain
from services.inbox.board import collect, iso
from services.inbox.components import Feature
from services.inbox.deadlines import first_step
from services.inbox.http_api import idempotency_key, only_query, staff_only
from services.inbox.idempotency import IdempotentCreate
from services.kit import clock
from services.kit.auth import Identity
from services.kit.errors import Conflict, InvalidInput
from services.kit.events import new_envelope
from services.kit.logs import correlation_id_var
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.validation import Bool, Str, instant_ms, json_body, path_id, query_bool, query_int, validate

log = logging.getLogger(__name__)

ANNOUNCEMENTS = "announcements"
STATES = "announcement_states"
PRODUCER = "inbox"
ACTIVE_LIMIT = 200  # the unread count looks at this many newest active announcements
# The sealed content is not needed to count or to page through state.
WITHOUT_CONTENT = {"_outbox": 0, "title": 0, "body": 0}

INDEXES = [
    IndexSpec(ANNOUNCEMENTS, [("agency_key", 1), ("sort_key", -1)], name="agency_sort"),
    IndexSpec(ANNOUNCEMENTS, [("active_key", 1), ("sort_key", -1)], name="active_sort"),
    IndexSpec(STATES, [("ack_key", 1), ("acknowledged_at", 1)], name="acknowledged"),
]


def new_announcement_id() -> str:
    return f"ann_{uuid.uuid4().hex}"


def state_id(announcement_id: str, staff_id: str) -> str:
    return f"{announcement_id}|{staff_id}"


def is_active(doc: dict, at_ms: int) -> bool:
    expires_at = doc.get("expires_at")
    return bool(doc.get("active_key")) and (expires_at is None or expires_at > at_ms)


def parse_expiry(text: str, at_ms: int) -> int:
    """An ISO-8601 time with a zone, in the future, as epoch ms."""
    ms = instant_ms("expires_at", text, code="invalid_value")
    if ms <= at_ms:
        raise InvalidInput("invalid_value", "expires_at must be in the future", {"field": "expires_at"})
    return ms


def check_acknowledge_by(acknowledge_by: int | None, ack_required: bool, expires_at: int | None) -> None:
    """An acknowledge-by time needs an announcement that asks for acknowledgement, lies in the
    future by the deadline clock, and not after the announcement expires."""
    if acknowledge_by is None:
        return
    if not ack_required:
        raise InvalidInput(
            "invalid_value", "acknowledge_by needs acknowledgement_required", {"field": "acknowledge_by"}
        )
    if acknowledge_by <= clock.now_ms():
        raise InvalidInput("invalid_value", "acknowledge_by must be in the future", {"field": "acknowledge_by"})
    if expires_at is not None and acknowledge_by > expires_at:
        raise InvalidInput("invalid_value", "acknowledge_by must not be after expires_at", {"field": "acknowledge_by"})


def non_blank(fields: dict, name: str) -> None:
    if name in fields and not fields[name].strip():
        raise InvalidInput("invalid_value", f"{name} must not be empty", {"field": name})


class Announcements(Feature):
    outbox_collections = (ANNOUNCEMENTS,)

    def __init__(self, components):
        super().__init__(components)
        db = components.store.db
        self.db = db
        self.announcements = db[ANNOUNCEMENTS]
        self.states = db[STATES]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, INDEXES)

    def attach(self) -> None:
        self.components.board.extra_unread[domain.FOLDER_ANNOUNCEMENTS] = self.unread_count

    # --- admin: post, edit, expire ------------------------------------------------------
    def post(
        self, caller: Identity, title: str, body: str, expires_at: int | None = None, ack_required: bool = False
    ) -> dict:
        """One insert: the announcement with its posted event. No staff is resolved or written."""
        return self.post_once(caller, title, body, expires_at, ack_required)[0]

    def post_once(
        self,
        caller: Identity,
        title: str,
        body: str,
        expires_at: int | None = None,
        ack_required: bool = False,
        *,
        idempotency_key: str | None = None,
        acknowledge_by: int | None = None,
    ) -> tuple[dict, bool]:
        """`post` under the caller's Idempotency-Key (services/inbox/idempotency.py): (the
        announcement, whether this call posted it). A repeat is answered with the announcement the
        first one posted, even once its expiry has passed."""
        self.components.board.require_compose(caller, domain.COMPOSE_ANNOUNCEMENT)
        asked = (title, body, expires_at, bool(ack_required))
        if acknowledge_by is not None:  # (the digest of a request without one stays what it was)
            asked = (*asked, acknowledge_by)
        keyed = IdempotentCreate(self.components.store, caller, idempotency_key, "announcement", *asked)
        earlier = keyed.earlier()
        stored = self._stored(earlier) if earlier else None
        if stored is not None:
            return self._view(caller, stored, self._states([stored["_id"]], caller.staff_id)), False
        posted_at = now_ms()
        if expires_at is not None and expires_at <= posted_at:
            raise InvalidInput("invalid_value", "expires_at must be in the future", {"field": "expires_at"})
        check_acknowledge_by(acknowledge_by, bool(ack_required), expires_at)
        announcement_id = keyed.claim(new_announcement_id())
        doc = self._new_announcement(
            caller, announcement_id, title=title, body=body, expires_at=expires_at, ack=ack_required, at=posted_at
        )
        if acknowledge_by is not None:
            doc.update({"acknowledge_by": acknowledge_by, **first_step(acknowledge_by)})
        try:
            self.announcements.insert_one(doc)
        except DuplicateKeyError:  # a concurrent repeat of the same Idempotency-Key posted it first
            stored = self._stored(announcement_id)
            if stored is not None:
                return self._view(caller, stored, self._states([stored["_id"]], caller.staff_id)), False
            raise
        log.info("announcement posted", extra={"staff_id": caller.staff_id, "agency_id": caller.agency_id})
        self._indexed(doc, title, body)
        return self._view(caller, doc, {}, title), True

    def _indexed(self, doc: dict, title: str, body: str) -> None:
        """Make the announcement findable by search (services/inbox/search.py) with the words at hand.
        A failure leaves it posted and unfound until `python -m services.inbox.search reindex`."""
        hook = self.components.store.on_announcement
        if hook is None:
            return
        try:
            hook(doc, title, body)
        except PyMongoError:
            log.warning("announcement not indexed for search", extra={"agency_id": doc["agency_id"]})

    def _stored(self, announcement_id: str) -> dict | None:
        return self.announcements.find_one({"_id": {"$eq": announcement_id}}, projection={"_outbox": 0})

    def _new_announcement(
        self,
        caller: Identity,
        announcement_id: str,
        *,
        title: str,
        body: str,
        expires_at: int | None,
        ack: bool,
        at: int,
    ) -> dict:
        """The announcement's document, with its posted event in the same insert."""
        cipher, agency = self.components.cipher, caller.agency_id
        doc = {
            "_id": announcement_id,
            "agency_id": agency,
            "agency_key": agency,
            "active_key": agency,
            "sort_key": domain.sort_key(at, announcement_id),
            "title": cipher.seal(agency, announcement_id, "title", title),
            "body": cipher.seal(agency, announcement_id, "body", body),
            "posted_by": caller.staff_id,
            "posted_by_name": caller.name,
            "posted_at": at,
            "expires_at": expires_at,
            "ack_required": int(ack),
            "edited_at": None,
            "version": 1,
        }
        doc.update(outbox_fields([self._posted_event(doc)]))
        return doc

    def _posted_event(self, doc: dict):
        posted_at = Timestamp()
        posted_at.FromMilliseconds(doc["posted_at"])
        payload = inbox_pb2.AnnouncementPosted(
            announcement_id=doc["_id"],
            agency_id=doc["agency_id"],
            posted_by_staff_id=doc["posted_by"],
            acknowledgement_required=bool(doc["ack_required"]),
            posted_at=posted_at,
        )
        return new_envelope(
            "announcement.posted.v1",
            payload,
            agency_id=doc["agency_id"],
            producer=PRODUCER,
            correlation_id=correlation_id_var.get(),
            event_id=f"{doc['_id']}-posted",
        )

    def edit(self, caller: Identity, announcement_id: str, changes: dict) -> dict:
        """Change title, body, expiry (None: never expires) or whether acknowledgement is required.
        `changes` holds only the fields to change, already validated."""
        self.components.board.require_compose(caller, domain.COMPOSE_ANNOUNCEMENT)
        doc = self._visible(caller, announcement_id, "edit")
        cipher, agency = self.components.cipher, caller.agency_id
        patch: dict = {"edited_at": now_ms(), "edited_by": caller.staff_id}
        for field in ("title", "body"):
            if field in changes:
                patch[field] = cipher.seal(agency, doc["_id"], field, changes[field])
        if "expires_at" in changes:
            patch["expires_at"] = changes["expires_at"]
            patch["active_key"] = agency
        if "ack_required" in changes:
            patch["ack_required"] = int(changes["ack_required"])
        view = self._apply(caller, doc, patch)
        if "title" in changes or "body" in changes:  # new words are added; the old ones find nothing new
            texts = {f: changes.get(f) or cipher.open(agency, doc["_id"], f, doc[f]) for f in ("title", "body")}
            self._indexed(doc, texts["title"], texts["body"])
        return view

    def expire(self, caller: Identity, announcement_id: str) -> dict:
        """Expire now: gone from everyone's folder and count; admins still list it with include_expired."""
        self.components.board.require_compose(caller, domain.COMPOSE_ANNOUNCEMENT)
        doc = self._visible(caller, announcement_id, "expire")
        at = now_ms()
        if not is_active(doc, at):
            return self._view(caller, doc, self._states([doc["_id"]], caller.staff_id))
        return self._apply(caller, doc, {"expires_at": at, "active_key": None, "expired_by": caller.staff_id})

    def _apply(self, caller: Identity, doc: dict, patch: dict) -> dict:
        """One write guarded by the version read, so a concurrent edit is never silently lost."""
        guard = {"_id": {"$eq": doc["_id"]}, "version": {"$eq": doc["version"]}}
        update = {"$set": {**patch, "version": doc["version"] + 1}}
        if not self.announcements.update_one(guard, update).matched_count:
            raise Conflict("busy", "the announcement is being changed by another request; try again")
        log.info("announcement changed", extra={"staff_id": caller.staff_id, "agency_id": caller.agency_id})
        after = {**doc, **patch, "version": doc["version"] + 1}
        return self._view(caller, after, self._states([doc["_id"]], caller.staff_id))

    # --- everyone: list, read, acknowledge ------------------------------------------------
    def page(self, caller: Identity, cursor: str | None, limit: int, include_expired: bool = False) -> dict:
        """Newest first, each with the caller's read and acknowledgement state; recorded as one
        listing (audit)."""
        if include_expired:
            self.components.board.require_compose(caller, domain.COMPOSE_ANNOUNCEMENT)
        before = domain.decode_cursor(cursor) if cursor else None
        field = "agency_key" if include_expired else "active_key"
        docs, next_key = self._collect(caller.agency_id, field, before, limit, include_expired)
        states = self._states([doc["_id"] for doc in docs], caller.staff_id)
        shown = [self._view(caller, doc, states) for doc in docs]
        store = self.components.store
        audit.record_list(store, caller, "announcement_list", domain.FOLDER_ANNOUNCEMENTS, len(shown))
        return {"items": shown, "next_cursor": domain.encode_cursor(next_key) if next_key else None}

    def _collect(self, agency: str, field: str, before: str | None, limit: int, include_expired: bool):
        """Fill a page from the index, skipping (and retiring) announcements whose time ran out."""
        at = now_ms()
        return collect(
            lambda cursor, n: self._fetch(field, agency, cursor, n, {"_outbox": 0, "body": 0}),
            lambda doc: include_expired or self._still_active(doc, at),
            before,
            limit,
            batch=limit + 1,
        )

    def _fetch(self, field: str, agency: str, before: str | None, limit: int, projection: dict) -> list[dict]:
        query: dict = {field: {"$eq": agency}}
        if before is not None:
            query["sort_key"] = {"$lt": before}
        found = self.announcements.find(query, projection=projection).sort("sort_key", DESCENDING).limit(limit)
        return list(found)

    def _still_active(self, doc: dict, at_ms: int) -> bool:
        if is_active(doc, at_ms):
            return True
        if doc.get("active_key"):
            self.announcements.update_one(
                {"_id": {"$eq": doc["_id"]}, "expires_at": {"$lte": at_ms}}, {"$set": {"active_key": None}}
            )
        return False

    def unread_count(self, caller: Identity) -> int:
        """Active announcements of the agency the caller has not read (Board.extra_unread)."""
        at = now_ms()
        docs = self._fetch("active_key", caller.agency_id, None, ACTIVE_LIMIT, WITHOUT_CONTENT)
        active = [doc for doc in docs if self._still_active(doc, at)]
        states = self._states([doc["_id"] for doc in active], caller.staff_id)
        return sum(1 for doc in active if not self._read(caller, doc, states))

    def active(self, agency_id: str) -> dict[str, int]:
        """The agency's active announcements (the newest ACTIVE_LIMIT): id -> time posted. Nothing
        is opened (search, services/inbox/search.py)."""
        at = now_ms()
        docs = self._fetch("active_key", agency_id, None, ACTIVE_LIMIT, WITHOUT_CONTENT)
        return {doc["_id"]: doc["posted_at"] for doc in docs if self._still_active(doc, at)}

    def found(self, caller: Identity, ids: list[str], *, unread: bool) -> list[dict]:
        """Search results (services/inbox/search.py): the caller's agency's active announcements
        among `ids`, newest first, as the folder lists them (only those not read with `unread`)."""
        if not ids:
            return []
        at = now_ms()
        docs = self.announcements.find({"_id": {"$in": ids}}, projection={"_outbox": 0, "body": 0})
        docs = [d for d in docs if d["agency_id"] == caller.agency_id and d.get("active_key") and is_active(d, at)]
        docs.sort(key=lambda d: d["sort_key"], reverse=True)
        states = self._states([doc["_id"] for doc in docs], caller.staff_id)
        return [self._view(caller, doc, states) for doc in docs if not (unread and self._read(caller, doc, states))]

    def read(self, caller: Identity, announcement_id: str) -> dict:
        """The announcement with its body; audited, and read from now on for the caller alone."""
        doc = self._visible(caller, announcement_id, "read")
        cipher, agency = self.components.cipher, caller.agency_id
        title = cipher.open(agency, doc["_id"], "title", doc["title"])
        body = cipher.open(agency, doc["_id"], "body", doc["body"])
        audit.record_read(self.components.store, caller, doc["_id"], resource_type="announcement")
        state = self._mark(caller, doc, {"read_at": now_ms()})
        return {**self._view(caller, doc, {doc["_id"]: state}, title), "body": body}

    def acknowledge(self, caller: Identity, announcement_id: str) -> dict:
        """Acknowledge (and so read) an announcement that asks for it; repeating it changes nothing."""
        doc = self._visible(caller, announcement_id, "acknowledge")
        if not is_active(doc, now_ms()):
            raise Conflict("announcement_expired", "the announcement has expired")
        if not doc.get("ack_required"):
            raise Conflict("acknowledgement_not_required", "this announcement does not ask for acknowledgement")
        at = now_ms()
        state = self._mark(caller, doc, {"read_at": at, "acknowledged_at": at}, {"ack_key": doc["_id"]})
        return self._view(caller, doc, {doc["_id"]: state})

    def acknowledgements(self, caller: Identity, announcement_id: str) -> dict:
        """Who has acknowledged (oldest first) and who has not yet: the agency's staff, as directory
        resolves it for the admin, without the author and those who acknowledged."""
        self.components.board.require_compose(caller, domain.COMPOSE_ANNOUNCEMENT)
        doc = self._visible(caller, announcement_id, "list_acknowledgements")
        acknowledged = [
            {"staff_id": state["staff_id"], "at": iso(state["acknowledged_at"])}
            for state in self.states.find({"ack_key": {"$eq": doc["_id"]}}).sort("acknowledged_at", 1)
        ]
        pending: list[str] = []
        if doc.get("ack_required"):
            done = {entry["staff_id"] for entry in acknowledged} | {doc["posted_by"]}
            staff = self.components.directory.resolve(domain.Addressing(whole_agency=True)).staff_ids
            pending = [staff_id for staff_id in staff if staff_id not in done]
        return {
            "id": doc["_id"],
            "acknowledgement_required": bool(doc.get("ack_required")),
            "acknowledged": acknowledged,
            "pending": pending,
        }

    # --- helpers ----------------------------------------------------------------------------
    def _visible(self, caller: Identity, announcement_id: str, action: str) -> dict:
        """The caller's agency's announcement; an expired one only for admins. Anything else is a
        refused, audited 404, so whether it exists does not leak."""
        doc = self.announcements.find_one({"_id": {"$eq": announcement_id}}, projection={"_outbox": 0})
        manager = domain.may_compose(caller.roles, domain.COMPOSE_ANNOUNCEMENT)
        if doc is None or doc["agency_id"] != caller.agency_id or not (manager or is_active(doc, now_ms())):
            raise audit.refuse(
                self.components.store,
                caller,
                announcement_id,
                action,
                resource_type="announcement",
                code="announcement_not_found",
                message="no such announcement",
            )
        return doc

    def _mark(self, caller: Identity, doc: dict, first: dict, also: dict | None = None) -> dict:
        """Create the caller's state document if needed and keep the first time of each of `first`."""
        update: dict = {
            "$setOnInsert": {"announcement_id": doc["_id"], "agency_id": caller.agency_id, "staff_id": caller.staff_id},
            "$min": first,
        }
        if also:
            update["$set"] = also
        sid = state_id(doc["_id"], caller.staff_id)
        self.states.update_one({"_id": {"$eq": sid}}, update, upsert=True)
        return self.states.find_one({"_id": {"$eq": sid}}) or {}

    def _states(self, announcement_ids: list[str], staff_id: str) -> dict[str, dict]:
        """The caller's state documents of these announcements, by announcement id."""
        if not announcement_ids:
            return {}
        ids = [state_id(announcement_id, staff_id) for announcement_id in announcement_ids]
        return {state["announcement_id"]: state for state in self.states.find({"_id": {"$in": ids}})}

    @staticmethod
    def _read(caller: Identity, doc: dict, states: dict[str, dict]) -> bool:
        return doc["posted_by"] == caller.staff_id or bool(states.get(doc["_id"], {}).get("read_at"))

    def _view(self, caller: Identity, doc: dict, states: dict[str, dict], title: str | None = None) -> dict:
        state = states.get(doc["_id"], {})
        if title is None:
            title = self.components.cipher.open(caller.agency_id, doc["_id"], "title", doc["title"])
        return {
            "id": doc["_id"],
            "folder": domain.FOLDER_ANNOUNCEMENTS,
            "title": title,
            "posted_by": {"id": doc["posted_by"], "name": doc.get("posted_by_name", "")},
            "posted_at": iso(doc["posted_at"]),
            "edited_at": iso(doc.get("edited_at")),
            "expires_at": iso(doc.get("expires_at")),
            "expired": not is_active(doc, now_ms()),
            "acknowledgement_required": bool(doc.get("ack_required")),
            "acknowledge_by": iso(doc.get("acknowledge_by")),
            "read": self._read(caller, doc, states),
            "read_at": iso(state.get("read_at")),
            "acknowledged": bool(state.get("acknowledged_at")),
            "acknowledged_at": iso(state.get("acknowledged_at")),
        }

    # --- HTTP -----------------------------------------------------------------------------
    def blueprint(self):
        settings = self.components.settings
        create_spec = {
            "title": Str(max_len=settings.max_subject_chars),
            "body": Str(max_len=settings.max_body_chars, strip=False),
            "expires_at": Str(max_len=64, required=False),
            "acknowledgement_required": Bool(),
            "acknowledge_by": Str(max_len=64, required=False),
        }
        edit_spec = {
            "title": Str(max_len=settings.max_subject_chars, required=False),
            "body": Str(max_len=settings.max_body_chars, strip=False, required=False),
            "expires_at": Str(max_len=64, required=False),
            "acknowledgement_required": Bool(),
        }
        bp = Blueprint("announcements", __name__, url_prefix="/api/v1/announcements")

        @bp.post("")
        @staff_only
        def create():
            self.components.board.require_compose(g.identity, domain.COMPOSE_ANNOUNCEMENT)
            key = idempotency_key()
            fields = validate(json_body(), create_spec)
            non_blank(fields, "body")
            # In the future when posted: checked by post_once, after a repeat has been answered.
            expires_at = (
                instant_ms("expires_at", fields["expires_at"], code="invalid_value") if "expires_at" in fields else None
            )
            ack = fields.get("acknowledgement_required", False)
            acknowledge_by = (
                instant_ms("acknowledge_by", fields["acknowledge_by"], code="invalid_value")
                if "acknowledge_by" in fields
                else None
            )
            made, created = self.post_once(
                g.identity,
                fields["title"],
                fields["body"],
                expires_at,
                ack,
                idempotency_key=key,
                acknowledge_by=acknowledge_by,
            )
            return made, 201 if created else 200

        @bp.get("")
        @staff_only
        def listing():
            only_query("cursor", "limit", "include_expired")
            return self.page(
                g.identity,
                request.args.get("cursor") or None,
                query_int("limit", 20, 1, 100),
                include_expired=query_bool("include_expired"),
            )

        @bp.get("/<announcement_id>")
        @staff_only
        def read(announcement_id: str):
            return self.read(g.identity, path_id(announcement_id, "announcement"))

        @bp.patch("/<announcement_id>")
        @staff_only
        def edit(announcement_id: str):
            self.components.board.require_compose(g.identity, domain.COMPOSE_ANNOUNCEMENT)
            raw = json_body()
            fields = validate(raw, edit_spec)
            non_blank(fields, "body")
            changes = {name: fields[name] for name in ("title", "body") if name in fields}
            if "expires_at" in raw:
                changes["expires_at"] = parse_expiry(fields["expires_at"], now_ms()) if "expires_at" in fields else None
            if "acknowledgement_required" in fields:
                changes["ack_required"] = fields["acknowledgement_required"]
            if not changes:
                raise InvalidInput("invalid_body", "give at least one field to change")
            return self.edit(g.identity, path_id(announcement_id, "announcement"), changes)

        @bp.post("/<announcement_id>/expire")
        @staff_only
        def expire(announcement_id: str):
            return self.expire(g.identity, path_id(announcement_id, "announcement"))

        @bp.post("/<announcement_id>/acknowledge")
        @staff_only
        def acknowledge(announcement_id: str):
            return self.acknowledge(g.identity, path_id(announcement_id, "announcement"))

        @bp.get("/<announcement_id>/acknowledgements")
        @staff_only
        def acknowledgements(announcement_id: str):
            return self.acknowledgements(g.identity, path_id(announcement_id, "announcement"))

        return bp
