"""Requested deliveries that arrive together (the bus consumer's batch_handler).

Those that create a new notice share their writes, with the guarantees of one delivery at a time
(the same documents, ids, revisions and held events): one `_id $in` read of the notices, one
insert of the notices (events held, `fanout_pending_at` set), one insert of all their board items
and one counter write per owner, one release of all their events. Every other event (an update,
a withdrawal, a second one for the same item, a refusal, an outage) is handed back, to be handled
one by one by Delivery.handle_event, which also finishes anything left half-done here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from clinic.inbox.v1 import inbox_pb2
from services.inbox.delivery_request import parse_request, policy_for
from services.inbox.delivery_rules import notice_id
from services.inbox.fanout import held_events
from services.kit.bus import event_context
from services.kit.events import Envelope, PermanentError, unpack
from services.kit.service_identity import acting_as

if TYPE_CHECKING:
    from services.inbox.delivery import Delivery

log = logging.getLogger(__name__)

FIRST_REVISION = 1


class _OneByOne(Exception):
    """A requested delivery the batch leaves to handle_event."""


@dataclass(frozen=True)
class NewNotice:
    """A requested delivery that creates its notice: the event, and the notice as it will be
    written with the events it holds."""

    envelope: Envelope
    notice: dict
    events: list[Envelope]

    @property
    def notice_id(self) -> str:
        return self.notice["_id"]


def deliver_batch(delivery: Delivery, envelopes: list[Envelope]) -> list[Envelope]:
    """Write the batch's new notices together; returns the events left for handle_event, in the
    order they came."""
    left: list[Envelope] = []
    prepared: list[NewNotice] = []
    for envelope in envelopes:
        try:
            with event_context(envelope):
                prepared.append(prepare_new(delivery, envelope))
        except Exception:  # noqa: BLE001 - whatever it is, handle_event meets it again and decides
            left.append(envelope)
    nids = [new.notice_id for new in prepared]
    found = delivery.notices.find({"_id": {"$in": nids}}, {"_id": 1}) if nids else []
    existing = {doc["_id"] for doc in found}
    fresh = []
    for new in prepared:
        if new.notice_id in existing or nids.count(new.notice_id) > 1:
            left.append(new.envelope)
        else:
            fresh.append(new)
    if not fresh:
        return in_order(envelopes, left)
    inserted_ids = insert_notices(delivery.notices, [{**new.notice, **held_events(new.events)} for new in fresh])
    written = [new for new in fresh if new.notice_id in inserted_ids]
    left += [new.envelope for new in fresh if new.notice_id not in inserted_ids]
    delivery._fan_out_all([new.notice for new in written])  # the fan-out step (tests stand in for it)
    written_ids = [new.notice_id for new in written]
    if delivery.fanout.release_all(written_ids, FIRST_REVISION) < len(written):
        # Another delivery rewrote one meanwhile: bring its items in line with that revision
        # too (this fan-out may have put back an item it took away), as complete_fanout does.
        for nid in written_ids:
            current = delivery.find_notice(nid)
            if current is not None and current["rev"] != FIRST_REVISION:
                delivery.complete_fanout(delivery.after_newer_revision(nid))
    for new in written:
        with event_context(new.envelope):
            log.info(
                "item delivered",
                extra={
                    "agency_id": new.notice["agency_id"],
                    "item_id": new.notice_id,
                    "folder": new.notice["folder"],
                    "recipients": len(new.notice["recipient_ids"]),
                },
            )
    return in_order(envelopes, left)


def in_order(envelopes: list[Envelope], left: list[Envelope]) -> list[Envelope]:
    ids = {envelope.event_id for envelope in left}
    return [envelope for envelope in envelopes if envelope.event_id in ids]


def prepare_new(delivery: Delivery, envelope: Envelope) -> NewNotice:
    """The notice a requested delivery would create, with its held events; raises for anything
    else (handle_event then decides)."""
    request = unpack(envelope, inbox_pb2.DeliverItemRequest)
    agency_id = envelope.agency_id
    if not agency_id:
        raise PermanentError("no_agency")
    wanted = parse_request(request)
    if wanted.withdrawn:
        raise _OneByOne
    policy = policy_for(envelope.producer, wanted.folder)
    nid = notice_id(agency_id, wanted.source, wanted.source_ref)
    with acting_as(delivery.components.service_tokens.identity(agency_id)):
        recipients = delivery.first_recipients(agency_id, wanted)
    delivery_key = request.delivery_id or envelope.event_id
    doc, _, events = delivery.compose(agency_id, nid, envelope.producer, policy, wanted, recipients, None, delivery_key)
    return NewNotice(envelope, doc, events)


def insert_notices(notices: Collection, docs: list[dict]) -> set[str]:
    """Insert new notices; the ids inserted (one another delivery created meanwhile is left out)."""
    try:
        notices.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(error.get("code") != 11000 for error in errors):
            raise
        failed = {error["index"] for error in errors}
        return {doc["_id"] for index, doc in enumerate(docs) if index not in failed}
    return {doc["_id"] for doc in docs}
