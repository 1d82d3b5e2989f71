"""The delivery API: other services put items on boards
(gRPC DeliverItem and the board_item.delivery_requested.v1 event).

A producer (notifications, erx-bridge, cloud-comms) delivers a *notice*: a title, an optional
summary, a severity, a status, a due time and action links, addressed to staff, teams or the
whole agency. One `notices` document per (agency, source, source_ref) is the record of truth; a
later delivery with the same source and source_ref updates it in place (new title or status,
resolved, withdrawn, recipients added or removed) instead of creating a second item.

Writes without multi-document transactions, as a send does (see Mailbox):
1. the notice document is written first, guarded by its revision (`rev`), with the held
   `board_item.delivered.v1` events and `fanout_pending_at` set;
2. the board items are brought in line with it: repeatably inserted (deterministic ids),
   changed through InboxStore.change_item (counters stay exact), or deleted;
3. one write releases the events and clears `fanout_pending_at`. A crash in between is finished
   by the repair worker.

Repeats have their effect once: the consumer records processed event ids, and every notice keeps
its last delivery ids (a gRPC `delivery_id`, or the event id), so a repeat answers applied=false.
An update whose `source_version` is lower than the stored one is ignored the same way.

`DeliverItemResponse.item_id` is the notice id, which is the `ref_id` of every board item it put
on a board; `BoardItemDelivered.item_id` is that recipient's board item id.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from clinic.inbox.v1 import inbox_pb2
from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Feature
from services.inbox.directory_client import RecipientCache
from services.inbox.store import REMOVE
from services.kit.auth import KIND_SERVICE, SERVICE_SUBJECT_PREFIX, Identity, agency_caller
from services.kit.bus import Consumer, ProcessedEvents, Topology, event_context
from services.kit.errors import DomainError, Forbidden, InvalidInput, NotFound, Unavailable
from services.kit.events import Envelope, PermanentError, new_envelope, unpack
from services.kit.logs import correlation_id_var
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import merge_update, outbox_fields, release_update, with_outbox
from services.kit.runtime import every
from services.kit.service_identity import acting_as
from services.kit.validation import Id, Link, ListOf, Str

log = logging.getLogger(__name__)

PRODUCER = "inbox"
REQUESTED_EVENT = "board_item.delivery_requested.v1"
DELIVERED_EVENT = "board_item.delivered.v1"
QUEUE = "inbox.board-item-deliveries"
NOTICES = "notices"
FANOUT_REPAIR_AFTER_MS = 10_000
RECENT_DELIVERIES = 50
WRITE_ATTEMPTS = 8

MAX_TITLE = 200
MAX_SUMMARY = 1000
MAX_LINKS = 10
MAX_LINK_LABEL = 80
MAX_REF = 128
# Source, source_ref and delivery ids: printable ASCII without spaces.
REF_PATTERN = re.compile(r"^[\x21-\x7e]+$")
STATUS_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ProducerPolicy:
    """What one registered service client may deliver, and the sender name its items show."""

    folders: frozenset[str]
    display_name: str


# Producer (service client name) -> what it may deliver. Anyone else is refused.
PRODUCERS: dict[str, ProducerPolicy] = {
    "notifications": ProducerPolicy(
        frozenset({domain.FOLDER_SCHEDULE, domain.FOLDER_LAB, domain.FOLDER_COMPLIANCE}), "Notifications"
    ),
    "erx-bridge": ProducerPolicy(frozenset({domain.FOLDER_ERX}), "eRx"),
    "cloud-comms": ProducerPolicy(frozenset({domain.FOLDER_CLOUD}), "Cloud Communications"),
}

KIND_FOLDERS: dict[int, str] = {
    inbox_pb2.DELIVERED_KIND_SCHEDULE: domain.FOLDER_SCHEDULE,
    inbox_pb2.DELIVERED_KIND_ERX: domain.FOLDER_ERX,
    inbox_pb2.DELIVERED_KIND_COMPLIANCE: domain.FOLDER_COMPLIANCE,
    inbox_pb2.DELIVERED_KIND_LAB: domain.FOLDER_LAB,
    inbox_pb2.DELIVERED_KIND_CLOUD: domain.FOLDER_CLOUD,
}
SEVERITY_NAMES: dict[int, str] = {
    inbox_pb2.SEVERITY_UNSPECIFIED: "info",
    inbox_pb2.SEVERITY_INFO: "info",
    inbox_pb2.SEVERITY_ABNORMAL: "abnormal",
    inbox_pb2.SEVERITY_URGENT: "urgent",
}
SEVERITY_TO_PB: dict[str, int] = {
    "info": inbox_pb2.SEVERITY_INFO,
    "abnormal": inbox_pb2.SEVERITY_ABNORMAL,
    "urgent": inbox_pb2.SEVERITY_URGENT,
}

TITLE = Str(max_len=MAX_TITLE)
SUMMARY = Str(max_len=MAX_SUMMARY, min_len=0, required=False)
STATUS = Str(max_len=40, required=False, pattern=STATUS_PATTERN)
REF = Str(max_len=MAX_REF, pattern=REF_PATTERN)
LINK_LABEL = Str(max_len=MAX_LINK_LABEL)
STAFF_IDS = ListOf(Id(), max_items=500)
TEAM_IDS = ListOf(Id(), max_items=100)


# --- pure rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRequest:
    """A DeliverItemRequest, validated."""

    folder: str
    addressing: domain.Addressing
    title: str | None = field(repr=False)  # minimum necessary, yet never in a repr
    summary: str | None = field(repr=False)
    severity: str
    status: str | None
    due_at: int | None
    links: tuple[tuple[str, str], ...]
    source: str
    source_ref: str
    resolved: bool
    withdrawn: bool
    source_version: int
    delivery_id: str | None
    mark_unread: bool
    actor_staff_id: str | None


def folder_for(kind: int) -> str:
    """The folder a delivered kind lands in."""
    folder = KIND_FOLDERS.get(kind)
    if folder is None:
        raise InvalidInput("invalid_kind", "kind must be one of the delivered kinds", {"field": "kind"})
    return folder


def policy_for(producer: str, folder: str) -> ProducerPolicy:
    """The producer's policy, if it may deliver into `folder`; Forbidden otherwise."""
    policy = PRODUCERS.get(producer)
    if policy is None or folder not in policy.folders:
        raise Forbidden("kind_not_allowed", "this service may not deliver items of this kind")
    return policy


