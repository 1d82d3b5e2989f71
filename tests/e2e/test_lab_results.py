"""Lab Report Notifications end to end: HL7 v2 ORU^R01 over MLLP (python-hl7's own MLLPClient and
its mllp_send command, ACKs parsed with the same library) and FHIR R4 DiagnosticReports through the
gateway, onto the boards of exactly the staff flagged Lab Result Notification, never with values,
with the full result behind an audited view."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient

from services.kit.patient_ref import mrn_system, patient_ref, read_keys
from services.kit.settings import Env
from tests.e2e.lab_messages import POTASSIUM_CRITICAL, POTASSIUM_TEST, as_bundle, diagnostic_report, oru
from tests.helpers import msa
from tests.waits import wait_until

# Demo staff flagged Lab Result Notification (services/directory/demo.py).
RIVERBEND_LAB_STAFF = {
    "stf_riverbend_reyes",
    "stf_riverbend_kim",
    "stf_riverbend_chen",
    "stf_riverbend_brooks",
    "stf_riverbend_white",
}
LAKESIDE_LAB_STAFF = {"stf_lakeside_ramirez", "stf_lakeside_foster"}
# Values of the CBC panel and the potassium result: never on a board.
VALUES = ("11.8", "4.62", "11.2", "38.1", "10*3/uL", "6.9", "mmol/L", "150-400")


@pytest.fixture(scope="module")
def mllp(stack):
    """One connection to the stack's MLLP listener through python-hl7's client."""
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        yield client


@pytest.fixture(scope="module")
def notifications_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}notifications"]


@pytest.fixture(scope="module")
def lab_patient_ref(stack):
    """The reference audit records name a Riverbend lab patient by: the stack's PATIENT_REF_KEY (its
    run folder), in the agency's MRN space (its development facility registration, RIVERBEND)."""
    key = read_keys(Env("e2e", {"CLINIC_RUN_DIR": str(stack.run_dir)})).current
    return lambda mrn: patient_ref("agy_riverbend", mrn_system("RIVERBEND"), mrn, key=key)


def holds_no_mrn(event, mrn: str) -> bool:
    """Neither the event's payload nor its envelope on the wire carries the MRN, in any case."""
    wire = event.envelope.SerializeToString().lower()
    return mrn.lower().encode() not in wire and mrn.lower() not in str(event.payload).lower()


def ack_of(raw: bytes) -> hl7.Message:
    """One framed ACK as python-hl7 parses it."""
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r"), raw
    return hl7.parse(raw[1:-2].decode("ascii"))


def send(client: MLLPClient, message: str | bytes) -> hl7.Message:
    return ack_of(client.send_message(message))


def read_acks(client: MLLPClient, count: int, first: bytes = b"") -> list[hl7.Message]:
    """`count` ACKs from the connection (python-hl7 reads one recv only: issue #44)."""
    data = first
    client.socket.settimeout(10)
    while data.count(b"\x1c\r") < count:
        chunk = client.socket.recv(4096)
        assert chunk, "the listener closed the connection"
        data += chunk
    frames = [part + b"\x1c\r" for part in data.split(b"\x1c\r") if part]
    assert len(frames) == count
    return [ack_of(f) for f in frames]


def lab_item(client, patient: str):
    """The caller's Lab Report Notification about `patient`, or None."""
    for item in client.items(folder="lab", limit=100)["items"]:
        if item.get("summary", "").startswith(f"Patient {patient}:"):
            return item
    return None


def stored_results(db) -> int:
    """Lab results the service holds (tests only: counting is a full scan on nx-27017)."""
    return db.lab_results.count_documents({})


def notice_recipients(inbox_db, order_id: str) -> set[str]:
    notice = inbox_db.notices.find_one({"source_ref": {"$eq": order_id}})
    return set(notice["recipient_ids"]) if notice else set()


def patient() -> str:
    return "MRN-" + uuid.uuid4().hex[:8]


