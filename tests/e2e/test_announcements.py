"""Agency announcements through the gateway: an admin posts once, everyone in the agency sees it."""

from __future__ import annotations

import uuid

import pika
import pytest

from clinic.audit.v1 import audit_pb2
from clinic.inbox.v1 import inbox_pb2
from services.kit.events import decode_envelope, unpack

URL = "/api/v1/announcements"


@pytest.fixture(scope="module")
def inbox_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}inbox"]


def post(client, **body):
    body.setdefault("title", f"Building notice {uuid.uuid4().hex[:8]}")
    body.setdefault("body", "The elevator is out of service until Monday.")
    return client.post(URL, json=body)


def unread(client) -> int:
    reply = client.get("/api/v1/board")
    assert reply.status_code == 200, reply.text
    return next(f for f in reply.json()["folders"] if f["id"] == "announcements")["unread"]


def listed(client, announcement_id: str) -> dict | None:
    cursor = None
    for _ in range(20):
        page = client.get(URL, params={"limit": 50, **({"cursor": cursor} if cursor else {})}).json()
        for item in page["items"]:
            if item["id"] == announcement_id:
                return item
        cursor = page["next_cursor"]
        if not cursor:
            return None
    return None


def test_staff_see_it_unread_and_reading_marks_it_for_the_reader_only(admin, reyes, kim):
    before_reyes, before_kim = unread(reyes), unread(kim)
    created = post(admin, title="Parking lot repaving")
    assert created.status_code == 201, created.text
    announcement = created.json()
    assert announcement["title"] == "Parking lot repaving" and announcement["posted_by"]["id"] == admin.staff_id
    assert unread(reyes) == before_reyes + 1 and unread(kim) == before_kim + 1
    assert listed(kim, announcement["id"])["read"] is False

    opened = kim.get(f"{URL}/{announcement['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["body"] == "The elevator is out of service until Monday."
    assert opened.json()["read"] is True
    assert unread(kim) == before_kim and unread(reyes) == before_reyes + 1
    assert listed(kim, announcement["id"])["read"] is True
    assert listed(reyes, announcement["id"])["read"] is False


def test_posting_writes_one_document_and_one_event(admin, inbox_db, stack):
    connection = pika.BlockingConnection(pika.URLParameters(stack.config.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue, "clinic.events", routing_key="announcement.posted.v1")
    try:
        items_before = inbox_db.board_items.count_documents({})
        announcement_id = post(admin, acknowledgement_required=True).json()["id"]
        assert inbox_db.board_items.count_documents({}) == items_before
        stored = inbox_db.announcements.find_one({"_id": announcement_id})
        assert b"elevator" not in repr(stored).encode()
        for _method, _props, body in channel.consume(queue, inactivity_timeout=10):
            assert body is not None, "no announcement.posted.v1 event"
            envelope = decode_envelope(body)
            event = unpack(envelope, inbox_pb2.AnnouncementPosted)
            if event.announcement_id == announcement_id:
                break
        assert envelope.producer == "inbox" and envelope.agency_id == admin.agency_id
        assert event.posted_by_staff_id == admin.staff_id and event.acknowledgement_required is True
    finally:
        connection.close()


def test_reading_is_audited(admin, reyes, stack):
    connection = pika.BlockingConnection(pika.URLParameters(stack.config.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue, "clinic.events", routing_key="phi.accessed.v1")
    try:
        announcement_id = post(admin).json()["id"]
        assert reyes.get(f"{URL}/{announcement_id}").status_code == 200
        for _method, _props, body in channel.consume(queue, inactivity_timeout=10):
            assert body is not None, "no phi.accessed.v1 event"
            event = unpack(decode_envelope(body), audit_pb2.PhiAccessed)
            if event.resource_id == announcement_id:
                break
        assert (event.actor_id, event.resource_type, event.action, event.outcome) == (
            reyes.staff_id,
            "announcement",
            "read",
            "allowed",
        )
    finally:
        connection.close()


def test_only_admins_post_edit_and_expire(admin, reyes, kim):
    refused = post(kim)
    assert refused.status_code == 403 and refused.json()["code"] == "compose_not_allowed"
    announcement_id = post(admin).json()["id"]
    edit = kim.http.patch(f"{kim.base_url}{URL}/{announcement_id}", json={"title": "Hijacked"})
    assert edit.status_code == 403 and edit.json()["code"] == "compose_not_allowed"
    assert kim.post(f"{URL}/{announcement_id}/expire").status_code == 403
    assert kim.get(f"{URL}/{announcement_id}/acknowledgements").status_code == 403

    edited = admin.http.patch(f"{admin.base_url}{URL}/{announcement_id}", json={"title": "Corrected notice"})
    assert edited.status_code == 200, edited.text
    assert edited.json()["edited_at"] is not None
    assert kim.get(f"{URL}/{announcement_id}").json()["title"] == "Corrected notice"

    before = unread(reyes)  # kim has read it, reyes has not
    expired = admin.post(f"{URL}/{announcement_id}/expire")
    assert expired.status_code == 200 and expired.json()["expired"] is True
    assert unread(reyes) == before - 1
    assert listed(kim, announcement_id) is None
    assert kim.get(f"{URL}/{announcement_id}").status_code == 404
    history = admin.get(URL, params={"include_expired": "true", "limit": 100}).json()["items"]
    assert any(item["id"] == announcement_id and item["expired"] for item in history)


def test_acknowledgement_flow(admin, reyes, kim):
    announcement_id = post(admin, acknowledgement_required=True).json()["id"]
    acknowledged = kim.post(f"{URL}/{announcement_id}/acknowledge")
    assert acknowledged.status_code == 200, acknowledged.text
    assert acknowledged.json()["acknowledged"] is True and acknowledged.json()["read"] is True
    lists = admin.get(f"{URL}/{announcement_id}/acknowledgements")
    assert lists.status_code == 200, lists.text
    body = lists.json()
    assert [entry["staff_id"] for entry in body["acknowledged"]] == [kim.staff_id]
    assert reyes.staff_id in body["pending"]
    assert kim.staff_id not in body["pending"] and admin.staff_id not in body["pending"]
    assert all(staff_id.startswith("stf_riverbend_") for staff_id in body["pending"])
    assert "stf_riverbend_young" not in body["pending"]  # deactivated staff owe nothing

    plain = post(admin).json()["id"]
    reply = kim.post(f"{URL}/{plain}/acknowledge")
    assert reply.status_code == 409 and reply.json()["code"] == "acknowledgement_not_required"


def test_another_agency_gets_404(admin, outsider):
    announcement_id = post(admin).json()["id"]
    for reply in (
        outsider.get(f"{URL}/{announcement_id}"),
        outsider.post(f"{URL}/{announcement_id}/acknowledge"),
        outsider.post(f"{URL}/{announcement_id}/expire"),
        outsider.get(f"{URL}/{announcement_id}/acknowledgements"),
        outsider.http.patch(f"{outsider.base_url}{URL}/{announcement_id}", json={"title": "Theirs"}),
    ):
        assert reply.status_code == 404, reply.text
        assert reply.json()["code"] == "announcement_not_found"
    assert listed(outsider, announcement_id) is None


def test_announcements_cannot_be_replied_to(admin, kim):
    announcement_id = post(admin).json()["id"]
    for route in ("reply", "reply-all"):
        reply = kim.post(f"/api/v1/messages/{announcement_id}/{route}", json={"body": "Thanks!"})
        assert reply.status_code == 404
    assert kim.post(f"{URL}/{announcement_id}/reply", json={"body": "Thanks!"}).status_code in (404, 405)


def count(inbox_db) -> int:
    return inbox_db.announcements.count_documents({})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"title": {"$gt": ""}, "body": "b"}, "invalid_type"),
        ({"title": "t", "body": {"$ne": None}}, "invalid_type"),
        ({"title": "t", "body": "x" * 20_001}, "too_long"),
        ({"title": "x" * 201, "body": "b"}, "too_long"),
        ({"title": "", "body": "b"}, "invalid_value"),
        ({"title": "t", "body": "  \n "}, "invalid_value"),
        ({"title": "t", "body": "b", "expires_at": "next tuesday"}, "invalid_value"),
        ({"title": "t", "body": "b", "expires_at": "2020-01-01T00:00:00Z"}, "invalid_value"),
        ({"title": "t", "body": "b", "expires_at": "2999-01-01T00:00:00"}, "invalid_value"),
        ({"title": "t", "body": "b", "expires_at": "9999-12-31T23:59:59-01:00"}, "invalid_value"),
        ({"title": "t", "body": "b", "acknowledgement_required": "yes"}, "invalid_type"),
        ({"title": "t", "body": "b", "$where": "1"}, "unknown_field"),
        ({"body": "b"}, "missing_field"),
        ([1, 2], "invalid_body"),
    ],
)
def test_bad_input_is_rejected_and_nothing_is_stored(admin, inbox_db, body, code):
    before = count(inbox_db)
    reply = admin.post(URL, json=body)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["code"] == code
    assert count(inbox_db) == before


def test_malformed_requests(admin, inbox_db):
    before = count(inbox_db)
    reply = admin.post(URL, data=b'{"title": "t", ', headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["code"] == "malformed_json"
    assert count(inbox_db) == before
    announcement_id = post(admin).json()["id"]
    patch = admin.http.patch(f"{admin.base_url}{URL}/{announcement_id}", json={"title": {"$gt": ""}})
    assert patch.status_code == 400 and patch.json()["code"] == "invalid_type"
    assert admin.http.patch(f"{admin.base_url}{URL}/{announcement_id}", json={}).status_code == 400
    assert admin.get(f"{URL}/..%2F..%2Fetc").status_code == 404
    assert admin.get(f"{URL}/ann_doesnotexist").status_code == 404
    assert admin.get(URL, params={"cursor": "!!notacursor"}).json()["code"] == "invalid_cursor"
    assert admin.get(URL, params={"limit": "1000"}).status_code == 400
    assert admin.get(URL, params={"sort": "title"}).status_code == 400
