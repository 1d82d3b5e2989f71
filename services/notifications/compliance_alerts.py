"""Compliance Alerts: items from the compliance system (partner key, gateway) and from compliance
officers (staff token) onto their assignees' boards; the background pass that reports them overdue
and escalates them once (rules in compliance.py).

Storage: one `compliance_items` document per item. Title and link are PHI, sealed with the agency's
key; the rest is in clear to find and judge it: assignees, due time, version, `overdue_at`,
`escalated_due`, `escalation_ids` and `next_check_at` (when the pass must look again; absent when
never: resolved or escalated). Every change, by a request or by the pass, is one write guarded by
the version read, carrying its `board_item.delivery_requested.v1` events (outbox; event ids
`<item>-v<version>-a` for the assignees' item, `-e` for the escalation). Two passes (replicas) that
read the same version: one write matches, the other matches nothing and moves on, so an item is
escalated once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from flask import Blueprint, g
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from services.kit.auth import ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER, Identity
from services.kit.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound, Unavailable
from services.kit.http import require_staff as staff_only
from services.kit.mongo import IndexSpec, ensure_indexes, eq, now_ms
from services.kit.outbox import outbox_fields, with_outbox
from services.kit.runtime import every
from services.kit.service_identity import acting_as
from services.kit.validation import Id, Instant, Link, ListOf, Str, idempotency_key_header, json_body, path_id, validate
from services.notifications import audit, compliance
from services.notifications.compliance import Assignee, ComplianceItem
from services.notifications.components import Feature
from services.notifications.delivery import delivery_requested
from services.notifications.lab import iso
from services.notifications.registrations import gateway_consumer

log = logging.getLogger(__name__)

COMPLIANCE_ITEMS = "compliance_items"
RESOURCE_TYPE = "compliance_item"
INDEXES = [IndexSpec(COMPLIANCE_ITEMS, [("next_check_at", 1)], name="compliance_next_check")]
WRITE_ATTEMPTS = 8
PASS_BATCH = 100
# A pass goes on through a backlog (many items falling due at once) up to this many batches.
MAX_BATCHES = 20
FIELDS = {"_outbox": 0}

KIND = Str(max_len=40, pattern=compliance.KIND_PATTERN)
TITLE = Str(max_len=200)
ASSIGNEES = ListOf(Id(), max_items=compliance.MAX_ASSIGNEES, required=True)
NEW_ITEM = {"kind": KIND, "title": TITLE, "assignee_ids": ASSIGNEES, "due_at": Instant(), "link": Link(required=False)}
ITEM_CHANGES = {
    "kind": Str(max_len=40, pattern=compliance.KIND_PATTERN, required=False),
    "title": Str(max_len=200, required=False),
    "assignee_ids": ListOf(Id(), max_items=compliance.MAX_ASSIGNEES),
    "due_at": Instant(required=False),
    "link": Link(required=False),
}
EXTERNAL_REF = Id(max_len=64)


class ComplianceAlerts(Feature):
    outbox_collections = (COMPLIANCE_ITEMS,)

    def __init__(self, components, pass_interval_s: float | None = None):
        super().__init__(components)
        self.items = components.store.db[COMPLIANCE_ITEMS]
        self.cipher = components.cipher
        self.pass_interval_s = pass_interval_s or components.settings.compliance_pass_interval_s

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def background(self):
        return [("compliance-overdue", self.run_passes)]

    # --- documents ------------------------------------------------------------------------------
    def _item(self, doc: dict) -> ComplianceItem:
        agency_id, item_id = doc["agency_id"], doc["_id"]
        return ComplianceItem(
            id=item_id,
            agency_id=agency_id,
            origin=doc["origin"],
            external_ref=doc.get("external_ref", ""),
            kind=doc["kind"],
            title=self.cipher.open(agency_id, item_id, "title", doc["title"]),
            link=self.cipher.open(agency_id, item_id, "link", doc["link"]) if doc.get("link") else "",
            assignee_ids=tuple(doc.get("assignee_ids") or ()),
            due_at=int(doc["due_at"]),
            version=int(doc["version"]),
            created_by=doc.get("created_by", ""),
            resolved_at=int(doc.get("resolved_at") or 0),
            overdue_at=int(doc.get("overdue_at") or 0),
            escalated_due=int(doc.get("escalated_due") or 0),
            escalation_ids=tuple(doc.get("escalation_ids") or ()),
            created_at=int(doc.get("created_at") or 0),
        )

    def _fields(self, item: ComplianceItem, next_check_at: int | None) -> tuple[dict, dict]:
        """($set, $unset) for the item's document."""
        to_set = {
            "agency_id": item.agency_id,
            "origin": item.origin,
            "external_ref": item.external_ref,
            "kind": item.kind,
            "title": self.cipher.seal(item.agency_id, item.id, "title", item.title),
            "assignee_ids": list(item.assignee_ids),
            "due_at": item.due_at,
            "version": item.version,
            "created_by": item.created_by,
            "resolved_at": item.resolved_at,
            "overdue_at": item.overdue_at,
            "escalated_due": item.escalated_due,
            "escalation_ids": list(item.escalation_ids),
            "created_at": item.created_at,
            "updated_at": now_ms(),
        }
        to_unset = {}
        if item.link:
            to_set["link"] = self.cipher.seal(item.agency_id, item.id, "link", item.link)
        else:
            to_unset["link"] = ""
        if next_check_at is None:
            to_unset["next_check_at"] = ""
        else:
            to_set["next_check_at"] = next_check_at
        return to_set, to_unset

    def load(self, agency_id: str, item_id: str) -> ComplianceItem | None:
        doc = self.items.find_one({"_id": eq(item_id)}, FIELDS)
        if doc is None or doc.get("agency_id") != agency_id:
            return None
        return self._item(doc)

    def _insert(self, item: ComplianceItem, events: list, next_check_at: int | None) -> bool:
        to_set, _ = self._fields(item, next_check_at)
        try:
            self.items.insert_one({"_id": item.id, **to_set, **outbox_fields(events)})
        except DuplicateKeyError:
            return False
        return True

    def _replace(self, before: ComplianceItem, after: ComplianceItem, events: list, next_check_at: int | None) -> bool:
        """Write `after` over `before` if nobody changed it meanwhile (version guard)."""
        to_set, to_unset = self._fields(after, next_check_at)
        update: dict = {"$set": to_set}
        if to_unset:
            update["$unset"] = to_unset
        if events:
            update = with_outbox(update, events)
        guard = {"_id": eq(before.id), "version": eq(before.version)}
        return bool(self.items.update_one(guard, update).matched_count)

    # --- what the rules need from directory -------------------------------------------------------
    def _settings(self, agency_id: str):
        return self.components.directory.agency_settings(agency_id)

    def _check_assignees(self, assignee_ids: list[str]) -> tuple[str, ...]:
        """Every assignee must be an active staff member of the agency (400 `unknown_staff`)."""
        if not assignee_ids:
            raise InvalidInput(
                "no_assignees", "a compliance item needs at least one assignee", {"field": "assignee_ids"}
            )
        resolution = self.components.directory.resolve(assignee_ids, [])
        reached = set(resolution.staff_ids)
        missing = [s for s in assignee_ids if s not in reached]
        if missing:
            raise InvalidInput("unknown_staff", "assignees must be active staff of this agency", {"staff_ids": missing})
        return tuple(assignee_ids)

    def _escalation(self, item: ComplianceItem) -> tuple[list[str], list[Assignee]]:
        directory = self.components.directory
        assignees = [
            Assignee(s.staff_id, s.display_name, s.supervisor_id)
            for s in directory.staff(list(item.assignee_ids))
            if s.agency_id == item.agency_id
        ]
        supervisor_ids = sorted({a.supervisor_id for a in assignees if a.supervisor_id})
        active = {s.staff_id for s in directory.staff(supervisor_ids) if s.active} if supervisor_ids else set()
        officers = directory.list_staff(ROLE_COMPLIANCE_OFFICER)
        admins = directory.list_staff(ROLE_ADMIN) if not officers or set(officers) <= set(item.assignee_ids) else []
        return compliance.escalation_recipients(assignees, active, officers, admins), assignees

    # --- changes ----------------------------------------------------------------------------------
    def create(self, agency_id: str, item_id: str, fields: dict, *, origin: str, external_ref: str, created_by: str):
        """A new item on its assignees' boards; None when the id exists (a partner's PUT then updates)."""
        now = now_ms()
        item = ComplianceItem(
            id=item_id,
            agency_id=agency_id,
            origin=origin,
            external_ref=external_ref,
            kind=fields["kind"],
            title=fields["title"],
            link=fields.get("link", ""),
            assignee_ids=self._check_assignees(fields["assignee_ids"]),
            due_at=fields["due_at"],
            created_by=created_by,
            created_at=now,
        )
        zone = self._settings(agency_id).time_zone or "UTC"
        event = self._assignee_event(item, zone, mark_unread=False)
        if not self._insert(item, [event], item.due_at):
            return None
        log.info("compliance item created", extra={"agency_id": agency_id, "item_id": item.id})
        return item

    def change(self, agency_id: str, item_id: str, fields: dict, *, reopen: bool = False) -> ComplianceItem:
        """Apply an edit (a reopened item comes back on the boards)."""
        if "assignee_ids" in fields:
            fields = {**fields, "assignee_ids": self._check_assignees(fields["assignee_ids"])}
        zone = self._settings(agency_id).time_zone or "UTC"
        for _ in range(WRITE_ATTEMPTS):
            before = self._existing(agency_id, item_id)
            if before.resolved_at and not reopen:
                raise _resolved()
            after = compliance.changed(before, **fields, resolved_at=0)
            if not before.resolved_at and compliance.same_content(before, after):
                return before  # a repeated request (a partner's retry) tells nobody twice
            if before.resolved_at:  # reopened: overdue and escalation start over
                after = replace(after, overdue_at=0, escalated_due=0)
            events = [self._assignee_event(after, zone, mark_unread=True)]
            if before.escalation_ids and (after.due_at != before.due_at or before.resolved_at):
                events.append(self._event(after, compliance.withdrawal(after.id + compliance.ESCALATION_SUFFIX,
                                                                      after.version), "e"))  # fmt: skip
                after = replace(after, escalation_ids=())
            minutes = self._settings(agency_id).compliance_escalation_minutes or 1440
            if self._replace(before, after, events, compliance.next_check(after, minutes)):
                log.info("compliance item changed", extra={"agency_id": agency_id, "item_id": item_id})
                return after
        raise _busy()

    def resolve(self, agency_id: str, item_id: str) -> ComplianceItem:
        """Resolved: withdrawn from every board it reached. Resolving again changes nothing."""
        for _ in range(WRITE_ATTEMPTS):
            before = self._existing(agency_id, item_id)
            if before.resolved_at:
                return before
            after = replace(before, resolved_at=now_ms(), version=before.version + 1)
            events = [self._event(after, d, "a" if i == 0 else "e")
                      for i, d in enumerate(compliance.resolution_deliveries(after))]  # fmt: skip
            if self._replace(before, after, events, None):
                log.info("compliance item resolved", extra={"agency_id": agency_id, "item_id": item_id})
                return after
        raise _busy()

    def _existing(self, agency_id: str, item_id: str) -> ComplianceItem:
        item = self.load(agency_id, item_id)
        if item is None:
            raise NotFound("compliance_item_not_found", "no such compliance item")
        return item

    def _event(self, item: ComplianceItem, request, suffix: str):
        return delivery_requested(item.agency_id, request, f"{item.id}-v{item.version}-{suffix}")

    def _assignee_event(self, item: ComplianceItem, zone: str, *, mark_unread: bool):
        return self._event(item, compliance.assignee_delivery(item, zone, mark_unread=mark_unread), "a")

    # --- the overdue / escalation pass ------------------------------------------------------------
    def run_passes(self, stop: threading.Event) -> None:
        every(stop, self.pass_interval_s, self.run_pass, "compliance overdue", errors=(PyMongoError, DomainError))

    def run_pass(self, now: int | None = None) -> int:
        """Look at every item whose check is due at `now` (a backlog in batches, at most
        MAX_BATCHES per pass); returns how many it changed."""
        now = now_ms() if now is None else now
        changed = 0
        for _ in range(MAX_BATCHES):
            due = self.items.find({"next_check_at": {"$lte": now}}, FIELDS).sort("next_check_at", ASCENDING)
            docs = list(due.limit(PASS_BATCH))
            for doc in docs:
                changed += self._check_doc(doc, now)
            if len(docs) < PASS_BATCH:
                break
        return changed

    def _check_doc(self, doc: dict, now: int) -> int:
        item = self._item(doc)
        try:
            with acting_as(self.components.service_tokens.identity(item.agency_id)):
                return self._check_item(item, doc.get("next_check_at"), now)
        except DomainError as exc:  # e.g. directory cannot answer for this agency: the others go on
            log.warning(
                "compliance item not checked; tried again next pass",
                extra={"agency_id": item.agency_id, "item_id": item.id, "code": exc.code},
            )
            return 0

    def _check_item(self, item: ComplianceItem, scheduled: int | None, now: int) -> int:
        settings = self._settings(item.agency_id)
        minutes = settings.compliance_escalation_minutes or 1440
        step = compliance.check(item, now, minutes)
        if not step.report_overdue and not step.escalate:
            if step.next_check_at != scheduled:  # the agency's delay changed: look again then
                self._replace(item, replace(item, version=item.version + 1), [], step.next_check_at)
            return 0
        zone = settings.time_zone or "UTC"
        after = replace(
            item,
            version=item.version + 1,
            overdue_at=item.overdue_at or now,
            escalated_due=item.due_at if step.escalate else 0,
        )
        events = []
        if step.report_overdue:
            events.append(self._assignee_event(after, zone, mark_unread=True))
        if step.escalate:
            recipients, assignees = self._escalation(after)
            after = replace(after, escalation_ids=tuple(recipients))
            if recipients:
                events.append(self._event(after, compliance.escalation_delivery(after, recipients, assignees, zone),
                                          "e"))  # fmt: skip
        if not self._replace(item, after, events, step.next_check_at):
            return 0  # another pass (replica) got there first
        log.info(
            "compliance item escalated" if step.escalate else "compliance item overdue",
            extra={"agency_id": item.agency_id, "item_id": item.id, "recipients": len(after.escalation_ids)},
        )
        return 1

    # --- reading --------------------------------------------------------------------------------
    def _repeated(self, officer: Identity, item_id: str, fields: dict) -> ComplianceItem:
        """The item an earlier create with the same Idempotency-Key made, if this is the same
        request again; else 409 `idempotency_key_reused`."""
        existing = self.load(officer.agency_id, item_id)
        if existing is None:
            raise _busy()  # the earlier create is still being written: a retry finds it
        asked = compliance.changed(
            existing,
            kind=fields["kind"],
            title=fields["title"],
            link=fields.get("link", ""),
            assignee_ids=self._check_assignees(fields["assignee_ids"]),
            due_at=fields["due_at"],
        )
        if existing.created_by != officer.staff_id or not compliance.same_content(existing, asked):
            raise Conflict("idempotency_key_reused", "this Idempotency-Key was used for another compliance item")
        return existing

    def view(self, caller: Identity, item_id: str) -> dict:
        """The item in full (PHI) for officers, assignees and escalation recipients; audited."""
        item = self.load(caller.agency_id, item_id)
        allowed = item is not None and (
            caller.has_role(ROLE_COMPLIANCE_OFFICER)
            or caller.staff_id in item.assignee_ids
            or caller.staff_id in item.escalation_ids
        )
        if not allowed:
            raise audit.refuse(
                self.components.store, caller, item_id, resource_type=RESOURCE_TYPE, code="compliance_item_not_found"
            )
        audit.record(self.components.store, caller, item_id, resource_type=RESOURCE_TYPE)
        return item_view(item, now_ms())

    # --- HTTP -----------------------------------------------------------------------------------
    def blueprints(self) -> list:
        staff = Blueprint("compliance", __name__, url_prefix="/api/v1/compliance")

        @staff.post("/items")
        @staff_only
        def create():
            officer = _officer()
            fields = validate(json_body(), NEW_ITEM)
            key = idempotency_key_header()
            item_id = compliance.keyed_id(officer.agency_id, officer.staff_id, key) if key else compliance.new_id()
            item = self.create(
                officer.agency_id, item_id, fields, origin="staff", external_ref="", created_by=officer.staff_id
            )
            if item is None and key:
                return item_view(self._repeated(officer, item_id, fields), now_ms()), 200
            if item is None:
                raise _busy()
            response = item_view(item, now_ms())
            return response, 201, {"Location": f"/api/v1/compliance/items/{item.id}"}

        @staff.get("/items/<item_id>")
        @staff_only
        def read(item_id: str):
            return self.view(g.identity, path_id(item_id, "compliance item"))

        @staff.patch("/items/<item_id>")
        @staff_only
        def edit(item_id: str):
            officer = _officer()
            fields = validate(json_body(), ITEM_CHANGES)
            item = self.change(officer.agency_id, path_id(item_id, "compliance item"), fields)
            return item_view(item, now_ms())

        @staff.post("/items/<item_id>/resolve")
        @staff_only
        def resolve(item_id: str):
            officer = _officer()
            item = self.resolve(officer.agency_id, path_id(item_id, "compliance item"))
            return item_view(item, now_ms())

        partner = Blueprint("compliance_partner", __name__, url_prefix="/api/v1/partner/compliance")

        @partner.put("/<agency_id>/items/<external_ref>")
        def put_item(agency_id: str, external_ref: str):
            consumer = gateway_consumer()
            agency_id = self.components.registrations.partner_agency(consumer, agency_id)
            ref = _external_ref(external_ref)
            fields = validate(json_body(), NEW_ITEM)
            item_id = compliance.partner_item_id(agency_id, consumer, ref)
            with acting_as(self.components.service_tokens.identity(agency_id)):
                item = self.create(
                    agency_id, item_id, fields, origin=f"partner:{consumer}", external_ref=ref, created_by=consumer
                )
                if item is not None:
                    return item_view(item, now_ms()), 201
                return item_view(self.change(agency_id, item_id, fields, reopen=True), now_ms()), 200

        @partner.post("/<agency_id>/items/<external_ref>/resolve")
        def resolve_item(agency_id: str, external_ref: str):
            consumer = gateway_consumer()
            agency_id = self.components.registrations.partner_agency(consumer, agency_id)
            item_id = compliance.partner_item_id(agency_id, consumer, _external_ref(external_ref))
            return item_view(self.resolve(agency_id, item_id), now_ms())

        return [staff, partner]


def item_view(item: ComplianceItem, now: int) -> dict:
    return {
        "id": item.id,
        "external_ref": item.external_ref or None,
        "kind": item.kind,
        "title": item.title,
        "link": item.link or None,
        "assignee_ids": list(item.assignee_ids),
        "due_at": iso(item.due_at),
        "status": item.status,
        "overdue": not item.resolved_at and now >= item.due_at,
        "escalated_to": list(item.escalation_ids),
        "resolved_at": iso(item.resolved_at) if item.resolved_at else None,
        "version": item.version,
    }


def _officer() -> Identity:
    caller: Identity = g.identity
    if not caller.has_role(ROLE_COMPLIANCE_OFFICER):
        raise Forbidden("forbidden", "this action needs the compliance officer role")
    return caller


def _external_ref(raw: str) -> str:
    try:
        return EXTERNAL_REF.clean("external_ref", raw)
    except InvalidInput as exc:
        raise NotFound("compliance_item_not_found", "no such compliance item") from exc


def _resolved() -> Conflict:
    return Conflict("compliance_item_resolved", "the item is resolved; the compliance system may reopen it")


def _busy() -> Unavailable:
    return Unavailable("busy", "the item is being changed at the same time; try again")
