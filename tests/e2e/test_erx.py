"""eRx Notifications end to end: the whole stack as `make run` starts it (directory, inbox, erx-bridge,
the gateway) with the eRx vendor simulator as the vendor, through the gateway as staff see it.

Riverbend subscribes to ePrescribing (clinic 1001 at the simulator); Dr. Reyes, Dr. Chen and
NP Brooks are its prescribers, clinician ids 2001, 2002 and 2003. The stack runs no scheduled sync
(ERX_SYNC_INTERVAL_S=0): every sync here is one a test asked for, so the simulator's call counters
show exactly what a sync cost.
"""

from __future__ import annotations

import csv
import io
import urllib.parse

import pytest
import requests

from services.erx_bridge import domain
from services.inbox.delivery_rules import notice_id
from services.kit.bus import Publisher, Topology
from services.kit.bus.signing import development_keyring
from services.kit.patient_ref import erx_system, is_patient_ref, patient_ref, read_keys
from services.kit.settings import Env
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
REYES, CHEN = "2001", "2002"
REFILL, PENDING, ERROR = "refill_request", "pending_prescription", "transaction_error"
TITLE_KIND = {"Refill request": REFILL, "Awaiting your signature": PENDING, "Prescription not sent": ERROR}
SYNC_S = 60


@pytest.fixture(scope="module")
def brooks(login):
    return login("np.brooks")


@pytest.fixture(scope="module")
def ramirez(login):
    """Lakeside's prescriber: flagged for ePrescribing, but Lakeside does not subscribe."""
    return login("dr.ramirez")


@pytest.fixture(scope="module")
def erx_patient_ref(stack):
    """The reference audit records name a Riverbend patient of the vendor by: the stack's
    PATIENT_REF_KEY (its run folder), in the vendor's id space (erx:dosespot)."""
    key = read_keys(Env("e2e", {"CLINIC_RUN_DIR": str(stack.run_dir)})).current
    return lambda vendor_patient_id: patient_ref(RIVERBEND, erx_system("dosespot"), str(vendor_patient_id), key=key)


def names_the_patient_by_reference_only(event, vendor_patient_id, erx_patient_ref) -> bool:
    """The event's patient is the reference of the vendor's patient id, which is no value of the event."""
    values = [value for _, value in event.payload.ListFields() if isinstance(value, str)]
    return (
        is_patient_ref(event.payload.patient_id)
        and event.payload.patient_id == erx_patient_ref(vendor_patient_id)
        and str(vendor_patient_id) not in values
    )


@pytest.fixture(autouse=True)
def no_faults_left(erx_simulator):
    erx_simulator.clear_faults()
    yield
    erx_simulator.clear_faults()


def start_sync(client, **body):
    reply = client.post("/api/v1/erx/sync", json=body) if body else client.post("/api/v1/erx/sync")
    assert reply.status_code == 202, reply.text
    assert reply.json()["status"] == "running" and reply.json()["sync_id"].startswith("sync_")
    return reply.json()["sync_id"]


