"""Every create a client may retry after a lost answer honours `Idempotency-Key`, through the gateway:
the same key with the same request answers the first one's object again (200, the same id) and
stores nothing twice; the same key with another request is refused (409 idempotency_key_reused);
keys are per caller (per patient for the portal)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests

from tests.e2e.test_portal import INTAKE, JANE, Portal


def iso_in(seconds: float) -> str:
    return dt.datetime.fromtimestamp(time.time() + seconds, tz=dt.UTC).isoformat()


@dataclass
class Create:
    """One create route: who calls it, a request body, another body, and how many of its objects exist."""

    post: Callable[[dict, str], requests.Response]
    body: Callable[[], dict]
    other: Callable[[dict], dict]
    stored: Callable[[], int]


def keyed(client, path: str) -> Callable[[dict, str], requests.Response]:
    return lambda body, key: client.post(path, json=body, headers={"Idempotency-Key": key})


@pytest.fixture(scope="module")
def portal(stack):
    return Portal(stack.gateway_url, stack.patient_portal_api_key)


@pytest.fixture
def creates(admin, reyes, kim, portal, inbox_db) -> dict[str, Create]:
    def tag() -> str:
        return uuid.uuid4().hex[:8]

    return {
        "message": Create(
            keyed(reyes, "/api/v1/messages"),
            lambda: {"to_staff_ids": [kim.staff_id], "subject": f"Intake {tag()}", "body": "Can we move it?"},
            lambda body: {**body, "body": "Another text"},
            lambda: inbox_db.messages.count_documents({"sender_id": {"$eq": reyes.staff_id}}),
        ),
        "reminder": Create(
            keyed(reyes, "/api/v1/reminders"),
            lambda: {"text": f"Call the pharmacy {tag()}", "remind_at": iso_in(3600)},
            lambda body: {**body, "text": body["text"] + " again"},
            lambda: inbox_db.board_items.count_documents(
                {"kind": {"$eq": "reminder"}, "owner_id": {"$eq": reyes.staff_id}}
            ),
        ),
        "signature_request": Create(
            keyed(reyes, "/api/v1/signature-requests"),
            lambda: {
                "document_kind": "patient",
                "title": f"Treatment plan {tag()}",
                "document_ref": "ehr://plans/1",
                "signer_ids": [kim.staff_id],
            },
            lambda body: {**body, "document_ref": "ehr://plans/2"},
            lambda: inbox_db.signature_requests.count_documents({"requester_id": {"$eq": reyes.staff_id}}),
        ),
        "announcement": Create(
            keyed(admin, "/api/v1/announcements"),
            lambda: {"title": f"Parking {tag()}", "body": "The lot is closed on Friday."},
            lambda body: {**body, "acknowledgement_required": True},
            lambda: inbox_db.announcements.count_documents({"posted_by": {"$eq": admin.staff_id}}),
        ),
        "portal_message": Create(
            lambda body, key: portal.send(JANE, json=body, headers={"Idempotency-Key": key}),
            lambda: {"to_team_id": INTAKE, "subject": f"Appointment {tag()}", "body": "Can I come at 9?"},
            lambda body: {**body, "subject": body["subject"] + "?"},
            lambda: inbox_db.messages.count_documents({"kind": {"$eq": "portal_message"}}),
        ),
    }


KINDS = ["message", "reminder", "signature_request", "announcement", "portal_message"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_repeated_create_answers_the_first_one_and_stores_one(creates, kind):
    create = creates[kind]
    key, body = uuid.uuid4().hex, create.body()
    before = create.stored()
    first = create.post(body, key)
    assert first.status_code == 201, first.text
    again = create.post(body, key)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert create.stored() == before + 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_key_reused_for_another_request_is_refused(creates, kind):
    create = creates[kind]
    key, body = uuid.uuid4().hex, create.body()
    assert create.post(body, key).status_code == 201
    before = create.stored()
    refused = create.post(create.other(body), key)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "idempotency_key_reused"
    assert create.stored() == before


@pytest.mark.parametrize("kind", ["reminder", "signature_request", "announcement"])
def test_concurrent_repeats_make_one_object(creates, kind):
    create = creates[kind]
    key, body = uuid.uuid4().hex, create.body()
    before = create.stored()
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: create.post(body, key), range(5)))
    assert sorted(r.status_code for r in replies) == [200, 200, 200, 200, 201], [r.text for r in replies]
    assert len({r.json()["id"] for r in replies}) == 1
    assert create.stored() == before + 1


def test_without_a_key_every_create_is_new(reyes, creates):
    create = creates["reminder"]
    body = create.body()
    before = create.stored()
    replies = [reyes.post("/api/v1/reminders", json=body) for _ in range(2)]
    assert [r.status_code for r in replies] == [201, 201]
    assert replies[0].json()["id"] != replies[1].json()["id"]
    assert create.stored() == before + 2


def test_a_key_names_one_thing_of_its_caller_whatever_the_route(reyes, kim, creates):
    key = uuid.uuid4().hex
    message = creates["message"]
    assert message.post(message.body(), key).status_code == 201
    # The caller's key is spent on the message: a reminder under it is another request.
    reminder = creates["reminder"]
    refused = reminder.post(reminder.body(), key)
    assert refused.status_code == 409 and refused.json()["code"] == "idempotency_key_reused"
    # Another caller's same key is theirs alone.
    theirs = kim.post("/api/v1/reminders", json=reminder.body(), headers={"Idempotency-Key": key})
    assert theirs.status_code == 201, theirs.text


def test_a_repeat_is_answered_even_once_the_request_would_no_longer_be_accepted(reyes, kim, inbox_db, advance_clock):
    """A signature request's due time that has passed since the first request does not turn its
    repeat into a 400: the repeat is answered from what was stored before anything is checked."""
    # Due times are judged by inbox's deadline clock, which earlier tests may have moved forward.
    offset_s = advance_clock(0)["offset_ms"] / 1000
    key = uuid.uuid4().hex
    body = {
        "document_kind": "staff",
        "title": f"Policy {uuid.uuid4().hex[:8]}",
        "document_ref": "ehr://policies/7",
        "signer_ids": [kim.staff_id],
        "due_at": iso_in(offset_s + 4),  # room for a slow first answer on a busy machine
    }
    post = keyed(reyes, "/api/v1/signature-requests")
    first = post(body, key)
    assert first.status_code == 201, first.text
    while dt.datetime.fromisoformat(body["due_at"]) > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_s):
        time.sleep(0.1)  # until the due time has passed: a new request with it is now refused
    assert reyes.post("/api/v1/signature-requests", json=body).json()["code"] == "invalid_time"
    again = post(body, key)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert inbox_db.signature_requests.count_documents({"_id": {"$eq": first.json()["id"]}}) == 1


@pytest.mark.parametrize("key", [b"caf\xc3\xa9", b"tab\there", b"x" * 129])
def test_an_idempotency_key_outside_the_one_rule_is_refused_on_every_inbox_create(reyes, key):
    """1-128 printable ASCII characters, as on every other service (docs/api.md)."""
    for path, body in (
        ("/api/v1/messages", {"to_staff_ids": ["stf_riverbend_kim"], "subject": "Key rule", "body": "x"}),
        ("/api/v1/reminders", {"text": "Key rule", "remind_at": "2030-01-01T09:00:00+00:00"}),
    ):
        answer = reyes.post(path, json=body, headers={"Idempotency-Key": key})
        assert (answer.status_code, answer.json()["code"]) == (400, "invalid_idempotency_key"), (path, answer.text)
