"""eFax end to end: the whole stack as `make run` starts it, with the fax simulator as the provider.
The simulator delivers an inbound fax to Riverbend's main fax number (+15555550100, demo data: linked
to the intake staff Chris Wilson and Dana Thompson) through the gateway's unauthenticated callback
route; cloud-comms checks its signature, stores it sealed and stages its delivery; inbox puts it on
the intake staff's boards (folder "cloud"), and its PDF opens for them only.

Send Fax from the board: an intake staff member sends a PDF (uploaded, or a fax they received) from
the main fax number through the gateway; cloud-comms hands it to the simulator, whose signed status
callbacks come back through the gateway and move the sender's board item on (sent, or failed and
unread again).

Needs the launcher to run cloud-comms and the fax simulator (`python -m services.fax_simulator`) and
the gateway to route /api/v1/fax/callbacks (no gateway auth) and /api/v1/cloud (staff JWT), with
the larger body limit of /api/v1/cloud/faxes/outbound.
"""

from __future__ import annotations

import base64
import random

import pytest
import requests

from services.fax_simulator.pdf import sample_pdf
from tests.waits import wait_until

RIVERBEND_FAX = "+15555550100"
REFERRAL_LINES = (b"REFERRAL FOR CONSULTATION", b"Patient: Maria Lopez", b"DOB: 03/12/1984", b"MRN: RB100234")


@pytest.fixture(scope="module")
def fax_simulator(stack) -> str:
    url = getattr(stack, "fax_simulator_url", None)
    ports = getattr(stack.config, "ports", None)
    if url is None and getattr(ports, "fax_simulator", None):
        url = f"http://127.0.0.1:{ports.fax_simulator}"
    if url is None:
        pytest.skip("the launcher does not run the fax simulator yet")
    return url


@pytest.fixture
def inbound(fax_simulator):
    def _send(to: str = RIVERBEND_FAX, pages: int = 2, fault: str | None = None) -> tuple[str, dict]:
        caller = f"+1555{random.randrange(10**6, 10**7)}"
        if fault:
            reply = requests.post(f"{fax_simulator}/simulator/faults", json={"fault": fault}, timeout=10)
            assert reply.status_code == 201, reply.text
        reply = requests.post(
            f"{fax_simulator}/simulator/inbound", json={"from": caller, "to": to, "pages": pages}, timeout=60
        )
        assert reply.status_code == 201, reply.text
        return caller, reply.json()

    return _send


def fax_item(client, caller: str):
    for item in client.items(folder="cloud", limit=100)["items"]:
        if item.get("title") == f"Fax from {caller}":
            return item
    return None


def test_an_inbound_fax_reaches_the_intake_staff_and_only_they_can_read_it(inbound, login, admin, outsider):
    wilson, thompson = login("intake.wilson"), login("intake.thompson")
    caller, delivered = inbound(pages=2)
    assert delivered["answers"] == [200], delivered

    item = wait_until(lambda: fax_item(wilson, caller), timeout=20)
    assert item["summary"].startswith("2 pages · received ")
    # In the agency's time zone (Riverbend: America/Chicago), not UTC.
    assert item["summary"].endswith((" CST", " CDT")), item["summary"]
    assert not item["read"]
    assert wait_until(lambda: fax_item(thompson, caller), timeout=20)
    detail = wilson.get(f"/api/v1/board/items/{item['id']}").json()
    view_url = detail["links"][0]["url"]
    fax_path = view_url[view_url.index("/api/v1/cloud/faxes/") :]

    view = wilson.get(fax_path)
    assert view.status_code == 200, view.text
    assert view.json()["from_number"] == caller and view.json()["pages"] == 2
    pdf = wilson.get(view.json()["pdf_url"])
    assert pdf.status_code == 200 and pdf.headers["Content-Type"].startswith("application/pdf")
    assert pdf.content.startswith(b"%PDF-") and all(line in pdf.content for line in REFERRAL_LINES)

    for other in (admin, outsider):  # same agency, not linked to the number; another agency
        assert fax_item(other, caller) is None
        assert other.get(fax_path).status_code == 404
        assert other.get(f"{fax_path}/pdf").status_code == 404


