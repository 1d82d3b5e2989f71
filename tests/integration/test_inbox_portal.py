"""Patient Portal Messages against the real database: the portal's routes (as the gateway calls
them), the fan-out to the care team, staff replies and who may read which thread."""

from __future__ import annotations

import json

import pytest

from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.directory_client import PortalPatient
from services.inbox.http_api import build_app
from services.inbox.portal import Portal
from services.kit.auth import Identity
from services.kit.errors import Conflict
from tests.integration.inbox_fixtures import staff
from tests.integration.test_gateway_identity import signing_client

AGENCY = "agy_1"
OTHER = "agy_2"
CONSUMER = "patient-portal"
TEAM = "team_intake"
TEAM_STAFF = ("stf_a", "stf_b", "stf_c")
JANE = PortalPatient("pat_jane", AGENCY, "portal_jane", "Jane Roe")
JOHN = PortalPatient("pat_john", AGENCY, "portal_john", "John Poe")
BASE = f"/api/v1/partner/portal/agencies/{AGENCY}/patients"


class ServiceTokens:
    """Inbox's service identity per agency, as ServiceTokens hands it out."""

    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:inbox", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


@pytest.fixture
def portal(inbox):
    components, table = inbox
    components.service_tokens = ServiceTokens()
    feature = Portal(components)
    components.features = [feature]
    feature.ensure_indexes()
    feature.attach()
    table.teams[TEAM] = list(TEAM_STAFF)
    table.staff.update({s: AGENCY for s in (*TEAM_STAFF, "stf_d")})
    table.staff["stf_other"] = OTHER
    table.patients.update({"jane": JANE, "john": JOHN})
    # The gateway signs each partner request (X-Gateway-Identity); this client does it in its place.
    return components, table, signing_client(build_app(components, None), components.settings.gateway_identity_keys[0])


def partner(consumer: str = CONSUMER, **headers) -> dict:
    return {"X-Consumer-Username": consumer, **headers}


def post(client, portal_user_id: str, body, headers=None):
    return client.post(
        f"{BASE}/{portal_user_id}/messages", json=body, headers=partner() if headers is None else headers
    )


def ask(client, portal_user_id: str, subject: str = "Refill question", **fields):
    body = {"to_team_id": TEAM, "subject": subject, "body": "Can I get my refill early?", **fields}
    reply = post(client, portal_user_id, body)
    assert reply.status_code == 201, reply.get_json()
    return reply.get_json()


def folder(components, staff_id: str, folder_id: str) -> dict:
    tree = components.board.tree(staff(AGENCY, staff_id))
    return next(f for f in tree["folders"] if f["id"] == folder_id)


def test_a_patient_message_reaches_every_team_member_in_patient_portal_messages(portal):
    components, _, client = portal
    sent = ask(client, "portal_jane")
    assert sent["thread_id"] == sent["id"]
    for staff_id in TEAM_STAFF:
        assert folder(components, staff_id, domain.FOLDER_PORTAL) == {
            "id": "portal",
            "name": "Patient Portal Messages",
            "unread": 1,
            "total": 1,
        }
        assert folder(components, staff_id, domain.FOLDER_MESSAGES)["total"] == 0
        assert folder(components, staff_id, domain.FOLDER_SENT)["total"] == 0
    page = components.board.page(staff(AGENCY, "stf_a"), domain.FOLDER_PORTAL, ItemFilter(), None, 20)
    (item,) = page["items"]
    assert item["kind"] == domain.KIND_PORTAL_MESSAGE
    assert item["title"] == "Refill question"
    assert item["sender"] == {"id": "pat_jane", "name": "Patient (portal)"}
    assert folder(components, "stf_d", domain.FOLDER_PORTAL)["total"] == 0

    raw = components.store.messages.find_one({"_id": {"$eq": sent["id"]}})
    stored = json.dumps(raw, default=str)
    assert "Jane Roe" not in stored and "refill early" not in stored and "Refill question" not in stored
    assert raw["sender_kind"] == "patient" and raw["patient_id"] == "pat_jane"
    assert sorted(raw["recipient_ids"]) == sorted(TEAM_STAFF)
    assert len(raw["_outbox"]) == 3 and "fanout_pending_at" not in raw
    thread = components.store.db["portal_threads"].find_one({"_id": {"$eq": sent["thread_id"]}})
    assert "Refill question" not in json.dumps(thread, default=str)


def test_the_reading_pane_shows_the_patient_and_is_audited(portal):
    components, _, client = portal
    sent = ask(client, "portal_jane")
    item_id = domain.board_item_id(sent["id"], "stf_b", domain.FOLDER_PORTAL)
    opened = components.board.open_item(staff(AGENCY, "stf_b"), item_id)
    assert opened["patient"] == {"id": "pat_jane", "name": "Jane Roe"}
    assert opened["body"] == "Can I get my refill early?"
    assert folder(components, "stf_b", domain.FOLDER_PORTAL)["unread"] == 0
    audited = components.store.access_denials.find_one(
        {"resource_id": {"$eq": sent["id"]}, "actor_id": {"$eq": "stf_b"}}
    )
    assert audited is not None
    read = components.mailbox.read(staff(AGENCY, "stf_c"), sent["id"])
    assert read["body"] == "Can I get my refill early?"


