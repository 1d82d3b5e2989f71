"""The delivery API: other services put items on boards
(gRPC DeliverItem and the board_item.delivery_requested.v1 event).

A producer (notifications, erx-bridge, cloud-comms) delivers a *notice*: a title, an optional
summary, a severity, a status, a due time and action links, addressed to staff, teams or the
whole agency. One `notices` document per (agency, source, source_ref) is the record of truth; a
later delivery with the same source and source_ref updates it in place (new title or status,
resolved, withdrawn, recipients added or removed) instead of creating a second item.

Written as a send is (services/inbox/fanout.py): the notice first, guarded by its revision
(`rev`), with its held `board_item.delivered.v1` events and `fanout_pending_at` set; then the board
items are inserted (each new one counted once by the revision's pass, whoever inserted it),
changed through InboxStore.change_item (counters stay exact) or deleted; then one write releases
the events and clears the marker. A crash in between is finished by the repair worker, counters
included.

Repeats have their effect once: the consumer records processed event ids, and every notice keeps
its last delivery ids (a gRPC `delivery_id`, or the event id), so a repeat answers applied=false.
An update whose `source_version` is lower than the stored one is ignored the same way.

`DeliverItemResponse.item_id` is the notice id, which is the `ref_id` of every board item it put
on a board; `BoardItemDelivered.item_id` is that recipient's board item id.

The request is checked in delivery_request.py, the rules are in delivery_rules.py, and requested
deliveries that arrive together are written together by delivery_batch.py.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pymongo.errors import DuplicateKeyError

from clinic.inbox.v1 import inbox_pb2
from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.inbox.delivery_batch import deliver_batch
from services.inbox.delivery_request import DeliveryRequest, ProducerPolicy, parse_request, policy_for
from services.inbox.delivery_rules import (
    DELIVERED_EVENT,
    erx_recipients,
    final_recipients,
    is_repeat,
    is_stale,
    item_patch,
    notice_id,
    notice_item,
    recent_deliveries,
    recipient_changes,
    revision_events,
    unfinished_removals,
)
from services.inbox.directory_client import EprescriberCache, RecipientCache
from services.inbox.fanout import COUNTED_AT, MARKER, Fanout, held_events, hold_events, repair_index
from services.kit.auth import KIND_SERVICE, SERVICE_SUBJECT_PREFIX, Identity, agency_caller
from services.kit.bus import Consumer, Topology
from services.kit.errors import Forbidden, InvalidInput, NotFound, Unavailable
from services.kit.events import Envelope, PermanentError, unpack
from services.kit.mongo import ensure_indexes, now_ms
from services.kit.processed_events import ProcessedEvents
from services.kit.service_identity import acting_as

# What other modules and tests import from here (the event and its helpers live in delivery_rules).
__all__ = [
    "DELIVERED_EVENT",
    "NOTICES",
    "QUEUE",
    "REQUESTED_EVENT",
    "Delivery",
    "Outcome",
]

log = logging.getLogger(__name__)

REQUESTED_EVENT = "board_item.delivery_requested.v1"
QUEUE = "inbox.board-item-deliveries"
NOTICES = "notices"
WRITE_ATTEMPTS = 8


@dataclass(frozen=True)
class Outcome:
    """What a delivery did: the notice it wrote (or found), its recipients, whether it was new,
    and whether it had any effect (a repeat or an older version has none)."""

    notice_id: str
    recipient_ids: list[str]
    created: bool
    applied: bool


class Delivery(Feature):
    """Producers' items on staff boards: the notices collection, its fan-out to board items,
    the gRPC and event entry points, the repair worker and the reading pane of a notice."""

    outbox_collections = (NOTICES,)

    def __init__(self, components):
        super().__init__(components)
        self.store = components.store
        self.cipher = components.cipher
        self.notices = components.store.db[NOTICES]
        # Directory's word on explicitly addressed staff, trusted for INBOX_RECIPIENTS_CACHE_S.
        self.recipients = RecipientCache(self._ask_directory, components.settings.recipients_cache_s)
        # Who has ePrescribing (the only staff an eRx item may reach), trusted as long.
        self.eprescribers = EprescriberCache(self._ask_eprescribers, components.settings.recipients_cache_s)
        # Other features' fields on a notice as a delivery writes it: hook(agency_id, wanted, notice
        # before, fields) -> more fields (None unsets) (critical-result escalation, services/inbox/escalation.py).
        self.compose_hooks: list[Callable[[str, DeliveryRequest, dict | None, dict], dict]] = []
        # Other features' parts of a notice's reading pane: extra(caller, notice) -> fields.
        self.detail_extras: list[Callable[[Identity, dict], dict]] = []
        self.fanout = Fanout(
            self.notices,
            lambda notice: self._fan_out(notice),  # noqa: PLW0108 - looked up per call: tests stand in for it
            what="delivery",
            revision="rev",
            on_rewritten=self.after_newer_revision,
            counters=components.store,
            owners=lambda notice: [domain.owner_key(notice["agency_id"], s) for s in notice["recipient_ids"]],
            point="inbox.delivery",
        )

    def ensure_indexes(self) -> None:
        ensure_indexes(self.store.db, [repair_index(NOTICES), repair_index(NOTICES, COUNTED_AT)])

    def attach(self) -> None:
        self.components.board.details[domain.KIND_NOTICE] = self.detail

    def background(self):
        return [("delivery-consumer", self.consume), ("delivery-fanout-repair", self.repair_fanouts)]

    # --- the two ways in -----------------------------------------------------------------------
    def deliver_grpc(self, request: inbox_pb2.DeliverItemRequest) -> inbox_pb2.DeliverItemResponse:
        caller = agency_caller()
        if caller.kind != KIND_SERVICE:
            raise Forbidden("service_only", "only services deliver items")
        producer = caller.subject.removeprefix(SERVICE_SUBJECT_PREFIX)
        outcome = self.deliver(caller.agency_id, producer, request, request.delivery_id or None)
        return inbox_pb2.DeliverItemResponse(
            item_id=outcome.notice_id,
            recipient_staff_ids=outcome.recipient_ids,
            created=outcome.created,
            applied=outcome.applied,
        )

    def handle_event(self, envelope: Envelope) -> None:
        """One board_item.delivery_requested.v1: refusals are parked, outages retried. The event id
        is the delivery key when the request names none, covering a redelivery after a crash."""
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)
        if not envelope.agency_id:
            raise PermanentError("no_agency")
        try:
            with acting_as(self.components.service_tokens.identity(envelope.agency_id)):
                self.deliver(envelope.agency_id, envelope.producer, request, request.delivery_id or envelope.event_id)
        except (InvalidInput, Forbidden, NotFound) as exc:
            raise PermanentError(exc.code) from exc

    def handle_batch(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Requested deliveries that arrived together (the consumer's batch_handler): the ones that
        create a new notice are written together (delivery_batch); every other one is handed back,
        to be handled one by one by handle_event, which also finishes anything left half-done."""
        return deliver_batch(self, envelopes)

    def consumer(self, amqp_url: str, topology: Topology, **options) -> Consumer:
        return Consumer(
            amqp_url,
            QUEUE,
            [REQUESTED_EVENT],
            self.handle_event,
            topology=topology,
            processed=ProcessedEvents(self.store.db, QUEUE),
            connection_name="inbox-board-item-deliveries",
            batch_handler=self.handle_batch,
            **options,
        )

    def consume(self, stop: threading.Event) -> None:
        common = self.components.settings.common
        consumer = self.consumer(common.amqp_url, Topology(exchange=common.events_exchange))
        thread = consumer.start()
        try:
            stop.wait()
        finally:
            consumer.stop()
            thread.join(10)

    # --- delivering -------------------------------------------------------------------------------
    def deliver(
        self, agency_id: str, producer: str, request: inbox_pb2.DeliverItemRequest, delivery_key: str | None
    ) -> Outcome:
        wanted = parse_request(request)
        return self.deliver_checked(agency_id, producer, policy_for(producer, wanted.folder), wanted, delivery_key)

    def deliver_checked(  # noqa: PLR0913, PLR0917 - a checked delivery and what it is written with
        self,
        agency_id: str,
        producer: str,
        policy: ProducerPolicy,
        wanted: DeliveryRequest,
        delivery_key: str | None,
        extra: dict | None = None,
    ) -> Outcome:
        """A delivery already checked (a producer's, or one the inbox makes itself: an escalation),
        written with `extra` fields on its notice."""
        nid = notice_id(agency_id, wanted.source, wanted.source_ref)
        resolved: list[str] | None = None
        for _ in range(WRITE_ATTEMPTS):
            notice = self.find_notice(nid)
            if notice is not None:
                self._check_same_item(notice, producer, wanted)
            if is_repeat(notice, delivery_key) or is_stale(notice, wanted.source_version):
                self.complete_fanout(notice)
                return Outcome(nid, list(notice["recipient_ids"]), created=False, applied=False)
            if wanted.withdrawn and (notice is None or notice.get("withdrawn_at")):
                return Outcome(nid, [], created=False, applied=False)
            if resolved is None and not wanted.withdrawn:
                resolved = self._resolved(agency_id, wanted)
            recipients = [] if wanted.withdrawn else self._final(wanted, resolved or [], notice)
            doc = self._write(agency_id, nid, producer, policy, wanted, recipients, notice, delivery_key, extra)
            if doc is not None:
                self.complete_fanout(doc)
                log.info(
                    "item delivered",
                    extra={
                        "agency_id": agency_id,
                        "item_id": nid,
                        "folder": wanted.folder,
                        "recipients": len(doc["recipient_ids"]),
                    },
                )
                return Outcome(nid, list(doc["recipient_ids"]), created=notice is None, applied=True)
        raise Unavailable("busy", "the item is being changed by another delivery; try again")

    @staticmethod
    def _check_same_item(notice: dict, producer: str, wanted: DeliveryRequest) -> None:
        if notice["producer"] != producer:
            raise Forbidden("kind_not_allowed", "this item was delivered by another service")
        if notice["folder"] != wanted.folder:
            raise InvalidInput("kind_changed", "an item keeps the kind it was delivered with", {"field": "kind"})

    def _ask_directory(self, addressing: domain.Addressing):
        return self.components.directory.resolve(addressing)  # looked up per call: tests swap it

    def _ask_eprescribers(self) -> frozenset[str]:
        return frozenset(self.components.directory.eprescriber_ids())  # looked up per call, as above

    def _resolved(self, agency_id: str, wanted: DeliveryRequest) -> list[str]:
        """The delivery's recipients as directory knows them: 400 `unknown_recipients` for ids unknown in
        the agency; for an eRx item, 403 `erx_not_enabled` for a named member without ePrescribing.
        Checked before anything is written (both entry points, and the batch path, come through here)."""
        resolution = self.recipients.resolve(agency_id, wanted.addressing)
        resolved = resolution.require_known("some recipients do not exist in this agency")
        if wanted.folder == domain.FOLDER_ERX:
            resolved = self._with_eprescribing(agency_id, wanted.addressing.staff_ids, resolved)
        return resolved

    def _with_eprescribing(self, agency_id: str, named: tuple[str, ...], resolved: list[str]) -> list[str]:
        """delivery_rules.erx_recipients on who has ePrescribing (a refusal is directory's answer of now)."""
        return self.eprescribers.check(agency_id, lambda ids: erx_recipients(named, resolved, ids))

    def first_recipients(self, agency_id: str, wanted: DeliveryRequest) -> list[str]:
        """Recipients of a delivery creating its notice (nobody holds it yet)."""
        return final_recipients(self._resolved(agency_id, wanted), wanted.actor_staff_id)

    @staticmethod
    def _final(wanted: DeliveryRequest, resolved: list[str], notice: dict | None) -> list[str]:
        holders = [] if notice is None or notice.get("withdrawn_at") else list(notice.get("recipient_ids") or [])
        return final_recipients(resolved, wanted.actor_staff_id, holders)

    def _write(  # noqa: PLR0913, PLR0917 - the delivery and its context, as deliver() has them
        self,
        agency_id: str,
        nid: str,
        producer: str,
        policy: ProducerPolicy,
        wanted: DeliveryRequest,
        recipients: list[str],
        notice: dict | None,
        delivery_key: str | None,
        extra: dict | None = None,
    ) -> dict | None:
        """Write the notice (insert, or update guarded by its revision) with its held events;
        the written document, or None when another delivery wrote it first."""
        doc, fields, events = self.compose(
            agency_id, nid, producer, policy, wanted, recipients, notice, delivery_key, extra=extra
        )
        if notice is None:
            try:
                self.notices.insert_one({**doc, **held_events(events)})
            except DuplicateKeyError:
                return None
            return doc
        to_set = {k: v for k, v in fields.items() if v is not None}
        to_unset = {k: "" for k, v in fields.items() if v is None}
        update: dict = {"$set": to_set}
        if to_unset:
            update["$unset"] = to_unset
        update = hold_events(update, events)
        guard = {"_id": {"$eq": nid}, "rev": {"$eq": notice["rev"]}}
        return doc if self.notices.update_one(guard, update).matched_count else None

    def compose(  # noqa: PLR0913, PLR0917 - as _write
        self,
        agency_id: str,
        nid: str,
        producer: str,
        policy: ProducerPolicy,
        wanted: DeliveryRequest,
        recipients: list[str],
        notice: dict | None,
        delivery_key: str | None,
        *,
        extra: dict | None = None,
    ) -> tuple[dict, dict, list[Envelope]]:
        """(the notice as it will be, the fields this delivery writes, its held events). `extra` and
        the compose hooks add fields (None unsets one)."""
        at = now_ms()
        before = list((notice or {}).get("recipient_ids") or [])
        added, removed = recipient_changes(before, recipients)
        removed = [*removed, *unfinished_removals(notice, recipients, removed)]
        fields = {
            "agency_id": agency_id,
            "producer": producer,
            "folder": wanted.folder,
            "source": wanted.source,
            "source_ref": wanted.source_ref,
            "sender_name": policy.display_name,
            "source_version": max(wanted.source_version, int((notice or {}).get("source_version") or 0)),
            "deliveries": recent_deliveries(notice, delivery_key),
            "recipient_ids": recipients,
            "removed_ids": removed,
            "delivered_at": at,
            MARKER: at,
            # Whose own change this revision is: their item, if kept, stays as read as it was.
            "actor_staff_id": None if wanted.withdrawn else wanted.actor_staff_id,
        }
        if wanted.withdrawn:
            fields["withdrawn_at"] = at
        else:
            fields.update(self._content(agency_id, nid, wanted, notice, at))
        fields.update(extra or {})
        for hook in self.compose_hooks:
            fields.update(hook(agency_id, wanted, notice, fields))
        fields["rev"] = int((notice or {}).get("rev") or 0) + 1
        merged = {"created_at": at, **(notice or {}), "_id": nid, **fields}
        doc = {k: v for k, v in merged.items() if v is not None}
        events = [] if wanted.withdrawn else revision_events(doc, set(added), at)
        return doc, fields, events

    def _content(self, agency_id: str, nid: str, wanted: DeliveryRequest, notice: dict | None, at: int) -> dict:
        """The sealed content and display state of a (re)delivered item; None values are removed."""
        seal = self.cipher.seal
        previous = notice or {}
        unread_since = at if (notice is None or wanted.mark_unread or previous.get("withdrawn_at")) else None
        links = [{"label": label, "url": url} for label, url in wanted.links]
        return {
            "title": seal(agency_id, nid, "title", wanted.title),
            "summary": seal(agency_id, nid, "summary", wanted.summary) if wanted.summary else None,
            "patient_name": seal(agency_id, nid, "patient_name", wanted.patient_name) if wanted.patient_name else None,
            "links": seal(agency_id, nid, "links", json.dumps(links)),
            "severity": wanted.severity,
            "status": wanted.status,
            "due_at": wanted.due_at,
            "resolved_at": (previous.get("resolved_at") or at) if wanted.resolved else None,
            "unread_since": unread_since or previous.get("unread_since") or at,
            "withdrawn_at": None,
        }

    # --- fan-out --------------------------------------------------------------------------------
    def find_notice(self, nid: str) -> dict | None:
        return self.notices.find_one({"_id": {"$eq": nid}}, projection={"_outbox": 0})

    def complete_fanout(self, notice: dict | None) -> None:
        """Bring every board item in line with the notice, then release its events and clear the
        marker in one write guarded by the revision (fanout.Fanout)."""
        self.fanout.complete(notice)

    def after_newer_revision(self, nid: str) -> dict | None:
        """A newer revision was written while an older one fanned out. If its own fan-out already
        finished, this pass may have put back an item it took away: its state is applied once
        more (idempotent). Returns the notice when its fan-out is still to be done, else None."""
        notice = self.find_notice(nid)
        if notice is not None and MARKER not in notice:
            self._fan_out(notice)
            return None
        return notice

    def _fan_out(self, notice: dict) -> None:
        self._fan_out_all([notice])

    def _fan_out_all(self, notices: list[dict]) -> None:
        """Board items in line with each notice: the new ones of all of them in one insert, counted
        by their revision's pass (one counter write per owner), the existing ones changed one by one."""
        for notice in notices:
            for staff_id in notice.get("removed_ids") or []:
                self.store.delete_item(domain.board_item_id(notice["_id"], staff_id, notice["folder"]), staff_id)
        passes = {
            self.fanout.pass_key(notice): [notice_item(notice, staff_id) for staff_id in notice["recipient_ids"]]
            for notice in notices
        }
        placement = self.store.place_items(passes)
        self.fanout.count(placement.placed)
        for notice in notices:
            for staff_id in notice["recipient_ids"]:
                item_id = domain.board_item_id(notice["_id"], staff_id, notice["folder"])
                if item_id not in placement.inserted:
                    current = placement.existing.get(item_id)
                    self.store.change_item(item_id, lambda it, notice=notice: item_patch(it, notice), current=current)

    def repair_fanouts(self, stop: threading.Event, interval_s: float = 5.0) -> None:
        """Finish deliveries interrupted between the notice write and the board items."""
        self.fanout.run_repairs(stop, interval_s)

    # --- the reading pane -------------------------------------------------------------------------
    def detail(self, caller: Identity, item: dict) -> dict:
        """A delivered item's content for its recipient (Board.open_item); audited."""
        notice = self.find_notice(item["ref_id"])
        if (
            notice is None
            or notice["agency_id"] != caller.agency_id
            # The caller's own item: theirs, or a coverer's copy of a recipient's (services/inbox/coverage.py).
            or not {caller.staff_id, (item.get("covering_for") or {}).get("staff_id")}
            & set(notice.get("recipient_ids", []))
        ):
            raise audit.refuse(
                self.store,
                caller,
                item["ref_id"],
                "read",
                resource_type="notice",
                code="item_not_found",
                message="no such item",
            )
        agency, nid = caller.agency_id, notice["_id"]
        content = {
            "title": self.cipher.open(agency, nid, "title", notice["title"]),
            "summary": self.cipher.open(agency, nid, "summary", notice["summary"]) if notice.get("summary") else "",
            "links": json.loads(self.cipher.open(agency, nid, "links", notice["links"])),
            "severity": notice["severity"],
            "status": notice.get("status"),
            "due_at": iso(notice.get("due_at")),
            "resolved_at": iso(notice.get("resolved_at")),
            "source": notice["source"],
            "source_ref": notice["source_ref"],
        }
        if notice.get("patient_name"):  # whom it is about, in the agency's word for them ("Client")
            content["patient"] = {"name": self.cipher.open(agency, nid, "patient_name", notice["patient_name"])}
        for extra in self.detail_extras:
            content.update(extra(caller, notice))
        audit.record_read(self.store, caller, nid, resource_type="notice")
        return content