def test_a_repeated_callback_is_one_item(inbound, login):
    wilson = login("intake.wilson")
    caller, delivered = inbound(fault="duplicate_callback")
    assert delivered["answers"] == [200, 200]
    wait_until(lambda: fax_item(wilson, caller), timeout=20)
    matching = [i for i in wilson.items(folder="cloud", limit=100)["items"] if i["title"] == f"Fax from {caller}"]
    assert len(matching) == 1


def test_a_forged_callback_is_refused(inbound, login):
    caller, delivered = inbound(fault="bad_signature")
    assert delivered["answers"] == [401]
    caller, delivered = inbound(to="+15555550000")
    assert delivered["answers"] == [404]


def test_the_callback_route_needs_no_token_but_the_staff_routes_do(stack, fax_simulator):
    unsigned = requests.post(f"{stack.gateway_url}/api/v1/fax/callbacks/received", files={"x": b"y"}, timeout=10)
    assert unsigned.status_code == 401 and unsigned.json()["code"] == "invalid_signature"
    assert requests.get(f"{stack.gateway_url}/api/v1/cloud/faxes/fax_x", timeout=10).status_code == 401


# --- Send Fax ------------------------------------------------------------------------------------------


def new_number() -> str:
    """A destination Send Fax allows: NPA 555 (unassigned), an exchange neither N11 nor 555."""
    exchange = random.choice([n for n in range(200, 1000) if n % 100 != 11 and n != 555])
    return f"+1555{exchange}{random.randrange(10**4):04d}"


def sent_item(client, number: str, status: str):
    for item in client.items(folder="cloud", limit=100)["items"]:
        if item.get("title") == f"Fax to {number}" and item.get("status") == status:
            return item
    return None


def simulator_sent(fax_simulator: str, fid: str) -> list[dict]:
    sent = requests.get(f"{fax_simulator}/simulator/state", timeout=10).json()["sent"]
    return [fax for fax in sent if fax["tags"].get("outbound_id") == fid]


def test_an_uploaded_pdf_is_faxed_and_the_senders_item_follows(login, admin, outsider, fax_simulator):
    wilson, thompson = login("intake.wilson"), login("intake.thompson")
    to = new_number()
    # Larger than the gateway's usual 1 MB body limit: the upload route allows a 20 MiB PDF.
    pdf = sample_pdf(1, "\n".join(["A line of text making the page over two megabytes large."] * 40_000))
    assert len(pdf) > 2 * 1024 * 1024
    body = {"to": to, "from_number": RIVERBEND_FAX, "pdf_base64": base64.b64encode(pdf).decode(), "filename": "a.pdf"}
    reply = wilson.post("/api/v1/cloud/faxes/outbound", json=body)
    assert reply.status_code == 202, reply.text
    fid = reply.json()["id"]
    assert reply.json()["status"] == "queued" and reply.json()["to_number"] == to

    item = wait_until(lambda: sent_item(wilson, to, "sent"), timeout=30)
    assert item["summary"] == "Sent · 1 page"
    link = wilson.get(f"/api/v1/board/items/{item['id']}").json()["links"][0]["url"]
    view = wilson.get(link[link.index("/api/v1/cloud/faxes/outbound/") :]).json()
    assert view["id"] == fid and [h["status"] for h in view["history"]] == [
        "queued",
        "sending",
        "inprogress",
        "success",
    ]
    assert wilson.get(view["pdf_url"]).content == pdf

    (provided,) = simulator_sent(fax_simulator, fid)
    assert provided["caller_id"] == RIVERBEND_FAX and provided["recipients"][0]["phone_number"] == to
    assert [c["answers"] for c in provided["callbacks"]] == [[200], [200], [200]]  # through the gateway, signed

    assert thompson.get(f"/api/v1/cloud/faxes/outbound/{fid}").status_code == 200  # linked to the number
    assert sent_item(thompson, to, "sent") is None  # the item is the sender's
    for other in (admin, outsider):
        assert other.get(f"/api/v1/cloud/faxes/outbound/{fid}").status_code == 404
    refused = admin.post(
        "/api/v1/cloud/faxes/outbound", json={**body, "pdf_base64": base64.b64encode(sample_pdf()).decode()}
    )
    assert refused.status_code == 403 and refused.json()["code"] == "not_linked"