def test_a_staff_reply_reaches_the_patients_thread_and_no_other_board(portal):
    components, _, client = portal
    sent = ask(client, "portal_jane")
    kim = staff(AGENCY, "stf_a", name="Jordan Kim, RN")
    result = components.mailbox.reply(kim, sent["id"], body="Yes, tomorrow.")
    assert result.created and result.recipient_ids == []
    assert folder(components, "stf_a", domain.FOLDER_SENT)["total"] == 1
    for staff_id in ("stf_b", "stf_c"):
        assert folder(components, staff_id, domain.FOLDER_PORTAL) | {"name": ""} == {
            "id": "portal",
            "name": "",
            "unread": 1,
            "total": 1,
        }
        assert folder(components, staff_id, domain.FOLDER_MESSAGES)["total"] == 0
    assert components.store.board_items.find_one({"owner_id": {"$eq": "pat_jane"}}) is None

    listed = client.get(f"{BASE}/portal_jane/threads", headers=partner()).get_json()
    (thread,) = listed["threads"]
    assert thread["id"] == sent["thread_id"] and thread["subject"] == "Refill question"
    opened = client.get(f"{BASE}/portal_jane/threads/{thread['id']}", headers=partner())
    assert opened.status_code == 200
    messages = opened.get_json()["messages"]
    assert [m["body"] for m in messages] == ["Can I get my refill early?", "Yes, tomorrow."]
    assert messages[0]["sender"] == {"kind": "patient", "name": "Jane Roe"}
    assert messages[1]["sender"] == {"kind": "staff", "id": "stf_a", "name": "Jordan Kim, RN"}
    assert messages[1]["subject"] == "Re: Refill question"
    audited = components.store.access_denials.find_one(
        {"resource_id": {"$eq": thread["id"]}, "actor_id": {"$eq": CONSUMER}}
    )
    assert audited is not None and audited["action"] == "read_thread"

    with pytest.raises(Conflict) as refused:
        components.mailbox.reply(staff(AGENCY, "stf_b"), sent["id"], body="All", reply_all=True)
    assert refused.value.code == "reply_all_not_allowed"


def test_the_patients_next_message_reaches_the_team_and_whoever_replied(portal):
    components, table, client = portal
    sent = ask(client, "portal_jane")
    components.mailbox.reply(staff(AGENCY, "stf_a"), sent["id"], body="On it.")
    table.teams[TEAM] = ["stf_b", "stf_c"]  # the replier has left the team since
    again = post(client, "portal_jane", {"thread_id": sent["thread_id"], "body": "Thanks!"})
    assert again.status_code == 201, again.get_json()
    assert again.get_json()["thread_id"] == sent["thread_id"]
    raw = components.store.message(again.get_json()["id"])
    assert sorted(raw["recipient_ids"]) == ["stf_a", "stf_b", "stf_c"]
    assert folder(components, "stf_a", domain.FOLDER_PORTAL)["total"] == 2
    opened = client.get(f"{BASE}/portal_jane/threads/{sent['thread_id']}", headers=partner()).get_json()
    assert [m["subject"] for m in opened["messages"]] == [
        "Refill question",
        "Re: Refill question",
        "Re: Refill question",
    ]


def test_a_patient_never_reaches_another_patients_thread(portal):
    components, _, client = portal
    sent = ask(client, "portal_jane")
    stolen = client.get(f"{BASE}/portal_john/threads/{sent['thread_id']}", headers=partner())
    assert stolen.status_code == 404 and stolen.get_json()["code"] == "thread_not_found"
    continued = post(client, "portal_john", {"thread_id": sent["thread_id"], "body": "Me too"})
    assert continued.status_code == 404 and continued.get_json()["code"] == "thread_not_found"
    assert client.get(f"{BASE}/portal_john/threads", headers=partner()).get_json()["threads"] == []
    refused = components.store.access_denials.find_one(
        {"resource_id": {"$eq": sent["thread_id"]}, "actor_id": {"$eq": CONSUMER}}
    )
    assert refused is not None
    assert components.store.messages.count_documents({}) == 1


