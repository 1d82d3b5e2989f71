"""Reminders and signature requests end to end through the gateway."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest

from tests.waits import wait_until


@pytest.fixture(scope="module")
def patel(login):
    return login("therapist.patel")


def iso_in(seconds: float) -> str:
    return dt.datetime.fromtimestamp(time.time() + seconds, tz=dt.UTC).isoformat()


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def my_reminder(client, reminder_id: str) -> dict:
    reply = client.get("/api/v1/reminders", params={"limit": 100})
    assert reply.status_code == 200, reply.text
    return next(r for r in reply.json()["reminders"] if r["id"] == reminder_id)


def code(reply) -> str:
    return reply.json()["code"]


def test_a_pending_reminder_is_listed_as_mine_but_hidden_from_the_board(reyes):
    unread, total = reyes.counts("reminders")
    text = unique("Call the client's pharmacy next week")
    created = reyes.post("/api/v1/reminders", json={"text": text, "remind_at": iso_in(7 * 86_400)})
    assert created.status_code == 201, created.text
    reminder = created.json()
    assert reminder["state"] == "pending" and reminder["text"] == text
    assert my_reminder(reyes, reminder["id"])["state"] == "pending"
    assert all(item["id"] != reminder["id"] for item in reyes.items(folder="reminders", limit=100)["items"])
    assert reyes.counts("reminders") == (unread, total)


def test_a_reminder_appears_when_due_and_can_be_snoozed_and_completed(reyes, events):
    unread, total = reyes.counts("reminders")
    text = unique("Call the client's pharmacy")
    with events.listen("board_item.delivered.v1") as heard:
        created = reyes.post("/api/v1/reminders", json={"text": text, "remind_at": iso_in(5)})
        assert created.status_code == 201, created.text
        reminder = created.json()
        assert reminder["state"] == "pending" and reminder["text"] == text

        item = wait_until(
            lambda: next(
                (i for i in reyes.items(folder="reminders", limit=100)["items"] if i["id"] == reminder["id"]), None
            ),
            timeout=20,
        )
        assert item["title"] == text and item["read"] is False and item["kind"] == "reminder"
        assert reyes.counts("reminders") == (unread + 1, total + 1)
        assert my_reminder(reyes, reminder["id"])["state"] == "due"
        event = heard.wait_for(lambda e: e.payload.item_id == reminder["id"]).payload
    assert event.recipient_staff_id == reyes.staff_id and event.board_kind == "reminders" and event.created

    snoozed = reyes.post(f"/api/v1/reminders/{reminder['id']}/snooze", json={"minutes": 30})
    assert snoozed.status_code == 200, snoozed.text
    assert snoozed.json()["state"] == "snoozed"
    assert reyes.counts("reminders") == (unread, total)
    assert all(item["id"] != reminder["id"] for item in reyes.items(folder="reminders", limit=100)["items"])

    completed = reyes.post(f"/api/v1/reminders/{reminder['id']}/complete")
    assert completed.status_code == 200 and completed.json()["state"] == "completed"
    assert my_reminder(reyes, reminder["id"])["state"] == "completed"
    assert reyes.counts("reminders") == (unread, total)


def test_a_due_reminder_opens_in_the_reading_pane_and_completes(reyes):
    text = unique("Renew the release of information")
    link = "https://ehr.example/clients/4711"
    reminder = reyes.post("/api/v1/reminders", json={"text": text, "remind_at": iso_in(-60), "link": link}).json()
    assert reminder["state"] == "due"
    unread, total = reyes.counts("reminders")
    opened = reyes.get(f"/api/v1/board/items/{reminder['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["text"] == text and opened.json()["link"] == link and opened.json()["state"] == "due"
    assert reyes.counts("reminders") == (unread - 1, total)
    completed = reyes.post(f"/api/v1/reminders/{reminder['id']}/complete")
    assert completed.status_code == 200, completed.text
    assert completed.json()["state"] == "completed" and completed.json()["read"] is True
    assert my_reminder(reyes, reminder["id"])["state"] == "completed"
    assert reyes.get(f"/api/v1/board/items/{reminder['id']}").json()["state"] == "completed"  # the pane shows it
    assert reyes.counts("reminders") == (unread - 1, total)
    assert (
        next(i for i in reyes.items(folder="reminders", limit=100)["items"] if i["id"] == reminder["id"])["read"]
        is True
    )


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
    before = reyes.counts("signatures")
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
        item = next(i for i in signer.items(folder="signatures", limit=100)["items"] if i["ref_id"] == request_id)
        assert item["kind"] == "signature_request" and item["read"] is False and item["title"] == title
        assert item["sender"]["id"] == reyes.staff_id and item["overdue"] is False
    assert reyes.counts("signatures") == (before[0], before[1] + 1)  # the requester's read copy

    shown = kim.get(f"/api/v1/signature-requests/{request_id}")
    assert shown.status_code == 200 and shown.json()["document_ref"] == "chart/4711/plan/3"
    signed = kim.post(f"/api/v1/signature-requests/{request_id}/sign", json={"attestation": "Reviewed and agreed."})
    assert signed.status_code == 200, signed.text
    assert signed.json()["status"] == "partially_signed"
    kims = next(i for i in kim.items(folder="signatures", limit=100)["items"] if i["ref_id"] == request_id)
    assert kims["read"] is True and kims["status"] == "partially_signed"

    outcomes = [i for i in reyes.items(folder="signatures", limit=100)["items"] if i["kind"] == "signature_outcome"]
    outcome = next(i for i in outcomes if i["title"].endswith(f"signed: {title}"))
    assert outcome["read"] is False and outcome["sender"]["id"] == kim.staff_id
    assert reyes.counts("signatures") == (before[0] + 1, before[1] + 2)
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
        i
        for i in reyes.items(folder="signatures", limit=100)["items"]
        if i["ref_id"] == request_id and i["kind"] == "signature_request"
    )
    assert requester_copy["status"] == "declined"


def test_the_requester_cancels_an_open_request_and_its_signers_items_close(reyes, kim, patel, outsider):
    title = unique("Consent form countersign")
    created = reyes.post(
        "/api/v1/signature-requests",
        json={
            "document_kind": "staff",
            "title": title,
            "document_ref": "hr/77",
            "signer_ids": [kim.staff_id, patel.staff_id],
        },
    )
    assert created.status_code == 201, created.text
    request_id = created.json()["id"]
    signed = kim.post(f"/api/v1/signature-requests/{request_id}/sign", json={"attestation": "Agreed."})
    assert signed.status_code == 200, signed.text
    patel_unread = patel.counts("signatures")[0]

    # Only the requester may cancel; a signer is refused, anyone outside sees nothing.
    refused = patel.post(f"/api/v1/signature-requests/{request_id}/cancel")
    assert refused.status_code == 403 and code(refused) == "not_requester"
    assert outsider.post(f"/api/v1/signature-requests/{request_id}/cancel").status_code == 404
    bad = reyes.post(f"/api/v1/signature-requests/{request_id}/cancel", json={"reason": {"$gt": ""}})
    assert bad.status_code == 400
    assert reyes.get(f"/api/v1/signature-requests/{request_id}").json()["status"] == "partially_signed"

    cancelled = reyes.post(f"/api/v1/signature-requests/{request_id}/cancel", json={"reason": "Wrong form version."})
    assert cancelled.status_code == 200, cancelled.text
    view = cancelled.json()
    assert view["status"] == "cancelled" and view["cancelled_at"] and view["cancel_reason"] == "Wrong form version."
    assert [(s["staff_id"], s["state"]) for s in view["signers"]] == [
        (kim.staff_id, "signed"),
        (patel.staff_id, "pending"),
    ]

    # Patel's item closed: read, out of the unread count, and she can no longer answer.
    item = next(i for i in patel.items(folder="signatures", limit=100)["items"] if i["ref_id"] == request_id)
    assert item["status"] == "cancelled" and item["read"] is True
    assert patel.counts("signatures")[0] == patel_unread - 1
    late = patel.post(f"/api/v1/signature-requests/{request_id}/sign", json={"attestation": "Now?"})
    assert late.status_code == 409 and code(late) == "request_closed"
    assert "cancel_reason" not in patel.get(f"/api/v1/signature-requests/{request_id}").json()  # the requester's note
    again = reyes.post(f"/api/v1/signature-requests/{request_id}/cancel")
    assert again.status_code == 409 and code(again) == "request_closed"


def test_bad_input_is_refused_and_nothing_is_written(reyes, kim, outsider, inbox_db):
    def mine() -> int:
        return inbox_db.signature_requests.count_documents({"requester_id": {"$eq": reyes.staff_id}})

    def reminders() -> int:
        return inbox_db.board_items.count_documents({"owner_id": {"$eq": reyes.staff_id}, "kind": {"$eq": "reminder"}})

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