def parse_request(request: inbox_pb2.DeliverItemRequest) -> DeliveryRequest:
    """Validate every field before anything is read or written. A withdrawal needs only the
    source and source_ref; every other delivery needs a title and recipients."""
    folder = folder_for(request.kind)
    if request.severity not in SEVERITY_NAMES:
        raise InvalidInput("invalid_value", "severity is not a known value", {"field": "severity"})
    if request.source_version < 0:
        raise InvalidInput("invalid_value", "source_version must not be negative", {"field": "source_version"})
    withdrawn = bool(request.withdrawn)
    addressing = domain.Addressing(
        staff_ids=tuple(STAFF_IDS.clean("recipients.staff_ids", list(request.recipients.staff_ids))),
        team_ids=tuple(TEAM_IDS.clean("recipients.team_ids", list(request.recipients.team_ids))),
        whole_agency=bool(request.recipients.whole_agency),
    )
    if addressing.is_empty() and not withdrawn:
        raise InvalidInput("no_recipients", "address the item to staff, teams or the whole agency")
    if not request.title and withdrawn:
        title = None
    else:
        title = required(TITLE, "title", request.title)
    due_at = None
    if request.HasField("due_at"):
        try:
            due_at = request.due_at.ToMilliseconds()
        except ValueError as exc:  # outside what a Timestamp may hold (year 1..9999, valid nanos)
            raise InvalidInput("invalid_value", "due_at is not a valid time", {"field": "due_at"}) from exc
        if due_at <= 0:
            raise InvalidInput("invalid_value", "due_at must be a time after 1970", {"field": "due_at"})
    return DeliveryRequest(
        folder=folder,
        addressing=addressing,
        title=title,
        summary=SUMMARY.clean("summary", request.summary) or None,
        severity=SEVERITY_NAMES[request.severity],
        status=STATUS.clean("status", request.status) if request.status else None,
        due_at=due_at,
        links=parse_links(request.links),
        source=required(REF, "source", request.source),
        source_ref=required(REF, "source_ref", request.source_ref),
        resolved=bool(request.resolved),
        withdrawn=withdrawn,
        source_version=int(request.source_version),
        delivery_id=REF.clean("delivery_id", request.delivery_id) if request.delivery_id else None,
        mark_unread=bool(request.mark_unread),
        actor_staff_id=Id().clean("actor_staff_id", request.actor_staff_id) if request.actor_staff_id else None,
    )


