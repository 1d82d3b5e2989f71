"""Delivery into inbox (services/kit/board_delivery.py): every board item this service produces is a
`board_item.delivery_requested.v1` event staged in the same write as the state it announces."""

from __future__ import annotations

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.kit import board_delivery
from services.kit.board_delivery import REQUESTED_EVENT, SEVERITIES

__all__ = ["PRODUCER", "REQUESTED_EVENT", "SEVERITIES", "delivery_requested"]

PRODUCER = "notifications"


def delivery_requested(agency_id: str, request: inbox_pb2.DeliverItemRequest, event_id: str) -> Envelope:
    """The event asking inbox to deliver `request`; `event_id` stable for the state it announces."""
    return board_delivery.delivery_requested(PRODUCER, agency_id, request, event_id)
