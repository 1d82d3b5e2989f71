"""The first journey end to end through the gateway: log in, send, list, read."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pymongo
import pytest

from services.kit.crypto import DecryptionError, KeyRing, PhiCipher
from services.kit.settings import Env, common_settings
from tests.e2e.conftest import Client
from tests.waits import wait_until


def unique_subject() -> str:
    return f"Intake follow-up {uuid.uuid4().hex[:8]}"


def find_on_board(client, message_id: str, **params) -> dict | None:
    cursor = None
    for _ in range(20):
        page = client.board(**params, **({"cursor": cursor} if cursor else {}))
        for item in page["items"]:
            if item["id"] == message_id:
                return item
        cursor = page["next_cursor"]
        if not cursor:
            return None
    return None


def test_colleague_lists_and_reads_a_message(admin, reyes):
    subject = unique_subject()
    sent = admin.send(to_staff_ids=[reyes.staff_id], subject=subject, body="Please call the client back.")
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    assert sent.json()["recipient_ids"] == [reyes.staff_id]

    listed = find_on_board(reyes, message_id)
    assert listed is not None
    assert listed["subject"] == subject
    assert listed["read"] is False
    assert listed["sender"]["id"] == admin.staff_id
    assert find_on_board(reyes, message_id, unread="true") is not None

    opened = reyes.get(f"/api/v1/messages/{message_id}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["body"] == "Please call the client back."
    assert opened.json()["read"] is True
    assert find_on_board(reyes, message_id, unread="true") is None
    assert find_on_board(reyes, message_id)["read"] is True

    # The sender sees it in Sent, already read, and the read was the recipient's alone.
    assert find_on_board(admin, message_id, folder="sent") is not None
    assert find_on_board(admin, message_id) is None


def test_mark_unread_is_per_recipient(admin, reyes, kim):
    sent = admin.send(to_staff_ids=[reyes.staff_id, kim.staff_id], subject=unique_subject())
    message_id = sent.json()["id"]
    assert reyes.get(f"/api/v1/messages/{message_id}").status_code == 200
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    unread = reyes.post(f"/api/v1/messages/{message_id}/unread")
    assert unread.status_code == 200
    assert find_on_board(reyes, message_id, unread="true") is not None
    assert find_on_board(kim, message_id)["read"] is True


def test_team_members_each_get_it_exactly_once(admin, stack, inbox_db):
    teams = admin.get("/api/v1/directory/teams").json()["teams"]
    staff = {s["id"]: s for s in admin.get("/api/v1/directory/staff").json()["staff"]}
    team = max(teams, key=lambda t: len(t["member_ids"]))
    # Deactivated members are not recipients.
    members = [m for m in team["member_ids"] if m != admin.staff_id and staff[m]["active"]]
    assert len(members) >= 2
    # Address one member directly as well as through the team: still once.
    sent = admin.send(to_team_ids=[team["id"]], to_staff_ids=[members[0]], subject=unique_subject())
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    assert sorted(sent.json()["recipient_ids"]) == sorted(members)
    # Every member has exactly one Messages item; the sender has only the Sent copy.
    items = list(inbox_db.board_items.find({"message_id": message_id}))
    received = sorted(i["owner_id"] for i in items if i["folder"] == "messages")
    assert received == sorted(members)
    assert [i["owner_id"] for i in items if i["folder"] == "sent"] == [admin.staff_id]
    # And a member sees it once on their board through the gateway.
    username = next(login["username"] for login in stack.demo_logins if login["staff_id"] == members[-1])
    page = Client(stack.gateway_url, username).board(limit=100)
    assert [i["id"] for i in page["items"]].count(message_id) == 1


def test_other_agency_and_unaddressed_staff_get_404(admin, reyes, kim, outsider):
    message_id = admin.send(to_staff_ids=[reyes.staff_id], subject=unique_subject()).json()["id"]
    for stranger in (outsider, kim):
        reply = stranger.get(f"/api/v1/messages/{message_id}")
        assert reply.status_code == 404
        assert reply.json()["code"] == "message_not_found"
        assert stranger.post(f"/api/v1/messages/{message_id}/unread").status_code == 404
        assert find_on_board(stranger, message_id) is None


def test_another_agencys_staff_cannot_be_addressed(admin, outsider):
    reply = admin.send(to_staff_ids=[outsider.staff_id])
    assert reply.status_code == 400
    assert reply.json()["code"] == "unknown_recipients"


def test_subject_and_body_are_ciphertext_in_the_database(admin, reyes, inbox_db, stack):
    subject, body = unique_subject(), f"Client reports side effects {uuid.uuid4().hex}"
    link = "https://ehr.example/clients/4711"
    message_id = admin.send(to_staff_ids=[reyes.staff_id], subject=subject, body=body, links=[link]).json()["id"]
    stored = inbox_db.messages.find_one({"_id": message_id})
    raw = repr(stored).encode()
    for plain in (subject, body, "4711"):
        assert plain.encode() not in raw
    # AES-GCM under the agency's data key: opens with the service's keys, and only for this record.
    settings = common_settings(Env("inbox", stack.service_env()))
    cipher = PhiCipher(KeyRing(inbox_db, settings.phi_master_keys, settings.phi_master_key_id))
    for field, plain in (("subject", subject), ("body", body), ("links", json.dumps([link]))):
        blob = bytes(stored[field])
        assert blob[0] == 1 and blob[2 : 2 + blob[1]].decode().startswith(f"{admin.agency_id}:")
        assert cipher.open(admin.agency_id, message_id, field, blob) == plain
        with pytest.raises(DecryptionError):
            cipher.open(admin.agency_id, "msg_other", field, blob)
    items = list(inbox_db.board_items.find({"message_id": message_id}))
    assert len(items) == 2  # the recipient's and the sender's Sent copy
    for item in items:
        assert subject.encode() not in repr(item).encode()
        assert cipher.open(admin.agency_id, message_id, "subject", bytes(item["subject"])) == subject


def test_phi_never_reaches_the_logs(admin, reyes, stack):
    marker = f"PHI-MARKER-{uuid.uuid4().hex}"
    message_id = admin.send(to_staff_ids=[reyes.staff_id], subject=marker, body=marker).json()["id"]
    assert reyes.get(f"/api/v1/messages/{message_id}").json()["body"] == marker
    # The error paths too: refused sends carry the same text.
    for body in (
        {"to_staff_ids": ["stf_nobody_here"], "subject": marker, "body": marker},
        {"to_staff_ids": [reyes.staff_id], "subject": marker, "body": marker, "links": [f"javascript:{marker}"]},
        {"to_staff_ids": [reyes.staff_id], "subject": marker, "body": marker * 1000},
        {"to_staff_ids": [reyes.staff_id], "subject": {"$gt": marker}, "body": marker},
    ):
        reply = admin.post("/api/v1/messages", json=body)
        assert reply.status_code == 400 and marker not in reply.text
    # The logs are written by the services' processes: read them once a later request is in them too.
    later = f"logs-read-after-{uuid.uuid4().hex}"
    last = admin.get("/api/v1/messages", params={"limit": 1}, headers={"X-Correlation-ID": later})
    assert last.status_code == 200 and last.headers["X-Correlation-ID"] == later
    request_id = last.headers["X-Kong-Request-Id"]
    for service, trace in (("inbox", later), ("gateway", request_id)):
        log_file = stack.logs / f"{service}.log"
        wait_until(
            lambda log_file=log_file, trace=trace: trace in log_file.read_text(errors="replace"),
            message=f"the later request in {log_file.name}",
        )
    for log_file in stack.logs.glob("*.log"):
        assert marker not in log_file.read_text(errors="replace"), log_file.name


def test_delivery_and_read_events_are_published(admin, reyes, kim, outsider, events):
    with events.listen("message.delivered.v1", "phi.accessed.v1") as heard:
        message_id = admin.send(to_staff_ids=[reyes.staff_id, kim.staff_id], subject=unique_subject()).json()["id"]
        reyes.get(f"/api/v1/messages/{message_id}")
        assert outsider.get(f"/api/v1/messages/{message_id}").status_code == 404
        delivered = {
            recipient.staff_id: heard.wait_for(
                lambda e, who=recipient.staff_id: (
                    e.type == "message.delivered.v1"
                    and e.payload.message_id == message_id
                    and e.payload.recipient_staff_id == who
                )
            ).envelope
            for recipient in (reyes, kim)
        }
        for reader in (reyes, outsider):
            heard.wait_for(
                lambda e, who=reader.staff_id: (
                    e.type == "phi.accessed.v1" and e.payload.resource_id == message_id and e.payload.actor_id == who
                )
            )
        # Exactly these events: counted once a later message's delivery and read have been heard too.
        later = admin.send(to_staff_ids=[kim.staff_id], subject=unique_subject()).json()["id"]
        assert kim.get(f"/api/v1/messages/{later}").status_code == 200
        heard.wait_for(lambda e: e.type == "message.delivered.v1" and e.payload.message_id == later)
        heard.wait_for(lambda e: e.type == "phi.accessed.v1" and e.payload.resource_id == later)
        received = heard.drain()
        accessed = [e.payload for e in received if e.type == "phi.accessed.v1"]
    assert sorted(
        e.payload.recipient_staff_id
        for e in received
        if e.type == "message.delivered.v1" and e.payload.message_id == message_id
    ) == sorted([reyes.staff_id, kim.staff_id])
    for envelope in delivered.values():
        assert envelope.producer == "inbox" and envelope.agency_id == admin.agency_id
        assert envelope.correlation_id
    outcomes = [
        (event.actor_id, event.agency_id, event.action, event.outcome)
        for event in accessed
        if event.resource_id == message_id
    ]
    assert sorted(outcomes) == sorted(
        [
            (reyes.staff_id, reyes.agency_id, "read", "allowed"),
            (outsider.staff_id, outsider.agency_id, "read", "denied"),  # refused reads are audited too
        ]
    )


def test_idempotency_key_makes_a_retried_send_one_message(admin, reyes, kim, inbox_db):
    key = uuid.uuid4().hex
    body = {"to_staff_ids": [reyes.staff_id], "subject": "s", "body": "b"}

    def post(client=admin, json=body):
        return client.post("/api/v1/messages", json=json, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: post(), range(5)))
    assert sorted(r.status_code for r in replies) == [200, 200, 200, 200, 201]
    message_id = replies[0].json()["id"]
    assert {r.json()["id"] for r in replies} == {message_id}
    assert inbox_db.board_items.count_documents({"message_id": message_id}) == 2
    # The same key with another message is a conflict, not a silent replay.
    conflict = post(json={**body, "body": "something else"})
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_key_reused"
    # Keys are per sender: another sender's key never returns this message.
    theirs = post(client=kim, json={"to_staff_ids": [reyes.staff_id], "subject": "s", "body": "b"})
    assert theirs.status_code == 201 and theirs.json()["id"] != message_id


def test_cursor_pagination_is_newest_first_and_complete(admin, kim):
    ids = [admin.send(to_staff_ids=[kim.staff_id], subject=f"page {i}").json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = kim.board(limit=2, **({"cursor": cursor} if cursor else {}))
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [i for i in seen if i in ids] == list(reversed(ids))
    assert len(seen) == len(set(seen))


def test_inbox_verifies_tokens_itself(stack, reyes):
    import requests

    assert requests.get(f"{stack.inbox_url}/api/v1/messages", timeout=5).status_code == 401
    forged = reyes.token[:-4] + ("AAAA" if not reyes.token.endswith("AAAA") else "BBBB")
    reply = requests.get(f"{stack.inbox_url}/api/v1/messages", headers={"Authorization": f"Bearer {forged}"}, timeout=5)
    assert reply.status_code == 401
    assert reply.json()["code"] == "invalid_token"


def count(db: pymongo.database.Database) -> tuple[int, int]:
    return db.messages.count_documents({}), db.board_items.count_documents({})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"to_staff_ids": "stf_x", "subject": "s", "body": "b"}, "invalid_type"),
        ({"to_staff_ids": [{"$gt": ""}], "subject": "s", "body": "b"}, "invalid_type"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": {"$gt": ""}, "body": "b"}, "invalid_type"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": {"$ne": None}}, "invalid_type"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "b", "priority": {"$in": ["urgent"]}}, "invalid_type"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "b", "$where": "1"}, "unknown_field"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "b", "to_whole_agency": "yes"}, "invalid_type"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "b", "priority": "critical"}, "invalid_value"),
        (
            {"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "b", "links": ["javascript:alert(1)"]},
            "invalid_link",
        ),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "", "body": "b"}, "invalid_value"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "  \n\t "}, "invalid_value"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "x" * 201, "body": "b"}, "too_long"),
        ({"to_staff_ids": ["RECIPIENT"], "subject": "s", "body": "x" * 20_001}, "too_long"),
        ({"to_staff_ids": ["stf_nobody_here"], "subject": "s", "body": "b"}, "unknown_recipients"),
        ({"subject": "s", "body": "b"}, "no_recipients"),
        ([1, 2, 3], "invalid_body"),
    ],
)
def test_bad_input_is_rejected_and_nothing_is_stored(admin, reyes, inbox_db, body, code):
    if isinstance(body, dict) and body.get("to_staff_ids") == ["RECIPIENT"]:
        body["to_staff_ids"] = [reyes.staff_id]
    before = count(inbox_db)
    reply = admin.post("/api/v1/messages", json=body)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["code"] == code
    assert "Traceback" not in reply.text
    assert count(inbox_db) == before


def test_malformed_json_and_oversize_bodies_are_rejected(admin, inbox_db, stack):
    before = count(inbox_db)
    reply = admin.post("/api/v1/messages", data=b'{"subject": "s", ', headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["code"] == "malformed_json"
    reply = admin.post(
        "/api/v1/messages", data=b"subject=s", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert reply.status_code == 415 and reply.json()["code"] == "unsupported_media_type"
    # Over the gateway's request-size limit: Kong's own 413.
    huge = b'{"subject": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    reply = admin.post("/api/v1/messages", data=huge, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["message"] == "Request size limit exceeded"
    assert count(inbox_db) == before
    # And the service keeps serving.
    assert admin.board()["items"] is not None


def test_malformed_ids_and_cursors(admin):
    assert admin.get("/api/v1/messages/..%2F..%2Fetc").status_code == 404
    assert admin.get("/api/v1/messages/msg_doesnotexist").status_code == 404
    reply = admin.get("/api/v1/messages", params={"cursor": "!!notacursor"})
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_cursor"
    reply = admin.get("/api/v1/messages", params={"folder": {"$gt": ""}})
    assert reply.status_code == 400
    reply = admin.get("/api/v1/messages", params={"limit": "1000"})
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_query"