def parse_links(links) -> tuple[tuple[str, str], ...]:
    if len(links) > MAX_LINKS:
        raise InvalidInput("too_many", f"links may hold at most {MAX_LINKS} items", {"field": "links"})
    return tuple(
        (required(LINK_LABEL, f"links[{i}].label", link.label), required(Link(), f"links[{i}].url", link.url))
        for i, link in enumerate(links)
    )


def required(spec: Str, path: str, value: str) -> str:
    """A protobuf string is empty when it was not set: that is a missing field."""
    if not value:
        raise InvalidInput("missing_field", f"{path} is required", {"field": path})
    return spec.clean(path, value)


def notice_id(agency_id: str, source: str, source_ref: str) -> str:
    """One notice per (agency, source, source_ref), so a redelivery finds the item it updates."""
    return "ntc_" + domain.digest(agency_id, source, source_ref)[:32]


def final_recipients(resolved: list[str], actor_staff_id: str | None, holders: list[str] | None = None) -> list[str]:
    """Resolved staff, each once. The staff member whose own action caused the item is never given
    it, but keeps the item they already hold (`holders`), unread or not as before (item_patch)."""
    held = set(holders or ())
    recipients = [s for s in dict.fromkeys(resolved) if s != actor_staff_id or s in held]
    if not recipients:
        raise InvalidInput("no_recipients", "the item has no recipients")
    return recipients


def recipient_changes(before: list[str], after: list[str]) -> tuple[list[str], list[str]]:
    """(added, removed): who gets a new item, whose item goes."""
    old, new = set(before), set(after)
    return [s for s in after if s not in old], [s for s in before if s not in new]


def unfinished_removals(notice: dict | None, recipients: list[str], removed: list[str]) -> list[str]:
    """Removals of a revision whose fan-out has not finished (a crash): the revision written over it
    must still take those items away, since its own recipient change no longer names them."""
    if not notice or "fanout_pending_at" not in notice:
        return []
    return [s for s in notice.get("removed_ids") or [] if s not in recipients and s not in removed]


def is_repeat(notice: dict | None, delivery_key: str | None) -> bool:
    return bool(notice and delivery_key and delivery_key in (notice.get("deliveries") or []))


def is_stale(notice: dict | None, source_version: int) -> bool:
    """An update older than the stored one; version 0 always applies."""
    return bool(notice and source_version and source_version < int(notice.get("source_version") or 0))


def recent_deliveries(notice: dict | None, delivery_key: str | None) -> list[str]:
    known = list((notice or {}).get("deliveries") or [])
    if delivery_key:
        known.append(delivery_key)
    return known[-RECENT_DELIVERIES:]


def delivered_event(
    item: dict, created: bool, at_ms: int, *, severity: str = "info", event_id: str | None = None
) -> Envelope:
    """`board_item.delivered.v1` for a board item that landed on (or came back to) its owner's board
    at `at_ms`. The event id is one per item and time unless the caller names one (a notice names
    one per revision, so each revision announces each item once)."""
    delivered_at = Timestamp()
    delivered_at.FromMilliseconds(at_ms)
    payload = inbox_pb2.BoardItemDelivered(
        item_id=item["_id"],
        agency_id=item["agency_id"],
        recipient_staff_id=item["owner_id"],
        board_kind=item.get("folder") or item.get("origin_folder", ""),
        severity=SEVERITY_TO_PB[severity],
        created=created,
        delivered_at=delivered_at,
    )
    return new_envelope(
        DELIVERED_EVENT,
        payload,
        agency_id=item["agency_id"],
        producer=PRODUCER,
        correlation_id=correlation_id_var.get(),
        event_id=event_id or f"{item['_id']}-{at_ms}-delivered",
    )


def item_state(notice: dict) -> dict:
    """The fields every recipient's item carries from its notice (None: absent)."""
    return {
        "title": notice.get("title"),
        "summary": notice.get("summary"),
        "severity": notice["severity"],
        "status": notice.get("status"),
        "due_at": notice.get("due_at"),
        "resolved_at": notice.get("resolved_at"),
        "urgent": int(notice["severity"] == "urgent"),
        "sender_name": notice["sender_name"],
        "notice_rev": notice["rev"],
    }