def open_item(client, item) -> dict:
    reply = client.get(f"/api/v1/board/items/{item['id']}")
    assert reply.status_code == 200, reply.text
    return reply.json()


# --- HL7 v2 over MLLP -------------------------------------------------------------------------------


def test_a_cbc_panel_reaches_exactly_the_flagged_staff_without_values(mllp, login, reyes, kim, admin, inbox_db):
    mrn = patient()
    ack = send(mllp, oru(control_id="CBC-0001", patient=mrn))
    assert msa(ack)[:2] == ("AA", "CBC-0001")
    item = wait_until(lambda: lab_item(reyes, mrn), timeout=15)
    assert item["title"] == "Lab result: CBC panel - Blood by Automated count (final)"
    assert item["summary"] == f"Patient {mrn}: 1 critical, 2 abnormal"
    assert item["severity"] == "urgent" and item["status"] == "final" and not item["read"]
    assert item["sender"]["name"] == "Notifications"
    detail = open_item(reyes, item)
    assert notice_recipients(inbox_db, detail["source_ref"]) == RIVERBEND_LAB_STAFF
    wait_until(lambda: lab_item(kim, mrn), timeout=15)  # the fan-out writes one item after another
    for unflagged in (admin, login("therapist.patel"), login("dr.ramirez")):
        assert lab_item(unflagged, mrn) is None
    shown = str(item) + str(detail)
    assert not [value for value in VALUES if value in shown]
    assert detail["links"][0]["url"].endswith(f"/api/v1/lab/results/{detail['source_ref']}")


def test_a_single_critical_value_is_urgent(mllp, chen):
    mrn = patient()
    ack = send(mllp, oru(patient=mrn, observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST))
    assert msa(ack)[0] == "AA"
    item = wait_until(lambda: lab_item(chen, mrn), timeout=15)
    assert (item["title"], item["summary"]) == ("Lab result: Potassium (final)", f"Patient {mrn}: 1 critical")
    assert item["severity"] == "urgent" and item["urgent"] is True


def test_a_preliminary_then_final_result_updates_the_same_item_unread_again(mllp, reyes, notifications_db):
    mrn, order = patient(), "ORD-" + uuid.uuid4().hex[:8]
    prelim = oru(patient=mrn, order=order, status="P", sent_at="20261126080000")
    assert msa(send(mllp, prelim))[0] == "AA"
    first = wait_until(lambda: lab_item(reyes, mrn), timeout=15)
    assert first["status"] == "preliminary"
    open_item(reyes, first)  # read it
    assert lab_item(reyes, mrn)["read"] is True

    final = oru(patient=mrn, order=order, status="F", sent_at="20261126091500")
    assert msa(send(mllp, final))[0] == "AA"
    updated = wait_until(lambda: (i := lab_item(reyes, mrn)) and i["status"] == "final" and i, timeout=15)
    assert updated["id"] == first["id"] and updated["read"] is False
    assert updated["title"].endswith("(final)")
    mine = [i for i in reyes.items(folder="lab", limit=100)["items"] if i["summary"].startswith(f"Patient {mrn}:")]
    assert [i["id"] for i in mine] == [first["id"]]

    # A late copy of the preliminary result (a new message id) does not take the item back.
    late = oru(patient=mrn, order=order, status="P", sent_at="20261126080000")
    assert msa(send(mllp, late))[0] == "AA"
    assert stored_results(notifications_db) >= 3
    view = reyes.get(f"/api/v1/lab/results/{open_item(reyes, updated)['source_ref']}").json()
    assert view["status"] == "final"
    assert lab_item(reyes, mrn)["status"] == "final"


