"""Lab Report Notifications end to end: HL7 v2 ORU^R01 over MLLP (python-hl7's own MLLPClient and
mllp_send) and FHIR R4 DiagnosticReports through the gateway, onto the boards of exactly the staff
flagged Lab Result Notification, with the full result behind an audited view."""

from __future__ import annotations

import hl7
import pytest
from hl7.client import MLLPClient

from tests.e2e.conftest import wait_until
from tests.e2e.lab_messages import oru

# Demo staff flagged Lab Result Notification (services/directory/demo.py).
RIVERBEND_LAB_STAFF = {
    "stf_riverbend_reyes",
    "stf_riverbend_kim",
    "stf_riverbend_chen",
    "stf_riverbend_brooks",
    "stf_riverbend_white",
}


@pytest.fixture(scope="module")
def mllp(stack):
    """A connection to the stack's MLLP listener through python-hl7's client."""
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        yield client


def ack_of(raw: bytes) -> hl7.Message:
    """An ACK as python-hl7 parses it (the MLLP frame stripped)."""
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r"), raw
    return hl7.parse(raw[1:-2].decode("ascii"))


def lab_item(client, order_link_id: str | None = None, **match):
    """The caller's Lab Report Notification whose fields match, or None."""
    for item in client.items(folder="lab")["items"]:
        if all(item.get(k) == v for k, v in match.items()):
            return item
    return None


def test_a_cbc_panel_reaches_only_the_flagged_staff(mllp, login, reyes, kim, admin):
    control_id = "CBC-0001"
    ack = ack_of(mllp.send_message(oru(control_id=control_id, patient="MRN-CBC-1")))
    assert str(ack.segment("MSA")(1)) == "AA"
    assert str(ack.segment("MSA")(2)) == control_id
    title = "Lab result: CBC panel - Blood by Automated count (final)"
    item = wait_until(lambda: lab_item(reyes, summary="Patient MRN-CBC-1: 1 critical, 2 abnormal"), timeout=15)
    assert item["title"] == title and item["severity"] == "urgent" and not item["read"]
    assert lab_item(kim, summary=item["summary"]) is not None
    # Unflagged staff (the admin, a therapist) get nothing.
    assert lab_item(admin, summary=item["summary"]) is None
    assert lab_item(login("therapist.patel"), summary=item["summary"]) is None
