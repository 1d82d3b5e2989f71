"""Read receipts, recall and the patient a message is about, end to end through the gateway.

Time is controlled through the agency's message options (a recall window of 0 minutes has always
passed), never by waiting."""

from __future__ import annotations

import threading
import uuid

import pytest

from tests.e2e.test_portal import INTAKE, JANE, Portal, ask

INTAKE_USERS = ("intake.wilson", "intake.thompson", "frontdesk.davis", "frontdesk.lopez", "casemgr.garcia")
OPTIONS = "/api/v1/board/agency-options"


@pytest.fixture
def options(admin):
    """Set Riverbend's message options for one test; the defaults are put back afterwards."""

    def _set(**changes) -> dict:
        reply = admin.patch(OPTIONS, json=changes)
        assert reply.status_code == 200, reply.text
        return reply.json()

    yield _set
    _set(receipts=True, recall_window_minutes=10)


@pytest.fixture(scope="module")
def portal(stack):
    return Portal(stack.gateway_url, stack.patient_portal_api_key)


def send(sender, **addressing) -> str:
    reply = sender.send(subject=f"Receipts {uuid.uuid4().hex[:8]}", body="Please review the plan.", **addressing)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def receipts(client, message_id: str, **params) -> dict:
    reply = client.get(f"/api/v1/messages/{message_id}/receipts", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def statuses(body: dict) -> dict[str, str]:
    return {entry["staff_id"]: entry["status"] for entry in body["recipients"]}


def recall(client, message_id: str):
    return client.post(f"/api/v1/messages/{message_id}/recall")


def test_the_sender_sees_each_recipient_read_as_they_read(reyes, kim, chen):
    message_id = send(reyes, to_staff_ids=[kim.staff_id, chen.staff_id])
    first = receipts(reyes, message_id)
    assert first["receipts"] is True
    assert first["counts"] == {"recipients": 2, "delivered": 2, "recalled": 0, "read": 0}
    assert statuses(first) == {kim.staff_id: "delivered", chen.staff_id: "delivered"}
    assert all(entry["delivered_at"] == first["sent_at"] and entry["read_at"] is None for entry in first["recipients"])
    assert first["recallable_until"] is not None and first["recall"] is None

    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    after = receipts(reyes, message_id)
    assert after["counts"]["read"] == 1
    assert statuses(after) == {kim.staff_id: "read", chen.staff_id: "delivered"}
    read_at = next(e["read_at"] for e in after["recipients"] if e["staff_id"] == kim.staff_id)
    assert read_at is not None and read_at >= after["sent_at"]

    # Marked unread and read again: the receipt keeps the first read.
    assert kim.post(f"/api/v1/messages/{message_id}/unread").status_code == 200
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    again = receipts(reyes, message_id)
    assert again["counts"]["read"] == 1
    assert next(e["read_at"] for e in again["recipients"] if e["staff_id"] == kim.staff_id) == read_at

    # Read from the board's reading pane counts too.
    item = next(i for i in chen.items(folder="messages")["items"] if i["ref_id"] == message_id)
    assert chen.get(f"/api/v1/board/items/{item['id']}").status_code == 200
    assert receipts(reyes, message_id)["counts"]["read"] == 2


def test_only_the_sender_sees_receipts(reyes, kim, outsider):
    message_id = send(reyes, to_staff_ids=[kim.staff_id])
    for other in (kim, outsider):
        refused = other.get(f"/api/v1/messages/{message_id}/receipts")
        assert refused.status_code == 404 and refused.json()["code"] == "message_not_found"
        refused = recall(other, message_id)
        assert refused.status_code == 404 and refused.json()["code"] == "message_not_found"
    unknown = reyes.get("/api/v1/messages/msg_nope/receipts")
    assert unknown.status_code == 404 and unknown.json()["code"] == "message_not_found"


def test_a_team_message_shows_counts_and_a_paged_list(reyes, login):
    team = [login(username) for username in INTAKE_USERS]
    message_id = send(reyes, to_team_ids=[INTAKE])
    for member in team[:2]:
        assert member.get(f"/api/v1/messages/{message_id}").status_code == 200
    first = receipts(reyes, message_id, limit=2)
    assert first["to"] == {"staff_ids": [], "team_ids": [INTAKE], "whole_agency": False}
    assert first["counts"] == {"recipients": 5, "delivered": 5, "recalled": 0, "read": 2}
    listed = [*first["recipients"]]
    cursor = first["next_cursor"]
    pages = 1
    while cursor:
        page = receipts(reyes, message_id, limit=2, cursor=cursor)
        listed += page["recipients"]
        cursor = page["next_cursor"]
        pages += 1
    assert pages == 3
    assert sorted(e["staff_id"] for e in listed) == sorted(member.staff_id for member in team)
    assert {e["staff_id"] for e in listed if e["status"] == "read"} == {team[0].staff_id, team[1].staff_id}
    bad = reyes.get(f"/api/v1/messages/{message_id}/receipts", params={"cursor": "x"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"


def test_with_receipts_off_the_sender_sees_delivery_only(reyes, kim, admin, options):
    assert kim.patch(OPTIONS, json={"receipts": False}).status_code == 403
    changed = options(receipts=False)
    assert (changed["receipts"], changed["recall_window_minutes"]) == (False, 10)
    assert changed["critical_result_escalation_minutes"] == 30 and changed["escalation_team_id"] == ""
    assert kim.get(OPTIONS).json()["receipts"] is False
    message_id = send(reyes, to_staff_ids=[kim.staff_id])
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    body = receipts(reyes, message_id)
    assert body["receipts"] is False
    assert body["counts"] == {"recipients": 1, "delivered": 1, "recalled": 0}
    assert body["recipients"] == [{"staff_id": kim.staff_id, "status": "delivered", "delivered_at": body["sent_at"]}]
    bad = admin.patch(OPTIONS, json={"recall_window_minutes": -1})
    assert bad.status_code == 400 and bad.json()["code"] == "out_of_range"


def test_agency_options_are_checked_together_and_only_for_admins(kim, admin, outsider, options):
    """The options are checked one by one, then together; anyone but an admin is refused first."""
    assert kim.patch(OPTIONS, json={"nope": 1}).status_code == 403  # not told what would be wrong
    bad = admin.patch(
        OPTIONS, json={"critical_result_escalation_minutes": 50, "critical_result_second_escalation_minutes": 10}
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_value"
    assert admin.patch(OPTIONS, json={"critical_result_escalation_minutes": 60}).json()["code"] == "invalid_value"
    for team in ("team_lakeside_clinical", "team_nope"):  # another agency's, and nobody's
        refused = admin.patch(OPTIONS, json={"escalation_team_id": team})
        assert refused.status_code == 400 and refused.json()["code"] == "unknown_team", refused.text
    null = admin.patch(OPTIONS, json={"receipts": None})
    assert null.status_code == 400 and null.json()["code"] == "invalid_type"
    assert admin.patch(OPTIONS, json={}).json()["code"] == "missing_field"
    injected = admin.patch(OPTIONS, json={"recall_window_minutes": {"$gt": ""}})
    assert injected.status_code == 400 and injected.json()["code"] == "invalid_type"
    assert options(critical_result_second_escalation_minutes=90)["critical_result_second_escalation_minutes"] == 90
    assert options(critical_result_second_escalation_minutes=60)["critical_result_second_escalation_minutes"] == 60
    assert options(escalation_team_id="team_riverbend_intake")["escalation_team_id"] == "team_riverbend_intake"
    assert options(escalation_team_id="")["escalation_team_id"] == ""
    assert outsider.get(OPTIONS).json()["critical_result_second_escalation_minutes"] == 60  # its own agency's


def test_recall_takes_back_unread_copies_and_lists_who_read_it(reyes, kim, chen, wilson):
    before = {client.staff_id: client.counts("messages") for client in (kim, chen, wilson)}
    sent_before = reyes.counts("sent")
    message_id = send(reyes, to_staff_ids=[kim.staff_id, chen.staff_id, wilson.staff_id])
    for client in (kim, chen, wilson):
        unread, total = before[client.staff_id]
        assert client.counts("messages") == (unread + 1, total + 1)
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200

    answer = recall(reyes, message_id)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert sorted(body["recalled"]) == sorted([chen.staff_id, wilson.staff_id])
    assert body["already_read"] == [kim.staff_id]

    # Exactly their copies left their boards and counts; the reader keeps hers (read: total only).
    for client in (chen, wilson):
        assert client.counts("messages") == before[client.staff_id]
        gone = client.get(f"/api/v1/messages/{message_id}")
        assert gone.status_code == 404 and gone.json()["code"] == "message_not_found"
        assert message_id not in {i["ref_id"] for i in client.items(folder="messages", limit=100)["items"]}
    assert kim.counts("messages") == (before[kim.staff_id][0], before[kim.staff_id][1] + 1)
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    assert reyes.counts("sent")[1] == sent_before[1] + 1

    # The sender's views say it was recalled; a second recall answers the same.
    detail = reyes.get(f"/api/v1/messages/{message_id}").json()
    assert detail["recall"] == {"recalled_at": body["recalled_at"], "recalled": 2, "already_read": 1}
    sent_item = next(i for i in reyes.items(folder="sent")["items"] if i["ref_id"] == message_id)
    assert sent_item["recalled_at"] == body["recalled_at"]
    thread = reyes.get(f"/api/v1/threads/{detail['thread_id']}").json()
    assert thread["messages"][-1]["recalled_at"] == body["recalled_at"]
    assert chen.get(f"/api/v1/threads/{detail['thread_id']}").status_code == 404
    assert recall(reyes, message_id).json() == body
    shown = receipts(reyes, message_id)
    assert shown["counts"] == {"recipients": 3, "delivered": 1, "recalled": 2, "read": 1}
    assert statuses(shown) == {kim.staff_id: "read", chen.staff_id: "recalled", wilson.staff_id: "recalled"}
    assert shown["recallable_until"] is None


def test_a_read_racing_the_recall_wins_or_loses_whole(reyes, kim):
    """Each round: the recipient opens the message while the sender recalls it. Exactly one wins."""
    outcomes = []
    for _ in range(6):
        before = kim.counts("messages")
        message_id = send(reyes, to_staff_ids=[kim.staff_id])
        start = threading.Barrier(2)
        replies: dict[str, object] = {}

        def read(message_id=message_id, start=start, replies=replies):
            start.wait()
            replies["read"] = kim.get(f"/api/v1/messages/{message_id}")

        def take_back(message_id=message_id, start=start, replies=replies):
            start.wait()
            replies["recall"] = recall(reyes, message_id)

        workers = [threading.Thread(target=read), threading.Thread(target=take_back)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        read_reply, recall_reply = replies["read"], replies["recall"]
        assert recall_reply.status_code == 200, recall_reply.text
        body = recall_reply.json()
        if read_reply.status_code == 200:
            assert body == {**body, "recalled": [], "already_read": [kim.staff_id]}
            assert kim.counts("messages") == (before[0], before[1] + 1)
            outcomes.append("read")
        else:
            assert read_reply.status_code == 404, read_reply.text
            assert body == {**body, "recalled": [kim.staff_id], "already_read": []}
            assert kim.counts("messages") == before
            outcomes.append("recalled")
        assert receipts(reyes, message_id)["counts"]["read"] == (1 if outcomes[-1] == "read" else 0)
    assert len(outcomes) == 6


def test_after_the_window_a_recall_is_refused(reyes, kim, options):
    message_id = send(reyes, to_staff_ids=[kim.staff_id])
    options(recall_window_minutes=0)
    refused = recall(reyes, message_id)
    assert refused.status_code == 409 and refused.json()["code"] == "recall_window_passed"
    assert receipts(reyes, message_id)["recallable_until"] is None
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200


def test_forward_and_reply_of_a_portal_message_keep_the_patient(portal, login, reyes):
    wilson = login("intake.wilson")
    jane = {"id": "pat_riverbend_demo", "name": "Jane Demo-Client"}
    original = ask(portal, f"Refill {uuid.uuid4().hex[:8]}", JANE)
    opened = wilson.get(f"/api/v1/messages/{original['id']}").json()
    assert opened["patient"] == jane and opened["patient_term"] == "Client"

    forwarded = wilson.post(
        f"/api/v1/messages/{original['id']}/forward", json={"to_staff_ids": [reyes.staff_id], "body": "FYI"}
    )
    assert forwarded.status_code == 201, forwarded.text
    forward_id = forwarded.json()["id"]
    for client in (reyes, wilson):  # the recipient and the sender
        detail = client.get(f"/api/v1/messages/{forward_id}").json()
        assert detail["patient"] == jane and detail["patient_term"] == "Client"
    item = next(i for i in reyes.items(folder="messages")["items"] if i["ref_id"] == forward_id)
    assert reyes.get(f"/api/v1/board/items/{item['id']}").json()["patient"] == jane
    thread = reyes.get(f"/api/v1/threads/{forward_id}").json()
    assert thread["messages"][0]["patient"] == jane

    # A reply to the forward keeps it too, and so does the staff answer to the patient.
    answered = reyes.post(f"/api/v1/messages/{forward_id}/reply", json={"body": "Refill approved."})
    assert answered.status_code == 201, answered.text
    assert wilson.get(f"/api/v1/messages/{answered.json()['id']}").json()["patient"] == jane
    to_patient = wilson.post(f"/api/v1/messages/{original['id']}/reply", json={"body": "Ready Friday."})
    assert to_patient.status_code == 201, to_patient.text
    assert wilson.get(f"/api/v1/messages/{to_patient.json()['id']}").json()["patient"] == jane

    # A message about no patient shows none.
    plain = send(reyes, to_staff_ids=[wilson.staff_id])
    assert wilson.get(f"/api/v1/messages/{plain}").json()["patient"] is None
