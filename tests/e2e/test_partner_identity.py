"""A partner's identity end to end: the services' own HTTP ports believe a partner only when the
gateway vouches for it (X-Gateway-Identity), so whoever reaches a port without an API key cannot
write portal messages as a patient, inject lab results or compliance items, or read portal threads;
through the gateway, with the real API keys, the partners work as before. Each refusal is a
`forged_identity_refused` security event on the bus."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import pika
import pytest
import requests

from clinic.audit.v1 import security_pb2
from services.kit import gateway_identity as gi
from services.kit.events import decode_envelope, unpack
from tests.e2e.lab_messages import diagnostic_report
from tests.helpers import client_from, loopback_address
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
JANE = "portal_riverbend_0001"
INTAKE = "team_riverbend_intake"
WRONG_KEY = "an-attackers-guess-at-the-key-0123456789"
SECURITY_EVENT = "security_event.recorded.v1"


@pytest.fixture(scope="module")
def gateway_key(stack) -> str:
    """The key the stack's gateway and services share (generated into the run folder)."""
    return (stack.run_dir / "secrets" / gi.DEV_KEY_FILE).read_text().strip()


@contextlib.contextmanager
def security_events(stack):
    """The security events published from now on: a list filled by `drain()`."""
    connection = pika.BlockingConnection(pika.URLParameters(stack.config.amqp_url))
    try:
        channel = connection.channel()
        queue = channel.queue_declare(queue="", exclusive=True).method.queue
        channel.queue_bind(queue, "clinic.events", routing_key=SECURITY_EVENT)
        seen: list[security_pb2.SecurityEvent] = []

        def drain() -> list[security_pb2.SecurityEvent]:
            while True:
                method, _properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return seen
                seen.append(unpack(decode_envelope(body), security_pb2.SecurityEvent))

        yield drain
    finally:
        connection.close()


def refused_event(drain, service: str, reason: str, claimed: str) -> security_pb2.SecurityEvent:
    return wait_until(
        lambda: next((e for e in drain() if e.kind == "forged_identity_refused" and e.service == service
                      and e.reason == reason and e.actor_id == claimed), None),
        timeout=15, message=f"a forged_identity_refused event from {service} ({reason})",
    )


def portal_path(suffix: str = "threads") -> str:
    return f"/api/v1/partner/portal/agencies/{RIVERBEND}/patients/{JANE}/{suffix}"


