"""Signature Requests: sign-off on a document by named signers; sign or decline; the requester hears each outcome.

One `signature_requests` document per request is the record: the sealed document title and
reference, and each signer's state in a map keyed by staff id. It is written as a message is
(services/inbox/fanout.py): every change of it is one write guarded by its `version` that sets
`sync_pending_at`; the board items that show it (one per signer, one read copy for the requester,
and an outcome item per response for the requester) are then brought in line repeatably:
deterministic ids, duplicates skipped, each new item carrying its own `board_item.delivered.v1`
event (so the request holds none), status patches applied only from a newer version of the
request; then the marker is cleared unless the request changed meanwhile. A crash in between
leaves `sync_pending_at` set and the repair loop finishes the job.

An optional `due_at` (in the future by services/kit/clock.py) also sets `deadline_step_at`: at the
due time each signer who has not responded gets a reminder, and `overdue_report_minutes` later the
requester gets the names of who has not (services/inbox/deadlines.py).
"""

from __future__ import annotations

import logging
import threading
import uuid

from flask import Blueprint, g, request
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Components, Feature
from services.inbox.deadlines import STEP_AT as DEADLINE_STEP
from services.inbox.deadlines import first_step
from services.inbox.delivery_rules import delivered_event
from services.inbox.fanout import Fanout, repair_index
from services.inbox.http_api import idempotency_key, only_query, staff_only
from services.inbox.idempotency import IdempotentCreate
from services.kit import clock
from services.kit.auth import Identity
from services.kit.errors import Conflict, Forbidden, InvalidInput
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.validation import Choice, Id, Instant, ListOf, Str, json_body, path_id, query_int, validate

log = logging.getLogger(__name__)

REQUESTS = "signature_requests"
SYNC_MARKER = "sync_pending_at"
INDEXES = [
    IndexSpec(REQUESTS, [("requester_key", 1), ("sort_key", -1)], name="requester_sort"),
    repair_index(REQUESTS, SYNC_MARKER),
]
DOCUMENT_KINDS = ("patient", "staff")
MAX_SIGNERS = 20
TITLE_MAX_CHARS = 200
REF_MAX_CHARS = 500
NOTE_MAX_CHARS = 2000
ATTEMPTS = 8

STATUS_PENDING = "pending"
STATUS_PARTIAL = "partially_signed"
STATUS_COMPLETE = "complete"
STATUS_DECLINED = "declined"
STATUS_CANCELLED = "cancelled"
CLOSED = (STATUS_COMPLETE, STATUS_DECLINED, STATUS_CANCELLED)
SIGNED = "signed"
DECLINED = "declined"


# --- pure rules ---------------------------------------------------------------------------------


def new_request_id() -> str:
    return f"sig_{uuid.uuid4().hex[:24]}"


def outcome_ref(request_id: str, signer_id: str) -> str:
    """Id of the requester's notice of one signer's answer (one per signer, so repeatable)."""
    return "sgo_" + domain.digest(request_id, signer_id)[:24]


def request_status(signers: dict[str, dict]) -> str:
    """A decline ends the request; it is complete once every signer signed."""
    outcomes = [entry.get("outcome") for entry in signers.values()]
    if DECLINED in outcomes:
        return STATUS_DECLINED
    if outcomes and all(outcome == SIGNED for outcome in outcomes):
        return STATUS_COMPLETE
    if SIGNED in outcomes:
        return STATUS_PARTIAL
    return STATUS_PENDING


def doc_status(doc: dict) -> str:
    """The request's status: cancelled by its requester, else by its signers' answers."""
    return STATUS_CANCELLED if doc.get("cancelled_at") else request_status(doc["signers"])


def closed_at(signers: dict[str, dict]) -> int:
    """When the request closed: its last answer."""
    return max((entry.get("responded_at") or 0 for entry in signers.values()), default=0)


def check_may_cancel(doc: dict) -> None:
    """Only an open request (pending or partially signed) can be cancelled."""
    status = doc_status(doc)
    if status in CLOSED:
        raise Conflict("request_closed", f"this request is already {status.replace('_', ' ')}")


