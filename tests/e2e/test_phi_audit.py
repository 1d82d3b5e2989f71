"""Listings are audited end to end: a staff member reads their board and their messages through the
gateway, and inbox's outbox relay publishes one `phi.accessed.v1` per request on the stack's bus
(heard on a temporary queue bound in the stack's vhost; no audit service is needed for that)."""

from __future__ import annotations

import uuid


def test_reading_the_board_through_the_gateway_publishes_one_listing_event(reyes, kim, events):
    subject = f"Roe follow-up {uuid.uuid4().hex[:6]}"
    assert reyes.send(to_staff_ids=[kim.staff_id], subject=subject).status_code == 201
    with events.listen("phi.accessed.v1") as heard:
        page = kim.get("/api/v1/board/items", params={"folder": "messages", "limit": 5})
        assert page.status_code == 200 and subject in [i["title"] for i in page.json()["items"]]
        listing = heard.wait_for(
            lambda e: e.payload.actor_id == kim.staff_id and e.payload.resource_type == "board_list"
        )
        assert (listing.payload.resource_id, listing.payload.action, listing.payload.outcome) == (
            "messages",
            "list",
            "allowed",
        )
        assert (listing.payload.agency_id, listing.payload.service) == (kim.agency_id, "inbox")
        assert listing.envelope.producer == "inbox" and listing.envelope.correlation_id
        assert subject not in listing.envelope.SerializeToString().decode("utf-8", "replace")

        # One event per request: a second page read, then a marker read, and nothing else listed.
        assert kim.get("/api/v1/messages", params={"limit": 5}).status_code == 200
        marker = heard.wait_for(
            lambda e: e.payload.actor_id == kim.staff_id and e.payload.resource_type == "message_list"
        )
        received = heard.drain()
    kims_listings = [
        e.envelope.event_id for e in received if e.payload.actor_id == kim.staff_id and e.payload.action == "list"
    ]
    assert kims_listings == [listing.envelope.event_id, marker.envelope.event_id]
