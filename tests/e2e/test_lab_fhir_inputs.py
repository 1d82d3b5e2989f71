"""The FHIR inputs end to end, through the gateway: hostile bodies on both partner FHIR routes
(DiagnosticReport and Appointment) are refused with 400 and a stable code as a FHIR
OperationOutcome (application/fhir+json), never a 500, nothing stored; what EHRs send (comparator
values, notes, absent values, an entered-in-error report) reaches the full result view as sent."""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from tests.unit.test_notifications_fhir import (
    epic_bundle,
    hemolyzed_potassium,
    report_of,
    sodium,
    troponin,
    urine_hcg,
)
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def notifications_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}notifications"]


@pytest.fixture(scope="module")
def lab_route(stack):
    session = requests.Session()
    session.headers["apikey"] = stack.lab_interface_api_key

    def post(raw: bytes, *, agency: str = RIVERBEND, content_type: str = FHIR_JSON) -> requests.Response:
        return session.post(
            f"{stack.gateway_url}/api/v1/partner/lab/{agency}/DiagnosticReport",
            data=raw,
            headers={"Content-Type": content_type},
            timeout=30,
        )

    return post


@pytest.fixture(scope="module")
def schedule_route(stack):
    session = requests.Session()
    session.headers["apikey"] = stack.practice_management_api_key

    def put(raw: bytes, *, agency: str = RIVERBEND, content_type: str = FHIR_JSON) -> requests.Response:
        return session.put(
            f"{stack.gateway_url}/api/v1/partner/schedule/{agency}/Appointment/{APPOINTMENT_ID}",
            data=raw,
            headers={"Content-Type": content_type},
            timeout=30,
        )

    return put


APPOINTMENT_ID = "fhir-hostile-1"
PATEL = "Practitioner/stf_riverbend_patel"


def appointment(**changes) -> dict:
    body = {
        "resourceType": "Appointment",
        "id": APPOINTMENT_ID,
        "status": "booked",
        "start": "2026-12-03T09:00:00-06:00",
        "end": "2026-12-03T09:30:00-06:00",
        "participant": [{"actor": {"reference": PATEL}, "status": "accepted"}],
    }
    body.update(changes)
    return body


def lab_report(**changes) -> dict:
    body = epic_bundle([troponin(), sodium(140, "N")])
    report_of(body).update(changes)
    return body


def encoded(body: dict) -> bytes:
    """As a careless sender's JSON library writes it: NaN and Infinity as bare literals."""
    return json.dumps(body, allow_nan=True).encode()


