"""What a producer (notifications, erx-bridge, cloud-comms) needs to put items on boards through
inbox's delivery API: the `board_item.delivery_requested.v1` event and the severities by name.

The event carries a clinic.inbox.v1.DeliverItemRequest and is staged in the same document write as
the state it announces (kit outbox); the relay publishes it and inbox's consumer delivers it. Its
payload (titles and summaries name patients) is sealed (services.kit.sealing): the outbox document
and the broker's queues hold it encrypted, and inbox opens it with the same derived agency key.
inbox updates one board item per (agency, source, source_ref): a higher `source_version` wins, an
older one is ignored, `mark_unread` puts it back in the unread counts. The event id must be stable
for the state it announces (a republished event then has its effect once).
"""

from __future__ import annotations

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.kit import sealing
from services.kit.events import new_envelope
from services.kit.logs import correlation_id_var

REQUESTED_EVENT = "board_item.delivery_requested.v1"

SEVERITIES = {
    "info": inbox_pb2.SEVERITY_INFO,
    "abnormal": inbox_pb2.SEVERITY_ABNORMAL,
    "urgent": inbox_pb2.SEVERITY_URGENT,
}


def delivery_requested(
    producer: str, agency_id: str, request: inbox_pb2.DeliverItemRequest, event_id: str
) -> Envelope:
    """The event asking inbox to deliver `request` for `agency_id`, from `producer`, sealed."""
    envelope = new_envelope(
        REQUESTED_EVENT,
        request,
        agency_id=agency_id,
        producer=producer,
        correlation_id=correlation_id_var.get(),
        event_id=event_id,
    )
    return sealing.sealer().seal(envelope)
