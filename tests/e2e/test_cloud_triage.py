"""Triage through the whole stack: a Direct message (S/MIME with the openssl CLI, sent over SMTP)
carrying a C-CDA and the fax simulator's sample referral fax (a PDF with a text layer) are triaged
by cloud-comms' worker against the demo roster; intake staff read and confirm the suggestion through
the gateway; an agency admin routes referrals to the Medical team, whose members then find the
routed item on their boards and can open the document; the roster answers searches."""

from __future__ import annotations

import base64
import random
import uuid

import pytest
import requests

from tests.cloud_direct_helpers import direct_message, send
from tests.cloud_triage_documents import LAB_PAGE_CARTER, LAB_PAGE_LOPEZ, ccda
from tests.waits import wait_until

RIVERBEND_FAX = "+15555550100"


@pytest.fixture
def routes(admin):
    """Riverbend's triage settings, put back to none after the test (the stack is shared)."""
    yield lambda **routes: admin.put("/api/v1/cloud/triage/settings", json={"routes": routes})
    assert admin.put("/api/v1/cloud/triage/settings", json={"routes": {}}).status_code == 200


def ccda_message(certs, subject: str) -> bytes:
    boundary = "triage_" + uuid.uuid4().hex
    attachment = base64.encodebytes(ccda()).decode().strip()
    inner = "\r\n".join(
        [
            f'Content-Type: multipart/mixed; boundary="{boundary}"',
            "",
            f"--{boundary}",
            "Content-Type: text/plain; charset=utf-8",
            "",
            "Referral attached.",
            f"--{boundary}",
            "Content-Type: application/xml",
            'Content-Disposition: attachment; filename="referral.xml"',
            "Content-Transfer-Encoding: base64",
            "",
            attachment,
            f"--{boundary}--",
            "",
        ]
    ).encode()
    return direct_message(certs, subject=subject, inner=inner)


def item_titled(client, title: str) -> dict | None:
    return next((i for i in client.items(folder="cloud", limit=100)["items"] if i["title"] == title), None)


def document_path(client, item: dict) -> str:
    url = client.get(f"/api/v1/board/items/{item['id']}").json()["links"][0]["url"]
    return url[url.index("/api/v1/cloud/") :]


def triaged(client, document_id: str) -> dict:
    def state():
        answer = client.get(f"/api/v1/cloud/triage/{document_id}")
        assert answer.status_code == 200, answer.text
        return answer.json() if answer.json()["state"] != "pending" else None

    return wait_until(state, timeout=30, message=f"triage of {document_id}")


def test_a_direct_ccda_is_suggested_and_confirmed_by_intake(stack, certs, wilson, reyes, outsider):
    subject = f"Referral {uuid.uuid4().hex[:8]}"
    assert send(stack.config.ports.cloud_comms_smtp, ccda_message(certs, subject)) == (250, b"ok")
    item = wait_until(lambda: item_titled(wilson, f"Direct: {subject}"), timeout=20)
    document_id = document_path(wilson, item).rsplit("/", 1)[1]

    view = triaged(wilson, document_id)
    assert (view["kind"], view["state"]) == ("direct", "suggested")
    assert view["suggestion"]["patient"]["name"] == "Maria Lopez"
    assert view["suggestion"]["patient"]["mrn"] == "RB100234"
    assert view["suggestion"]["confidence"] == 0.99 and view["suggestion"]["document_type"] == "referral"

    ana = wilson.get("/api/v1/cloud/patients", params={"q": "RB101552"}).json()["patients"][0]
    corrected = wilson.post(
        f"/api/v1/cloud/triage/{document_id}/confirm", json={"patient_id": ana["id"], "document_type": "lab_report"}
    )
    assert corrected.status_code == 200, corrected.text
    assert corrected.json()["confirmed"]["by"]["id"] == wilson.staff_id
    assert corrected.json()["history"][-1]["action"] == "corrected"
    # Not delivered to them (Dr. Reyes is not linked to the intake address), another agency, no token.
    assert reyes.get(f"/api/v1/cloud/triage/{document_id}").status_code == 404
    assert outsider.get(f"/api/v1/cloud/triage/{document_id}").status_code == 404
    assert requests.get(f"{stack.gateway_url}/api/v1/cloud/triage/{document_id}", timeout=10).status_code == 401