def progress(client, sync_id: str) -> dict:
    reply = client.get(f"/api/v1/erx/sync/{sync_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def run_sync(client, **body) -> dict:
    """A sync asked for by `client`, once it finished."""
    sync_id = start_sync(client, **body)
    return wait_until(
        lambda: (p := progress(client, sync_id))["status"] != "running" and p,
        timeout=SYNC_S,
        interval=0.2,
        message=f"sync {sync_id} to finish",
    )


def erx_items(client) -> list[dict]:
    return client.items(folder="erx", limit=100)["items"]


def board_item(client, vendor_item_id: str) -> dict | None:
    """The client's board item of one vendor item (inbox keeps one per erx-bridge item id)."""
    ref = notice_id(RIVERBEND, "erx", domain.item_id(RIVERBEND, "dosespot", vendor_item_id))
    found = [item for item in erx_items(client) if item["ref_id"] == ref]
    assert len(found) <= 1, found
    return found[0] if found else None


def open_by_kind(client) -> dict[str, int]:
    """Open items erx-bridge synced, by kind (other tests deliver eRx items of their own through the
    delivery API; those carry none of erx-bridge's titles)."""
    counts = {REFILL: 0, PENDING: 0, ERROR: 0}
    for item in erx_items(client):
        kind = TITLE_KIND.get(item["title"].split(": ", 1)[0]) if ": " in item["title"] else None
        if kind and not item.get("resolved_at"):
            counts[kind] += 1
    return counts


def settled(client, erx_simulator, clinician: str) -> dict[str, int]:
    """Wait until the board shows as many open items of each kind as the vendor holds."""
    wanted = erx_simulator.counts(clinician)
    return wait_until(lambda: (found := open_by_kind(client)) == wanted and found, timeout=30, message=f"{wanted}")


# --- sync ------------------------------------------------------------------------------------------
def test_a_sync_puts_the_prescribers_items_on_their_board_and_nobody_elses(reyes, chen, erx_simulator):
    held = erx_simulator.counts(REYES)
    assert sum(held.values()) > 0  # the simulator's demo data

    done = run_sync(reyes)

    assert done["status"] == "done" and done["errors"] == []
    assert (done["prescribers_total"], done["prescribers_done"]) == (1, 1)
    assert done["scope"] == "self" and done["started_at"] and done["finished_at"]
    assert settled(reyes, erx_simulator, REYES) == held
    items = erx_items(reyes)
    assert all(item["sender"]["name"] == "eRx" and item["folder"] == "erx" for item in items)
    errors = [i for i in items if i["title"].startswith("Prescription not sent: ")]
    assert errors and all(i["severity"] == "abnormal" and i["status"] == "error" for i in errors)
    refills = [i for i in items if i["title"].startswith("Refill request: ")]
    assert all(i["severity"] == "info" and i["summary"].startswith("Client ") for i in refills)
    assert all(" · requested 20" in i["summary"] for i in refills)
    # The reading pane's link is the one the page turns into single sign-on.
    pane = reyes.get(f"/api/v1/board/items/{refills[0]['id']}").json()
    [link] = pane["links"]
    assert link["label"] == "Open in ePrescribing"
    assert link["url"].startswith(f"{reyes.base_url}/api/v1/erx/sso/patient/erx_")
    # Chen's board has none of Reyes's items.
    mine = {i["ref_id"] for i in items}
    assert not mine & {i["ref_id"] for i in erx_items(chen)}


def test_a_second_sync_with_nothing_changed_asks_the_vendor_once_and_changes_nothing(reyes, erx_simulator):
    run_sync(reyes)
    settled(reyes, erx_simulator, REYES)
    before = erx_items(reyes)
    unread = reyes.counts("erx")
    erx_simulator.clear_calls()

    done = run_sync(reyes)

    assert (done["added"], done["updated"], done["resolved"], done["errors"]) == (0, 0, 0, [])
    assert erx_simulator.calls() == {"counts": {REYES: 1}}
    assert erx_items(reyes) == before and reyes.counts("erx") == unread


def test_an_item_resolved_at_the_vendor_is_resolved_on_the_board_within_one_sync(reyes, erx_simulator):
    run_sync(reyes)
    [new] = erx_simulator.add(REYES, REFILL, patient_name="Juniper Oakhurst", medication="Buspirone 10 mg tablet")
    assert run_sync(reyes)["added"] == 1
    item = wait_until(lambda: board_item(reyes, new["vendor_item_id"]), message="the new refill request")
    assert item["title"] == "Refill request: Buspirone 10 mg tablet" and not item["read"]
    assert item["summary"].startswith("Client Juniper Oakhurst")
    unread, total = reyes.counts("erx")

    erx_simulator.resolve(new["vendor_item_id"])
    done = run_sync(reyes)

    assert (done["added"], done["updated"], done["resolved"]) == (0, 0, 1)
    resolved = wait_until(
        lambda: (i := board_item(reyes, new["vendor_item_id"])) and i.get("resolved_at") and i,
        message="the refill request resolved",
    )
    assert resolved["read"] and resolved["status"] == "resolved" and resolved["id"] == item["id"]
    assert reyes.counts("erx") == (unread - 1, total)  # kept on the board, out of the unread count


def test_repeated_syncs_and_redelivered_events_never_duplicate_an_item(stack, reyes, erx_simulator, events):
    run_sync(reyes)
    with events.listen("board_item.delivery_requested.v1") as heard:
        [new] = erx_simulator.add(REYES, PENDING, medication="Escitalopram 10 mg tablet")
        assert run_sync(reyes)["added"] == 1
        iid = domain.item_id(RIVERBEND, "dosespot", new["vendor_item_id"])
        event = heard.wait_for(lambda e: e.payload.source_ref == iid, timeout=15)
    assert event.envelope.event_id == f"{iid}-v1" and event.envelope.producer == "erx-bridge"
    item = wait_until(lambda: board_item(reyes, new["vendor_item_id"]), message="the pending prescription")
    for _ in range(3):
        assert run_sync(reyes)["added"] == 0
    counts = reyes.counts("erx")

    publisher = Publisher(stack.config.amqp_url, Topology(), signer=development_keyring(stack.run_dir).signer)
    try:
        publisher.publish([event.envelope, event.envelope])  # the relay published it again, twice
    finally:
        publisher.close()
    [marker] = erx_simulator.add(REYES, REFILL, medication="Hydroxyzine 25 mg capsule")
    run_sync(reyes)
    wait_until(lambda: board_item(reyes, marker["vendor_item_id"]), message="the later item")  # after the repeats

    assert board_item(reyes, new["vendor_item_id"])["id"] == item["id"]  # still one item
    assert reyes.counts("erx") == (counts[0] + 1, counts[1] + 1)  # only the marker added
    assert settled(reyes, erx_simulator, REYES)


# --- the vendor misbehaving ------------------------------------------------------------------------
FAULTS = {
    "slow": {"fault": "slow", "delay_s": 1.0, "endpoint": "counts"},
    "timeout": {"fault": "timeout", "delay_s": 5.0, "endpoint": "refills"},
    "429 with Retry-After": {"fault": "rate_limit", "retry_after": "1", "endpoint": "counts"},
    "5xx": {"fault": "status", "status": 503, "endpoint": "refills"},
    "expired token": {"fault": "expired_token", "endpoint": "pending"},
    "malformed JSON": {"fault": "malformed", "shape": "invalid_json", "endpoint": "refills"},
    "wrong shape": {"fault": "malformed", "shape": "wrong_shape", "endpoint": "counts"},
    "HTML page": {"fault": "malformed", "shape": "html", "endpoint": "pending"},
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_vendor_fault_loses_and_doubles_nothing(chen, erx_simulator, fault):
    [pending] = erx_simulator.add(CHEN, PENDING, medication="Bupropion XL 150 mg tablet")
    run_sync(chen)
    settled(chen, erx_simulator, CHEN)
    # Two changes at the vendor: a new refill request, and the pending prescription sent (gone).
    [new] = erx_simulator.add(CHEN, REFILL, medication="Amlodipine 5 mg tablet")
    erx_simulator.resolve(pending["vendor_item_id"])
    erx_simulator.fault(clinician=CHEN, times=1, **fault)

    done = run_sync(chen)

    assert done["status"] == "done" and done["errors"] == [], done
    assert (done["added"], done["updated"], done["resolved"]) == (1, 0, 1)
    assert erx_simulator.state()["faults"] == []  # the fault was met
    item = wait_until(lambda: board_item(chen, new["vendor_item_id"]), message="the new refill request")
    assert not item.get("resolved_at")
    wait_until(
        lambda: (i := board_item(chen, pending["vendor_item_id"])) and i.get("resolved_at"),
        message="the sent prescription resolved",
    )
    assert settled(chen, erx_simulator, CHEN)


def test_a_vendor_down_for_the_whole_sync_changes_nothing_and_the_next_sync_catches_up(chen, erx_simulator):
    run_sync(chen)
    settled(chen, erx_simulator, CHEN)
    before = {i["id"]: (i.get("resolved_at"), i["title"]) for i in erx_items(chen)}
    [new] = erx_simulator.add(CHEN, REFILL, medication="Lisinopril 10 mg tablet")
    erx_simulator.fault(fault="status", status=503, endpoint="refills", clinician=CHEN, times=3)

    failed = run_sync(chen)

    assert failed["status"] == "failed" and failed["added"] == 0
    assert [(e["code"], e["staff_id"]) for e in failed["errors"]] == [("vendor_unavailable", chen.staff_id)]
    assert "503" in failed["errors"][0]["message"]
    assert {i["id"]: (i.get("resolved_at"), i["title"]) for i in erx_items(chen)} == before

    done = run_sync(chen)
    assert done["status"] == "done" and done["added"] == 1
    wait_until(lambda: board_item(chen, new["vendor_item_id"]), message="the refill request after the outage")


# --- who may ---------------------------------------------------------------------------------------
def test_staff_without_eprescribing_are_refused(kim, ramirez, outsider):
    for client in (kim, ramirez):
        for reply in (
            client.post("/api/v1/erx/sync"),
            client.post("/api/v1/erx/sso", json={"context": "home"}),
            client.get("/api/v1/erx/reports/pending-rx"),
        ):
            assert reply.status_code == 403 and reply.json()["code"] == "erx_not_enabled", reply.text
    # Lakeside's admin: Lakeside does not subscribe.
    reply = outsider.post("/api/v1/erx/sync", json={"scope": "agency"})
    assert reply.status_code == 403 and reply.json()["code"] == "erx_not_enabled"


def test_syncs_are_seen_by_who_asked_and_by_the_agencys_admins_only(reyes, chen, admin, outsider):
    sync_id = start_sync(reyes)
    assert chen.get(f"/api/v1/erx/sync/{sync_id}").json()["code"] == "sync_not_found"
    assert chen.get(f"/api/v1/erx/sync/{sync_id}").status_code == 404
    assert outsider.get(f"/api/v1/erx/sync/{sync_id}").status_code in (403, 404)
    assert admin.get(f"/api/v1/erx/sync/{sync_id}").status_code == 200
    assert reyes.get("/api/v1/erx/sync/sync_unknown").status_code == 404
    assert requests.get(f"{reyes.base_url}/api/v1/erx/sync/{sync_id}", timeout=10).status_code == 401  # no token


def test_an_admin_syncs_the_whole_agency(admin, reyes, erx_simulator):
    assert reyes.post("/api/v1/erx/sync", json={"scope": "agency"}).json()["code"] == "admin_only"
    assert admin.post("/api/v1/erx/sync").json()["code"] == "erx_not_enabled"  # the admin prescribes nothing

    done = run_sync(admin, scope="agency")

    assert done["status"] == "done" and done["scope"] == "agency", done
    assert (done["prescribers_total"], done["prescribers_done"]) == (3, 3)


def test_bad_requests_are_refused_before_anything_runs(reyes):
    cases = [
        ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, "malformed_json"),
        ({"json": {"scope": {"$ne": ""}}}, "invalid_type"),
        ({"json": {"scope": "everyone"}}, "invalid_value"),
        ({"json": {"full": "yes"}}, "invalid_type"),
        ({"json": {"agency_id": "agy_lakeside"}}, "unknown_field"),
        ({"json": ["scope", "agency"]}, "invalid_body"),
    ]
    for kwargs, code in cases:
        reply = reyes.post("/api/v1/erx/sync", **kwargs)
        assert reply.status_code == 400 and reply.json()["code"] == code, (kwargs, reply.text)
    for body, code in [
        ({"context": "chart"}, "invalid_value"),
        ({"context": "patient"}, "invalid_value"),
        ({"context": "patient", "patient_id": {"$gt": ""}}, "invalid_type"),
        ({"context": "home", "patient_id": "50001"}, "invalid_value"),
        ({}, "missing_field"),
    ]:
        reply = reyes.post("/api/v1/erx/sso", json=body)
        assert reply.status_code == 400 and reply.json()["code"] == code, (body, reply.text)
    assert reyes.get("/api/v1/erx/reports/pending-rx?format=xlsx").json()["code"] == "invalid_query"


# --- single sign-on --------------------------------------------------------------------------------
def sso_query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def test_single_sign_on_is_for_the_caller_and_the_vendor_accepts_it(stack, reyes, erx_simulator):
    reply = reyes.post("/api/v1/erx/sso", json={"context": "home"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    body = reply.json()
    assert set(body) == {"url", "expires_at"}
    query = sso_query(body["url"])
    assert body["url"].startswith(f"{stack.erx_simulator_url}/LoginSingleSignOn.aspx?")
    assert query["SingleSignOnClinicId"] == "1001" and query["SingleSignOnUserId"] == REYES
    assert query["SingleSignOnCode"] and query["SingleSignOnUserIdVerify"] and "PatientId" not in query
    opened = requests.get(body["url"], timeout=10)
    assert opened.status_code == 200 and "Clinician 2001 is signed in" in opened.text
    assert requests.get(body["url"], timeout=10).status_code == 403  # an address works once

    notifications = sso_query(reyes.post("/api/v1/erx/sso", json={"context": "notifications"}).json()["url"])
    assert notifications["RefillsErrors"] == "1"


def test_single_sign_on_to_the_patient_of_ones_own_item(reyes, chen, erx_db, erx_simulator, events, erx_patient_ref):
    run_sync(reyes)
    doc = erx_db.erx_items.find_one({"open_key": {"$eq": f"{RIVERBEND}|{reyes.staff_id}|{REFILL}"}})
    assert doc is not None

    with events.listen("phi.accessed.v1") as heard:
        reply = reyes.post("/api/v1/erx/sso", json={"context": "patient", "item_id": doc["_id"]})
        assert reply.status_code == 200, reply.text
        query = sso_query(reply.json()["url"])
        seen = heard.wait_for(lambda e: e.payload.resource_id == doc["_id"] and e.payload.action == "sso")
        assert names_the_patient_by_reference_only(seen, query["PatientId"], erx_patient_ref)
    assert query["SingleSignOnUserId"] == REYES and query["PatientId"].isdigit()
    opened = requests.get(reply.json()["url"], timeout=10)
    assert opened.status_code == 200 and f"patient {query['PatientId']}" in opened.text
    # The board item's link itself, posted (what the page may do instead).
    via_link = reyes.post(f"/api/v1/erx/sso/patient/{doc['_id']}")
    assert via_link.status_code == 200 and sso_query(via_link.json()["url"])["PatientId"] == query["PatientId"]
    assert reyes.get(f"/api/v1/erx/sso/patient/{doc['_id']}").status_code == 405  # following it is not enough
    # Nobody else's item: Chen gets 404 for Reyes's.
    refused = chen.post("/api/v1/erx/sso", json={"context": "patient", "item_id": doc["_id"]})
    assert refused.status_code == 404 and refused.json()["code"] == "erx_item_not_found"


def test_single_sign_on_to_a_patient_by_the_vendors_id_records_the_reference_only(
    reyes, erx_simulator, events, erx_patient_ref
):
    [added] = erx_simulator.add(REYES, REFILL)
    vendor_patient = str(added["patient_id"])
    with events.listen("phi.accessed.v1") as heard:
        reply = reyes.post("/api/v1/erx/sso", json={"context": "patient", "patient_id": vendor_patient})
        assert reply.status_code == 200, reply.text
        assert sso_query(reply.json()["url"])["PatientId"] == vendor_patient
        seen = heard.wait_for(lambda e: e.payload.resource_type == "erx_patient" and e.payload.action == "sso")
    assert names_the_patient_by_reference_only(seen, vendor_patient, erx_patient_ref)
    assert seen.payload.resource_id == seen.payload.patient_id  # the patient asked for is the resource


# --- the Pending Rx report -------------------------------------------------------------------------
def test_the_pending_rx_report_as_csv_and_json_is_audited(reyes, admin, erx_simulator, events, erx_patient_ref):
    [added] = erx_simulator.add(REYES, PENDING)
    added_item = domain.item_id(RIVERBEND, "dosespot", added["vendor_item_id"])
    run_sync(reyes)
    held = settled(reyes, erx_simulator, REYES)
    with events.listen("phi.accessed.v1") as heard:
        reply = reyes.get("/api/v1/erx/reports/pending-rx?format=csv")
        assert reply.status_code == 200, reply.text
        assert reply.headers["Content-Type"].startswith("text/csv")
        assert reply.headers["Cache-Control"] == "no-store"
        assert "attachment" in reply.headers["Content-Disposition"]
        rows = list(csv.reader(io.StringIO(reply.text)))
        assert rows[0] == ["Type", "Prescriber", "Client", "Medication", "Pharmacy", "Date", "Detail", "Item ID"]
        body = rows[1:]
        assert len(body) == held[PENDING] + held[ERROR]
        assert {r[0] for r in body} == {"Pending prescription", "Transaction error"}
        assert {r[1] for r in body} == {"Dr. Elena Reyes"}
        assert all(r[7].startswith("erx_") and r[2] and r[3] for r in body)
        seen = heard.wait_for(lambda e: e.payload.resource_id == body[0][7], timeout=15)
        assert seen.payload.actor_id == reyes.staff_id and seen.payload.action == "report"
        assert seen.payload.resource_type == "erx_item" and seen.payload.service == "erx-bridge"
        assert is_patient_ref(seen.payload.patient_id)  # the item's patient, by reference
        # The row added above: its patient is the reference of the vendor's id, never the id itself.
        row = heard.wait_for(lambda e: e.payload.resource_id == added_item and e.payload.action == "report")
        assert names_the_patient_by_reference_only(row, added["patient_id"], erx_patient_ref)

    report = reyes.get("/api/v1/erx/reports/pending-rx").json()
    assert report["count"] == len(body) and report["scope"] == "self" and not report["truncated"]
    assert {i["kind"] for i in report["items"]} == {PENDING, ERROR}
    assert reyes.get("/api/v1/erx/reports/pending-rx?scope=agency").json()["code"] == "admin_only"

    agency = admin.get("/api/v1/erx/reports/pending-rx?scope=agency").json()
    assert agency["scope"] == "agency" and agency["count"] >= report["count"]
    assert {i["item_id"] for i in report["items"]} <= {i["item_id"] for i in agency["items"]}


def test_a_report_cell_a_spreadsheet_would_run_is_written_as_text(brooks, erx_simulator):
    [hostile] = erx_simulator.add("2003", PENDING, medication='=HYPERLINK("http://evil.example","x")')
    assert run_sync(brooks)["added"] >= 1
    rows = list(csv.reader(io.StringIO(brooks.get("/api/v1/erx/reports/pending-rx?format=csv").text)))
    iid = domain.item_id(RIVERBEND, "dosespot", hostile["vendor_item_id"])
    [row] = [r for r in rows if r[7] == iid]
    assert row[3] == '\'=HYPERLINK("http://evil.example","x")'
    assert row[1] == "Taylor Brooks, PMHNP"


def test_no_patient_data_or_sign_on_address_reaches_the_logs(stack, reyes, erx_simulator):
    run_sync(reyes)
    reyes.post("/api/v1/erx/sso", json={"context": "home"})
    log = (stack.logs / "erx-bridge.log").read_text()
    assert "SingleSignOn" not in log and "dev-clinic-key" not in log
    for name in ("Quillfeather", "Marrowby", "Tennick", "Ashgrove", "Oakhurst", "Sertraline", "Buspirone"):
        assert name not in log
