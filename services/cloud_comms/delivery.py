"""Delivery into inbox (services/kit/board_delivery.py): every board item cloud-comms produces (a
Direct message, a fax) is a `board_item.delivery_requested.v1` event (kind DELIVERED_KIND_CLOUD)
staged in the same write as the stored message (kit outbox).

inbox keeps one board item per (agency, source, source_ref): source "direct" with the message's
Message-ID (per recipient address), source "fax" with the fax id, source "direct-out" with an
outbound Direct message's id (its sender's item, updated with a higher `source_version` and a new
`status` at every change). The event id and delivery_id are stable for the state they announce,
so a republished event or a resent message has its effect once.

`status` is the item's short status; inbox accepts `[A-Za-z0-9_-]{1,40}` ("queued", "failed"...),
anything else refuses the whole delivery. `mark_unread` (default True) puts an updated item back
among the unread: only for what needs the owner's attention.
"""

from __future__ import annotations

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.kit import board_delivery
from services.kit.board_delivery import REQUESTED_EVENT, SEVERITIES

__all__ = [
    "KIND",
    "PRODUCER",
    "REQUESTED_EVENT",
    "SEVERITIES",
    "SOURCE_DIRECT",
    "SOURCE_DIRECT_OUT",
    "SOURCE_FAX",
    "delivery_requested",
    "request",
]

PRODUCER = "cloud-comms"
KIND = inbox_pb2.DELIVERED_KIND_CLOUD
SOURCE_DIRECT = "direct"
SOURCE_DIRECT_OUT = "direct-out"
SOURCE_FAX = "fax"


def request(
    *,
    source: str,
    source_ref: str,
    delivery_id: str,
    staff_ids: list[str],
    title: str,
    summary: str,
    url: str,
    link_label: str = "Open",
    severity: str = "info",
    source_version: int = 1,
    status: str = "",
    mark_unread: bool = True,
) -> inbox_pb2.DeliverItemRequest:
    """A DeliverItemRequest of this service (kind CLOUD) to `staff_ids`, linking to `url`."""
    return inbox_pb2.DeliverItemRequest(
        kind=KIND,
        recipients=inbox_pb2.Recipients(staff_ids=staff_ids),
        title=title,
        summary=summary,
        severity=SEVERITIES[severity],
        links=[inbox_pb2.ActionLink(label=link_label, url=url)],
        source=source,
        source_ref=source_ref,
        source_version=source_version,
        delivery_id=delivery_id,
        status=status,
        mark_unread=mark_unread,
    )


def delivery_requested(agency_id: str, request: inbox_pb2.DeliverItemRequest, event_id: str) -> Envelope:
    """The event asking inbox to deliver `request`; `event_id` stable for the state it announces."""
    return board_delivery.delivery_requested(PRODUCER, agency_id, request, event_id)
