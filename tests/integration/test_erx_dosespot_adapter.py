"""The real DoseSpot adapter against the real simulator process (`python -m services.erx_simulator`),
started once for this module on a free port; every test starts from the simulator's demo data.

Demo data: clinic 1001; clinician 2001 has 3 refill requests, 2 pending prescriptions and 1
transmission error, 2002 has 2, 3 and 2, 2003 has 1, 1 and 1. Pages hold 5 items here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from services.erx_bridge.resilience import CircuitBreakers, CircuitOpen, CircuitState
from services.erx_bridge.vendors.base import (
    PENDING_PRESCRIPTION,
    REFILL_REQUEST,
    SSO_NOTIFICATIONS,
    SSO_PATIENT,
    TRANSACTION_ERROR,
    Counts,
    PracticeCredentials,
    VendorMalformed,
    VendorRejected,
    VendorUnavailable,
)
from services.erx_bridge.vendors.dosespot import DoseSpotAdapter
from services.erx_bridge.vendors.registry import adapter_for
from services.kit.embedded_mongo import free_port
from tests.helpers import Clock
from tests.waits import wait_until

REPO = Path(__file__).resolve().parents[2]
CLINIC_KEY = "integration-clinic-key-5Kd9"
SUBSCRIPTION_KEY = "integration-subscription-key-77"
PAGE_SIZE = 5
DEMO = {
    "2001": Counts(refill_requests=3, transaction_errors=1, pending_prescriptions=2),
    "2002": Counts(refill_requests=2, transaction_errors=2, pending_prescriptions=3),
    "2003": Counts(refill_requests=1, transaction_errors=1, pending_prescriptions=1),
}


class Simulator:
    def __init__(self, root: str):
        self.root = root

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        response = requests.request(method, f"{self.root}/simulator/{path}", json=body, timeout=10)
        assert response.status_code < 300, response.text
        return response.json()

    def fault(self, **spec) -> None:
        self.control("POST", "faults", spec)

    def calls(self) -> dict[str, dict[str, int]]:
        return self.control("GET", "calls")["calls"]

    def add(self, clinician: str, kind: str, **fields) -> list[dict]:
        return self.control("POST", f"clinicians/{clinician}/items", {"kind": kind, **fields})["items"]


@pytest.fixture(scope="module")
def simulator_process(tmp_path_factory):
    port = free_port()
    environ = {
        **os.environ,
        "CLINIC_MODE": "development",
        "CLINIC_RUN_DIR": str(tmp_path_factory.mktemp("erx-simulator-run")),
        "ERX_SIMULATOR_HOST": "127.0.0.1",
        "ERX_SIMULATOR_PORT": str(port),
        "ERX_SIMULATOR_CLINIC_KEY": CLINIC_KEY,
        "ERX_SIMULATOR_SUBSCRIPTION_KEY": SUBSCRIPTION_KEY,
        "ERX_SIMULATOR_PAGE_SIZE": str(PAGE_SIZE),
        "ERX_SIMULATOR_TOKEN_TTL_S": "3600",
    }
    logs = tmp_path_factory.mktemp("erx-simulator-logs")
    stdout, stderr = (logs / "stdout.log").open("w+"), (logs / "stderr.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.erx_simulator"], cwd=REPO, env=environ, stdout=stdout, stderr=stderr, text=True
    )
    root = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, (logs / "stderr.log").read_text()  # exited instead of starting
        try:
            return requests.get(f"{root}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, timeout=20, interval=0.1, message="the simulator answering /healthz")
        yield Simulator(root), process
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        lines = [json.loads(line) for line in (logs / "stdout.log").read_text().splitlines()]
        assert any(line["msg"] == "stopped" for line in lines)
        for text in ((logs / "stdout.log").read_text(), (logs / "stderr.log").read_text()):
            assert CLINIC_KEY not in text and SUBSCRIPTION_KEY not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
        stderr.close()


@pytest.fixture
def sim(simulator_process) -> Simulator:
    simulator, _ = simulator_process
    simulator.control("POST", "reset")
    return simulator


@pytest.fixture
def practice(sim) -> PracticeCredentials:
    return PracticeCredentials(
        vendor="dosespot",
        base_url=f"{sim.root}/webapi/v2",
        clinic_id="1001",
        clinic_key=CLINIC_KEY,
        admin_user_id="2001",
        sso_url=f"{sim.root}/LoginSingleSignOn.aspx",
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def adapter(clock):
    made = adapter_for(
        "dosespot",
        subscription_key=SUBSCRIPTION_KEY,
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
        breakers=CircuitBreakers(failure_threshold=3, cooldown_s=30.0, clock=clock),
    )
    assert isinstance(made, DoseSpotAdapter)
    yield made
    made.close()


def breaker(adapter: DoseSpotAdapter, practice: PracticeCredentials):
    return adapter._breakers.for_key(practice.base_url)


# -- counts, items, paging -----------------------------------------------------------------------


def test_counts_are_the_clinicians_and_cost_one_call_each_once_signed_in(adapter, practice, sim):
    for clinician, expected in DEMO.items():
        assert adapter.counts(practice, clinician) == expected
    assert sim.calls() == {"token": {c: 1 for c in DEMO}, "counts": {c: 1 for c in DEMO}}

    sim.control("DELETE", "calls")
    for clinician, expected in DEMO.items():
        assert adapter.counts(practice, clinician) == expected
    # Nothing changed: one vendor call per prescriber, the token reused.
    assert sim.calls() == {"counts": {c: 1 for c in DEMO}}


def test_each_kind_is_read_and_mapped(adapter, practice, sim):
    [refill] = sim.add("2003", REFILL_REQUEST, patient_name="Wren Halloway", medication="Sertraline 100 mg tablet")
    [error] = sim.add(
        "2003",
        TRANSACTION_ERROR,
        patient_name="Ash Tolliver",
        medication="Lisinopril 20 mg tablet",
        detail="NCPDP down",
    )
    [pending] = sim.add("2003", PENDING_PRESCRIPTION, patient_name="Rook Benning", medication="Buspirone 15 mg tablet")

    refills = adapter.items(practice, "2003", REFILL_REQUEST)
    errors = adapter.items(practice, "2003", TRANSACTION_ERROR)
    pendings = adapter.items(practice, "2003", PENDING_PRESCRIPTION)
    assert (len(refills), len(errors), len(pendings)) == (2, 2, 2)

    got = {item.vendor_item_id: item for item in refills + errors + pendings}
    mine = got[refill["vendor_item_id"]]
    assert mine.vendor_item_id == f"refill:{refill['id']}" and mine.kind == REFILL_REQUEST
    assert (mine.patient_id, mine.patient_name, mine.medication) == (
        str(refill["patient_id"]),
        "Wren Halloway",
        "Sertraline 100 mg tablet",
    )
    # Transmission errors name neither patient nor medication: the adapter looked both up.
    mine = got[error["vendor_item_id"]]
    assert mine.vendor_item_id == f"error:{error['id']}" and mine.kind == TRANSACTION_ERROR
    assert (mine.patient_name, mine.medication, mine.detail) == (
        "Ash Tolliver",
        "Lisinopril 20 mg tablet",
        "NCPDP down",
    )
    mine = got[pending["vendor_item_id"]]
    assert mine.vendor_item_id == f"pending:{pending['id']}" and mine.kind == PENDING_PRESCRIPTION
    assert (mine.patient_name, mine.medication) == ("Rook Benning", "Buspirone 15 mg tablet")
    assert mine.detail in ("awaiting signature", "ready to sign")
    for item in got.values():
        assert item.requested_at is not None and item.requested_at.tzinfo is not None
        assert item.requested_at < dt.datetime.now(dt.UTC)
        assert item.patient_name and item.medication
    # Stable ids: read again, the same ones.
    assert {i.vendor_item_id for i in adapter.items(practice, "2003", REFILL_REQUEST)} == {
        i.vendor_item_id for i in refills
    }


def test_lists_are_followed_page_by_page(adapter, practice, sim):
    sim.add("2001", REFILL_REQUEST, count=13)  # 3 + 13 = 16 refill requests: 4 pages of 5
    sim.control("DELETE", "calls")
    refills = adapter.items(practice, "2001", REFILL_REQUEST)
    assert len(refills) == 16 == len({item.vendor_item_id for item in refills})
    assert adapter.counts(practice, "2001").refill_requests == 16
    assert sim.calls()["refills"] == {"2001": 4}

    sim.add("2001", REFILL_REQUEST, count=4)  # exactly 20: the last page is full, no fifth page asked
    sim.control("DELETE", "calls")
    assert len(adapter.items(practice, "2001", REFILL_REQUEST)) == 20
    assert sim.calls()["refills"] == {"2001": 4}


def test_a_clinician_with_nothing_open_has_empty_lists(adapter, practice, sim):
    sim.control("POST", "reset", {"demo": False})
    sim.control("POST", "clinicians/2005/items", {"kind": REFILL_REQUEST})
    sim.control("DELETE", "items/" + adapter.items(practice, "2005", REFILL_REQUEST)[0].vendor_item_id)
    assert adapter.counts(practice, "2005") == Counts(0, 0, 0)
    for kind in (REFILL_REQUEST, TRANSACTION_ERROR, PENDING_PRESCRIPTION):
        assert adapter.items(practice, "2005", kind) == []


def test_a_resolved_item_leaves_the_list_and_the_count(adapter, practice, sim):
    before = adapter.items(practice, "2002", TRANSACTION_ERROR)
    sim.control("DELETE", f"items/{before[0].vendor_item_id}")
    after = adapter.items(practice, "2002", TRANSACTION_ERROR)
    assert [item.vendor_item_id for item in after] == [item.vendor_item_id for item in before[1:]]
    assert adapter.counts(practice, "2002").transaction_errors == 1


def test_the_sso_link_signs_in_once(adapter, practice, sim):
    link = adapter.sso(practice, "2001", SSO_NOTIFICATIONS)
    assert sim.calls() == {}  # pure: no vendor call
    page = requests.get(link.url, timeout=5)
    assert page.status_code == 200 and "notifications summary" in page.text
    assert requests.get(link.url, timeout=5).status_code == 403  # single-use
    patient = adapter.items(practice, "2001", REFILL_REQUEST)[0].patient_id
    page = requests.get(adapter.sso(practice, "2001", SSO_PATIENT, patient).url, timeout=5)
    assert page.status_code == 200 and f"patient {patient}" in page.text


# -- faults ----------------------------------------------------------------------------------------


def test_429_with_retry_after_seconds(adapter, practice, sim):
    adapter.counts(practice, "2001")  # signed in
    sim.fault(fault="rate_limit", endpoint="counts", retry_after="7")
    with pytest.raises(VendorUnavailable) as raised:
        adapter.counts(practice, "2001")
    assert not isinstance(raised.value, VendorMalformed)
    assert raised.value.retry_after_s == 7.0
    assert adapter.counts(practice, "2001") == DEMO["2001"]


def test_429_with_retry_after_as_a_date_and_without_one(adapter, practice, sim):
    sim.fault(fault="rate_limit", endpoint="refills", retry_after_date_in_s=120)
    with pytest.raises(VendorUnavailable) as raised:
        adapter.items(practice, "2001", REFILL_REQUEST)
    assert 115.0 <= raised.value.retry_after_s <= 121.0
    sim.fault(fault="rate_limit", endpoint="token")
    with pytest.raises(VendorUnavailable) as raised:
        adapter.counts(practice, "2002")
    assert raised.value.retry_after_s == 10.0  # DoseSpot's guide: wait 10 seconds


def test_503_with_retry_after_and_500_without(adapter, practice, sim):
    sim.fault(fault="status", status=503, retry_after="3", endpoint="counts")
    with pytest.raises(VendorUnavailable) as raised:
        adapter.counts(practice, "2001")
    assert raised.value.retry_after_s == 3.0
    sim.fault(fault="status", status=500, endpoint="errors")
    with pytest.raises(VendorUnavailable) as raised:
        adapter.items(practice, "2001", TRANSACTION_ERROR)
    assert raised.value.retry_after_s is None and not isinstance(raised.value, VendorMalformed)
    assert adapter.counts(practice, "2001") == DEMO["2001"]


def test_a_timeout_is_unavailable_and_a_slow_answer_is_waited_for(adapter, practice, sim):
    adapter.counts(practice, "2001")
    sim.fault(fault="timeout", endpoint="counts", delay_s=10)
    started = time.monotonic()
    with pytest.raises(VendorUnavailable, match="timed out"):
        adapter.counts(practice, "2001")
    assert time.monotonic() - started < 5
    sim.control("DELETE", "faults")  # frees the held request
    sim.fault(fault="slow", endpoint="counts", delay_s=0.3)
    assert adapter.counts(practice, "2001") == DEMO["2001"]


def test_an_expired_token_is_replaced_once_without_the_caller_noticing(adapter, practice, sim):
    adapter.counts(practice, "2001")
    sim.control("DELETE", "calls")
    sim.fault(fault="expired_token", endpoint="counts")
    assert adapter.counts(practice, "2001") == DEMO["2001"]
    assert sim.calls() == {"token": {"2001": 1}, "counts": {"2001": 2}}
    sim.control("DELETE", "calls")
    assert adapter.counts(practice, "2001") == DEMO["2001"]  # the new token is kept
    assert sim.calls() == {"counts": {"2001": 1}}


def test_a_token_refused_after_renewal_is_a_rejection(adapter, practice, sim, clock):
    adapter.counts(practice, "2001")
    sim.fault(fault="expired_token", endpoint="counts", times=2)
    with pytest.raises(VendorRejected):
        adapter.counts(practice, "2001")
    assert breaker(adapter, practice).consecutive_failures == 0  # the vendor is up; it said no
    assert adapter.counts(practice, "2001") == DEMO["2001"]


def test_wrong_credentials_are_rejected(adapter, practice, sim):
    wrong_key = PracticeCredentials(**{**practice.__dict__, "clinic_key": "not-the-key"})
    with pytest.raises(VendorRejected):
        adapter.counts(wrong_key, "2001")
    with pytest.raises(VendorRejected):
        adapter.counts(practice, "9999")  # no such clinician at the clinic
    without_subscription = DoseSpotAdapter(read_timeout_s=2.0)
    try:
        with pytest.raises(VendorRejected):
            without_subscription.counts(practice, "2001")
    finally:
        without_subscription.close()


@pytest.mark.parametrize(
    ("endpoint", "shape", "kind"),
    [
        ("counts", "invalid_json", None),
        ("counts", "wrong_shape", None),
        ("counts", "html", None),
        ("token", "wrong_shape", None),
        ("token", "invalid_json", None),
        ("refills", "wrong_shape", REFILL_REQUEST),
        ("refills", "invalid_json", REFILL_REQUEST),
        ("errors", "wrong_shape", TRANSACTION_ERROR),
        ("pending", "wrong_shape", PENDING_PRESCRIPTION),
        ("patient", "wrong_shape", TRANSACTION_ERROR),
        ("prescription", "wrong_shape", TRANSACTION_ERROR),
    ],
)
def test_an_unreadable_answer_is_malformed(adapter, practice, sim, endpoint, shape, kind):
    sim.fault(fault="malformed", endpoint=endpoint, shape=shape)
    with pytest.raises(VendorMalformed):
        if kind is None:
            adapter.counts(practice, "2001")
        else:
            adapter.items(practice, "2001", kind)
    assert sim.control("GET", "faults")["faults"] == []  # the fault was met
    assert adapter.counts(practice, "2001") == DEMO["2001"]


def test_repeated_failures_open_the_circuit_until_the_cooldown_then_it_recovers(adapter, practice, sim, clock):
    adapter.counts(practice, "2001")
    sim.fault(fault="status", status=500, endpoint="counts", times=3)
    for _ in range(3):
        with pytest.raises(VendorUnavailable):
            adapter.counts(practice, "2001")
    assert breaker(adapter, practice).state is CircuitState.OPEN
    sim.control("DELETE", "calls")

    with pytest.raises(CircuitOpen) as raised:
        adapter.counts(practice, "2002")
    assert raised.value.retry_after_s == pytest.approx(30.0)
    with pytest.raises(CircuitOpen):
        adapter.items(practice, "2001", REFILL_REQUEST)
    assert sim.calls() == {}  # failing fast: the vendor was not asked

    clock.advance(30)
    sim.fault(fault="status", status=503, endpoint="counts")
    with pytest.raises(VendorUnavailable):  # the half-open trial fails: open again
        adapter.counts(practice, "2001")
    assert breaker(adapter, practice).state is CircuitState.OPEN
    with pytest.raises(CircuitOpen):
        adapter.counts(practice, "2001")

    clock.advance(30)
    assert adapter.counts(practice, "2001") == DEMO["2001"]  # the trial succeeds: closed
    assert breaker(adapter, practice).state is CircuitState.CLOSED
    assert adapter.counts(practice, "2002") == DEMO["2002"]


def test_an_unreachable_vendor_is_unavailable(adapter, practice):
    closed = PracticeCredentials(**{**practice.__dict__, "base_url": f"http://127.0.0.1:{free_port()}/webapi/v2"})
    with pytest.raises(VendorUnavailable, match="connection failed"):
        adapter.counts(closed, "2001")
    assert breaker(adapter, practice).state is CircuitState.CLOSED  # another API root's breaker


def test_unknown_vendors_and_kinds_are_refused(adapter, practice):
    with pytest.raises(ValueError):
        adapter_for("surescripts-direct")
    with pytest.raises(ValueError):
        adapter.items(practice, "2001", "rx_change")


def test_no_secret_or_patient_reaches_the_logs(adapter, practice, sim, caplog, simulator_process):
    caplog.set_level(logging.DEBUG)
    sim.fault(fault="expired_token", endpoint="counts")
    sim.fault(fault="status", status=500, endpoint="refills")
    adapter.counts(practice, "2002")
    with pytest.raises(VendorUnavailable):
        adapter.items(practice, "2002", REFILL_REQUEST)
    items = adapter.items(practice, "2002", TRANSACTION_ERROR)
    link = adapter.sso(practice, "2002", SSO_NOTIFICATIONS)
    secrets = [CLINIC_KEY, SUBSCRIPTION_KEY, link.url.split("SingleSignOnCode=")[1][:40]]
    secrets += [item.patient_name for item in items] + [item.medication for item in items]
    text = "\n".join(record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records)
    assert caplog.records  # the adapter did log (routes, statuses)
    for secret in secrets:
        assert secret not in text
