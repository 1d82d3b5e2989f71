"""Patient Portal Messages end to end: the portal calls the gateway with its own API key on behalf
of a patient; the care team answers from their Message Board."""

from __future__ import annotations

import uuid

import pytest
import requests

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


def ask(portal: Portal, subject: str, portal_user_id: str = JANE) -> dict:
    sent = portal.send(portal_user_id, json={"to_team_id": INTAKE, "subject": subject, "body": "Can I come at 9?"})
    assert sent.status_code == 201, sent.text
    return sent.json()


def test_a_patient_message_reaches_every_intake_member_and_a_reply_reaches_the_portal(portal, login):
    team = [login(username) for username in INTAKE_USERS]
    before = {client.staff_id: client.folder("portal")["unread"] for client in team}
    subject = f"Appointment {uuid.uuid4().hex[:8]}"
    sent = ask(portal, subject)
    for client in team:
        folder = client.folder("portal")
        assert folder["name"] == "Client Portal Messages"  # Riverbend says "Client"
        assert folder["unread"] == before[client.staff_id] + 1

    wilson = team[0]
    item = next(i for i in wilson.items(folder="portal")["items"] if i["ref_id"] == sent["id"])
    assert item["title"] == subject and item["sender"]["name"] == "Client (portal)"
    opened = wilson.get(f"/api/v1/board/items/{item['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["patient"] == {"id": "pat_riverbend_demo", "name": "Jane Demo-Client"}
    assert wilson.get(f"/api/v1/messages/{sent['id']}").json()["body"] == "Can I come at 9?"

    others_before = {client.staff_id: client.folder("portal")["total"] for client in team[1:]}
    replied = wilson.post(f"/api/v1/messages/{sent['id']}/reply", json={"body": "9 works, see you then."})
    assert replied.status_code == 201, replied.text
    assert {client.staff_id: client.folder("portal")["total"] for client in team[1:]} == others_before
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
    before = ramirez.folder("portal")
    sent = portal.send(
        "portal_lakeside_0001",
        agency_id=LAKESIDE,
        json={"to_staff_id": ramirez.staff_id, "subject": "Lab results", "body": "Are they in?"},
    )
    assert sent.status_code == 201, sent.text
    after = ramirez.folder("portal")
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
    threads_before = portal.threads(JANE).json()["threads"]
    reply = portal.send(JANE, **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["code"] == code
    assert portal.threads(JANE).json()["threads"] == threads_before


def test_delivery_and_thread_read_events_are_published(portal, login, events):
    intake = {login(username).staff_id for username in INTAKE_USERS}
    with events.listen("message.delivered.v1", "phi.accessed.v1") as heard:
        sent = ask(portal, "Events")
        portal.thread(JANE, sent["thread_id"])
        for staff_id in intake:
            heard.wait_for(
                lambda e, who=staff_id: (
                    e.type == "message.delivered.v1"
                    and e.payload.message_id == sent["id"]
                    and e.payload.recipient_staff_id == who
                )
            )
        heard.wait_for(lambda e: e.type == "phi.accessed.v1" and e.payload.resource_id == sent["thread_id"])
        # Exactly these events: counted once a later message's delivery and read have been heard too.
        later = ask(portal, "Events, later")
        portal.thread(JANE, later["thread_id"])
        heard.wait_for(lambda e: e.type == "message.delivered.v1" and e.payload.message_id == later["id"])
        heard.wait_for(lambda e: e.type == "phi.accessed.v1" and e.payload.resource_id == later["thread_id"])
        received = heard.drain()
    delivered = [e.payload for e in received if e.type == "message.delivered.v1"]
    delivered = [event for event in delivered if event.message_id == sent["id"]]
    assert sorted(event.recipient_staff_id for event in delivered) == sorted(intake)
    for event in delivered:
        assert event.sender_kind == "patient" and event.patient_id == "pat_riverbend_demo"
        assert event.board_kind == "portal"
    accessed = [e.payload for e in received if e.type == "phi.accessed.v1"]
    (read,) = [event for event in accessed if event.resource_id == sent["thread_id"]]
    assert (read.actor_kind, read.actor_id, read.action, read.outcome) == (
        "partner",
        "patient-portal",
        "read_thread",
        "allowed",
    )
