"""Critical results are acknowledged, or escalated (supervisor or escalation team, then admins); an
urgent message nobody reads comes back to its sender with a one-click re-route. End to end through
the gateway, with the deadline clock moved forward (tests/e2e/conftest.py `advance_clock`).

The clock is shared by the whole session and never moves back, so every test here delivers its own
result and looks only at the items of that result; each test acknowledges what it delivered before
it ends, so nothing of it is escalated by a later test's move of the clock."""

from __future__ import annotations

import uuid

import pytest
import requests
from hl7.client import MLLPClient

from clinic.inbox.v1 import inbox_pb2
from services.inbox.delivery_rules import notice_id
from tests.e2e.lab_messages import POTASSIUM_CRITICAL, POTASSIUM_TEST, oru
from tests.helpers import auth, msa
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
OPTIONS = "/api/v1/board/agency-options"
ADMIN = "stf_riverbend_admin"
REYES = "stf_riverbend_reyes"
MEDICAL_TEAM = "team_riverbend_medical"


def deliver(inbox_stub, service_token, staff_ids: list[str], severity=inbox_pb2.SEVERITY_URGENT) -> str:
    """A lab result delivered as notifications delivers one; its notice id (the items' ref_id)."""
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=staff_ids),
        title="Lab result: Potassium (final)",
        summary="Patient MRN-TEST: 1 critical",
        severity=severity,
        status="final",
        source="lab",
        source_ref=f"order-{uuid.uuid4().hex[:12]}",
    )
    reply = inbox_stub.DeliverItem(request, metadata=auth(service_token("notifications")), timeout=10)
    assert reply.created and reply.applied
    return reply.item_id


def copy_of(result_id: str, level: int) -> str:
    """The notice id of a result's escalation copy (deterministic: one per result and level)."""
    return notice_id(RIVERBEND, "inbox.escalation", f"{result_id}.{level}")


def item_for(client, ref_id: str, folder: str = "lab") -> dict | None:
    found = [i for i in client.items(folder=folder, limit=100)["items"] if i["ref_id"] == ref_id]
    assert len(found) <= 1, found
    return found[0] if found else None


