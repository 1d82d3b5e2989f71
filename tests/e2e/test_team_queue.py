"""Team queues with claim, through the gateway: a message (or a patient's portal message) addressed to a
team is one shared item; members claim it (exactly one wins), release it, mark it done, or reply
(handled for all, the reply shown in the thread to every member); every member's counts move
exactly and stay equal to a recount of their board; outsiders get 404."""

from __future__ import annotations

import threading
import uuid

import pytest

from services.inbox.board import Board
from services.inbox.store import InboxStore
from tests.e2e.test_portal import INTAKE, INTAKE_USERS, JANE, Portal

MEDICAL = "team_riverbend_medical"
MEDICAL_USERS = ("dr.reyes", "dr.chen", "np.brooks", "nurse.kim", "nurse.white")


@pytest.fixture(scope="module")
def medical(login):
    return [login(username) for username in MEDICAL_USERS]


@pytest.fixture(scope="module")
def intake(login):
    return [login(username) for username in INTAKE_USERS]


@pytest.fixture(scope="module")
def portal(stack):
    return Portal(stack.gateway_url, stack.patient_portal_api_key)


@pytest.fixture(scope="module")
def recount(inbox_db):
    """client -> whether their stored counters equal a recount of their board's items."""
    board = Board(InboxStore(inbox_db), cipher=None)

    def _exact(client) -> bool:
        return board.stored_counts(client.agency_id, client.staff_id) == board.recount(
            client.agency_id, client.staff_id
        )

    return _exact


def counts(team, folder: str = "messages") -> dict[str, tuple[int, int]]:
    return {client.staff_id: client.counts(folder) for client in team}


def send_to(sender, team_id: str) -> str:
    sent = sender.send(to_team_ids=[team_id], subject=f"Call back {uuid.uuid4().hex[:6]}", body="Mrs. A called.")
    assert sent.status_code == 201, sent.text
    return sent.json()["id"]


def act(client, message_id: str, action: str):
    return client.post(f"/api/v1/messages/{message_id}/{action}")


def listed(client, message_id: str, folder: str = "messages") -> dict:
    return next(i for i in client.items(folder=folder)["items"] if i["ref_id"] == message_id)


