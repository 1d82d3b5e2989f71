"""eFax end to end: the whole stack as `make run` starts it, with the fax simulator as the provider.
The simulator delivers an inbound fax to Riverbend's main fax number (+15555550100, demo data: linked
to the intake staff Chris Wilson and Dana Thompson) through the gateway's unauthenticated callback
route; cloud-comms checks its signature, stores it sealed and stages its delivery; inbox puts it on
the intake staff's boards (folder "cloud"), and its PDF opens for them only.

Needs the launcher to run cloud-comms and the fax simulator (`python -m services.fax_simulator`) and
the gateway to route /api/v1/fax/callbacks (no gateway auth) and /api/v1/cloud (staff JWT).
"""

from __future__ import annotations

import random

import pytest
import requests

from tests.waits import wait_until

RIVERBEND_FAX = "+15555550100"
SAMPLE_TEXT = b"Referral for JOHN SAMPLE DOB 1970-01-01"


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
    assert pdf.content.startswith(b"%PDF-") and SAMPLE_TEXT in pdf.content

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