def test_only_the_agencys_own_portal_consumer_is_served(portal):
    _, table, client = portal
    body = {"to_team_id": TEAM, "subject": "Hi", "body": "Hello"}
    assert post(client, "portal_jane", body, headers={}).status_code == 401
    anonymous = post(client, "portal_jane", body, headers=partner(**{"X-Anonymous-Consumer": "true"}))
    assert anonymous.status_code == 401 and anonymous.get_json()["code"] == "unauthenticated"
    other = post(client, "portal_jane", body, headers=partner("another-partner"))
    assert other.status_code == 404 and other.get_json()["code"] == "agency_not_found"
    assert post(client, "nobody_here", body).get_json()["code"] == "patient_not_found"
    foreign = client.get(f"/api/v1/partner/portal/agencies/{OTHER}/patients/portal_jane/threads", headers=partner())
    assert foreign.status_code == 404 and foreign.get_json()["code"] == "patient_not_found"
    table.portal_consumer = ""
    unserved = client.get(f"{BASE}/portal_jane/threads", headers=partner())
    assert unserved.status_code == 404 and unserved.get_json()["code"] == "agency_not_found"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"to_team_id": {"$gt": ""}, "subject": "Hi", "body": "x"}, 400, "invalid_type"),
        ({"to_team_id": "team_nope", "subject": "Hi", "body": "x"}, 400, "unknown_recipients"),
        ({"to_staff_id": "stf_other", "subject": "Hi", "body": "x"}, 400, "unknown_recipients"),
        ({"to_team_id": TEAM, "to_staff_id": "stf_a", "subject": "Hi", "body": "x"}, 400, "invalid_value"),
        ({"subject": "Hi", "body": "x"}, 400, "invalid_value"),
        ({"to_team_id": TEAM, "body": "x"}, 400, "missing_field"),
        ({"to_team_id": TEAM, "subject": "Hi", "body": "   "}, 400, "invalid_value"),
        ({"to_team_id": TEAM, "subject": "Hi", "body": "x", "priority": "urgent"}, 400, "unknown_field"),
        ({"thread_id": "msg_unknown", "body": "x"}, 404, "thread_not_found"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(portal, body, status, code):
    components, _, client = portal
    reply = post(client, "portal_jane", body)
    assert reply.status_code == status and reply.get_json()["code"] == code
    db = components.store.db
    for collection in ("messages", "board_items", "portal_threads", "board_counters"):
        assert db[collection].count_documents({}) == 0, collection


def test_malformed_json_is_refused(portal):
    _, _, client = portal
    reply = client.post(
        f"{BASE}/portal_jane/messages", data="{not json", content_type="application/json", headers=partner()
    )
    assert reply.status_code == 400 and reply.get_json()["code"] == "malformed_json"


def test_a_retried_send_with_the_same_idempotency_key_is_sent_once(portal):
    components, _, client = portal
    body = {"to_team_id": TEAM, "subject": "Hi", "body": "Once"}
    headers = partner(**{"Idempotency-Key": "k-1"})
    first = post(client, "portal_jane", body, headers)
    second = post(client, "portal_jane", body, headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.get_json()["id"] == second.get_json()["id"]
    reused = post(client, "portal_jane", {**body, "body": "Another"}, headers)
    assert reused.status_code == 409 and reused.get_json()["code"] == "idempotency_key_reused"
    assert post(client, "portal_john", body, headers).status_code == 201  # keys are per patient
    assert folder(components, "stf_a", domain.FOLDER_PORTAL)["total"] == 2


def test_threads_are_listed_by_latest_activity_in_pages(portal):
    components, _, client = portal
    first = ask(client, "portal_jane", subject="First")
    ask(client, "portal_jane", subject="Second")
    ask(client, "portal_jane", subject="Third")
    page = client.get(f"{BASE}/portal_jane/threads?limit=2", headers=partner()).get_json()
    assert [t["subject"] for t in page["threads"]] == ["Third", "Second"]
    rest = client.get(f"{BASE}/portal_jane/threads?limit=2&cursor={page['next_cursor']}", headers=partner())
    assert [t["subject"] for t in rest.get_json()["threads"]] == ["First"]
    assert rest.get_json()["next_cursor"] is None
    components.mailbox.reply(staff(AGENCY, "stf_c"), first["id"], body="Answer")
    newest = client.get(f"{BASE}/portal_jane/threads?limit=1", headers=partner()).get_json()
    assert newest["threads"][0]["subject"] == "First"
    bad = client.get(f"{BASE}/portal_jane/threads?cursor=nonsense", headers=partner())
    assert bad.status_code == 400 and bad.get_json()["code"] == "invalid_cursor"


def test_an_idempotency_key_reused_for_text_split_differently_is_refused(portal):
    _, _, client = portal
    headers = partner(**{"Idempotency-Key": "k-split"})
    first = post(client, "portal_jane", {"to_team_id": TEAM, "subject": "Dose|change", "body": "today"}, headers)
    assert first.status_code == 201
    moved = post(client, "portal_jane", {"to_team_id": TEAM, "subject": "Dose", "body": "change|today"}, headers)
    assert moved.status_code == 409 and moved.get_json()["code"] == "idempotency_key_reused"
