"""Compliance Alerts end to end: items from the compliance tracker (partner key) and from compliance
officers (staff token) through the gateway, on their assignees' boards, overdue, escalated once to
the supervisor or the compliance officers, and gone from every board once resolved."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
import requests

from services.inbox.delivery_rules import notice_id
from services.kit import mongo, sealing
from services.kit.service_identity import ServiceTokens
from services.kit.transport import use_grpc_tls
from services.notifications import config
from services.notifications.compliance_alerts import ComplianceAlerts
from services.notifications.service import build
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"


def at(**delta) -> str:
    """A due time relative to now, ISO-8601 with offset (the past works: no waiting for the clock)."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(**delta)).isoformat(timespec="seconds")


def item_body(**changes) -> dict:
    body = {
        "kind": "treatment_plan_review",
        "title": "90-day treatment plan review for record 4821",
        "assignee_ids": ["stf_riverbend_patel"],
        "due_at": at(days=3),
        "link": "https://compliance.example/items/4821",
    }
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def tracker(stack):
    session = requests.Session()
    session.headers["apikey"] = stack.compliance_tracker_api_key
    base = f"{stack.gateway_url}/api/v1/partner/compliance/{RIVERBEND}/items"
    return session, base


@pytest.fixture(scope="module")
def ortiz(login):
    """Riverbend's compliance officer."""
    return login("compliance.ortiz")


def alert(client, item_id: str, escalation: bool = False) -> dict | None:
    ref = notice_id(RIVERBEND, "compliance", item_id + (".escalation" if escalation else ""))
    return next((i for i in client.items(folder="compliance", limit=100)["items"] if i["ref_id"] == ref), None)


def test_the_compliance_tracker_creates_an_item_on_its_assignees_board(tracker, login):
    session, base = tracker
    patel, hall = login("therapist.patel"), login("therapist.hall")
    ref = "CT-" + uuid.uuid4().hex[:8]
    body = item_body()
    created = session.put(f"{base}/{ref}", json=body, timeout=10)
    assert created.status_code == 201, created.text
    item_id = created.json()["id"]
    assert created.json()["status"] == "open" and created.json()["external_ref"] == ref
    shown = wait_until(lambda: alert(patel, item_id), timeout=15)
    assert shown["title"] == "Treatment plan review due: 90-day treatment plan review for record 4821"
    assert shown["overdue"] is False and shown["severity"] == "info" and not shown["read"]
    assert alert(hall, item_id) is None
    # The same PUT again is the same item, and tells nobody twice.
    again = session.put(f"{base}/{ref}", json=body, timeout=10)
    assert again.status_code == 200 and again.json()["id"] == item_id and again.json()["version"] == 1
    resolved = session.post(f"{base}/{ref}/resolve", timeout=10)
    assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
    wait_until(lambda: alert(patel, item_id) is None, timeout=15)


def test_an_officer_creates_an_item_that_turns_overdue_and_escalates_once_to_the_supervisor(ortiz, login):
    patel, hall = login("therapist.patel"), login("therapist.hall")
    # Due five hours ago: past Riverbend's four-hour escalation delay at the first pass.
    created = ortiz.post("/api/v1/compliance/items", json=item_body(due_at=at(hours=-5)))
    assert created.status_code == 201, created.text
    item_id = created.json()["id"]
    overdue = wait_until(lambda: (i := alert(patel, item_id)) and i["status"] == "overdue" and i, timeout=20)
    assert overdue["overdue"] is True and overdue["severity"] == "urgent" and overdue["urgent"]
    escalation = wait_until(lambda: alert(hall, item_id, escalation=True), timeout=20)
    assert escalation["status"] == "escalated" and escalation["title"].startswith("Escalated: Treatment plan review")
    assert "assigned to Priya Patel, LCSW" in escalation["summary"]
    assert alert(ortiz, item_id, escalation=True) is None  # patel has a supervisor: the officer is not needed
    assert alert(patel, item_id, escalation=True) is None
    view = hall.get(f"/api/v1/compliance/items/{item_id}")
    assert view.status_code == 200 and view.json()["escalated_to"] == ["stf_riverbend_hall"]
    # More passes run meanwhile (every half second here); the escalation stays one item.
    wait_until(lambda: ortiz.get(f"/api/v1/compliance/items/{item_id}").json()["version"] >= 2, timeout=10)
    escalations = [i for i in hall.items(folder="compliance", limit=100)["items"]
                   if i["ref_id"] == notice_id(RIVERBEND, "compliance", f"{item_id}.escalation")]  # fmt: skip
    assert len(escalations) == 1

    resolved = ortiz.post(f"/api/v1/compliance/items/{item_id}/resolve")
    assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
    wait_until(lambda: alert(patel, item_id) is None and alert(hall, item_id, escalation=True) is None, timeout=15)