def test_a_routed_referral_fax_reaches_the_medical_team(stack, routes, wilson, login):
    chen, patel = login("dr.chen"), login("therapist.patel")
    assert routes(referral="team_riverbend_medical").status_code == 200
    caller = f"+1555{random.randrange(10**6, 10**7)}"
    reply = requests.post(
        f"{stack.fax_simulator_url}/simulator/inbound", json={"from": caller, "to": RIVERBEND_FAX}, timeout=60
    )
    assert reply.status_code == 201 and reply.json()["answers"] == [200], reply.text
    item = wait_until(lambda: item_titled(wilson, f"Fax from {caller}"), timeout=20)
    path = document_path(wilson, item)
    document_id = path.rsplit("/", 1)[1]

    view = triaged(wilson, document_id)
    assert view["state"] == "confirmed" and view["confirmed"]["automatic"] is True, view
    assert view["confirmed"]["patient"]["name"] == "Maria Lopez"
    assert view["routed_to"]["team_id"] == "team_riverbend_medical"

    routed = wait_until(lambda: item_titled(chen, f"Referral: Fax from {caller}"), timeout=20)
    assert routed["summary"] == "Referral · filed automatically"
    assert document_path(chen, routed) == path
    assert chen.get(path).status_code == 200  # the routed team opens the fax itself
    assert chen.get(f"/api/v1/cloud/triage/{document_id}").status_code == 200
    assert item_titled(patel, f"Referral: Fax from {caller}") is None
    assert patel.get(path).status_code == 404


def test_triage_settings_and_the_roster_import_are_for_admins(admin, wilson):
    assert wilson.get("/api/v1/cloud/triage/settings").status_code == 403
    refused = wilson.post(
        "/api/v1/cloud/patients",
        json={"patients": [{"mrn": "RB9", "family": "X", "given": "Y", "birth_date": "1990-01-01"}]},
    )
    assert refused.status_code == 403 and refused.json()["code"] == "admin_only"
    assert admin.get("/api/v1/cloud/triage/settings").json()["auto_file_confidence"] == 0.95
    found = wilson.get("/api/v1/cloud/patients", params={"q": "lopez"}).json()["patients"]
    assert {p["name"] for p in found} >= {"Maria Lopez", "Ana Lopez"}
    assert wilson.get("/api/v1/cloud/patients", params={"q": '{"$gt": ""}'}).status_code == 400


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"text": "\n".join([*LAB_PAGE_LOPEZ, *LAB_PAGE_CARTER[1:]])}, "multiple_patients"),
        ({"is_test": True}, "test_fax"),  # the sample referral, sent with the provider's test flag
    ],
)
def test_a_fax_about_two_patients_or_a_test_fax_is_left_for_a_person(stack, routes, wilson, body, reason):
    assert routes(referral="team_riverbend_medical", lab_report="team_riverbend_medical").status_code == 200
    caller = f"+1555{random.randrange(10**6, 10**7)}"
    reply = requests.post(
        f"{stack.fax_simulator_url}/simulator/inbound",
        json={"from": caller, "to": RIVERBEND_FAX, **body},
        timeout=60,
    )
    assert reply.status_code == 201 and reply.json()["answers"] == [200], reply.text
    item = wait_until(lambda: item_titled(wilson, f"Fax from {caller}"), timeout=20)
    view = triaged(wilson, document_path(wilson, item).rsplit("/", 1)[1])
    assert view["state"] == "suggested" and view["confirmed"] is None and view["routed_to"] is None
    assert view["suggestion"]["patient"]["name"] == "Maria Lopez"
    assert reason in view["suggestion"]["reasons"]
    assert (view["suggestion"]["confidence"] < 0.9) is (reason == "multiple_patients")