def item_patch(item: dict, notice: dict) -> dict | None:
    """What brings one recipient's item in line with its notice; None when it already is (or the
    item was brought in line with a newer revision). Resolved makes it read; `unread_since`
    (creation or mark_unread) makes an item read before it unread again, and moves an item that
    arrived before it to the top of its list (sent_at and sort_key become that time)."""
    if int(item.get("notice_rev") or 0) > notice["rev"]:
        return None
    patch: dict = {}
    for key, value in item_state(notice).items():
        if value is None:
            if item.get(key) is not None:
                patch[key] = REMOVE
        elif item.get(key) != value:
            patch[key] = value
    read_at = item.get("read_at")
    unread_since = int(notice.get("unread_since") or 0)
    if notice.get("resolved_at"):
        read_at = read_at or notice["resolved_at"]
    elif read_at and read_at < unread_since:
        # The maker of the change keeps their item as read: read as of this revision.
        read_at = unread_since if item.get("owner_id") == notice.get("actor_staff_id") else None
    if read_at != item.get("read_at"):
        patch["read_at"] = read_at
    # Marked unread again (a corrected result, an appointment moved): back at the top of the list.
    if not read_at and unread_since > int(item.get("sent_at") or 0):
        patch["sent_at"] = unread_since
        patch["sort_key"] = domain.sort_key(unread_since, item["_id"])
    if item.get("board"):
        keys = domain.item_keys(
            item["agency_id"],
            item["owner_id"],
            item["folder"],
            unread=not read_at,
            urgent=notice["severity"] == "urgent",
        )
        patch.update({k: v for k, v in keys.items() if item.get(k) != v})
    return patch or None


class _OneByOne(Exception):
    """A requested delivery the batch leaves to handle_event."""


