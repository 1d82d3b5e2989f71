"""Delivery into inbox: every change of an eRx item is a `board_item.delivery_requested.v1` event
(payload clinic.inbox.v1.DeliverItemRequest, kind DELIVERED_KIND_ERX, folder "eRx Notifications")
staged in the same write as the item's new state (kit outbox); the relay publishes it and inbox's
consumer puts it on the prescriber's board.

inbox keeps one board item per (agency, "erx", source_ref = our item id): a new version updates it
(`source_version` = the item's version; an older one is ignored), `mark_unread` puts a changed
item back in the unread counts, `resolved` keeps it listed, read and out of the counts. The event
id and `delivery_id` are `<item id>-v<version>`, one per content version, so a republished event
or a repeated sync has its effect once.
"""

from __future__ import annotations

from collections.abc import Mapping

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.erx_bridge import domain
from services.kit import board_delivery
from services.kit.board_delivery import REQUESTED_EVENT, SEVERITIES

__all__ = ["PRODUCER", "REQUESTED_EVENT", "SOURCE", "delivery_request", "delivery_requested", "sso_link"]

PRODUCER = "erx-bridge"
SOURCE = "erx"
LINK_LABEL = "Open in ePrescribing"


def sso_link(public_url: str, iid: str) -> str:
    """The item's "Open in ePrescribing" address, which the page recognises (README.md, "Page
    integration"): it asks POST /api/v1/erx/sso {"context": "patient", "item_id": <id>} instead of
    following it. inbox takes only http(s) links, so it is an address under the gateway."""
    return f"{public_url}/api/v1/erx/sso/patient/{iid}"


def delivery_request(
    *,
    iid: str,
    version: int,
    staff_id: str,
    content: Mapping,
    patient_word: str,
    time_zone: str,
    public_url: str,
    resolved: bool = False,
    mark_unread: bool = False,
) -> inbox_pb2.DeliverItemRequest:
    kind = content["kind"]
    return inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_ERX,
        recipients=inbox_pb2.Recipients(staff_ids=[staff_id]),
        title=domain.board_title(content),
        summary=domain.board_summary(content, patient_word, time_zone),
        patient_name=(content.get("patient_name") or "")[:200],
        severity=SEVERITIES[domain.SEVERITIES[kind]],
        status=domain.RESOLVED_STATUS if resolved else domain.STATUSES[kind],
        links=[inbox_pb2.ActionLink(label=LINK_LABEL, url=sso_link(public_url, iid))],
        source=SOURCE,
        source_ref=iid,
        source_version=version,
        delivery_id=domain.delivery_id(iid, version),
        resolved=resolved,
        mark_unread=mark_unread,
    )


def delivery_requested(agency_id: str, request: inbox_pb2.DeliverItemRequest) -> Envelope:
    """The event asking inbox to deliver `request`; its id is the request's delivery id."""
    return board_delivery.delivery_requested(PRODUCER, agency_id, request, request.delivery_id)
