"""Patient Portal Messages end to end: the portal calls the gateway with its own API key on behalf
of a patient; the care team answers from their Message Board."""

from __future__ import annotations

import uuid

import pika
import pytest
import requests

from clinic.audit.v1 import audit_pb2
from clinic.inbox.v1 import inbox_pb2
from services.kit.events import decode_envelope, unpack

RIVERBEND = "agy_riverbend"
LAKESIDE = "agy_lakeside"
JANE = "portal_riverbend_0001"
INTAKE = "team_riverbend_intake"
INTAKE_USERS = ("intake.wilson", "intake.thompson", "frontdesk.davis", "frontdesk.lopez", "casemgr.garcia")


class Portal:
    """The patient portal: a partner system holding the patient-portal consumer's API key."""

    def __init__(self, base_url: str, api_key: str | None):
        self.base = f"{base_url}/api/v1/partner/portal"
        self.http = requests.Session()
        if api_key is not None:
            self.http.headers["apikey"] = api_key

    def patient(self, portal_user_id: str, agency_id: str = RIVERBEND) -> str:
        return f"{self.base}/agencies/{agency_id}/patients/{portal_user_id}"

    def send(self, portal_user_id: str, agency_id: str = RIVERBEND, **kwargs) -> requests.Response:
        return self.http.post(f"{self.patient(portal_user_id, agency_id)}/messages", **kwargs)

    def threads(self, portal_user_id: str, agency_id: str = RIVERBEND) -> requests.Response:
        return self.http.get(f"{self.patient(portal_user_id, agency_id)}/threads")

    def thread(self, portal_user_id: str, thread_id: str) -> requests.Response:
        return self.http.get(f"{self.patient(portal_user_id)}/threads/{thread_id}")


@pytest.fixture(scope="module")
def portal(stack):
    return Portal(stack.gateway_url, stack.patient_portal_api_key)


@pytest.fixture(scope="module")
def second_patient(login) -> str:
    """Another Riverbend client with a portal account, registered by the agency admin."""
    portal_user_id = f"portal_e2e_{uuid.uuid4().hex[:8]}"
    created = login("admin").post(
        "/api/v1/directory/patients", json={"portal_user_id": portal_user_id, "display_name": "Second E2E-Client"}
    )
    assert created.status_code == 201, created.text
    return portal_user_id


def portal_folder(client) -> dict:
    tree = client.get("/api/v1/board")
    assert tree.status_code == 200, tree.text
    return next(f for f in tree.json()["folders"] if f["id"] == "portal")


def ask(portal: Portal, subject: str, portal_user_id: str = JANE) -> dict:
    sent = portal.send(portal_user_id, json={"to_team_id": INTAKE, "subject": subject, "body": "Can I come at 9?"})
    assert sent.status_code == 201, sent.text
    return sent.json()