def test_a_received_fax_is_sent_on_and_a_failure_comes_back_unread(inbound, login, fax_simulator):
    wilson = login("intake.wilson")
    caller, delivered = inbound(pages=1)
    assert delivered["answers"] == [200]
    received = wait_until(lambda: fax_item(wilson, caller), timeout=20)
    link = wilson.get(f"/api/v1/board/items/{received['id']}").json()["links"][0]["url"]
    fax_id = link.rsplit("/", 1)[1]

    reply = requests.post(
        f"{fax_simulator}/simulator/faults", json={"fault": "send_failure", "reason": "No answer"}, timeout=10
    )
    assert reply.status_code == 201
    to = new_number()
    document = {"kind": "fax", "id": fax_id}
    reply = wilson.post(
        "/api/v1/cloud/faxes/outbound", json={"to": to, "from_number": RIVERBEND_FAX, "document": document}
    )
    assert reply.status_code == 202, reply.text
    item = wait_until(lambda: sent_item(wilson, to, "failed"), timeout=30)
    assert item["summary"] == "Failed: No answer" and not item["read"]
    view = wilson.get(f"/api/v1/cloud/faxes/outbound/{reply.json()['id']}").json()
    assert (view["status"], view["failure_reason"]) == ("failure", "No answer")
    assert wilson.get(view["pdf_url"]).content == wilson.get(f"/api/v1/cloud/faxes/{fax_id}/pdf").content


def test_a_fax_sent_in_test_mode_is_not_shown_as_sent(login, fax_simulator):
    wilson = login("intake.wilson")
    reply = requests.post(f"{fax_simulator}/simulator/faults", json={"fault": "test_mode"}, timeout=10)
    assert reply.status_code == 201
    to = new_number()
    body = {"to": to, "from_number": RIVERBEND_FAX, "pdf_base64": base64.b64encode(sample_pdf()).decode()}
    reply = wilson.post("/api/v1/cloud/faxes/outbound", json=body)
    assert reply.status_code == 202, reply.text
    item = wait_until(lambda: sent_item(wilson, to, "test"), timeout=30)
    assert item["summary"] == "Test mode: not transmitted" and not item["read"]
    assert sent_item(wilson, to, "sent") is None
    assert wilson.get(f"/api/v1/cloud/faxes/outbound/{reply.json()['id']}").json()["status"] == "test"


def test_an_idempotency_key_through_the_gateway_sends_once(login, fax_simulator):
    wilson = login("intake.wilson")
    to, key = new_number(), f"e2e-{random.randrange(10**12)}"
    body = {"to": to, "from_number": RIVERBEND_FAX, "pdf_base64": base64.b64encode(sample_pdf()).decode()}
    first = wilson.post("/api/v1/cloud/faxes/outbound", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    again = wilson.post("/api/v1/cloud/faxes/outbound", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    wait_until(lambda: sent_item(wilson, to, "sent"), timeout=30)
    assert len(simulator_sent(fax_simulator, first.json()["id"])) == 1
    premium = wilson.post("/api/v1/cloud/faxes/outbound", json={**body, "to": "+19005550177"})
    assert premium.status_code == 400 and premium.json()["code"] == "destination_not_allowed"


def test_a_forged_status_callback_is_refused_at_cloud_comms(stack):
    forged = requests.post(
        f"{stack.gateway_url}/api/v1/fax/callbacks/status",
        files={"fax": (None, '{"id": 1, "direction": "sent", "status": "success"}'), "direction": (None, "sent")},
        headers={"X-Phaxio-Signature": "0" * 40},
        timeout=10,
    )
    assert forged.status_code == 401 and forged.json()["code"] == "invalid_signature"
