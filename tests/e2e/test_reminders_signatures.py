"""Reminders and signature requests end to end through the gateway."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pika
import pytest

from clinic.inbox.v1 import inbox_pb2
from services.kit.events import decode_envelope, unpack
from tests.e2e.conftest import wait_until


@pytest.fixture(scope="module")
def patel(login):
    return login("therapist.patel")


def iso_in(seconds: float) -> str:
    return dt.datetime.fromtimestamp(time.time() + seconds, tz=dt.UTC).isoformat()


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def folder_counts(client, folder: str) -> tuple[int, int]:
    reply = client.get("/api/v1/board")
    assert reply.status_code == 200, reply.text
    entry = next(f for f in reply.json()["folders"] if f["id"] == folder)
    return entry["unread"], entry["total"]


def board_items(client, folder: str) -> list[dict]:
    reply = client.get("/api/v1/board/items", params={"folder": folder, "limit": 100})
    assert reply.status_code == 200, reply.text
    return reply.json()["items"]


def my_reminder(client, reminder_id: str) -> dict:
    reply = client.get("/api/v1/reminders", params={"limit": 100})
    assert reply.status_code == 200, reply.text
    return next(r for r in reply.json()["reminders"] if r["id"] == reminder_id)


def code(reply) -> str:
    return reply.json()["code"]


@pytest.fixture
def delivered_events(stack):
    """board_item.delivered.v1 events published from now on: call it with an item id to wait for one."""
    connection = pika.BlockingConnection(pika.URLParameters(stack.config.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue, "clinic.events", routing_key="board_item.delivered.v1")
    seen: dict[str, inbox_pb2.BoardItemDelivered] = {}

    def wait_for(item_id: str) -> inbox_pb2.BoardItemDelivered:
        for _method, _props, body in channel.consume(queue, inactivity_timeout=10):
            if body is None:
                break
            event = unpack(decode_envelope(body), inbox_pb2.BoardItemDelivered)
            seen[event.item_id] = event
            if item_id in seen:
                break
        channel.cancel()
        return seen[item_id]

    yield wait_for
    connection.close()


def test_a_reminder_appears_when_due_and_can_be_snoozed_and_completed(reyes, delivered_events):
    unread, total = folder_counts(reyes, "reminders")
    text = unique("Call the client's pharmacy")
    created = reyes.post("/api/v1/reminders", json={"text": text, "remind_at": iso_in(3)})
    assert created.status_code == 201, created.text
    reminder = created.json()
    assert reminder["state"] == "pending" and reminder["text"] == text
    assert my_reminder(reyes, reminder["id"])["state"] == "pending"
    assert all(item["id"] != reminder["id"] for item in board_items(reyes, "reminders"))

    item = wait_until(
        lambda: next((i for i in board_items(reyes, "reminders") if i["id"] == reminder["id"]), None), timeout=10
    )
    assert item["title"] == text and item["read"] is False and item["kind"] == "reminder"
    assert folder_counts(reyes, "reminders") == (unread + 1, total + 1)
    assert my_reminder(reyes, reminder["id"])["state"] == "due"
    event = delivered_events(reminder["id"])
    assert event.recipient_staff_id == reyes.staff_id and event.board_kind == "reminders" and event.created

    snoozed = reyes.post(f"/api/v1/reminders/{reminder['id']}/snooze", json={"minutes": 30})
    assert snoozed.status_code == 200, snoozed.text
    assert snoozed.json()["state"] == "snoozed"
    assert folder_counts(reyes, "reminders") == (unread, total)
    assert all(item["id"] != reminder["id"] for item in board_items(reyes, "reminders"))

    completed = reyes.post(f"/api/v1/reminders/{reminder['id']}/complete")
    assert completed.status_code == 200 and completed.json()["state"] == "completed"
    assert my_reminder(reyes, reminder["id"])["state"] == "completed"
    assert folder_counts(reyes, "reminders") == (unread, total)


def test_a_due_reminder_opens_in_the_reading_pane_and_completes(reyes):
    text = unique("Renew the release of information")
    link = "https://ehr.example/clients/4711"
    reminder = reyes.post("/api/v1/reminders", json={"text": text, "remind_at": iso_in(-60), "link": link}).json()
    assert reminder["state"] == "due"
    unread, total = folder_counts(reyes, "reminders")
    opened = reyes.get(f"/api/v1/board/items/{reminder['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["text"] == text and opened.json()["link"] == link and opened.json()["state"] == "due"
    assert folder_counts(reyes, "reminders") == (unread - 1, total)
    reyes.post(f"/api/v1/reminders/{reminder['id']}/complete")
    assert folder_counts(reyes, "reminders") == (unread - 1, total)
    assert next(i for i in board_items(reyes, "reminders") if i["id"] == reminder["id"])["read"] is True


def test_someone_elses_reminder_is_not_found(reyes, kim, outsider):
    reminder = reyes.post("/api/v1/reminders", json={"text": "Private", "remind_at": iso_in(-1)}).json()
    for stranger in (kim, outsider):
        for path, body in (("snooze", {"minutes": 5}), ("complete", None)):
            reply = stranger.post(f"/api/v1/reminders/{reminder['id']}/{path}", json=body)
            assert reply.status_code == 404 and code(reply) == "reminder_not_found"
        assert stranger.get(f"/api/v1/board/items/{reminder['id']}").status_code == 404
        listed = stranger.get("/api/v1/reminders", params={"limit": 100}).json()["reminders"]
        assert all(r["id"] != reminder["id"] for r in listed)
    assert my_reminder(reyes, reminder["id"])["state"] == "due"


def test_a_signature_request_collects_answers(reyes, kim, patel, admin, outsider):
    title = unique("Treatment plan review")
    before = folder_counts(reyes, "signatures")
    created = reyes.post(
        "/api/v1/signature-requests",
        json={
            "document_kind": "patient",
            "title": title,
            "document_ref": "chart/4711/plan/3",
            "due_at": iso_in(2 * 86_400),
            "signer_ids": [kim.staff_id, patel.staff_id],
        },
    )
    assert created.status_code == 201, created.text
    request_id = created.json()["id"]
    assert created.json()["status"] == "pending"

    for signer in (kim, patel):
        item = next(i for i in board_items(signer, "signatures") if i["ref_id"] == request_id)
        assert item["kind"] == "signature_request" and item["read"] is False and item["title"] == title
        assert item["sender"]["id"] == reyes.staff_id and item["overdue"] is False
    assert folder_counts(reyes, "signatures") == (before[0], before[1] + 1)  # the requester's read copy

    shown = kim.get(f"/api/v1/signature-requests/{request_id}")
    assert shown.status_code == 200 and shown.json()["document_ref"] == "chart/4711/plan/3"
    signed = kim.post(f"/api/v1/signature-requests/{request_id}/sign", json={"attestation": "Reviewed and agreed."})
    assert signed.status_code == 200, signed.text
    assert signed.json()["status"] == "partially_signed"
    kims = next(i for i in board_items(kim, "signatures") if i["ref_id"] == request_id)
    assert kims["read"] is True and kims["status"] == "partially_signed"

    outcomes = [i for i in board_items(reyes, "signatures") if i["kind"] == "signature_outcome"]
    outcome = next(i for i in outcomes if i["title"].endswith(f"signed: {title}"))
    assert outcome["read"] is False and outcome["sender"]["id"] == kim.staff_id
    assert folder_counts(reyes, "signatures") == (before[0] + 1, before[1] + 2)
    pane = reyes.get(f"/api/v1/board/items/{outcome['id']}")
    assert pane.status_code == 200
    assert pane.json()["signature_request"]["signers"][0]["attestation"] == "Reviewed and agreed."

    again = kim.post(f"/api/v1/signature-requests/{request_id}/sign", json={"attestation": "again"})
    assert again.status_code == 409 and code(again) == "already_responded"
    for stranger in (admin, outsider):
        reply = stranger.post(f"/api/v1/signature-requests/{request_id}/sign", json={"attestation": "me too"})
        assert reply.status_code == 404 and code(reply) == "signature_request_not_found"
        assert stranger.get(f"/api/v1/signature-requests/{request_id}").status_code == 404

    declined = patel.post(f"/api/v1/signature-requests/{request_id}/decline", json={"reason": "Dose is wrong."})
    assert declined.status_code == 200 and declined.json()["status"] == "declined"
    view = reyes.get(f"/api/v1/signature-requests/{request_id}").json()
    assert [(s["staff_id"], s["state"]) for s in view["signers"]] == [
        (kim.staff_id, "signed"),
        (patel.staff_id, "declined"),
    ]
    assert view["signers"][1]["reason"] == "Dose is wrong."
    mine = reyes.get("/api/v1/signature-requests").json()["requests"]
    assert mine[0]["id"] == request_id and mine[0]["status"] == "declined"
    requester_copy = next(
        i for i in board_items(reyes, "signatures") if i["ref_id"] == request_id and i["kind"] == "signature_request"
    )
    assert requester_copy["status"] == "declined"


def test_bad_input_is_refused_and_nothing_is_written(reyes, kim, outsider):
    def mine() -> int:
        return len(reyes.get("/api/v1/signature-requests", params={"limit": 100}).json()["requests"])

    def reminders() -> int:
        return len(reyes.get("/api/v1/reminders", params={"limit": 100}).json()["reminders"])

    requests_before, reminders_before = mine(), reminders()
    good = {
        "document_kind": "staff",
        "title": "Annual attestation",
        "document_ref": "hr/policy/7",
        "signer_ids": [kim.staff_id],
    }
    cases = [
        ({**good, "signer_ids": ["stf_nobody"]}, "unknown_recipients"),
        ({**good, "signer_ids": [outsider.staff_id]}, "unknown_recipients"),
        ({**good, "signer_ids": [{"$ne": None}]}, "invalid_type"),
        ({**good, "title": {"$gt": ""}}, "invalid_type"),
        ({**good, "title": "x" * 201}, "too_long"),
        ({**good, "document_kind": "billing"}, "invalid_value"),
        ({**good, "due_at": "2020-01-01T00:00:00Z"}, "invalid_time"),
        ({**good, "due_at": "2030-01-01T09:00:00"}, "invalid_time"),
        ({**good, "due_at": "next tuesday"}, "invalid_time"),
        ({**good, "signer_ids": []}, "no_recipients"),
        ({**good, "extra": 1}, "unknown_field"),
    ]
    for body, expected in cases:
        reply = reyes.post("/api/v1/signature-requests", json=body)
        assert reply.status_code == 400 and code(reply) == expected, (body, reply.text)

    reminder_cases = [
        ({"text": "x", "remind_at": "2030-13-01T00:00:00Z"}, "invalid_time"),
        ({"text": "x", "remind_at": "2030-01-01"}, "invalid_time"),
        ({"text": "x", "remind_at": {"$gt": ""}}, "invalid_type"),
        ({"text": "x" * 1001, "remind_at": iso_in(60)}, "too_long"),
        ({"text": "x", "remind_at": iso_in(60), "link": "javascript:alert(1)"}, "invalid_link"),
        ({"text": "x"}, "missing_field"),
    ]
    for body, expected in reminder_cases:
        reply = reyes.post("/api/v1/reminders", json=body)
        assert reply.status_code == 400 and code(reply) == expected, (body, reply.text)

    for path in ("/api/v1/reminders", "/api/v1/signature-requests"):
        reply = reyes.post(path, data="{not json", headers={"Content-Type": "application/json"})
        assert reply.status_code == 400 and code(reply) == "malformed_json"

    reminder = reyes.post("/api/v1/reminders", json={"text": "Snooze me", "remind_at": iso_in(-1)}).json()
    for body, expected in (
        ({"until": "2020-01-01T00:00:00Z"}, "invalid_time"),
        ({"minutes": 0}, "invalid_value"),
        ({"minutes": "5"}, "invalid_type"),
        ({"minutes": 5, "until": iso_in(600)}, "invalid_value"),
    ):
        reply = reyes.post(f"/api/v1/reminders/{reminder['id']}/snooze", json=body)
        assert reply.status_code == 400 and code(reply) == expected, (body, reply.text)
    assert my_reminder(reyes, reminder["id"])["state"] == "due"
    assert reyes.get('/api/v1/signature-requests/{"$gt":""}').status_code == 404

    assert mine() == requests_before
    assert reminders() == reminders_before + 1