def test_a_patient_message_reaches_every_intake_member_and_a_reply_reaches_the_portal(portal, login):
    team = [login(username) for username in INTAKE_USERS]
    before = {client.staff_id: portal_folder(client)["unread"] for client in team}
    subject = f"Appointment {uuid.uuid4().hex[:8]}"
    sent = ask(portal, subject)
    for client in team:
        folder = portal_folder(client)
        assert folder["name"] == "Client Portal Messages"  # Riverbend says "Client"
        assert folder["unread"] == before[client.staff_id] + 1

    wilson = team[0]
    item = next(
        i
        for i in wilson.get("/api/v1/board/items", params={"folder": "portal"}).json()["items"]
        if i["ref_id"] == sent["id"]
    )
    assert item["title"] == subject and item["sender"]["name"] == "Client (portal)"
    opened = wilson.get(f"/api/v1/board/items/{item['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["patient"] == {"id": "pat_riverbend_demo", "name": "Jane Demo-Client"}
    assert wilson.get(f"/api/v1/messages/{sent['id']}").json()["body"] == "Can I come at 9?"

    others_before = {client.staff_id: portal_folder(client)["total"] for client in team[1:]}
    replied = wilson.post(f"/api/v1/messages/{sent['id']}/reply", json={"body": "9 works, see you then."})
    assert replied.status_code == 201, replied.text
    assert {client.staff_id: portal_folder(client)["total"] for client in team[1:]} == others_before
    refused = wilson.post(f"/api/v1/messages/{sent['id']}/reply-all", json={"body": "All"})
    assert refused.status_code == 409 and refused.json()["code"] == "reply_all_not_allowed"

    listed = portal.threads(JANE)
    assert listed.status_code == 200, listed.text
    assert listed.json()["threads"][0]["id"] == sent["thread_id"]
    assert listed.json()["threads"][0]["subject"] == subject
    thread = portal.thread(JANE, sent["thread_id"])
    assert thread.status_code == 200, thread.text
    messages = thread.json()["messages"]
    assert [m["body"] for m in messages] == ["Can I come at 9?", "9 works, see you then."]
    assert messages[1]["sender"] == {"kind": "staff", "id": wilson.staff_id, "name": "Chris Wilson"}


def test_a_patient_cannot_read_another_patients_thread(portal, second_patient):
    sent = ask(portal, "Private matter")
    stolen = portal.thread(second_patient, sent["thread_id"])
    assert stolen.status_code == 404 and stolen.json()["code"] == "thread_not_found"
    assert sent["thread_id"] not in {t["id"] for t in portal.threads(second_patient).json()["threads"]}
    assert portal.thread(JANE, sent["thread_id"]).status_code == 200


@pytest.mark.parametrize("api_key", [None, "not-the-key"])
def test_the_gateway_refuses_a_missing_or_wrong_api_key(stack, api_key):
    stranger = Portal(stack.gateway_url, api_key)
    reply = stranger.threads(JANE)
    assert reply.status_code == 401
    forged = stranger.http.get(stranger.patient(JANE) + "/threads", headers={"X-Consumer-Username": "patient-portal"})
    assert forged.status_code == 401


def test_another_agency_or_an_unknown_one_is_not_found(portal):
    lakeside = portal.threads(JANE, agency_id=LAKESIDE)
    assert lakeside.status_code == 404 and lakeside.json()["code"] == "patient_not_found"
    unknown = portal.threads(JANE, agency_id="agy_nowhere")
    assert unknown.status_code == 404 and unknown.json()["code"] == "agency_not_found"
    assert portal.threads("portal_nobody").json()["code"] == "patient_not_found"


def test_the_lakeside_patient_writes_to_lakeside_only(portal, login):
    ramirez = login("dr.ramirez")
    before = portal_folder(ramirez)
    sent = portal.send(
        "portal_lakeside_0001",
        agency_id=LAKESIDE,
        json={"to_staff_id": ramirez.staff_id, "subject": "Lab results", "body": "Are they in?"},
    )
    assert sent.status_code == 201, sent.text
    after = portal_folder(ramirez)
    assert after["name"] == "Patient Portal Messages" and after["unread"] == before["unread"] + 1
    riverbend_staff = portal.send(
        "portal_lakeside_0001",
        agency_id=LAKESIDE,
        json={"to_staff_id": "stf_riverbend_wilson", "subject": "Hi", "body": "x"},
    )
    assert riverbend_staff.status_code == 400 and riverbend_staff.json()["code"] == "unknown_recipients"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "{oops", "headers": {"Content-Type": "application/json"}}, 400, "malformed_json"),
        ({"json": {"to_team_id": {"$ne": ""}, "subject": "s", "body": "b"}}, 400, "invalid_type"),
        ({"json": {"to_team_id": INTAKE, "subject": {"$gt": ""}, "body": "b"}}, 400, "invalid_type"),
        ({"json": {"to_team_id": "team_nope", "subject": "s", "body": "b"}}, 400, "unknown_recipients"),
        ({"json": {"to_team_id": "team_lakeside_clinical", "subject": "s", "body": "b"}}, 400, "unknown_recipients"),
        ({"json": {"to_team_id": INTAKE, "subject": "s", "body": "b", "sender_id": "x"}}, 400, "unknown_field"),
        ({"data": "to_team_id=x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ],
)
def test_bad_input_is_refused(portal, kwargs, status, code):
    reply = portal.send(JANE, **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["code"] == code


def test_delivery_and_thread_read_events_are_published(portal, stack):
    connection = pika.BlockingConnection(pika.URLParameters(stack.config.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue, "clinic.events", routing_key="message.delivered.v1")
    channel.queue_bind(queue, "clinic.events", routing_key="phi.accessed.v1")
    try:
        sent = ask(portal, "Events")
        portal.thread(JANE, sent["thread_id"])
        delivered, accessed = {}, []
        for _method, _props, body in channel.consume(queue, inactivity_timeout=10):
            if body is None:
                break
            envelope = decode_envelope(body)
            if envelope.event_type == "message.delivered.v1":
                event = unpack(envelope, inbox_pb2.MessageDelivered)
                if event.message_id == sent["id"]:
                    delivered[event.recipient_staff_id] = event
            elif envelope.event_type == "phi.accessed.v1":
                event = unpack(envelope, audit_pb2.PhiAccessed)
                if event.resource_id == sent["thread_id"]:
                    accessed.append(event)
            if len(delivered) == len(INTAKE_USERS) and accessed:
                break
        assert len(delivered) == len(INTAKE_USERS)
        for event in delivered.values():
            assert event.sender_kind == "patient" and event.patient_id == "pat_riverbend_demo"
            assert event.board_kind == "portal"
        (read,) = accessed
        assert (read.actor_kind, read.actor_id, read.action, read.outcome) == (
            "partner",
            "patient-portal",
            "read_thread",
            "allowed",
        )
    finally:
        connection.close()