def check_may_respond(signers: dict[str, dict], signer_id: str) -> None:
    """A signer answers once, and only while the request is open."""
    if signers[signer_id].get("responded_at"):
        raise Conflict("already_responded", "you have already responded to this request")
    if request_status(signers) in CLOSED:
        raise Conflict("request_closed", "this request is already closed")


def status_patch(item: dict, doc: dict, now: int) -> dict | None:
    """Bring one request item in line with the request at `doc["version"]`; an older version never
    overwrites a newer one, and a signer's own item turns read once they responded or the request
    closed."""
    if item.get("kind") != domain.KIND_SIGNATURE_REQUEST or item.get("request_version", 0) >= doc["version"]:
        return None
    status = doc_status(doc)
    patch: dict = {"request_version": doc["version"], "status": status}
    if status in CLOSED and not item.get("resolved_at"):
        patch["resolved_at"] = now
    mine = doc["signers"].get(item["owner_id"])
    responded = bool(mine and mine.get("responded_at"))
    if responded:
        patch["my_response"] = mine["outcome"]
    # Nothing is left to do for whoever answered, nor for anyone once the request is closed
    # (declined, or complete): the item leaves the unread counts, as a resolved item does.
    if (responded or status in CLOSED) and not item.get("read_at"):
        patch |= {"read_at": now, "unread_board": None}
    return patch


# --- request fields -------------------------------------------------------------------------------

CREATE_SPEC = {
    "document_kind": Choice(choices=DOCUMENT_KINDS, required=True),
    "title": Str(max_len=TITLE_MAX_CHARS),
    "document_ref": Str(max_len=REF_MAX_CHARS),
    "due_at": Instant(required=False),
    "signer_ids": ListOf(Id(), max_items=MAX_SIGNERS, required=True),
}
SIGN_SPEC = {"attestation": Str(max_len=NOTE_MAX_CHARS)}
CANCEL_SPEC = {"reason": Str(max_len=NOTE_MAX_CHARS, required=False)}
DECLINE_SPEC = {"reason": Str(max_len=NOTE_MAX_CHARS)}


# --- the feature ------------------------------------------------------------------------------------