def test_without_a_supervisor_the_compliance_officers_are_told(ortiz, login):
    davis = login("frontdesk.davis")  # no supervisor in the demo data
    created = ortiz.post(
        "/api/v1/compliance/items",
        json=item_body(kind="consent_expiring", title="Consent to treat expires", assignee_ids=[davis.staff_id],
                       due_at=at(hours=-6)),
    )  # fmt: skip
    item_id = created.json()["id"]
    escalation = wait_until(lambda: alert(ortiz, item_id, escalation=True), timeout=20)
    assert escalation["title"] == "Escalated: Consent expiring: Consent to treat expires"
    # The assignee's own item turns overdue by its own delivery request, which may land a moment later.
    wait_until(lambda: (i := alert(davis, item_id)) and i["status"] == "overdue", timeout=20)
    ortiz.post(f"/api/v1/compliance/items/{item_id}/resolve")
    wait_until(lambda: alert(ortiz, item_id, escalation=True) is None and alert(davis, item_id) is None, timeout=15)


def test_an_item_just_past_due_is_overdue_but_not_yet_escalated(ortiz, login):
    patel, hall = login("therapist.patel"), login("therapist.hall")
    created = ortiz.post("/api/v1/compliance/items", json=item_body(due_at=at(minutes=-1)))
    item_id = created.json()["id"]
    wait_until(lambda: (i := alert(patel, item_id)) and i["status"] == "overdue", timeout=20)
    assert alert(hall, item_id, escalation=True) is None
    assert ortiz.get(f"/api/v1/compliance/items/{item_id}").json()["escalated_to"] == []


def test_only_compliance_officers_manage_items_and_only_those_involved_read_them(ortiz, login, admin):
    patel, kim = login("therapist.patel"), login("nurse.kim")
    refused = patel.post("/api/v1/compliance/items", json=item_body())
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert admin.post("/api/v1/compliance/items", json=item_body()).status_code == 403
    item_id = ortiz.post("/api/v1/compliance/items", json=item_body()).json()["id"]
    assert patel.post(f"/api/v1/compliance/items/{item_id}/resolve").status_code == 403
    assert patel.get(f"/api/v1/compliance/items/{item_id}").json()["title"] == item_body()["title"]
    unrelated = kim.get(f"/api/v1/compliance/items/{item_id}")
    assert unrelated.status_code == 404 and unrelated.json()["code"] == "compliance_item_not_found"
    outsider = login("lakeside.admin").get(f"/api/v1/compliance/items/{item_id}")
    assert outsider.status_code == 404


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (item_body(assignee_ids=["stf_lakeside_foster"]), "unknown_staff"),
        (item_body(assignee_ids=["stf_riverbend_young"]), "unknown_staff"),  # deactivated
        (item_body(assignee_ids={"$gt": ""}), "invalid_type"),
        (item_body(assignee_ids=[]), "no_assignees"),
        (item_body(title={"$gt": ""}), "invalid_type"),
        (item_body(due_at="tomorrow"), "invalid_time"),
        (item_body(link="javascript:alert(1)"), "invalid_link"),
        (item_body(kind="Not A Kind"), "invalid_value"),
        ({**item_body(), "agency_id": "agy_lakeside"}, "unknown_field"),
    ],
)
def test_bad_items_are_refused_with_stable_codes(ortiz, tracker, body, code):
    reply = ortiz.post("/api/v1/compliance/items", json=body)
    assert reply.status_code == 400 and reply.json()["code"] == code
    session, base = tracker
    partner = session.put(f"{base}/CT-bad", json=body, timeout=10)
    assert partner.status_code == 400 and partner.json()["code"] == code