def test_concurrent_claims_exactly_one_wins_and_counts_follow(admin, medical, recount, inbox_db):
    before = counts(medical)
    message_id = send_to(admin, MEDICAL)
    assert counts(medical) == {k: (u + 1, t + 1) for k, (u, t) in before.items()}
    assert listed(medical[0], message_id)["queue"] == {"state": "open", "claimed_by": None}

    kim, chen = medical[3], medical[1]
    start = threading.Barrier(2)
    replies: dict[str, object] = {}

    def claim(client):
        start.wait()
        replies[client.staff_id] = act(client, message_id, "claim")

    threads = [threading.Thread(target=claim, args=(c,)) for c in (kim, chen)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(reply.status_code for reply in replies.values())
    assert statuses == [200, 409], {k: r.text for k, r in replies.items()}
    winner = next(c for c in (kim, chen) if replies[c.staff_id].status_code == 200)
    loser = chen if winner is kim else kim
    refused = replies[loser.staff_id].json()
    won = replies[winner.staff_id].json()
    assert refused["code"] == "already_claimed"
    assert refused["details"]["claimed_by"] == {"id": winner.staff_id, "name": won["claimed_by"]["name"]}
    assert won["claimed_by"]["name"] in refused["message"]
    assert won["state"] == "claimed" and won["message_id"] == message_id

    # The others see who claimed it, and it left their unread counts; the claimer's stays.
    for client in medical:
        unread, total = before[client.staff_id]
        claimed = client.staff_id == winner.staff_id
        assert client.counts("messages") == (unread + (1 if claimed else 0), total + 1), client.staff_id
        assert listed(client, message_id)["queue"] == {"state": "claimed", "claimed_by": won["claimed_by"]}
    shown = loser.get(f"/api/v1/messages/{message_id}")
    assert shown.status_code == 200 and shown.json()["queue"]["claimed_by"] == won["claimed_by"]

    # Only the claimer releases; then it comes back unread for the others.
    assert act(loser, message_id, "release").status_code == 409
    released = act(winner, message_id, "release")
    assert released.status_code == 200 and released.json()["state"] == "open"
    opened = loser.get(f"/api/v1/messages/{message_id}")  # the loser opened it meanwhile: read
    assert opened.status_code == 200
    for client in medical:
        unread, total = before[client.staff_id]
        read = 0 if client.staff_id == loser.staff_id else 1
        assert client.counts("messages") == (unread + read, total + 1), client.staff_id

    # Done: handled for all, out of every unread count; no claim after that.
    done = act(medical[2], message_id, "done")
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "done" and done.json()["done_by"]["id"] == medical[2].staff_id
    assert counts(medical) == {k: (u, t + 1) for k, (u, t) in before.items()}
    late = act(kim, message_id, "claim")
    assert late.status_code == 409 and late.json()["code"] == "already_done"
    for client in [admin, *medical]:
        assert recount(client), client.staff_id

    # Each action is audited with its action name.
    actions = {doc["action"] for doc in inbox_db["access_denials"].find({"resource_id": message_id})}
    assert {"claim", "release", "done"} <= actions


def test_a_members_reply_shows_in_the_thread_to_every_member_and_handles_it(admin, medical, recount, inbox_db):
    before = counts(medical)
    message_id = send_to(admin, MEDICAL)
    chen, brooks = medical[1], medical[2]
    replied = chen.post(f"/api/v1/messages/{message_id}/reply", json={"body": "I'll call her at noon."})
    assert replied.status_code == 201, replied.text
    reply_id = replied.json()["id"]
    assert counts(medical) == {k: (u, t + 1) for k, (u, t) in before.items()}
    thread = brooks.get(f"/api/v1/threads/{message_id}")
    assert thread.status_code == 200, thread.text
    assert [m["id"] for m in thread.json()["messages"]] == [message_id, reply_id]
    assert thread.json()["messages"][1]["body"] == "I'll call her at noon."
    queue = brooks.get(f"/api/v1/messages/{message_id}").json()["queue"]
    assert queue["state"] == "done" and queue["handled_by_reply"] == reply_id
    assert queue["done_by"]["id"] == chen.staff_id
    handled = inbox_db["access_denials"].find_one({"resource_id": message_id, "action": "done"})
    assert handled is not None and handled["actor_id"] == chen.staff_id
    for client in [admin, *medical]:
        assert recount(client), client.staff_id


def test_outsiders_and_bad_requests_are_refused(admin, medical, outsider, wilson, kim):
    message_id = send_to(admin, MEDICAL)
    for client in (outsider, wilson, admin):  # another agency, another team, the sender
        for action in ("claim", "release", "done"):
            refused = act(client, message_id, action)
            assert refused.status_code == 404, refused.text
            assert refused.json()["code"] == "message_not_found"
    assert act(kim, "msg_does_not_exist", "claim").status_code == 404
    assert act(kim, "$ne", "claim").status_code == 404
    injected = kim.post(f"/api/v1/messages/{message_id}/claim", json={"$set": {"state": "done"}})
    assert injected.status_code == 400 and injected.json()["code"] == "unknown_field"
    direct = admin.send(to_staff_ids=[kim.staff_id])
    not_team = act(kim, direct.json()["id"], "claim")
    assert not_team.status_code == 409 and not_team.json()["code"] == "not_a_team_item"
    # Nothing was changed by the refusals.
    assert kim.get(f"/api/v1/messages/{message_id}").json()["queue"]["state"] == "open"


def test_a_portal_message_to_a_team_is_claimed_and_answered_for_all(portal, intake, recount):
    before = counts(intake, "portal")
    sent = portal.send(
        JANE, json={"to_team_id": INTAKE, "subject": f"Forms {uuid.uuid4().hex[:6]}", "body": "Which forms?"}
    )
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    wilson, thompson = intake[0], intake[1]
    claimed = act(wilson, message_id, "claim")
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["claimed_by"] == {"id": wilson.staff_id, "name": "Chris Wilson"}
    item = listed(thompson, message_id, "portal")
    assert item["queue"] == {"state": "claimed", "claimed_by": {"id": wilson.staff_id, "name": "Chris Wilson"}}
    for client in intake:
        unread, total = before[client.staff_id]
        assert client.counts("portal") == (unread + (1 if client is wilson else 0), total + 1)

    answered = wilson.post(f"/api/v1/messages/{message_id}/reply", json={"body": "Just the intake form."})
    assert answered.status_code == 201, answered.text
    assert counts(intake, "portal") == {k: (u, t + 1) for k, (u, t) in before.items()}
    thread = thompson.get(f"/api/v1/threads/{sent.json()['thread_id']}")
    assert thread.status_code == 200, thread.text
    bodies = [m["body"] for m in thread.json()["messages"]]
    assert bodies == ["Which forms?", "Just the intake form."]
    opened = thompson.get(f"/api/v1/board/items/{item['id']}")
    assert opened.status_code == 200
    assert opened.json()["queue"]["state"] == "done" and opened.json()["queue"]["done_by"]["id"] == wilson.staff_id
    for client in intake:
        assert recount(client), client.staff_id