def test_the_same_message_twice_is_stored_once_and_acknowledged_aa_twice(mllp, kim, notifications_db, inbox_db):
    mrn = patient()
    message = oru(control_id="DUP-" + uuid.uuid4().hex[:8], patient=mrn)
    before = stored_results(notifications_db)
    assert msa(send(mllp, message))[0] == "AA"
    assert msa(send(mllp, message))[0] == "AA"
    assert stored_results(notifications_db) == before + 1
    item = wait_until(lambda: lab_item(kim, mrn), timeout=15)
    assert [i for i in kim.items(folder="lab", limit=100)["items"] if i["summary"] == item["summary"]] == [item]


def test_the_same_message_on_two_connections_at_once_is_stored_once(stack, notifications_db):
    message = oru(control_id="RACE-" + uuid.uuid4().hex[:8], patient=patient())
    before = stored_results(notifications_db)

    def send_alone(_n: int) -> tuple[str, ...]:
        with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
            return msa(send(client, message))

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send_alone, range(4)))
    assert {a[0] for a in answers} == {"AA"}
    assert stored_results(notifications_db) == before + 1


def test_several_messages_on_one_connection_each_get_their_ack_in_order(mllp):
    ids = [f"MULTI-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    frames = b"".join(b"\x0b" + oru(control_id=c, patient=patient()).encode() + b"\x1c\r" for c in ids)
    acks = read_acks(mllp, 3, mllp.send(frames))
    assert [msa(a)[:2] for a in acks] == [("AA", c) for c in ids]


def test_a_large_message_split_across_tcp_writes_is_one_message(mllp, reyes):
    mrn = patient()
    notes = [
        f"OBX|{i}|TX|11526-1^Pathology study^LN||{'Microscopic description line. ' * 40}||||||F" for i in range(1, 80)
    ]
    message = oru(patient=mrn, control_id="BIG-" + uuid.uuid4().hex[:6], observations=notes).encode()
    assert len(message) > 64 * 1024  # more than one read of the listener
    framed = b"\x0b" + message + b"\x1c\r"
    middle = len(framed) // 2
    mllp.socket.sendall(framed[:middle])  # python-hl7's send() may itself write partly (issue #41)
    ack = ack_of(mllp.send(framed[middle:]))
    assert msa(ack)[0] == "AA"
    item = wait_until(lambda: lab_item(reyes, mrn), timeout=15)
    assert item["summary"] == f"Patient {mrn}: no abnormal flags" and item["severity"] == "info"


@pytest.mark.parametrize("separator", ["\n", "\r\n"])
def test_newline_separated_segments_are_accepted(mllp, white_staff, separator):
    mrn = patient()
    ack = send(mllp, oru(patient=mrn, separator=separator))
    assert msa(ack)[0] == "AA"
    item = wait_until(lambda: lab_item(white_staff, mrn), timeout=15)
    assert item["summary"] == f"Patient {mrn}: 1 critical, 2 abnormal"


@pytest.fixture(scope="module")
def white_staff(login):
    return login("nurse.white")


MALFORMED = [
    (b"this is not an HL7 message", "AR", "", "100"),
    # Declared UTF-8, sent as Latin-1 (a Windows sender's habit): the bytes do not decode.
    (
        oru(control_id="BAD-UTF", patient="MRN-Zoë")
        .replace("|2.5.1", "|2.5.1||||||UNICODE UTF-8", 1)
        .encode("latin-1"),
        "AE",
        "BAD-UTF",
        "102",
    ),
    (oru(control_id="BAD-CS").replace("|2.5.1", "|2.5.1||||||EBCDIC-US", 1).encode(), "AR", "BAD-CS", "103"),
    (oru(control_id="TRAINING").replace("|P|2.5.1", "|T|2.5.1", 1).encode(), "AR", "TRAINING", "202"),
    (oru(control_id="BAD-ENC").replace("MSH|^~\\&|", "MSH|^^\\&|", 1).encode(), "AR", "BAD-ENC", "102"),
    (oru(control_id="BAD-FAC", receiving_facility="NOWHERE").encode(), "AR", "BAD-FAC", "103"),
    (oru(control_id="BAD-PID").replace("PID|1||MRN48213^^^RIVERBEND^MR", "PID|1||").encode(), "AE", "BAD-PID", "101"),
    (oru(control_id="BAD-TYPE").replace("ORU^R01^ORU_R01", "ADT^A01").encode(), "AR", "BAD-TYPE", "200"),
]


def test_malformed_messages_are_refused_store_nothing_and_the_next_is_served(mllp, notifications_db):
    before = stored_results(notifications_db)
    for raw, code, control_id, error in MALFORMED:
        ack = send(mllp, raw)
        assert msa(ack)[:2] == (code, control_id), raw[:40]
        assert str(ack.segment("ERR")(3)(1)(1)) == error
        assert str(ack.segment("MSA")(3))  # the reason
    assert stored_results(notifications_db) == before
    assert msa(send(mllp, oru(control_id="AFTER-BAD")))[:2] == ("AA", "AFTER-BAD")
    assert stored_results(notifications_db) == before + 1


def test_mllp_send_delivers_a_file_of_messages_and_prints_each_ack(stack, tmp_path, brooks):
    mrns = [patient(), patient()]
    ids = [f"CLI-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    file = tmp_path / "results.hl7"
    file.write_bytes(
        b"".join(b"\x0b" + oru(control_id=c, patient=m).encode() + b"\x1c\r" for c, m in zip(ids, mrns, strict=True))
    )
    command = Path(sys.executable).parent / "mllp_send"
    result = subprocess.run(
        [str(command), "--file", str(file), "--port", str(stack.config.ports.notifications_mllp), "127.0.0.1"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    acks = [hl7.parse(part.strip(b"\x0b\r\n").decode()) for part in result.stdout.split(b"\x1c") if part.strip()]
    assert [msa(a)[:2] for a in acks] == [("AA", c) for c in ids]
    for mrn in mrns:
        wait_until(lambda mrn=mrn: lab_item(brooks, mrn), timeout=15)


@pytest.fixture(scope="module")
def brooks(login):
    return login("np.brooks")


# --- the full result --------------------------------------------------------------------------------


def test_the_full_result_is_shown_to_allowed_staff_audited_and_hidden_from_others(
    mllp, reyes, admin, outsider, login, events, lab_patient_ref
):
    mrn = patient()
    assert msa(send(mllp, oru(patient=mrn)))[0] == "AA"
    item = wait_until(lambda: lab_item(reyes, mrn), timeout=15)
    order_id = open_item(reyes, item)["source_ref"]
    with events.listen("phi.accessed.v1") as heard:
        reply = reyes.get(f"/api/v1/lab/results/{order_id}")
        assert reply.status_code == 200, reply.text
        result = reply.json()
        assert result["patient_ref"] == mrn and result["status"] == "final" and result["severity"] == "urgent"
        assert [(o["value"], o["units"], o["reference_range"], o["flags"]) for o in result["observations"]][0] == (
            "11.8",
            "10*3/uL",
            "4.5-11.0",
            ["H"],
        )
        assert result["observations"][4]["severity"] == "urgent"
        allowed = heard.wait_for(
            lambda e: e.payload.resource_id == order_id and e.payload.actor_id == "stf_riverbend_reyes"
        )
        assert (allowed.payload.outcome, allowed.payload.resource_type) == ("allowed", "lab_result")
        assert allowed.payload.service == "notifications"
        # Whose result it is, for "who looked at this patient": by reference, never the MRN (PHI).
        assert allowed.payload.patient_id == lab_patient_ref(mrn)
        assert holds_no_mrn(allowed, mrn)

        for other in (admin, login("therapist.patel"), outsider, login("dr.ramirez")):
            refused = other.get(f"/api/v1/lab/results/{order_id}")
            assert refused.status_code == 404 and refused.json()["code"] == "lab_result_not_found"
        denied = heard.wait_for(lambda e: e.payload.resource_id == order_id and e.payload.outcome == "denied")
        assert denied.payload.actor_id == "stf_riverbend_admin" and holds_no_mrn(denied, mrn)
    unknown = reyes.get("/api/v1/lab/results/lab_00000000000000000000000000000000")
    assert unknown.status_code == 404
    assert reyes.get("/api/v1/lab/results/%7B%22$gt%22:%22%22%7D").status_code == 404
    no_token = reyes.http.get(f"{reyes.base_url}/api/v1/lab/results/{order_id}", headers={"Authorization": ""})
    assert no_token.status_code == 401


# --- FHIR R4 through the gateway --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_interface(stack):
    def post(body, agency="agy_riverbend", key=None, **kwargs):
        import requests

        headers = {"apikey": stack.lab_interface_api_key if key is None else key}
        headers.update(kwargs.pop("headers", {}))
        if body is not None and "data" not in kwargs:
            kwargs["json"] = body
        return requests.post(
            f"{stack.gateway_url}/api/v1/partner/lab/{agency}/DiagnosticReport", headers=headers, timeout=30, **kwargs
        )

    return post


def test_a_fhir_diagnostic_report_reaches_the_flagged_staff_and_is_viewable(lab_interface, kim, reyes, admin, inbox_db):
    mrn = patient()
    body = diagnostic_report(patient=mrn)
    reply = lab_interface(body)
    assert reply.status_code == 201, reply.text
    created = reply.json()
    assert created["created"] is True and created["status"] == "final"
    item = wait_until(lambda: lab_item(kim, mrn), timeout=15)
    assert item["title"] == "Lab result: Basic metabolic panel (final)"
    assert item["summary"] == f"Patient {mrn}: 1 critical, 1 abnormal" and item["severity"] == "urgent"
    assert notice_recipients(inbox_db, created["id"]) == RIVERBEND_LAB_STAFF
    assert lab_item(admin, mrn) is None
    view = reyes.get(f"/api/v1/lab/results/{created['id']}").json()
    assert [(o["name"], o["value"], o["flags"]) for o in view["observations"]] == [
        ("Potassium", "6.9", ["HH"]),
        ("Glucose", "162", ["H"]),
        ("Sodium", "140", ["N"]),
    ]
    again = lab_interface(body)
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["id"] == created["id"]

    corrected = lab_interface(as_bundle({**body, "status": "corrected", "issued": "2026-11-26T10:00:00Z"}))
    assert corrected.status_code == 201 and corrected.json()["id"] == created["id"]
    wait_until(lambda: lab_item(kim, mrn)["status"] == "corrected", timeout=15)


def test_one_patient_is_one_reference_in_the_audit_trail_over_hl7_and_fhir(
    mllp, lab_interface, reyes, events, lab_patient_ref, stack, mongo_client
):
    """The same MRN sent over MLLP and as a FHIR DiagnosticReport is one patient to an auditor: both
    reads carry the same reference, and the audit service stores it, never the MRN."""
    mrn = patient()
    assert msa(send(mllp, oru(patient=mrn)))[0] == "AA"
    hl7_order = open_item(reyes, wait_until(lambda: lab_item(reyes, mrn), timeout=15))["source_ref"]
    fhir = lab_interface(diagnostic_report(patient=mrn))
    assert fhir.status_code == 201, fhir.text
    fhir_order = fhir.json()["id"]
    assert hl7_order != fhir_order
    with events.listen("phi.accessed.v1") as heard:
        for order in (hl7_order, fhir_order):
            assert reyes.get(f"/api/v1/lab/results/{order}").status_code == 200
        reads = [heard.wait_for(lambda e, o=order: e.payload.resource_id == o) for order in (hl7_order, fhir_order)]
    assert [r.payload.patient_id for r in reads] == [lab_patient_ref(mrn)] * 2
    assert all(holds_no_mrn(r, mrn) for r in reads)
    assert lab_patient_ref(patient()) != lab_patient_ref(mrn)  # another patient, another reference

    trail = mongo_client[f"{stack.db_prefix}audit"].audit_records

    def recorded() -> list[dict] | None:
        found = trail.find({"patient_id": {"$eq": lab_patient_ref(mrn)}, "service": {"$eq": "notifications"}})
        found = list(found)
        return found if len(found) >= 2 else None

    stored = wait_until(recorded, timeout=20, message="both reads in the audit trail")
    assert {d["resource_id"] for d in stored} == {hl7_order, fhir_order}
    assert all(mrn.lower() not in repr(d).lower() for d in stored)


def test_the_lakeside_lab_staff_get_lakeside_results_only(lab_interface, login):
    mrn = patient()
    reply = lab_interface(diagnostic_report(patient=mrn), agency="agy_lakeside")
    assert reply.status_code == 201
    ramirez, kim = login("dr.ramirez"), login("nurse.kim")
    wait_until(lambda: lab_item(ramirez, mrn), timeout=15)
    assert lab_item(login("frontdesk.baker"), mrn) is None and lab_item(kim, mrn) is None


FHIR_JSON = {"Content-Type": "application/fhir+json"}


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": b'{"resourceType": "DiagnosticReport",', "headers": FHIR_JSON}, 400, "malformed_json"),
        ({"body": [1, 2]}, 400, "invalid_body"),
        ({"body": {"resourceType": "Patient", "id": "p1"}}, 400, "invalid_resource_type"),
        ({"body": {**diagnostic_report(), "status": {"$gt": ""}}}, 400, "invalid_type"),
        ({"body": {**diagnostic_report(), "subject": {"reference": {"$ne": None}}}}, 400, "invalid_type"),
        ({"body": {**diagnostic_report(), "result": [{"reference": "Observation/x"}]}}, 400, "unresolved_reference"),
        ({"body": {**diagnostic_report(), "text": {"div": "x" * 600_000}}}, 413, "payload_too_large"),
        ({"body": diagnostic_report(), "agency": "agy_nowhere"}, 404, "agency_not_found"),
        ({"body": diagnostic_report(), "agency": "{\"$gt\":\"\"}"}, 404, "agency_not_found"),
    ],
)  # fmt: skip
def test_malformed_fhir_is_refused_with_a_stable_code_and_nothing_is_stored(
    lab_interface, notifications_db, kwargs, status, code
):
    kwargs = dict(kwargs)
    body = kwargs.pop("body", None)
    before = stored_results(notifications_db)
    reply = lab_interface(body, **kwargs)
    assert reply.status_code == status, reply.text
    assert reply.json()["code"] == code
    if status in (400, 404):  # refusals from the service itself are FHIR OperationOutcomes too
        assert reply.json()["resourceType"] == "OperationOutcome"
        assert reply.json()["issue"][0]["severity"] == "error"
    assert "Traceback" not in reply.text
    assert stored_results(notifications_db) == before


def test_only_the_lab_interface_may_post_results(lab_interface, stack):
    body = diagnostic_report()
    assert lab_interface(body, key="").status_code == 401
    assert lab_interface(body, key="not-a-key").status_code == 401
    assert lab_interface(body, key=stack.patient_portal_api_key).status_code == 403  # not in lab-interfaces


# --- at rest, in the logs, health -------------------------------------------------------------------


def test_results_are_sealed_at_rest_and_never_logged(mllp, stack, notifications_db, kim):
    mrn = "MRN-SEALED-" + uuid.uuid4().hex[:6]
    control_id = "SEAL-" + uuid.uuid4().hex[:6]
    assert msa(send(mllp, oru(control_id=control_id, patient=mrn)))[0] == "AA"
    wait_until(lambda: lab_item(kim, mrn), timeout=15)

    def released() -> list[dict]:
        # The delivery request waits in the document's outbox until the relay has published it
        # (inbox may take it before the relay's clearing write): read once every outbox is out.
        docs = list(notifications_db.lab_results.find({}))
        return [] if any(doc.get("_outbox") for doc in docs) else docs

    docs = wait_until(released, timeout=15)
    for doc in docs:
        raw = repr(doc)
        assert mrn not in raw and "Platelets" not in raw and "11.8" not in raw
        assert isinstance(doc["report"], bytes)
    # The log is written by the service's process: read it once this message's trace line is in it.
    log_file = stack.logs / "notifications.log"
    logs = wait_until(lambda: (text := log_file.read_text()) and f'"{control_id}"' in text and text, timeout=15)
    assert mrn not in logs and "CBC panel" not in logs and "DOE" not in logs and "Platelets" not in logs
    assert "lab result stored" in logs
    # The interface team traces a message by its ids and the ACK it got, never by its content.
    (trace,) = [json.loads(line) for line in logs.splitlines() if f'"{control_id}"' in line]
    assert trace["sending_facility"] == "QUEST_LAB" and trace["receiving_facility"] == "RIVERBEND"
    assert trace["message_type"] == "ORU^R01" and trace["ack_code"] == "AA"


def test_health_and_readiness(stack):
    import requests

    assert requests.get(f"{stack.notifications_url}/healthz", timeout=5).json()["status"] == "ok"
    ready = requests.get(f"{stack.notifications_url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    # The service checks tokens itself, not only the gateway.
    direct = requests.get(f"{stack.notifications_url}/api/v1/lab/results/lab_x", timeout=5)
    assert direct.status_code == 401 and direct.json()["code"] == "unauthenticated"
    forged = requests.post(
        f"{stack.notifications_url}/api/v1/partner/lab/agy_riverbend/DiagnosticReport",
        json=diagnostic_report(),
        headers={"X-Anonymous-Consumer": "true", "X-Consumer-Username": "lab-interface"},
        timeout=5,
    )
    assert forged.status_code == 401


# --- the ordering provider ----------------------------------------------------------------------------


def test_the_ordering_provider_named_by_npi_is_told_only_when_the_agency_asks(mllp, login, admin, reyes):
    """Therapist Nguyen is not flagged for lab results; ORC-12 names them by NPI."""
    nguyen = login("therapist.nguyen")
    member = "/api/v1/directory/staff/stf_riverbend_nguyen"
    ordering = "1245319599^NGUYEN^MINH^^^^^^NPI&2.16.840.1.113883.4.6&ISO^L^^^NPI"

    def ordered(mrn: str) -> str:
        message = oru(patient=mrn, observations=POTASSIUM_CRITICAL, test=POTASSIUM_TEST)
        return message.replace("\rOBR|", f"|||||||||{ordering}\rOBR|", 1)  # ORC-12

    assert admin.patch(member, json={"npi": "1245319599"}).status_code == 200
    try:
        off = patient()
        assert msa(send(mllp, ordered(off)))[0] == "AA"
        wait_until(lambda: lab_item(reyes, off), timeout=15)
        assert lab_item(nguyen, off) is None
        option = {"options": {"notify_ordering_provider_of_results": True}}
        assert admin.patch("/api/v1/directory/agency", json=option).status_code == 200

        sent: list[str] = []

        def told() -> bool:
            # Until the option has reached notifications: each try is a new result, and Nguyen's item
            # may land a moment after Reyes's, so wait a little for it before trying again.
            mrn = patient()
            sent.append(mrn)
            assert msa(send(mllp, ordered(mrn)))[0] == "AA"
            wait_until(lambda: lab_item(reyes, mrn), timeout=15)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if lab_item(nguyen, mrn) is not None:
                    return True
                time.sleep(0.1)
            return False

        wait_until(told, timeout=30)
        item = lab_item(nguyen, sent[-1])
        assert item is not None and lab_item(nguyen, off) is None
        assert item["title"] == "Lab result: Potassium (final)" and item["severity"] == "urgent"
        # Told as its orderer, Nguyen may open the full result; the flag is not needed.
        assert nguyen.get(f"/api/v1/lab/results/{open_item(nguyen, item)['source_ref']}").status_code == 200
    finally:
        admin.patch("/api/v1/directory/agency", json={"options": {"notify_ordering_provider_of_results": False}})
        assert admin.patch(member, json={"npi": ""}).status_code == 200


def test_a_compliance_officer_finds_every_read_of_a_patient_by_record_number(mllp, reyes, login, lab_patient_ref):
    """The trail names lab patients by reference only; an officer searching by the MRN (in the
    body, never the address) finds the reads, any spelling of it, and nothing of another patient."""
    mrn, other = patient(), patient()
    for number in (mrn, other):
        assert msa(send(mllp, oru(patient=number)))[0] == "AA"
    for number in (mrn, other):
        order_id = open_item(reyes, wait_until(lambda n=number: lab_item(reyes, n), timeout=15))["source_ref"]
        assert reyes.get(f"/api/v1/lab/results/{order_id}").status_code == 200
    officer = login("compliance.ortiz")

    def reads_of(identifier: str, **extra) -> list[dict]:
        reply = officer.post("/api/v1/audit/records/search", json={"patient_identifier": identifier, **extra})
        assert reply.status_code == 200, reply.text
        return [r for r in reply.json()["items"] if r["resource_type"] == "lab_result" and r["action"] == "read"]

    found = wait_until(lambda: reads_of(mrn) or None, timeout=20)
    assert {r["patient_id"] for r in found} == {lab_patient_ref(mrn)}
    assert found[0]["actor_id"] == "stf_riverbend_reyes"
    # The way a person types it: case and spaces do not matter; the identifier space may be named.
    assert reads_of(f"  {mrn.lower()} ") == found
    assert reads_of(mrn, identifier_system="mrn:RIVERBEND") == found
    assert reads_of(mrn, identifier_system="mrn:elsewhere") == []
    assert reads_of("MRN-00000000") == []
    # The other patient's read reaches the trail on its own time (outbox, bus, audit service).
    assert {r["patient_id"] for r in wait_until(lambda: reads_of(other) or None, timeout=20)} == {
        lab_patient_ref(other)
    }
    # Other filters combine with it; bad input is refused with a stable code.
    assert reads_of(mrn, actor="stf_riverbend_kim") == []
    for body, code in (
        ({"patient_identifier": {"$gt": ""}}, "invalid_type"),
        ({"patient_identifier": mrn, "patient_id": lab_patient_ref(mrn)}, "unknown_field"),
        ({}, "missing_field"),
        ({"patient_identifier": mrn, "limit": "0"}, "invalid_query"),
    ):
        refused = officer.post("/api/v1/audit/records/search", json=body)
        assert (refused.status_code, refused.json()["code"]) == (400, code), refused.text
    # Never the identifier in the address (it would reach logs): a query string is refused.
    in_address = officer.post(
        f"/api/v1/audit/records/search?patient_identifier={mrn}", json={"patient_identifier": mrn}
    )
    assert (in_address.status_code, in_address.json()["code"]) == (400, "invalid_query")
    # Staff without an auditor role are refused; the search itself is in the trail, by reference.
    assert reyes.post("/api/v1/audit/records/search", json={"patient_identifier": mrn}).status_code == 403
    searched = wait_until(
        lambda: (
            [
                r
                for r in officer.get("/api/v1/audit/records", params={"action": "search"}).json()["items"]
                if r["patient_id"] == lab_patient_ref(mrn)
            ]
            or None
        ),
        timeout=20,
    )
    assert searched[0]["actor_id"] == officer.staff_id
