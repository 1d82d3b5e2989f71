"""Delivery into inbox: every board item this service produces is a `board_item.delivery_requested.v1`
event (payload clinic.inbox.v1.DeliverItemRequest) staged in the same document write as the state
it announces (the kit's outbox); the relay publishes it and inbox's consumer puts it on the boards.

inbox upserts by (agency, source, source_ref): a later request with the same source_ref updates the
same board item (a higher `source_version` wins, an older one is ignored; `mark_unread` puts it
back into the unread counts). The event id is the delivery key, so a republished event has its
effect once.
"""

from __future__ import annotations

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.kit.events import new_envelope
from services.kit.logs import correlation_id_var

PRODUCER = "notifications"
REQUESTED_EVENT = "board_item.delivery_requested.v1"

SEVERITIES = {
    "info": inbox_pb2.SEVERITY_INFO,
    "abnormal": inbox_pb2.SEVERITY_ABNORMAL,
    "urgent": inbox_pb2.SEVERITY_URGENT,
}


def delivery_requested(agency_id: str, request: inbox_pb2.DeliverItemRequest, event_id: str) -> Envelope:
    """The event asking inbox to deliver `request` for `agency_id`; `event_id` must be stable for
    the state it announces (e.g. the stored document's id), so a retry is recognised."""
    return new_envelope(
        REQUESTED_EVENT,
        request,
        agency_id=agency_id,
        producer=PRODUCER,
        correlation_id=correlation_id_var.get(),
        event_id=event_id,
    )
