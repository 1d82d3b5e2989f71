"""The fax simulator against cloud-comms' fax callback in-process: the simulator's inbound faxes are
accepted (its signature is Phaxio's, as cloud-comms checks it), its faults are refused or absorbed,
and its send API answers like Phaxio's with signed status updates queued -> inprogress -> final."""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from io import BytesIO

import pytest

from services.cloud_comms.fax import phaxio
from services.cloud_comms.fax.feature import FAXES
from services.fax_simulator.app import Fault, Simulator, create_app
from services.fax_simulator.pdf import sample_pdf
from tests.integration.test_cloud_fax import (  # noqa: F401 - fixtures
    INTAKE_NUMBER,
    PUBLIC,
    TOKEN,
    directory,
    setup,
)
from tests.waits import wait_until


class InProcess:
    """`requests.post` as the simulator calls it, answered by cloud-comms' Flask test client; status
    callbacks (not served here) are kept."""

    def __init__(self, client):
        self.client = client
        self.status_callbacks: list[tuple[str, dict, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, url, files=None, headers=None, timeout=None):
        path = urllib.parse.urlsplit(url).path
        # the simulator posts multipart, as Phaxio does: fields are parts without a file name
        fields = {name: part[1] for name, part in files.items() if part[0] is None}
        if path.endswith("/status"):
            with self.lock:
                self.status_callbacks.append((url, fields, dict(headers)))
            return type("Answer", (), {"status_code": 200})()
        body = dict(fields)
        for name, part in files.items():
            if part[0] is not None:
                filename, content, ctype = part
                body[name] = (BytesIO(content), filename, ctype)
        answer = self.client.post(path, data=body, headers=headers, content_type="multipart/form-data")
        return type("Answer", (), {"status_code": answer.status_code})()


@pytest.fixture
def simulator(setup):  # noqa: F811 - the fixture imported above
    db, client = setup
    transport = InProcess(client)
    sim = Simulator(
        callback_token=TOKEN,
        api_key="key",
        api_secret="secret",
        received_url=f"{PUBLIC}/received",
        status_url=f"{PUBLIC}/status",
        step_s=0.0,
        post=transport,
    )
    yield db, sim, transport, create_app(sim).test_client()
    sim.stop()


def test_an_inbound_fax_from_the_simulator_is_stored(simulator):
    db, sim, _, control = simulator
    answer = control.post("/simulator/inbound", json={"from": "+15555550123", "to": INTAKE_NUMBER, "pages": 3})
    assert answer.status_code == 201
    assert answer.get_json()["answers"] == [200]
    (doc,) = db[FAXES].find()
    assert doc["pages"] == 3 and doc["provider_fax_id"] == str(answer.get_json()["fax_id"])
    assert doc["is_test"] is False, "the simulator plays live API keys unless asked"
    assert control.get("/simulator/state").get_json()["inbound"][0]["answers"] == [200]


def test_an_inbound_test_fax_is_stored_as_one(simulator):
    db, _, _, control = simulator
    answer = control.post("/simulator/inbound", json={"to": INTAKE_NUMBER, "is_test": True})
    assert answer.get_json()["answers"] == [200]
    (doc,) = db[FAXES].find()
    assert doc["is_test"] is True
    assert control.post("/simulator/inbound", json={"to": INTAKE_NUMBER, "is_test": "yes"}).status_code == 400


@pytest.mark.parametrize(
    ("fault", "answers", "stored"),
    [
        ("bad_signature", [401], 0),
        ("no_signature", [401], 0),
        ("duplicate_callback", [200, 200], 1),
        ("not_a_pdf", [400], 0),
    ],
)
def test_faults(simulator, fault, answers, stored):
    db, _, _, control = simulator
    assert control.post("/simulator/faults", json={"fault": fault}).status_code == 201
    answer = control.post("/simulator/inbound", json={"to": INTAKE_NUMBER})
    assert answer.get_json()["answers"] == answers
    assert db[FAXES].count_documents({}) == stored
    # the fault is used up: the next fax goes through
    assert control.post("/simulator/inbound", json={"to": INTAKE_NUMBER}).get_json()["answers"] == [200]


def test_an_unknown_number_is_answered_404(simulator):
    _, _, _, control = simulator
    assert control.post("/simulator/inbound", json={"to": "+15555550000"}).get_json()["answers"] == [404]


def test_control_api_refuses_bad_input(simulator):
    _, _, _, control = simulator
    assert control.post("/simulator/inbound", json={"to": INTAKE_NUMBER, "pages": 0}).status_code == 400
    assert control.post("/simulator/inbound", json={"from": "+1555"}).status_code == 400
    assert control.post("/simulator/inbound", json={"to": INTAKE_NUMBER, "x": 1}).status_code == 400
    assert control.post("/simulator/faults", json={"fault": "meteor"}).status_code == 400


def basic(key="key", secret="secret"):
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


@pytest.mark.parametrize("fails", [False, True])
def test_a_sent_fax_reports_its_status_in_signed_callbacks(simulator, fails):
    _, _, transport, api = simulator
    if fails:
        api.post("/simulator/faults", json={"fault": "send_failure"})
    sent = api.post(
        "/v2/faxes",
        data={"to": "+15555550177", "file": (BytesIO(sample_pdf(2)), "out.pdf", "application/pdf")},
        headers=basic(),
        content_type="multipart/form-data",
    )
    assert sent.status_code == 200
    body = sent.get_json()
    assert body["success"] is True and isinstance(body["data"]["id"], int)

    wait_until(lambda: len(transport.status_callbacks) == 3, 5.0, 0.02, "three status callbacks")
    statuses = []
    for url, params, headers in transport.status_callbacks:
        assert url == f"{PUBLIC}/status"
        assert phaxio.signature_valid(TOKEN, url, list(params.items()), [], headers["X-Phaxio-Signature"])
        fax = json.loads(params["fax"])
        assert fax["id"] == body["data"]["id"] and fax["direction"] == "sent" and fax["num_pages"] == 2
        statuses.append(fax["status"])
    assert statuses == ["queued", "inprogress", "failure" if fails else "success"]
    got = api.get(f"/v2/faxes/{body['data']['id']}", headers=basic()).get_json()["data"]
    assert got["status"] == statuses[-1]


def test_sending_needs_the_api_credentials(simulator):
    _, _, _, api = simulator
    data = {"to": "+15555550177", "file": (BytesIO(sample_pdf()), "out.pdf", "application/pdf")}
    refused = api.post("/v2/faxes", data=data, headers=basic(secret="wrong"), content_type="multipart/form-data")
    assert refused.status_code == 401 and refused.get_json()["success"] is False
    assert api.post("/v2/faxes", data={"to": "+15555550177"}, headers=basic()).status_code == 422


def test_faults_are_kept_in_order_and_listed(simulator):
    _, sim, _, control = simulator
    control.post("/simulator/faults", json={"fault": "bad_signature", "times": 2})
    assert control.get("/simulator/state").get_json()["faults"] == [{"fault": "bad_signature", "times": 2}]
    sim.add_fault(Fault("duplicate_callback"))
    assert control.delete("/simulator/faults").get_json() == {"faults": []}


def test_sends_carry_tags_and_are_listed_by_them(simulator):
    _, _, transport, api = simulator
    data = {
        "to": "+15555550177",
        "caller_id": "+15555550100",
        "tag[outbound_id]": "fxo_1",
        "file": (BytesIO(sample_pdf(1)), "out.pdf", "application/pdf"),
    }
    sent = api.post("/faxes", data=data, headers=basic(), content_type="multipart/form-data")  # the API at the root too
    assert sent.status_code == 200
    fax_id = sent.get_json()["data"]["id"]
    listed = api.get("/v2/faxes?direction=sent&tag[outbound_id]=fxo_1", headers=basic()).get_json()
    assert [f["id"] for f in listed["data"]] == [fax_id]
    assert listed["data"][0]["caller_id"] == "+15555550100" and listed["data"][0]["tags"] == {"outbound_id": "fxo_1"}
    assert api.get("/v2/faxes?tag[outbound_id]=fxo_2", headers=basic()).get_json()["data"] == []
    assert api.get("/v2/faxes?direction=received&tag[outbound_id]=fxo_1", headers=basic()).get_json()["data"] == []
    assert api.get("/v2/faxes", headers=basic(secret="wrong")).status_code == 401
    wait_until(lambda: len(transport.status_callbacks) == 3, 5.0, 0.02, "three status callbacks")
    assert all(json.loads(p["fax"])["tags"] == {"outbound_id": "fxo_1"} for _, p, _ in transport.status_callbacks)


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        ({"fault": "api_unavailable"}, 503, "Service temporarily unavailable (simulated)"),
        ({"fault": "api_refuses", "reason": "Invalid recipient"}, 422, "Invalid recipient"),
        ({"fault": "lost_answer"}, 502, "Bad gateway (simulated: the fax was queued)"),
        ({"fault": "api_unauthorized"}, 401, "Invalid API credentials (simulated)"),
    ],
)
def test_send_faults(simulator, fault, status, message):
    _, _, _, api = simulator
    assert api.post("/simulator/faults", json=fault).status_code == 201
    data = {"to": "+15555550177", "file": (BytesIO(sample_pdf(1)), "out.pdf", "application/pdf")}
    answer = api.post("/v2/faxes", data=data, headers=basic(), content_type="multipart/form-data")
    assert (answer.status_code, answer.get_json()) == (status, {"success": False, "message": message})
    # only a lost answer queued the fax
    assert len(api.get("/simulator/state").get_json()["sent"]) == (1 if fault["fault"] == "lost_answer" else 0)