def test_malformed_json_and_foreign_agencies_are_refused(ortiz, tracker, stack):
    reply = ortiz.post("/api/v1/compliance/items", data=b"{nope", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["code"] == "malformed_json"
    session, _ = tracker
    elsewhere = session.put(f"{stack.gateway_url}/api/v1/partner/compliance/agy_elsewhere/items/CT-1",
                            json=item_body(), timeout=10)  # fmt: skip
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "agency_not_found"
    portal = requests.put(f"{stack.gateway_url}/api/v1/partner/compliance/{RIVERBEND}/items/CT-1", json=item_body(),
                          headers={"apikey": stack.patient_portal_api_key}, timeout=10)  # fmt: skip
    assert portal.status_code == 403


@pytest.fixture
def second_replica(stack, service_secret):
    """The compliance pass of a second notifications replica: the same code, database, directory and
    service identity as the stack's process (built as it builds itself), run from the test alongside it."""
    settings = config.load(stack.service_env())
    db = mongo.database(settings.common.mongo_uri, settings.common.mongo_db)
    with use_grpc_tls(stack.grpc_tls):  # its channels to the stack, as the stack's process opens them
        tokens = ServiceTokens(settings.directory_grpc_target, "notifications", service_secret("notifications"))
        replica = build(settings, db, service_tokens=tokens, features=(ComplianceAlerts,))
    # It seals its delivery requests with the stack's keys, as the stack's process does (kit sealing).
    with sealing.configured(settings.common.phi_master_keys, settings.common.phi_master_key_id):
        yield replica.features[0]
    replica.close()  # its directory client
    tokens.close()  # the database client is the process-wide one (kit mongo.client): it stays open


def test_two_replicas_passing_at_once_escalate_each_item_once(ortiz, login, events, second_replica):
    hall = login("therapist.hall")
    with events.listen("board_item.delivery_requested.v1") as heard:
        ids = [
            ortiz.post("/api/v1/compliance/items", json=item_body(due_at=at(hours=-5))).json()["id"] for _ in range(4)
        ]
        # The stack's own pass runs every half second; this replica's passes race it.
        racers = [threading.Thread(target=lambda: [second_replica.run_pass() for _ in range(5)]) for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(60)
        for item_id in ids:
            wait_until(lambda i=item_id: alert(hall, i, escalation=True), timeout=20)
            second_replica.run_pass()  # once more, after the escalation: nothing to do
        refs = {f"{item_id}.escalation" for item_id in ids}
        wait_until(lambda: refs <= {e.payload.source_ref for e in heard.drain()}, timeout=20)
        escalations = [e for e in heard.drain() if e.payload.source_ref in refs]
    assert sorted(e.payload.source_ref for e in escalations) == sorted(refs)  # one request per item
    for item_id in ids:
        ortiz.post(f"/api/v1/compliance/items/{item_id}/resolve")


def test_an_officer_reassigns_an_item_and_a_read_of_it_is_audited(ortiz, login, events):
    patel, davis = login("therapist.patel"), login("frontdesk.davis")
    item_id = ortiz.post("/api/v1/compliance/items", json=item_body()).json()["id"]
    wait_until(lambda: alert(patel, item_id), timeout=15)
    changed = ortiz.patch(f"/api/v1/compliance/items/{item_id}", json={"assignee_ids": [davis.staff_id]})
    assert changed.status_code == 200 and changed.json()["assignee_ids"] == [davis.staff_id]
    wait_until(lambda: alert(davis, item_id) and alert(patel, item_id) is None, timeout=15)
    assert patel.get(f"/api/v1/compliance/items/{item_id}").status_code == 404  # no longer involved
    with events.listen("phi.accessed.v1") as heard:
        assert davis.get(f"/api/v1/compliance/items/{item_id}").status_code == 200
        read = heard.wait_for(lambda e: e.payload.resource_id == item_id and e.payload.outcome == "allowed")
    assert read.payload.actor_id == davis.staff_id and read.payload.resource_type == "compliance_item"
    bad = ortiz.patch(f"/api/v1/compliance/items/{item_id}", json={"due_at": {"$gt": ""}})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_type"
    ortiz.post(f"/api/v1/compliance/items/{item_id}/resolve")
    again = ortiz.patch(f"/api/v1/compliance/items/{item_id}", json={"title": "Reopened?"})
    assert again.status_code == 409 and again.json()["code"] == "compliance_item_resolved"


def test_a_create_retried_with_its_idempotency_key_makes_one_item(ortiz, login):
    patel = login("therapist.patel")
    before = {i["ref_id"] for i in patel.items(folder="compliance", limit=100)["items"]}
    key = uuid.uuid4().hex
    body = item_body(title=f"Consent renewal {key[:6]}")
    first = ortiz.post("/api/v1/compliance/items", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    again = ortiz.post("/api/v1/compliance/items", json=body, headers={"Idempotency-Key": key})
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    other = ortiz.post("/api/v1/compliance/items", json={**body, "title": "Another"}, headers={"Idempotency-Key": key})
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")
    wait_until(lambda: alert(patel, first.json()["id"]), timeout=15)
    after = {i["ref_id"] for i in patel.items(folder="compliance", limit=100)["items"]}
    assert after - before == {alert(patel, first.json()["id"])["ref_id"]}
    bad = ortiz.post("/api/v1/compliance/items", json=body, headers={"Idempotency-Key": "é" * 3})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_idempotency_key")