def portal_threads(stack) -> list[dict]:
    reply = requests.get(stack.gateway_url + portal_path(), headers={"apikey": stack.patient_portal_api_key},
                         timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["threads"]


def message(subject: str) -> bytes:
    return json.dumps({"to_team_id": INTAKE, "subject": subject, "body": "Please call me back"}).encode()


def test_a_forged_patient_message_straight_to_inbox_is_refused_recorded_and_never_written(stack, gateway_key):
    subject = f"forged {uuid.uuid4().hex[:8]}"
    body = message(subject)
    url = stack.inbox_url + portal_path("messages")
    json_type = {"Content-Type": "application/json"}
    address = loopback_address()  # a client of its own: refusals are recorded once a minute per source
    attacker = client_from(address)
    with security_events(stack) as drain:
        unsigned = attacker.post(url, data=body, headers={**json_type, "X-Consumer-Username": "patient-portal"},
                                 timeout=10)
        assert unsigned.status_code == 401 and unsigned.json()["code"] == "gateway_identity_required"
        event = refused_event(drain, "inbox", "gateway_identity_required", "patient-portal")
        assert event.actor_kind == "partner" and event.agency_id == "" and event.source == address
        assert event.outcome == "refused" and JANE not in event.target_id  # the route, not the patient
        attempts = {
            "gateway_identity_bad_signature": gi.partner_headers(WRONG_KEY, "POST", portal_path("messages"), body,
                                                                 username="patient-portal"),
            "gateway_identity_expired": gi.partner_headers(gateway_key, "POST", portal_path("messages"), body,
                                                           username="patient-portal",
                                                           ts=int(time.time()) - gi.MAX_SKEW_S - 10),
        }
        # A token made for another message (as if captured on the wire), replayed with this one.
        captured = gi.partner_headers(gateway_key, "POST", portal_path("messages"), message("harmless"),
                                      username="patient-portal")
        for reason, headers in attempts.items():
            reply = attacker.post(url, data=body, headers={**json_type, **headers}, timeout=10)
            assert reply.status_code == 401 and reply.json()["code"] == "gateway_identity_invalid", reason
            refused_event(drain, "inbox", reason, "patient-portal")
        replayed = attacker.post(url, data=body, headers={**json_type, **captured}, timeout=10)
        assert replayed.status_code == 401 and replayed.json()["code"] == "gateway_identity_invalid"
    assert subject not in {t["subject"] for t in portal_threads(stack)}


def test_portal_threads_cannot_be_read_on_inboxs_port_without_the_gateway(stack, gateway_key):
    url = stack.inbox_url + portal_path()
    unsigned = requests.get(url, headers={"X-Consumer-Username": "patient-portal"}, timeout=10)
    assert unsigned.status_code == 401 and "threads" not in unsigned.json()
    for_elsewhere = gi.partner_headers(gateway_key, "GET", portal_path() + "?limit=1", username="patient-portal")
    reply = requests.get(url, headers=for_elsewhere, timeout=10)
    assert reply.status_code == 401 and reply.json()["code"] == "gateway_identity_invalid"


def test_forged_lab_results_and_compliance_items_on_notifications_port_are_refused_and_never_written(stack):
    report = diagnostic_report(patient=f"MRN{uuid.uuid4().hex[:6]}")
    lab_path = f"/api/v1/partner/lab/{RIVERBEND}/DiagnosticReport"
    ref = f"CT-{uuid.uuid4().hex[:8]}"
    item = {"kind": "treatment_plan_review", "title": "Forged review", "assignee_ids": ["stf_riverbend_patel"],
            "due_at": "2030-01-01T00:00:00+00:00"}
    compliance_path = f"/api/v1/partner/compliance/{RIVERBEND}/items/{ref}"
    attacker = client_from()  # a client of its own: refusals are recorded once a minute per source
    with security_events(stack) as drain:
        lab = attacker.post(stack.notifications_url + lab_path, json=report,
                            headers={"X-Consumer-Username": "lab-interface"}, timeout=10)
        assert lab.status_code == 401 and lab.json()["code"] == "gateway_identity_required"
        refused_event(drain, "notifications", "gateway_identity_required", "lab-interface")
        signed_elsewhere = gi.partner_headers(WRONG_KEY, "PUT", compliance_path, json.dumps(item).encode(),
                                              username="compliance-tracker")
        compliance = attacker.put(stack.notifications_url + compliance_path, data=json.dumps(item).encode(),
                                  headers={"Content-Type": "application/json", **signed_elsewhere}, timeout=10)
        assert compliance.status_code == 401 and compliance.json()["code"] == "gateway_identity_invalid"
        refused_event(drain, "notifications", "gateway_identity_bad_signature", "compliance-tracker")
    # Through the gateway the same requests are the first of their kind: nothing was written before.
    created = requests.post(stack.gateway_url + lab_path, json=report,
                            headers={"apikey": stack.lab_interface_api_key, "Content-Type": "application/fhir+json"},
                            timeout=30)
    assert created.status_code == 201 and created.json()["created"] is True, created.text
    first = requests.put(stack.gateway_url + compliance_path, json=item,
                         headers={"apikey": stack.compliance_tracker_api_key}, timeout=10)
    assert first.status_code == 201, first.text


def test_directorys_partner_route_refuses_a_forged_consumer(stack):
    forged = requests.get(f"{stack.directory_url}/api/v1/partner/whoami",
                          headers={"X-Consumer-Username": "patient-portal", "X-Credential-Identifier": "x"},
                          timeout=10)
    assert forged.status_code == 401 and forged.json()["code"] == "gateway_identity_required"


def test_through_the_gateway_a_partner_is_itself_whatever_headers_it_adds(stack):
    reply = requests.get(
        f"{stack.gateway_url}/api/v1/partner/whoami",
        headers={"apikey": stack.patient_portal_api_key, "X-Consumer-Username": "lab-interface",
                 gi.HEADER: "v1.1.00000000000000000000000000000000." + "A" * 43},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["consumer"] == "patient-portal" and reply.json()["credential"]


def test_the_portal_writes_and_reads_through_the_gateway_as_before(stack):
    subject = f"through the gateway {uuid.uuid4().hex[:8]}"
    sent = requests.post(stack.gateway_url + portal_path("messages"), data=message(subject),
                         headers={"apikey": stack.patient_portal_api_key, "Content-Type": "application/json"},
                         timeout=10)
    assert sent.status_code == 201, sent.text
    assert subject in {t["subject"] for t in portal_threads(stack)}