def test_a_failing_send_reports_the_reason_asked_for(simulator):
    _, _, transport, api = simulator
    api.post("/simulator/faults", json={"fault": "send_failure", "reason": "No answer"})
    data = {"to": "+15555550177", "file": (BytesIO(sample_pdf(1)), "out.pdf", "application/pdf")}
    api.post("/v2/faxes", data=data, headers=basic(), content_type="multipart/form-data")
    wait_until(lambda: len(transport.status_callbacks) == 3, 5.0, 0.02, "three status callbacks")
    final = json.loads(transport.status_callbacks[-1][1]["fax"])
    assert final["status"] == "failure" and final["error_type"] == "lineError"
    assert final["recipients"][0]["error_message"] == "No answer" == final["error_message"]
    assert api.post("/simulator/faults", json={"fault": "send_failure", "reason": 5}).status_code == 400


@pytest.mark.parametrize("test_mode", [False, True])
def test_a_send_in_test_mode_says_so_in_its_callbacks(simulator, test_mode):
    _, _, transport, api = simulator
    if test_mode:
        assert api.post("/simulator/faults", json={"fault": "test_mode"}).status_code == 201
    data = {"to": "+15555550177", "file": (BytesIO(sample_pdf(1)), "out.pdf", "application/pdf")}
    api.post("/v2/faxes", data=data, headers=basic(), content_type="multipart/form-data")
    wait_until(lambda: len(transport.status_callbacks) == 3, 5.0, 0.02, "three status callbacks")
    for _, fields, _ in transport.status_callbacks:
        assert fields["is_test"] == ("true" if test_mode else "false")
        assert json.loads(fields["fax"])["is_test"] is test_mode
    assert json.loads(transport.status_callbacks[-1][1]["fax"])["status"] == "success"