class Signatures(Feature):
    def __init__(self, components: Components, repair_interval_s: float = 5.0):
        super().__init__(components)
        self.repair_interval_s = repair_interval_s
        self.requests = components.store.db[REQUESTS]
        self.fanout = Fanout(
            self.requests,
            self._place_items,
            what="signature",
            marker=SYNC_MARKER,
            revision="version",
            holds_events=False,
            finish=lambda doc: self.sync(doc),  # noqa: PLW0108 - looked up per call: tests stand in for it
        )

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        self.components.board.details[domain.KIND_SIGNATURE_REQUEST] = self.item_detail
        self.components.board.details[domain.KIND_SIGNATURE_OUTCOME] = self.item_detail

    def background(self):
        return [("signature-sync-repair", self.repair)]

    # --- create ------------------------------------------------------------------------------------
    def create(self, caller: Identity, fields: dict) -> dict:
        return self.create_once(caller, fields)[0]

    def create_once(self, caller: Identity, fields: dict, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """A new request, under the caller's Idempotency-Key when given (services/inbox/idempotency.py):
        (the request, whether this call made it). A repeat is answered from what is stored, before
        the signers are looked up again."""
        self.components.board.require_compose(caller, domain.COMPOSE_SIGNATURE_REQUEST)
        signer_ids = fields["signer_ids"]
        if not signer_ids:
            raise InvalidInput("no_recipients", "name at least one signer", {"field": "signer_ids"})
        due_at = fields.get("due_at")
        asked = (fields["document_kind"], fields["title"], fields["document_ref"], due_at, signer_ids)
        keyed = IdempotentCreate(self.components.store, caller, idempotency_key, "signature_request", *asked)
        earlier = keyed.earlier()
        stored = self._stored(earlier) if earlier else None
        if stored is not None:
            return self.view(caller, stored), False
        now = now_ms()
        # Judged by the deadline clock (services/kit/clock.py), as the due reminders are.
        if due_at is not None and due_at <= clock.now_ms():
            raise InvalidInput("invalid_time", "due_at must be in the future", {"field": "due_at"})
        self._check_signers(signer_ids)
        request_id = keyed.claim(new_request_id())
        doc = self._new_request(caller, request_id, fields, now)
        try:
            self.requests.insert_one(doc)
        except DuplicateKeyError:  # a concurrent repeat of the same Idempotency-Key wrote it first
            stored = self._stored(request_id)
            if stored is not None:
                return self.view(caller, stored), False
            raise
        self.sync(doc)
        log.info("signature requested", extra={"staff_id": caller.staff_id, "agency_id": caller.agency_id})
        return self.view(caller, doc), True

    def _stored(self, request_id: str) -> dict | None:
        """The request as stored, its board items finished if its creator was interrupted before."""
        doc = self.requests.find_one({"_id": {"$eq": request_id}}, projection={"_outbox": 0})
        if doc is not None:
            self.sync(doc)
        return doc

    def _new_request(self, caller: Identity, request_id: str, fields: dict, now: int) -> dict:
        agency, cipher = caller.agency_id, self.components.cipher
        signer_ids = fields["signer_ids"]
        return {
            "_id": request_id,
            "agency_id": agency,
            "requester_id": caller.staff_id,
            "requester_name": caller.name,
            "requester_key": domain.owner_key(agency, caller.staff_id),
            "document_kind": fields["document_kind"],
            "title": cipher.seal(agency, request_id, "title", fields["title"]),
            "document_ref": cipher.seal(agency, request_id, "document_ref", fields["document_ref"]),
            "due_at": fields.get("due_at"),
            "signer_ids": signer_ids,
            "signers": {sid: {"responded_at": 0, "outcome": "", "name": ""} for sid in signer_ids},
            "created_at": now,
            "sort_key": domain.sort_key(now, request_id),
            "version": 1,
            SYNC_MARKER: now,
            # Reminders at the due time, the requester's list later (services/inbox/deadlines.py).
            **first_step(fields.get("due_at")),
        }

    def _check_signers(self, signer_ids: list[str]) -> None:
        """Every signer is an active colleague of the caller's agency (directory answers in the
        caller's identity, so another agency's staff are unknown)."""
        resolution = self.components.directory.resolve(domain.Addressing(staff_ids=tuple(signer_ids)))
        known = set(resolution.staff_ids)
        missing = [sid for sid in signer_ids if sid not in known]
        if missing:
            raise InvalidInput("unknown_recipients", "some signers do not exist in your agency", {"staff_ids": missing})

    # --- respond ----------------------------------------------------------------------------------
    def sign(self, caller: Identity, request_id: str, attestation: str) -> dict:
        return self._respond(caller, request_id, SIGNED, attestation, "sign")

    def decline(self, caller: Identity, request_id: str, reason: str) -> dict:
        return self._respond(caller, request_id, DECLINED, reason, "decline")

    def _respond(self, caller: Identity, request_id: str, outcome: str, note: str, action: str) -> dict:
        """Record one signer's answer in one version-guarded write; then the board items follow."""
        signer = caller.staff_id
        for _ in range(ATTEMPTS):
            doc = self._visible(caller, request_id, action, signers_only=True)
            check_may_respond(doc["signers"], signer)
            if doc.get("cancelled_at"):
                raise Conflict("request_closed", "this request was cancelled by its requester")
            now = now_ms()
            entry = {
                "responded_at": now,
                "outcome": outcome,
                "name": caller.name,
                "note": self.components.cipher.seal(caller.agency_id, request_id, f"note:{signer}", note),
            }
            update = {
                "$set": {f"signers.{signer}": entry, SYNC_MARKER: now},
                "$inc": {"version": 1},
            }
            guard = {"_id": {"$eq": request_id}, "version": {"$eq": doc["version"]}}
            if self.requests.update_one(guard, update).matched_count:
                doc = {
                    **doc,
                    "signers": {**doc["signers"], signer: entry},
                    "version": doc["version"] + 1,
                    SYNC_MARKER: now,
                }
                self.sync(doc)
                log.info("signature request answered", extra={"staff_id": signer, "agency_id": caller.agency_id})
                return self.view(caller, doc)
        raise Conflict("busy", "the request is being changed by another response; try again")

    def cancel(self, caller: Identity, request_id: str, reason: str) -> dict:
        """The requester takes back an open request: every signer's item closes (read, out of the
        counts, "Cancelled"); answers already given stay on the record. Audited; a repeat is 409."""
        for _ in range(ATTEMPTS):
            doc = self._visible(caller, request_id, "cancel")
            if doc["requester_id"] != caller.staff_id:
                raise Forbidden("not_requester", "only the person who asked for the signatures can cancel the request")
            check_may_cancel(doc)
            now = now_ms()
            fields = {"cancelled_at": now, "cancelled_by": caller.staff_id, SYNC_MARKER: now}
            if reason:
                fields["cancel_reason"] = self.components.cipher.seal(
                    caller.agency_id, request_id, "cancel_reason", reason
                )
            guard = {"_id": {"$eq": request_id}, "version": {"$eq": doc["version"]}}
            update = {"$set": fields, "$inc": {"version": 1}, "$unset": {DEADLINE_STEP: ""}}
            if self.requests.update_one(guard, update).matched_count:
                doc = {**doc, **fields, "version": doc["version"] + 1}
                doc.pop(DEADLINE_STEP, None)
                self.sync(doc)
                event = audit.accessed_event(caller, request_id, resource_type="signature_request", action="cancel")
                audit.record_access(self.components.store, event, request_id, "cancel", caller)
                log.info(
                    "signature request cancelled", extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id}
                )
                return self.view(caller, doc)
        raise Conflict("busy", "the request is being changed by a response; try again")

    # --- board items ----------------------------------------------------------------------------------
    def sync(self, doc: dict) -> None:
        """Make the request's board items show its state at `doc["version"]` (repeatable), then clear
        the repair marker unless the request changed meanwhile."""
        self.fanout.complete(doc)

    def _place_items(self, doc: dict) -> None:
        """The request items are inserted until placed once; after that they are only patched, so one
        its owner deleted stays deleted. Each answer adds an outcome item for the requester, also
        until placed once (`outcomes_placed`): an outcome the requester deleted stays deleted, and
        an answer whose sync was interrupted gets its outcome from whichever sync comes next, even
        when a later answer already cleared the repair marker."""
        now = now_ms()
        store = self.components.store
        request_items = self._request_items(doc)
        inserted: set[str] = set()
        if not doc.get("items_placed"):
            inserted = {item["_id"] for item in store.insert_board_items(_with_events(request_items))}
            self.requests.update_one({"_id": {"$eq": doc["_id"]}}, {"$set": {"items_placed": now}})
        for item in request_items:
            if item["_id"] not in inserted:  # one just inserted already shows this version
                store.change_item(item["_id"], lambda it: status_patch(it, doc, now))
        placed = doc.get("outcomes_placed") or {}
        answered = [sid for sid in doc["signer_ids"] if doc["signers"][sid].get("responded_at") and sid not in placed]
        if answered:
            store.insert_board_items(_with_events([self._outcome_item(doc, sid) for sid in answered]))
            marks = {f"outcomes_placed.{sid}": now for sid in answered}
            self.requests.update_one({"_id": {"$eq": doc["_id"]}}, {"$set": marks})

    def _request_items(self, doc: dict) -> list[dict]:
        """The requester's read copy and one item per signer (a signer's own wins if the requester
        named themself)."""
        by_id: dict[str, dict] = {}
        for owner, unread in [(doc["requester_id"], False), *((sid, True) for sid in doc["signer_ids"])]:
            item = self._request_item(doc, owner, unread)
            by_id[item["_id"]] = item
        return list(by_id.values())

    def _request_item(self, doc: dict, owner: str, unread: bool) -> dict:
        mine = doc["signers"].get(owner)
        responded = bool(mine and mine.get("responded_at"))
        status = doc_status(doc)
        item = domain.new_item(
            agency_id=doc["agency_id"],
            owner_id=owner,
            folder=domain.FOLDER_SIGNATURES,
            kind=domain.KIND_SIGNATURE_REQUEST,
            ref_id=doc["_id"],
            at_ms=doc["created_at"],
            unread=unread and not responded,
            request_id=doc["_id"],
            request_version=doc["version"],
            title=doc["title"],
            sender_id=doc["requester_id"],
            sender_name=doc["requester_name"],
            status=status,
            document_kind=doc["document_kind"],
        )
        if doc.get("due_at") is not None:
            item["due_at"] = doc["due_at"]
        if status in CLOSED:
            item["resolved_at"] = doc.get("cancelled_at") or closed_at(doc["signers"])
        if responded:
            item["my_response"] = mine["outcome"]
        return item

    def _outcome_item(self, doc: dict, signer_id: str) -> dict:
        """The requester's notice of one answer: "<signer> signed: <document title>"."""
        agency, cipher = doc["agency_id"], self.components.cipher
        entry = doc["signers"][signer_id]
        ref = outcome_ref(doc["_id"], signer_id)
        name = entry.get("name") or signer_id
        title = cipher.open(agency, doc["_id"], "title", doc["title"])
        return domain.new_item(
            agency_id=agency,
            owner_id=doc["requester_id"],
            folder=domain.FOLDER_SIGNATURES,
            kind=domain.KIND_SIGNATURE_OUTCOME,
            ref_id=ref,
            at_ms=entry["responded_at"],
            unread=True,
            request_id=doc["_id"],
            title=cipher.seal(agency, ref, "title", f"{name} {entry['outcome']}: {title}"),
            sender_id=signer_id,
            sender_name=entry.get("name", ""),
            status=entry["outcome"],
        )

    def repair(self, stop: threading.Event) -> None:
        """Finish the board items of requests whose change was interrupted before they followed."""
        self.fanout.run_repairs(stop, self.repair_interval_s)

    def repair_pending(self, older_than_ms: int | None = None, limit: int = 100) -> int:
        """Sync the requests whose marker is older than `older_than_ms`; returns how many."""
        return self.fanout.repair_pending(older_than_ms, limit)

    # --- reads ---------------------------------------------------------------------------------------
    def _visible(
        self,
        caller: Identity,
        request_id: str,
        action: str,
        signers_only: bool = False,
        on_behalf_of: str | None = None,
    ) -> dict:
        """The request if the caller is one of its signers (or, unless `signers_only`, its requester);
        anything else is the same audited 404."""
        doc = self.requests.find_one({"_id": {"$eq": request_id}}, projection={"_outbox": 0})
        allowed = doc is not None and doc["agency_id"] == caller.agency_id
        if allowed:
            viewers = {caller.staff_id, on_behalf_of} - {None}
            is_signer = bool(viewers & set(doc["signers"]))
            allowed = is_signer or (not signers_only and doc["requester_id"] in viewers)
        if not allowed:
            raise audit.refuse(
                self.components.store,
                caller,
                request_id,
                action,
                resource_type="signature_request",
                code="signature_request_not_found",
                message="no such signature request",
            )
        return doc

    def read(self, caller: Identity, request_id: str) -> dict:
        doc = self._visible(caller, request_id, "read")
        shown = self.view(caller, doc)
        audit.record_read(self.components.store, caller, request_id, resource_type="signature_request")
        return shown

    def item_detail(self, caller: Identity, item: dict) -> dict:
        """The reading pane of a request or outcome item (Board.open_item); audited."""
        # A coverer's copy shows the request as its covered signer or requester would see it.
        covered = (item.get("covering_for") or {}).get("staff_id")
        doc = self._visible(caller, item["request_id"], "read", on_behalf_of=covered)
        shown = self.view(caller, doc)
        audit.record_read(self.components.store, caller, doc["_id"], resource_type="signature_request")
        return {"signature_request": shown}

    def page(self, caller: Identity, cursor: str | None, limit: int) -> dict:
        """Requests the caller made, newest first; recorded as one listing (audit)."""
        query: dict = {"requester_key": {"$eq": domain.owner_key(caller.agency_id, caller.staff_id)}}
        if cursor:
            query["sort_key"] = {"$lt": domain.decode_cursor(cursor)}
        found = self.requests.find(query, projection={"_outbox": 0}).sort("sort_key", DESCENDING).limit(limit + 1)
        docs = list(found)
        more = len(docs) > limit
        docs = docs[:limit]
        shown = [self.summary(caller, doc) for doc in docs]
        store = self.components.store
        audit.record_list(store, caller, "signature_request_list", domain.FOLDER_SIGNATURES, len(shown))
        return {
            "requests": shown,
            "next_cursor": domain.encode_cursor(docs[-1]["sort_key"]) if more else None,
        }

    def summary(self, caller: Identity, doc: dict) -> dict:
        signers = doc["signers"]
        return {
            "id": doc["_id"],
            "document_kind": doc["document_kind"],
            "title": self.components.cipher.open(caller.agency_id, doc["_id"], "title", doc["title"]),
            "status": doc_status(doc),
            "due_at": iso(doc.get("due_at")),
            "created_at": iso(doc["created_at"]),
            "requester": {"id": doc["requester_id"], "name": doc.get("requester_name", "")},
            "signed": sum(1 for entry in signers.values() if entry.get("outcome") == SIGNED),
            "signers_total": len(signers),
        }

    def view(self, caller: Identity, doc: dict) -> dict:
        """The whole request; a signer's attestation or reason is shown to the requester and to that
        signer only."""
        agency, cipher = caller.agency_id, self.components.cipher
        is_requester = doc["requester_id"] == caller.staff_id
        signers = []
        for sid in doc["signer_ids"]:
            entry = doc["signers"][sid]
            shown = {
                "staff_id": sid,
                "name": entry.get("name", ""),
                "state": entry.get("outcome") or "pending",
                "responded_at": iso(entry.get("responded_at") or None),
            }
            if entry.get("note") is not None and (is_requester or sid == caller.staff_id):
                key = "attestation" if entry["outcome"] == SIGNED else "reason"
                shown[key] = cipher.open(agency, doc["_id"], f"note:{sid}", entry["note"])
            signers.append(shown)
        shown = {
            **self.summary(caller, doc),
            "document_ref": cipher.open(agency, doc["_id"], "document_ref", doc["document_ref"]),
            "signers": signers,
        }
        if doc.get("cancelled_at"):
            shown["cancelled_at"] = iso(doc["cancelled_at"])
            if is_requester and doc.get("cancel_reason") is not None:
                shown["cancel_reason"] = cipher.open(agency, doc["_id"], "cancel_reason", doc["cancel_reason"])
        return shown

    # --- routes ---------------------------------------------------------------------------------------
    def blueprint(self):
        bp = Blueprint("signature_requests", __name__, url_prefix="/api/v1/signature-requests")

        @bp.post("")
        @staff_only
        def create():
            key = idempotency_key()
            made, created = self.create_once(g.identity, validate(json_body(), CREATE_SPEC), key)
            return made, 201 if created else 200

        @bp.get("")
        @staff_only
        def page():
            only_query("cursor", "limit")
            return self.page(g.identity, request.args.get("cursor") or None, query_int("limit", 20, 1, 100))

        @bp.get("/<request_id>")
        @staff_only
        def read(request_id: str):
            return self.read(g.identity, path_id(request_id, "signature request"))

        @bp.post("/<request_id>/sign")
        @staff_only
        def sign(request_id: str):
            request_id = path_id(request_id, "signature request")
            return self.sign(g.identity, request_id, validate(json_body(), SIGN_SPEC)["attestation"])

        @bp.post("/<request_id>/cancel")
        @staff_only
        def cancel(request_id: str):
            request_id = path_id(request_id, "signature request")
            body = validate(json_body(), CANCEL_SPEC) if request.get_data() else {}
            return self.cancel(g.identity, request_id, body.get("reason") or "")

        @bp.post("/<request_id>/decline")
        @staff_only
        def decline(request_id: str):
            request_id = path_id(request_id, "signature request")
            return self.decline(g.identity, request_id, validate(json_body(), DECLINE_SPEC)["reason"])

        return bp


def _with_events(items: list[dict]) -> list[dict]:
    """Each new item carries its own `board_item.delivered.v1` (published only if it is inserted)."""
    return [{**item, **outbox_fields([delivered_event(item, True, item["sent_at"])])} for item in items]