def detail(client, item_id: str) -> dict:
    reply = client.get(f"/api/v1/board/items/{item_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def acknowledge(client, item_id: str, **kwargs) -> requests.Response:
    return client.post(f"/api/v1/board/items/{item_id}/acknowledge", **kwargs)


@pytest.fixture
def options(admin):
    def _set(**changes) -> dict:
        reply = admin.patch(OPTIONS, json=changes)
        assert reply.status_code == 200, reply.text
        return reply.json()

    yield _set
    _set(escalation_team_id="", urgent_message_escalation_minutes=60)


def test_unacknowledged_result_goes_to_the_supervisor_then_the_admins(
    inbox_stub, service_token, advance_clock, kim, reyes, admin
):
    advance_clock(7)  # deadlines count from arrival by the deadline clock, wherever it stands
    result = deliver(inbox_stub, service_token, [kim.staff_id])
    original = item_for(kim, result)
    view = detail(kim, original["id"])  # opening is not acknowledging
    trail = view["critical_result"]
    assert trail["acknowledgeable"] is True and trail["acknowledged"] is None
    assert trail["delivered_to"] == [kim.staff_id] and trail["escalations"] == []
    assert trail["next_escalation_at"]

    advance_clock(20)
    assert item_for(reyes, copy_of(result, 1)) is None

    advance_clock(11)  # 31 minutes after arrival: Kim's supervisor, Dr. Reyes
    copy = item_for(reyes, copy_of(result, 1))
    assert copy is not None and copy["severity"] == "urgent" and copy["urgent"] is True
    assert copy["title"] == "Not acknowledged: Lab result: Potassium (final)"
    assert "MRN" not in copy["summary"]  # no more than the original's title
    assert item_for(admin, copy_of(result, 2)) is None
    trail = detail(kim, original["id"])["critical_result"]
    assert [(e["level"], e["stage"], e["staff_ids"]) for e in trail["escalations"]] == [(1, "supervisor", [REYES])]
    copy_view = detail(reyes, copy["id"])["critical_result"]
    assert copy_view["result_id"] == result and copy_view["escalation_level"] == 1

    advance_clock(30)  # 61 minutes: the admins
    second = item_for(admin, copy_of(result, 2))
    assert second is not None
    trail = detail(kim, original["id"])["critical_result"]
    assert [(e["level"], e["stage"]) for e in trail["escalations"]] == [(1, "supervisor"), (2, "admins")]
    assert ADMIN in trail["escalations"][1]["staff_ids"] and trail["next_escalation_at"] is None

    advance_clock(60)  # escalated once per stage, however often the passes run
    assert item_for(reyes, copy_of(result, 1))["id"] == copy["id"]
    assert item_for(admin, copy_of(result, 2))["id"] == second["id"]

    acked = acknowledge(admin, second["id"])
    assert acked.status_code == 200, acked.text
    done = acked.json()["critical_result"]["acknowledged"]
    assert done["by"]["id"] == ADMIN and done["on_escalation"] is True and done["at"]
    assert detail(kim, original["id"])["critical_result"]["acknowledged"]["by"]["id"] == ADMIN


def test_acknowledged_in_time_nothing_is_escalated(inbox_stub, service_token, advance_clock, kim, reyes, admin):
    result = deliver(inbox_stub, service_token, [kim.staff_id])
    original = item_for(kim, result)
    reply = acknowledge(kim, original["id"])
    assert reply.status_code == 200, reply.text
    trail = reply.json()["critical_result"]
    assert trail["acknowledged"]["by"] == {"id": kim.staff_id, "name": trail["acknowledged"]["by"]["name"]}
    assert trail["acknowledged"]["on_escalation"] is False and trail["next_escalation_at"] is None

    again = acknowledge(kim, original["id"])  # the same answer: acknowledged once
    assert again.status_code == 200 and again.json()["critical_result"]["acknowledged"] == trail["acknowledged"]

    advance_clock(61)
    assert item_for(reyes, copy_of(result, 1)) is None
    assert item_for(admin, copy_of(result, 2)) is None
    assert detail(kim, original["id"])["critical_result"]["escalations"] == []


def test_acknowledging_the_copy_stops_the_second_stage(inbox_stub, service_token, advance_clock, kim, reyes, admin):
    result = deliver(inbox_stub, service_token, [kim.staff_id])
    advance_clock(31)
    copy = item_for(reyes, copy_of(result, 1))
    assert copy is not None
    reply = acknowledge(reyes, copy["id"])
    assert reply.status_code == 200, reply.text

    advance_clock(31)
    assert item_for(admin, copy_of(result, 2)) is None
    trail = detail(kim, item_for(kim, result)["id"])["critical_result"]
    assert [e["level"] for e in trail["escalations"]] == [1]
    assert trail["acknowledged"]["by"]["id"] == REYES and trail["acknowledged"]["on_escalation"] is True
    # Kim's own acknowledgement now answers the one already recorded.
    assert acknowledge(kim, item_for(kim, result)["id"]).json()["critical_result"]["acknowledged"]["by"]["id"] == REYES


def test_without_a_supervisor_the_escalation_team_is_told(
    inbox_stub, service_token, advance_clock, options, wilson, chen, admin
):
    options(escalation_team_id=MEDICAL_TEAM)
    result = deliver(inbox_stub, service_token, [wilson.staff_id])  # intake: no supervisor
    advance_clock(31)
    copy = item_for(chen, copy_of(result, 1))  # a member of the Medical team
    assert copy is not None
    trail = detail(chen, copy["id"])["critical_result"]
    assert trail["escalations"][0]["team_ids"] == [MEDICAL_TEAM]
    assert chen.staff_id in trail["escalations"][0]["staff_ids"]
    assert item_for(admin, copy_of(result, 1)) is None
    assert acknowledge(chen, copy["id"]).status_code == 200


def test_only_a_recipient_acknowledges(inbox_stub, service_token, kim, chen, outsider, wilson):
    result = deliver(inbox_stub, service_token, [kim.staff_id])
    original = item_for(kim, result)
    for stranger in (chen, outsider):
        reply = acknowledge(stranger, original["id"])
        assert reply.status_code == 404, reply.text
        assert reply.json()["code"] == "item_not_found"
    for bad in ("nope", "itm_" + "0" * 32, "%24ne", "..%2F..%2Fx", "a" * 65):
        assert acknowledge(kim, bad).status_code == 404
    for body in ({"$where": "1"}, {"acknowledged_by": {"$ne": None}}, [], "x"):
        reply = acknowledge(kim, original["id"], json=body)
        assert reply.status_code == 400, reply.text
    assert detail(kim, original["id"])["critical_result"]["acknowledged"] is None

    abnormal = deliver(inbox_stub, service_token, [kim.staff_id], severity=inbox_pb2.SEVERITY_ABNORMAL)
    reply = acknowledge(kim, item_for(kim, abnormal)["id"])
    assert reply.status_code == 409 and reply.json()["code"] == "not_acknowledgeable"
    assert "critical_result" not in detail(kim, item_for(kim, abnormal)["id"])

    sent = wilson.send(to_staff_ids=[kim.staff_id], subject="Not a result")
    assert sent.status_code == 201
    message_item = next(i for i in kim.items(folder="messages", limit=50)["items"] if i["title"] == "Not a result")
    assert acknowledge(kim, message_item["id"]).status_code == 409

    assert acknowledge(kim, original["id"], json={}).status_code == 200


def test_a_critical_result_from_the_lab_interface_is_acknowledged(stack, advance_clock, kim, reyes, admin):
    mrn = "MRN" + uuid.uuid4().hex[:8].upper()
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        ack = client.send_message(oru(patient=mrn, observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST))
    assert msa(ack)[0] == "AA"

    def mine():
        return next((i for i in kim.items(folder="lab", limit=100)["items"] if mrn in i.get("summary", "")), None)

    item = wait_until(mine, timeout=15)
    assert item["severity"] == "urgent"
    assert detail(kim, item["id"])["critical_result"]["acknowledged"] is None
    assert acknowledge(kim, item["id"]).status_code == 200
    advance_clock(61)  # acknowledged: none of its recipients' supervisors, nor the admins, are told
    assert item_for(reyes, copy_of(item["ref_id"], 1)) is None
    assert item_for(admin, copy_of(item["ref_id"], 2)) is None


def test_the_unacknowledged_gauge_is_exported(stack, inbox_stub, service_token, advance_clock, kim):
    result = deliver(inbox_stub, service_token, [kim.staff_id])
    advance_clock(0)
    text = requests.get(f"http://127.0.0.1:{stack.config.ports.inbox_http}/metrics", timeout=10).text
    waiting = [
        line for line in text.splitlines() if line.startswith('clinic_critical_results_unacknowledged{stage="waiting"}')
    ]
    assert waiting and float(waiting[0].split()[-1]) >= 1
    assert acknowledge(kim, item_for(kim, result)["id"]).status_code == 200


# --- urgent messages nobody reads ---------------------------------------------------------------------


def send_urgent(sender, to: list[str]) -> tuple[str, str]:
    subject = f"Urgent {uuid.uuid4().hex[:8]}"
    reply = sender.send(to_staff_ids=to, subject=subject, body="Please call the patient back today.", priority="urgent")
    assert reply.status_code == 201, reply.text
    return reply.json()["id"], subject


def unread_alert(client, message_id: str) -> dict | None:
    return item_for(client, notice_id(RIVERBEND, "inbox.urgent-unread", message_id), folder="compliance")


def test_an_unread_urgent_message_comes_back_to_its_sender_who_reroutes_it(advance_clock, wilson, kim, reyes, chen):
    message_id, subject = send_urgent(wilson, [kim.staff_id])
    advance_clock(30)
    assert unread_alert(wilson, message_id) is None

    advance_clock(31)
    alert = unread_alert(wilson, message_id)
    assert alert is not None and alert["title"] == f"Urgent message not read: {subject}"
    state = detail(wilson, alert["id"])["urgent_message"]
    assert state["message_id"] == message_id and state["unread_recipient_ids"] == [kim.staff_id]
    advance_clock(61)
    assert unread_alert(wilson, message_id)["id"] == alert["id"]  # told once

    # Only the sender re-routes; bad bodies are refused before anything is sent.
    assert kim.post(f"/api/v1/board/items/{alert['id']}/reroute", json={"to": "supervisors"}).status_code == 404
    for body in ({}, {"to": "everyone"}, {"staff_ids": {"$ne": None}}, {"to": "supervisors", "staff_ids": [REYES]}):
        reply = wilson.post(f"/api/v1/board/items/{alert['id']}/reroute", json=body)
        assert reply.status_code == 400, (body, reply.text)

    reply = wilson.post(f"/api/v1/board/items/{alert['id']}/reroute", json={"to": "supervisors"})
    assert reply.status_code == 201, reply.text
    rerouted = reply.json()
    assert rerouted["recipient_ids"] == [REYES]  # Kim's supervisor
    again = wilson.post(f"/api/v1/board/items/{alert['id']}/reroute", json={"to": "supervisors"})
    assert again.status_code == 200 and again.json()["message_id"] == rerouted["message_id"]  # nothing new sent
    opened = reyes.get(f"/api/v1/messages/{rerouted['message_id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["subject"] == f"Fwd: {subject}" and opened.json()["priority"] == "urgent"

    chosen = wilson.post(f"/api/v1/board/items/{alert['id']}/reroute", json={"staff_ids": [chen.staff_id]})
    assert chosen.status_code == 201 and chosen.json()["recipient_ids"] == [chen.staff_id]
    state = detail(wilson, alert["id"])["urgent_message"]
    assert sorted(r["message_id"] for r in state["rerouted"]) == sorted(
        [rerouted["message_id"], chosen.json()["message_id"]]
    )
    # Read now, so they are not reported later on.
    for client, mid in ((reyes, rerouted["message_id"]), (chen, chosen.json()["message_id"]), (kim, message_id)):
        assert client.get(f"/api/v1/messages/{mid}").status_code == 200


def test_a_read_urgent_message_is_not_reported(advance_clock, wilson, kim, chen, options):
    read_id, _ = send_urgent(chen, [kim.staff_id, wilson.staff_id])
    assert kim.get(f"/api/v1/messages/{read_id}").status_code == 200  # one recipient read it
    options(urgent_message_escalation_minutes=0)
    off_id, _ = send_urgent(chen, [kim.staff_id])
    advance_clock(0)  # taken in while the option is off
    options(urgent_message_escalation_minutes=60)
    advance_clock(61)
    assert unread_alert(chen, read_id) is None
    assert unread_alert(chen, off_id) is None
    assert kim.get(f"/api/v1/messages/{off_id}").status_code == 200