def deeply_nested(resource_type: str, depth: int) -> bytes:
    return (
        f'{{"resourceType":"{resource_type}","status":"final","extension":'.encode()
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


def with_nan_value() -> dict:
    body = lab_report()
    body["entry"][1]["resource"]["valueQuantity"]["value"] = float("nan")
    return body


# (route, raw body, status, code) for every hostile body on both routes.
HOSTILE = [
    pytest.param("lab", deeply_nested("DiagnosticReport", 100_000), 400, "too_deep", id="lab-100k-nested"),
    pytest.param("lab", deeply_nested("DiagnosticReport", 60), 400, "too_deep", id="lab-60-nested"),
    pytest.param("lab", encoded(with_nan_value()), 400, "invalid_type", id="lab-NaN"),
    pytest.param("lab", encoded(lab_report(extension=[{"url": "http://x.example/e", "valueDecimal": float("-inf")}])),
                 400, "invalid_type", id="lab-Infinity"),
    pytest.param("lab", encoded(lab_report(status=7)), 400, "invalid_type", id="lab-wrong-type"),
    pytest.param("lab", encoded(lab_report(subject={"reference": {"$ne": None}})), 400, "invalid_type",
                 id="lab-operator-in-reference"),
    pytest.param("lab", encoded(lab_report(status={"$gt": ""})), 400, "invalid_type", id="lab-operator-in-status"),
    pytest.param("lab", encoded(lab_report(conclusionn="typo")), 400, "unknown_field", id="lab-unknown-element"),
    pytest.param("lab", b'{"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"', 400,
                 "malformed_json", id="lab-truncated"),
    pytest.param("lab", b"\xff\xfe\x00\x00garbage", 400, "malformed_json", id="lab-not-utf8"),
    pytest.param("lab", b"[]", 400, "invalid_body", id="lab-array"),
    pytest.param("schedule", deeply_nested("Appointment", 100_000), 400, "too_deep", id="schedule-100k-nested"),
    pytest.param("schedule", deeply_nested("Appointment", 60), 400, "too_deep", id="schedule-60-nested"),
    pytest.param("schedule", encoded(appointment(minutesDuration=float("nan"))), 400, "invalid_type",
                 id="schedule-NaN"),
    pytest.param("schedule", encoded(appointment(extension=[{"url": "http://x.example/e",
                                                             "valueDecimal": float("inf")}])),
                 400, "invalid_type", id="schedule-Infinity"),
    pytest.param("schedule", encoded(appointment(status=7)), 400, "invalid_type", id="schedule-wrong-type"),
    pytest.param("schedule", encoded(appointment(participant=[{"actor": {"reference": {"$gt": ""}},
                                                               "status": "accepted"}])),
                 400, "invalid_type", id="schedule-operator-in-reference"),
    pytest.param("schedule", encoded(appointment(participant=[{"actor": {"reference": PATEL}, "status": "accepted",
                                                               "bogus": 1}])),
                 400, "unknown_field", id="schedule-unknown-element"),
    pytest.param("schedule", b'{"resourceType": "Appointment",', 400, "malformed_json", id="schedule-truncated"),
]  # fmt: skip


def assert_outcome(reply: requests.Response, status: int, code: str) -> dict:
    """A refusal from the service: the kit's error body that is also an OperationOutcome, as FHIR JSON."""
    assert reply.status_code == status, reply.text[:500]
    assert reply.headers["Content-Type"].split(";")[0].strip() == FHIR_JSON
    body = reply.json()
    assert body["code"] == code and body["message"]
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"] and issue["diagnostics"] == body["message"]
    assert "Traceback" not in reply.text
    return body


def stored(notifications_db) -> tuple[int, int]:
    """(lab results held, whether the hostile appointment was stored)."""
    appointments = notifications_db["appointments"].count_documents({"appointment_id": {"$eq": APPOINTMENT_ID}})
    return notifications_db.lab_results.count_documents({}), appointments


@pytest.mark.parametrize(("route", "raw", "status", "code"), HOSTILE)
def test_hostile_bodies_are_refused_as_operation_outcomes_and_nothing_is_stored(
    lab_route, schedule_route, notifications_db, route, raw, status, code
):
    before = stored(notifications_db)
    send = lab_route if route == "lab" else schedule_route
    assert_outcome(send(raw), status, code)
    assert stored(notifications_db) == before


@pytest.mark.parametrize("route", ["lab", "schedule"])
def test_refusals_outside_the_body_are_operation_outcomes_too(stack, lab_route, schedule_route, route):
    send = lab_route if route == "lab" else schedule_route
    body = encoded(lab_report() if route == "lab" else appointment())
    assert_outcome(send(body, agency="agy_nowhere"), 404, "agency_not_found")
    assert_outcome(send(b"resourceType=Appointment", content_type="text/plain"), 415, "unsupported_media_type")
    # Over the service's limit (512 KiB) but under the gateway's (1 MB): the service answers.
    padded = (lab_report if route == "lab" else appointment)(text={"status": "generated", "div": "x" * 600_000})
    outcome = assert_outcome(send(encoded(padded)), 413, "payload_too_large")
    assert outcome["issue"][0]["code"] == "too-long"
    # Straight to the service without the gateway's consumer: refused by the service itself.
    path = (
        f"/api/v1/partner/lab/{RIVERBEND}/DiagnosticReport"
        if route == "lab"
        else f"/api/v1/partner/schedule/{RIVERBEND}/Appointment/{APPOINTMENT_ID}"
    )
    direct = requests.request(
        "POST" if route == "lab" else "PUT",
        f"{stack.notifications_url}{path}",
        data=body,
        headers={"Content-Type": FHIR_JSON, "X-Anonymous-Consumer": "true"},
        timeout=10,
    )
    assert_outcome(direct, 401, "unauthenticated")
    # Over the gateway's own limit (1 MB) the gateway answers, in Kong's shape, before the service.
    assert send(b"{" + b" " * 1_100_000 + b"}").status_code == 413


# --- what EHRs send, as the full view shows it ----------------------------------------------------------


def patient() -> str:
    return "MRN-" + uuid.uuid4().hex[:8]


def lab_item(client, patient_ref: str):
    for item in client.items(folder="lab", limit=100)["items"]:
        if item.get("summary", "").startswith(f"Patient {patient_ref}:"):
            return item
    return None


def full_view(client, order_id: str) -> dict:
    reply = client.get(f"/api/v1/lab/results/{order_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_comparator_values_absent_values_and_notes_reach_the_full_view(lab_route, reyes, kim):
    mrn = patient()
    body = epic_bundle(
        [troponin(), hemolyzed_potassium(), urine_hcg()],
        patient=mrn,
        conclusion="Potassium not reported: hemolyzed specimen. Recollect ordered.",
    )
    reply = lab_route(encoded(body))
    assert reply.status_code == 201, reply.text
    created = reply.json()
    item = wait_until(lambda: lab_item(kim, mrn), timeout=15)
    assert item["summary"] == f"Patient {mrn}: no abnormal flags" and item["severity"] == "info"
    assert "<0.01" not in json.dumps(item) and "Lin" not in json.dumps(item)  # values and names stay off boards

    view = full_view(reyes, created["id"])
    troponin_shown, potassium_shown, hcg_shown = view["observations"]
    assert (troponin_shown["name"], troponin_shown["value"], troponin_shown["units"]) == ("Troponin I", "<0.01",
                                                                                          "ng/mL")  # fmt: skip
    assert troponin_shown["reference_range"] == "<0.04 ng/mL"
    assert troponin_shown["comments"] == ["Below the assay's limit of detection."]
    assert (potassium_shown["value"], potassium_shown["absent_reason"]) == ("", "Specimen hemolyzed")
    assert potassium_shown["comments"] == ["Specimen hemolyzed; please recollect."]
    assert (hcg_shown["value"], hcg_shown["retracted"]) == ("Negative", "")
    assert view["comments"] == ["Potassium not reported: hemolyzed specimen. Recollect ordered."]
    assert (view["patient_name"], view["retracted"]) == ("Lin, Derrick", "")


def test_a_report_entered_in_error_withdraws_a_final_critical_result(lab_route, reyes, kim):
    mrn, order = patient(), "1066" + uuid.uuid4().hex[:8].upper()
    final = epic_bundle([sodium(118, "LL")], patient=mrn, order=order, issued="2026-11-26T14:02:33Z")
    first = lab_route(encoded(final))
    assert first.status_code == 201, first.text
    item = wait_until(lambda: lab_item(kim, mrn), timeout=15)
    assert (item["status"], item["severity"]) == ("final", "urgent")

    withdrawn_value = sodium(118, "LL")
    withdrawn_value["status"] = "entered-in-error"
    withdrawal = epic_bundle(
        [withdrawn_value], patient=mrn, order=order, status="entered-in-error", issued="2026-11-26T14:20:00Z"
    )
    second = lab_route(encoded(withdrawal))
    assert second.status_code == 201, second.text
    assert second.json()["id"] == first.json()["id"] and second.json()["status"] == "retracted"

    updated = wait_until(lambda: (i := lab_item(kim, mrn)) and i["status"] == "retracted" and i, timeout=15)
    assert updated["id"] == item["id"] and not updated["read"]
    assert updated["severity"] != "urgent" and not updated["urgent"]
    assert updated["summary"] == f"Patient {mrn}: result withdrawn (entered in error)"

    view = full_view(reyes, first.json()["id"])
    assert (view["status"], view["severity"], view["retracted"]) == ("retracted", "info", "entered in error")
    assert [(o["name"], o["value"], o["retracted"]) for o in view["observations"]] == [
        ("Sodium", "", "entered in error")
    ]
    assert "118" not in json.dumps(view["observations"])