# --- the feature ------------------------------------------------------------------------------


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

    def ensure_indexes(self) -> None:
        ensure_indexes(self.store.db, [IndexSpec(NOTICES, [("fanout_pending_at", 1)], name="fanout_pending")])

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
        create a new notice are written together, the same writes as one by one, each shared by
        the batch: the notices (one insert), their board items (one insert) and counters (one
        write per owner), the release of their events (one update). Every other event (an update,
        a withdrawal, a second one for the same item, a refusal, an outage) is handed back, to be
        handled one by one by handle_event, which also finishes anything left half-done here."""
        left: list[Envelope] = []
        prepared: list[tuple[Envelope, str, dict, list[Envelope]]] = []
        for envelope in envelopes:
            try:
                with event_context(envelope):
                    prepared.append((envelope, *self._prepare_new(envelope)))
            except Exception:  # noqa: BLE001 - whatever it is, handle_event meets it again and decides
                left.append(envelope)
        nids = [nid for _, nid, _, _ in prepared]
        existing = {doc["_id"] for doc in self.notices.find({"_id": {"$in": nids}}, {"_id": 1})} if nids else set()
        fresh = []
        for envelope, nid, doc, events in prepared:
            if nid in existing or nids.count(nid) > 1:
                left.append(envelope)
            else:
                fresh.append((envelope, nid, doc, events))
        if not fresh:
            return self._in_order(envelopes, left)
        inserted_ids = self._insert_notices(
            [{**doc, **outbox_fields(events, ready=False)} for _, _, doc, events in fresh]
        )
        written = [entry for entry in fresh if entry[1] in inserted_ids]
        left += [entry[0] for entry in fresh if entry[1] not in inserted_ids]
        self._fan_out_all([doc for _, _, doc, _ in written])
        update = merge_update(release_update(), {"$unset": {"fanout_pending_at": ""}})
        nids = [nid for _, nid, _, _ in written]
        released = self.notices.update_many({"_id": {"$in": nids}, "rev": {"$eq": 1}}, update)
        if released.matched_count < len(written):
            # Another delivery rewrote one meanwhile: bring its items in line with that revision
            # too (this fan-out may have put back an item it took away), as complete_fanout does.
            for nid in nids:
                current = self._notice(nid)
                if current is not None and current["rev"] != 1:
                    self.complete_fanout(self._after_newer_revision(nid))
        for envelope, nid, doc, _ in written:
            with event_context(envelope):
                log.info(
                    "item delivered",
                    extra={
                        "agency_id": doc["agency_id"],
                        "item_id": nid,
                        "folder": doc["folder"],
                        "recipients": len(doc["recipient_ids"]),
                    },
                )
        return self._in_order(envelopes, left)

    @staticmethod
    def _in_order(envelopes: list[Envelope], left: list[Envelope]) -> list[Envelope]:
        ids = {envelope.event_id for envelope in left}
        return [envelope for envelope in envelopes if envelope.event_id in ids]

    def _prepare_new(self, envelope: Envelope) -> tuple[str, dict, list[Envelope]]:
        """(notice id, notice, held events) of a requested delivery that would create its notice;
        raises for anything else (handle_event then decides)."""
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)
        agency_id = envelope.agency_id
        if not agency_id:
            raise PermanentError("no_agency")
        wanted = parse_request(request)
        if wanted.withdrawn:
            raise _OneByOne
        policy = policy_for(envelope.producer, wanted.folder)
        nid = notice_id(agency_id, wanted.source, wanted.source_ref)
        with acting_as(self.components.service_tokens.identity(agency_id)):
            recipients = self._resolve(agency_id, wanted)
        delivery_key = request.delivery_id or envelope.event_id
        producer = envelope.producer
        doc, _, events = self._compose(agency_id, nid, producer, policy, wanted, recipients, None, delivery_key)
        return nid, doc, events

    def _insert_notices(self, docs: list[dict]) -> set[str]:
        """Insert new notices; the ids inserted (one another delivery created meanwhile is left out)."""
        try:
            self.notices.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != 11000 for error in errors):
                raise
            failed = {error["index"] for error in errors}
            return {doc["_id"] for index, doc in enumerate(docs) if index not in failed}
        return {doc["_id"] for doc in docs}

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
        policy = policy_for(producer, wanted.folder)
        nid = notice_id(agency_id, wanted.source, wanted.source_ref)
        resolved: list[str] | None = None
        for _ in range(WRITE_ATTEMPTS):
            notice = self._notice(nid)
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
            doc = self._write(agency_id, nid, producer, policy, wanted, recipients, notice, delivery_key)
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

    def _resolved(self, agency_id: str, wanted: DeliveryRequest) -> list[str]:
        resolution = self.recipients.resolve(agency_id, wanted.addressing)
        return resolution.require_known("some recipients do not exist in this agency")

    def _resolve(self, agency_id: str, wanted: DeliveryRequest) -> list[str]:
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
    ) -> dict | None:
        """Write the notice (insert, or update guarded by its revision) with its held events;
        the written document, or None when another delivery wrote it first."""
        doc, fields, events = self._compose(agency_id, nid, producer, policy, wanted, recipients, notice, delivery_key)
        if notice is None:
            try:
                self.notices.insert_one({**doc, **outbox_fields(events, ready=False)})
            except DuplicateKeyError:
                return None
            return doc
        to_set = {k: v for k, v in fields.items() if v is not None}
        to_unset = {k: "" for k, v in fields.items() if v is None}
        update: dict = {"$set": to_set}
        if to_unset:
            update["$unset"] = to_unset
        if events:
            update = with_outbox(update, events, ready=False)
        guard = {"_id": {"$eq": nid}, "rev": {"$eq": notice["rev"]}}
        return doc if self.notices.update_one(guard, update).matched_count else None

    def _compose(  # noqa: PLR0913, PLR0917 - as _write
        self,
        agency_id: str,
        nid: str,
        producer: str,
        policy: ProducerPolicy,
        wanted: DeliveryRequest,
        recipients: list[str],
        notice: dict | None,
        delivery_key: str | None,
    ) -> tuple[dict, dict, list[Envelope]]:
        """(the notice as it will be, the fields this delivery writes, its held events)."""
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
            "fanout_pending_at": at,
            # Whose own change this revision is: their item, if kept, stays as read as it was.
            "actor_staff_id": None if wanted.withdrawn else wanted.actor_staff_id,
        }
        if wanted.withdrawn:
            fields["withdrawn_at"] = at
        else:
            fields.update(self._content(agency_id, nid, wanted, notice, at))
        fields["rev"] = int((notice or {}).get("rev") or 0) + 1
        merged = {"created_at": at, **(notice or {}), "_id": nid, **fields}
        doc = {k: v for k, v in merged.items() if v is not None}
        events = [] if wanted.withdrawn else self._events(doc, set(added), at)
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
            "links": seal(agency_id, nid, "links", json.dumps(links)),
            "severity": wanted.severity,
            "status": wanted.status,
            "due_at": wanted.due_at,
            "resolved_at": (previous.get("resolved_at") or at) if wanted.resolved else None,
            "unread_since": unread_since or previous.get("unread_since") or at,
            "withdrawn_at": None,
        }

    @staticmethod
    def _events(doc: dict, added: set[str], at: int) -> list[Envelope]:
        """One `board_item.delivered.v1` per recipient's item of this revision of the notice."""
        events = []
        for staff_id in doc["recipient_ids"]:
            item_id = domain.board_item_id(doc["_id"], staff_id, doc["folder"])
            item = {"_id": item_id, "agency_id": doc["agency_id"], "owner_id": staff_id, "folder": doc["folder"]}
            event_id = "bid_" + domain.digest(item_id, str(doc["rev"]))[:32]
            events.append(delivered_event(item, staff_id in added, at, severity=doc["severity"], event_id=event_id))
        return events

    # --- fan-out --------------------------------------------------------------------------------
    def _notice(self, nid: str) -> dict | None:
        return self.notices.find_one({"_id": {"$eq": nid}}, projection={"_outbox": 0})

    def complete_fanout(self, notice: dict) -> None:
        """Bring every board item in line with the notice, then release its events and clear the
        marker in one write guarded by the revision. When a newer revision was written meanwhile,
        its state is applied too, so an item this pass put back on a board it left is removed."""
        for _ in range(WRITE_ATTEMPTS):
            if notice is None or "fanout_pending_at" not in notice:
                return
            self._fan_out(notice)
            update = merge_update(release_update(), {"$unset": {"fanout_pending_at": ""}})
            guard = {"_id": {"$eq": notice["_id"]}, "rev": {"$eq": notice["rev"]}}
            if self.notices.update_one(guard, update).matched_count:
                return
            notice = self._after_newer_revision(notice["_id"])

    def _after_newer_revision(self, nid: str) -> dict | None:
        """A newer revision was written while an older one fanned out. If its own fan-out already
        finished, this pass may have put back an item it took away: its state is applied once
        more (idempotent). Returns the notice when its fan-out is still to be done, else None."""
        notice = self._notice(nid)
        if notice is not None and "fanout_pending_at" not in notice:
            self._fan_out(notice)
            return None
        return notice

    def _fan_out(self, notice: dict) -> None:
        self._fan_out_all([notice])

    def _fan_out_all(self, notices: list[dict]) -> None:
        """Board items in line with each notice: the new ones of all of them in one insert (and one
        counter write per owner), the existing ones changed one by one."""
        for notice in notices:
            for staff_id in notice.get("removed_ids") or []:
                self.store.delete_item(domain.board_item_id(notice["_id"], staff_id, notice["folder"]), staff_id)
        items = [(notice, self._item(notice, staff_id)) for notice in notices for staff_id in notice["recipient_ids"]]
        inserted = {item["_id"] for item in self.store.insert_board_items([item for _, item in items])}
        for notice, item in items:
            if item["_id"] not in inserted:
                self.store.change_item(item["_id"], lambda it, notice=notice: item_patch(it, notice))

    @staticmethod
    def _item(notice: dict, staff_id: str) -> dict:
        state = {k: v for k, v in item_state(notice).items() if v is not None and k != "urgent"}
        return domain.new_item(
            agency_id=notice["agency_id"],
            owner_id=staff_id,
            folder=notice["folder"],
            kind=domain.KIND_NOTICE,
            ref_id=notice["_id"],
            at_ms=notice["delivered_at"],
            unread=not notice.get("resolved_at"),
            urgent=notice["severity"] == "urgent",
            sender_id=notice["producer"],
            sender_kind=KIND_SERVICE,
            **state,
        )

    def repair_fanouts(self, stop: threading.Event, interval_s: float = 5.0) -> None:
        """Finish deliveries interrupted between the notice write and the board items; a pass that
        meets an outage or a busy item is tried again next time."""
        every(stop, interval_s, self.repair_pending, "delivery repair", errors=(PyMongoError, DomainError))

    def repair_pending(self) -> None:
        """One repair pass: the oldest notices whose fan-out has been pending for a while."""
        pending = self.notices.find(
            {"fanout_pending_at": {"$lte": now_ms() - FANOUT_REPAIR_AFTER_MS}}, projection={"_outbox": 0}
        )
        for notice in pending.sort("fanout_pending_at", 1).limit(100):
            self.complete_fanout(notice)
            log.info("finished interrupted delivery", extra={"agency_id": notice["agency_id"]})

    # --- the reading pane -------------------------------------------------------------------------
    def detail(self, caller: Identity, item: dict) -> dict:
        """A delivered item's content for its recipient (Board.open_item); audited."""
        notice = self._notice(item["ref_id"])
        if (
            notice is None
            or notice["agency_id"] != caller.agency_id
            or caller.staff_id not in notice.get("recipient_ids", [])
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
        audit.record_read(self.store, caller, nid, resource_type="notice")
        return content
