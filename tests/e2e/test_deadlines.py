"""Signature-request due times and announcement acknowledge-by times, end to end through the gateway.

Time moves by the test clock (`advance_clock`): deadlines are set relative to it, never waited for."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

OPTIONS = "/api/v1/board/agency-options"


def iso_at(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat()


def clock_in(advance_clock, minutes: float) -> str:
    """A time `minutes` after the deadline clock's now."""
    return iso_at(advance_clock(0)["now_ms"] + int(minutes * 60_000))


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def reminders_titled(client, needle: str) -> list[dict]:
    items = client.items(folder="reminders", limit=100)["items"]
    return [item for item in items if needle in item["title"]]


@pytest.fixture(scope="module")
def lakeside(login):
    return {name: login(name) for name in ("lakeside.admin", "dr.ramirez", "nurse.foster", "frontdesk.baker")}


@pytest.fixture
def riverbend_options(admin):
    def _set(**changes) -> dict:
        reply = admin.patch(OPTIONS, json=changes)
        assert reply.status_code == 200, reply.text
        return reply.json()

    yield _set
    _set(overdue_report_minutes=60)


def request_signatures(requester, signers, title: str, due_at: str) -> dict:
    reply = requester.post(
        "/api/v1/signature-requests",
        json={
            "document_kind": "staff",
            "title": title,
            "document_ref": "policy/handbook-2026",
            "due_at": due_at,
            "signer_ids": [signer.staff_id for signer in signers],
        },
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_signers_who_have_not_responded_are_reminded_then_the_requester_gets_the_list(
    reyes, kim, chen, advance_clock, riverbend_options
):
    riverbend_options(overdue_report_minutes=15)
    title = unique("Annual policy attestation")
    made = request_signatures(reyes, [kim, chen], title, clock_in(advance_clock, 30))
    assert made["due_at"] is not None
    signed = kim.post(f"/api/v1/signature-requests/{made['id']}/sign", json={"attestation": "Read and agreed"})
    assert signed.status_code == 200, signed.text

    chen_before, kim_before, reyes_before = chen.counts("reminders"), kim.counts("reminders"), reyes.counts("reminders")
    advance_clock(10)  # not due yet
    assert reminders_titled(chen, title) == []

    advance_clock(21)  # past the due time
    reminder = reminders_titled(chen, title)
    assert len(reminder) == 1 and reminder[0]["title"] == f"Signature due: {title}"
    assert reminder[0]["kind"] == "reminder" and not reminder[0]["read"]
    assert reminder[0]["sender"]["id"] == reyes.staff_id
    assert chen.counts("reminders") == (chen_before[0] + 1, chen_before[1] + 1)
    assert reminders_titled(kim, title) == [] and kim.counts("reminders") == kim_before
    assert reminders_titled(reyes, title) == []  # the list comes overdue_report_minutes later

    # The reminder is a reminder like any other: listed, opened (its link names the request), completed.
    listed = chen.get("/api/v1/reminders", params={"limit": 100}).json()["reminders"]
    mine = next(r for r in listed if r["id"] == reminder[0]["id"])
    assert mine["link"] == made["id"] and mine["state"] == "due"

    advance_clock(16)  # past due + 15 minutes
    report = reminders_titled(reyes, title)
    assert len(report) == 1
    assert report[0]["title"] == f"Not yet signed (1): Dr. Wei Chen | {title}"
    assert chen.staff_id not in report[0]["title"] and kim.staff_id not in report[0]["title"]
    assert reyes.counts("reminders") == (reyes_before[0] + 1, reyes_before[1] + 1)

    # Once each: later passes place nothing again.
    advance_clock(120)
    assert len(reminders_titled(chen, title)) == 1 and len(reminders_titled(reyes, title)) == 1
    assert chen.counts("reminders") == (chen_before[0] + 1, chen_before[1] + 1)
    assert reyes.counts("reminders") == (reyes_before[0] + 1, reyes_before[1] + 1)


def test_nothing_is_sent_when_every_signer_responded_in_time(reyes, kim, chen, advance_clock):
    title = unique("Shift handover sign-off")
    made = request_signatures(reyes, [kim, chen], title, clock_in(advance_clock, 30))
    assert kim.post(f"/api/v1/signature-requests/{made['id']}/sign", json={"attestation": "ok"}).status_code == 200
    assert chen.post(f"/api/v1/signature-requests/{made['id']}/decline", json={"reason": "not mine"}).status_code == 200
    advance_clock(31)
    advance_clock(61)
    for client in (reyes, kim, chen):
        assert reminders_titled(client, title) == []


def test_a_signer_who_responds_after_the_reminder_is_left_off_the_list(reyes, kim, chen, advance_clock):
    title = unique("Consent form review")
    made = request_signatures(reyes, [kim, chen], title, clock_in(advance_clock, 5))
    advance_clock(6)
    assert len(reminders_titled(kim, title)) == 1 and len(reminders_titled(chen, title)) == 1
    assert kim.post(f"/api/v1/signature-requests/{made['id']}/sign", json={"attestation": "ok"}).status_code == 200
    advance_clock(61)
    report = reminders_titled(reyes, title)
    assert len(report) == 1 and report[0]["title"] == f"Not yet signed (1): Dr. Wei Chen | {title}"


def test_a_due_time_in_the_past_is_refused(reyes, kim, advance_clock):
    past = clock_in(advance_clock, -1)
    reply = reyes.post(
        "/api/v1/signature-requests",
        json={
            "document_kind": "staff",
            "title": "Late",
            "document_ref": "x",
            "due_at": past,
            "signer_ids": [kim.staff_id],
        },
    )
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_time"
    reply = reyes.post(
        "/api/v1/signature-requests",
        json={
            "document_kind": "staff",
            "title": "Bad",
            "document_ref": "x",
            "due_at": "soon",
            "signer_ids": [kim.staff_id],
        },
    )
    assert reply.status_code == 400


def post_announcement(client, **body):
    return client.post("/api/v1/announcements", json={"title": unique("Notice"), "body": "Please read.", **body})


def test_staff_who_have_not_acknowledged_are_reminded_then_the_author_gets_the_list(lakeside, advance_clock):
    author, ramirez, foster, baker = (
        lakeside[n] for n in ("lakeside.admin", "dr.ramirez", "nurse.foster", "frontdesk.baker")
    )
    title = unique("New fire drill procedure")
    by = clock_in(advance_clock, 30)
    posted = author.post(
        "/api/v1/announcements",
        json={"title": title, "body": "Read it.", "acknowledgement_required": True, "acknowledge_by": by},
    )
    assert posted.status_code == 201, posted.text
    announcement = posted.json()
    assert announcement["acknowledge_by"] is not None
    assert foster.post(f"/api/v1/announcements/{announcement['id']}/acknowledge").status_code == 200
    before = {client.staff_id: client.counts("reminders") for client in (author, ramirez, foster, baker)}

    advance_clock(31)
    for client in (ramirez, baker):
        reminder = reminders_titled(client, title)
        assert len(reminder) == 1 and reminder[0]["title"] == f"Please acknowledge: {title}"
        unread, total = before[client.staff_id]
        assert client.counts("reminders") == (unread + 1, total + 1)
    assert reminders_titled(foster, title) == [] and reminders_titled(author, title) == []

    # Baker acknowledges after the reminder: the author's list names only who still has not.
    assert baker.post(f"/api/v1/announcements/{announcement['id']}/acknowledge").status_code == 200
    advance_clock(60)
    report = reminders_titled(author, title)
    assert len(report) == 1 and report[0]["title"] == f"Not yet acknowledged (1): Dr. Luis Ramirez | {title}"
    advance_clock(60)
    assert len(reminders_titled(author, title)) == 1 and len(reminders_titled(ramirez, title)) == 1


def test_an_announcement_everyone_acknowledged_sends_nothing(lakeside, advance_clock):
    author = lakeside["lakeside.admin"]
    title = unique("Parking changes")
    posted = author.post(
        "/api/v1/announcements",
        json={
            "title": title,
            "body": "Read it.",
            "acknowledgement_required": True,
            "acknowledge_by": clock_in(advance_clock, 30),
        },
    )
    assert posted.status_code == 201, posted.text
    for name in ("dr.ramirez", "nurse.foster", "frontdesk.baker"):
        reply = lakeside[name].post(f"/api/v1/announcements/{posted.json()['id']}/acknowledge")
        assert reply.status_code == 200, reply.text
    advance_clock(31)
    advance_clock(61)
    for client in lakeside.values():
        assert reminders_titled(client, title) == []


def test_bad_acknowledge_by_times_are_refused(admin, advance_clock):
    future = clock_in(advance_clock, 60)
    cases = [
        {"acknowledge_by": future},  # acknowledgement not asked for
        {"acknowledge_by": clock_in(advance_clock, -5), "acknowledgement_required": True},
        {"acknowledge_by": "tomorrow", "acknowledgement_required": True},
        {"acknowledge_by": future, "acknowledgement_required": True, "expires_at": clock_in(advance_clock, 30)},
    ]
    for body in cases:
        reply = post_announcement(admin, **body)
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["code"] == "invalid_value"
