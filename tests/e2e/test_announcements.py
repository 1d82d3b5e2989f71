"""Agency announcements through the gateway: an admin posts once, everyone in the agency sees it."""

from __future__ import annotations

import uuid

import pytest

URL = "/api/v1/announcements"


def post(client, **body):
    body.setdefault("title", f"Building notice {uuid.uuid4().hex[:8]}")
    body.setdefault("body", "The elevator is out of service until Monday.")
    return client.post(URL, json=body)


def as_posted(admin, announcement_id: str) -> tuple[str, bool]:
    """(title, expired) of an announcement, as its admin sees it in the history."""
    history = admin.get(URL, params={"include_expired": "true", "limit": 100})
    assert history.status_code == 200, history.text
    [item] = [item for item in history.json()["items"] if item["id"] == announcement_id]
    return item["title"], item["expired"]


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
    before_reyes, before_kim = reyes.folder("announcements")["unread"], kim.folder("announcements")["unread"]
    created = post(admin, title="Parking lot repaving")
    assert created.status_code == 201, created.text
    announcement = created.json()
    assert announcement["title"] == "Parking lot repaving" and announcement["posted_by"]["id"] == admin.staff_id
    assert (
        reyes.folder("announcements")["unread"] == before_reyes + 1
        and kim.folder("announcements")["unread"] == before_kim + 1
    )
    assert listed(kim, announcement["id"])["read"] is False

    opened = kim.get(f"{URL}/{announcement['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["body"] == "The elevator is out of service until Monday."
    assert opened.json()["read"] is True
    assert (
        kim.folder("announcements")["unread"] == before_kim
        and reyes.folder("announcements")["unread"] == before_reyes + 1
    )
    assert listed(kim, announcement["id"])["read"] is True
    assert listed(reyes, announcement["id"])["read"] is False


def test_posting_writes_one_document_and_one_event(admin, inbox_db, events):
    with events.listen("announcement.posted.v1") as heard:
        items_before = inbox_db.board_items.count_documents({})
        announcement_id = post(admin, acknowledgement_required=True).json()["id"]
        assert inbox_db.board_items.count_documents({}) == items_before
        stored = inbox_db.announcements.find_one({"_id": announcement_id})
        assert b"elevator" not in repr(stored).encode()
        posted = heard.wait_for(lambda e: e.payload.announcement_id == announcement_id)
        # One event: counted once a later announcement's event has been heard too.
        later = post(admin).json()["id"]
        heard.wait_for(lambda e: e.payload.announcement_id == later)
        assert [e for e in heard.drain() if e.payload.announcement_id == announcement_id] == [posted]
    assert posted.envelope.producer == "inbox" and posted.envelope.agency_id == admin.agency_id
    assert posted.payload.posted_by_staff_id == admin.staff_id and posted.payload.acknowledgement_required is True


def test_reading_is_audited(admin, reyes, events):
    with events.listen("phi.accessed.v1") as heard:
        announcement_id = post(admin).json()["id"]
        assert reyes.get(f"{URL}/{announcement_id}").status_code == 200
        event = heard.wait_for(lambda e: e.payload.resource_id == announcement_id).payload
    assert (event.actor_id, event.resource_type, event.action, event.outcome) == (
        reyes.staff_id,
        "announcement",
        "read",
        "allowed",
    )


def test_only_admins_post_edit_and_expire(admin, reyes, kim):
    refused = post(kim)
    assert refused.status_code == 403 and refused.json()["code"] == "compose_not_allowed"
    announcement_id = post(admin).json()["id"]
    original = as_posted(admin, announcement_id)
    assert original[1] is False
    edit = kim.patch(f"{URL}/{announcement_id}", json={"title": "Hijacked"})
    assert edit.status_code == 403 and edit.json()["code"] == "compose_not_allowed"
    expire = kim.post(f"{URL}/{announcement_id}/expire")
    assert expire.status_code == 403 and expire.json()["code"] == "compose_not_allowed"
    acknowledgements = kim.get(f"{URL}/{announcement_id}/acknowledgements")
    assert acknowledgements.status_code == 403 and acknowledgements.json()["code"] == "compose_not_allowed"
    assert as_posted(admin, announcement_id) == original

    edited = admin.patch(f"{URL}/{announcement_id}", json={"title": "Corrected notice"})
    assert edited.status_code == 200, edited.text
    assert edited.json()["edited_at"] is not None
    assert kim.get(f"{URL}/{announcement_id}").json()["title"] == "Corrected notice"

    before = reyes.folder("announcements")["unread"]  # kim has read it, reyes has not
    expired = admin.post(f"{URL}/{announcement_id}/expire")
    assert expired.status_code == 200 and expired.json()["expired"] is True
    assert reyes.folder("announcements")["unread"] == before - 1
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
    original = f"Fire drill {uuid.uuid4().hex[:8]}"
    announcement_id = post(admin, title=original).json()["id"]
    for reply in (
        outsider.get(f"{URL}/{announcement_id}"),
        outsider.post(f"{URL}/{announcement_id}/acknowledge"),
        outsider.post(f"{URL}/{announcement_id}/expire"),
        outsider.get(f"{URL}/{announcement_id}/acknowledgements"),
        outsider.patch(f"{URL}/{announcement_id}", json={"title": "Theirs"}),
    ):
        assert reply.status_code == 404, reply.text
        assert reply.json()["code"] == "announcement_not_found"
    assert listed(outsider, announcement_id) is None
    assert as_posted(admin, announcement_id) == (original, False)


def test_announcements_cannot_be_replied_to(admin, kim):
    announcement_id = post(admin).json()["id"]
    for route in ("reply", "reply-all"):
        reply = kim.post(f"/api/v1/messages/{announcement_id}/{route}", json={"body": "Thanks!"})
        assert (reply.status_code, reply.json()["code"]) == (404, "message_not_found")
    no_route = kim.post(f"{URL}/{announcement_id}/reply", json={"body": "Thanks!"})
    assert (no_route.status_code, no_route.json()["code"]) == (404, "not_found")


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
    assert (reply.status_code, reply.json()["code"]) == (400, code), reply.text
    assert count(inbox_db) == before


def test_malformed_requests(admin, inbox_db):
    before = count(inbox_db)
    reply = admin.post(URL, data=b'{"title": "t", ', headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["code"] == "malformed_json"
    assert count(inbox_db) == before
    announcement_id = post(admin).json()["id"]
    patch = admin.patch(f"{URL}/{announcement_id}", json={"title": {"$gt": ""}})
    assert patch.status_code == 400 and patch.json()["code"] == "invalid_type"
    assert admin.patch(f"{URL}/{announcement_id}", json={}).status_code == 400
    assert admin.get(f"{URL}/..%2F..%2Fetc").status_code == 404
    assert admin.get(f"{URL}/ann_doesnotexist").status_code == 404
    assert admin.get(URL, params={"cursor": "!!notacursor"}).json()["code"] == "invalid_cursor"
    assert admin.get(URL, params={"limit": "1000"}).status_code == 400
    assert admin.get(URL, params={"sort": "title"}).status_code == 400
