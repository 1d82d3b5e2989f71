"""The eRx sync engine against the real embedded database: what reaches the outbox for each change at
the vendor, what one sync asks the vendor, and how failures leave the items.

The service is assembled by its own `build()`, with a stand-in vendor (`Vendor`, an in-memory
adapter with call counters and injectable failures) and a stand-in directory: the end-to-end tests
(tests/e2e/test_erx.py) run the real ones, the DoseSpot adapter and the vendor simulator.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field, replace

import bson
import pytest

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.erx_bridge import config, domain
from services.erx_bridge.directory_client import AgencyErx, Prescriber
from services.erx_bridge.service import ErxBridge, build
from services.erx_bridge.vendors.base import (
    PENDING_PRESCRIPTION,
    REFILL_REQUEST,
    TRANSACTION_ERROR,
    Counts,
    SsoLink,
    VendorItem,
    VendorMalformed,
    VendorRejected,
    VendorUnavailable,
)
from services.kit.auth import Identity, current_identity
from services.kit.events import unpack
from services.kit.mongo import database
from services.kit.service_identity import acting_as
from tests.waits import wait_until

AGENCY = "agy_riverbend"
OTHER = "agy_lakeside"
PRACTICE = {"vendor": "dosespot", "base_url": "https://vendor.example/webapi/v2", "clinic_id": "1001",
            "clinic_key": "k"}



# --- stand-ins ------------------------------------------------------------------------------------
class Vendor:
    """An in-memory vendor: clinician id -> {vendor item id: VendorItem}; counts every call and
    raises the failures queued with `fail(method, exc, times)` (method "counts" or a kind)."""

    name = "dosespot"

    def __init__(self):
        self.open: dict[str, dict[str, VendorItem]] = {}
        self.calls: Counter[str] = Counter()
        self.faults: list[list] = []
        self.gate: threading.Event | None = None  # when set, calls wait for it
        self.lock = threading.Lock()

    def add(self, clinician: str, kind: str, n: int, **fields) -> VendorItem:
        item = VendorItem(
            vendor_item_id=fields.pop("vendor_item_id", f"{kind}:{clinician}:{n}"),
            kind=kind,
            patient_id=fields.pop("patient_id", f"{500 + n}"),
            patient_name=fields.pop("patient_name", f"Avery Test{n}"),
            medication=fields.pop("medication", f"Sertraline {n} mg tablet"),
            pharmacy=fields.pop("pharmacy", "Main Street Pharmacy"),
            requested_at=fields.pop("requested_at", dt.datetime(2026, 3, 5, 15, 30, tzinfo=dt.UTC)),
            detail=fields.pop("detail", ""),
        )
        self.open.setdefault(clinician, {})[item.vendor_item_id] = item
        return item

    def remove(self, clinician: str, vendor_item_id: str) -> None:
        del self.open[clinician][vendor_item_id]

    def change(self, clinician: str, vendor_item_id: str, **fields) -> None:
        self.open[clinician][vendor_item_id] = replace(self.open[clinician][vendor_item_id], **fields)

    def fail(self, method: str, exc: Exception, times: int = 1) -> None:
        self.faults.append([method, exc, times])

    def _enter(self, method: str) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.calls[method] += 1
            for fault in self.faults:
                if fault[0] == method and fault[2] > 0:
                    fault[2] -= 1
                    raise fault[1]

    def counts(self, practice, clinician_id: str) -> Counts:
        self._enter("counts")
        mine = self.open.get(clinician_id, {}).values()
        count = Counter(i.kind for i in mine)
        return Counts(count[REFILL_REQUEST], count[TRANSACTION_ERROR], count[PENDING_PRESCRIPTION])

    def items(self, practice, clinician_id: str, kind: str) -> list[VendorItem]:
        self._enter(kind)
        return [i for i in self.open.get(clinician_id, {}).values() if i.kind == kind]

    def sso(self, practice, clinician_id: str, context: str, patient_id: str = "") -> SsoLink:
        url = f"https://vendor.example/sso?user={clinician_id}&context={context}&patient={patient_id}"
        return SsoLink(url=url, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))


@dataclass
class Directory:
    """directory's answers for the agencies of one test; every call must carry an identity of the agency."""

    staff: dict[str, Prescriber] = field(default_factory=dict)
    subscribed: dict[str, bool] = field(default_factory=lambda: {AGENCY: True})
    clinic_ids: dict[str, str] = field(default_factory=lambda: {AGENCY: "1001"})
    calls: Counter = field(default_factory=Counter)

    def _agency(self, agency_id: str) -> None:
        identity = current_identity.get()
        assert identity is not None and identity.agency_id == agency_id, "directory asked without the agency's identity"

    def agency(self, agency_id: str) -> AgencyErx:
        self._agency(agency_id)
        self.calls["agency"] += 1
        return AgencyErx(
            agency_id=agency_id,
            subscribed=self.subscribed.get(agency_id, False),
            vendor="dosespot" if self.subscribed.get(agency_id) else "",
            clinic_id=self.clinic_ids.get(agency_id, ""),
            time_zone="America/Chicago",
            patient_word="Client",
        )

    def member(self, agency_id: str, staff_id: str) -> Prescriber | None:
        self._agency(agency_id)
        found = self.staff.get(staff_id)
        return found if found is not None and found.agency_id == agency_id else None

    def prescribers(self, agency_id: str) -> list[Prescriber]:
        self._agency(agency_id)
        self.calls["prescribers"] += 1
        return sorted((p for p in self.staff.values() if p.agency_id == agency_id), key=lambda p: p.staff_id)

    def add(self, staff_id: str, clinician_id: str, agency_id: str = AGENCY) -> Prescriber:
        self.staff[staff_id] = Prescriber(agency_id, staff_id, clinician_id, display_name=f"Dr. {staff_id}")
        return self.staff[staff_id]


class ServiceIdentities:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:erx-bridge", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


def settings_for(tmp_path, **overrides: str) -> config.ErxBridgeSettings:
    environ = {
        "CLINIC_RUN_DIR": str(tmp_path),
        "MONGO_URI": "mongodb://unused:1",
        "PHI_MASTER_KEYS": "m:" + base64.b64encode(os.urandom(32)).decode(),
        "AMQP_URL": "amqp://unused/",
        "ERX_PRACTICES": json.dumps({AGENCY: PRACTICE}),
        "ERX_SYNC_INTERVAL_S": "0",
        "ERX_FULL_CHECK_EVERY": "3",
        "ERX_LEASE_WAIT_S": "0",
        **overrides,
    }
    return config.load(environ)


@dataclass
class Rig:
    bridge: ErxBridge
    vendor: Vendor
    directory: Directory
    waits: list = field(default_factory=list)

    @property
    def items(self):
        return self.bridge.store.items

    def target(self, agency_id: str = AGENCY, **options):
        with acting_as(ServiceIdentities().identity(agency_id)):
            return self.bridge.runner.target(agency_id, **options)

    def sync(self, prescriber: Prescriber, **options):
        return self.bridge.engine.sync_prescriber(self.target(prescriber.agency_id, **options), prescriber)

    def docs(self) -> dict[str, dict]:
        return {doc["_id"]: doc for doc in self.items.find({})}


def make_rig(mongo_uri: str, db_name: str, tmp_path, **overrides: str) -> Rig:
    vendor, directory = Vendor(), Directory()
    bridge = build(
        settings_for(tmp_path, **overrides),
        database(mongo_uri, db_name),
        directory=directory,
        service_tokens=ServiceIdentities(),
        adapter=vendor,
    )
    rig = Rig(bridge, vendor, directory)

    def no_wait(attempt: int, retry_after_s: float | None) -> float:
        rig.waits.append((attempt, retry_after_s))
        return 0.01

    bridge.engine.backoff = no_wait
    return rig


@pytest.fixture
def rig(mongo_uri, db_name, tmp_path):
    made = make_rig(mongo_uri, db_name, tmp_path)
    yield made
    made.bridge.close()


def staged(doc: dict) -> list[tuple[str, Envelope, inbox_pb2.DeliverItemRequest]]:
    """(event id, envelope, request) of each delivery the item's document holds in its outbox."""
    found = []
    for event_id, entry in (doc.get("_outbox") or {}).items():
        envelope = Envelope()
        envelope.ParseFromString(entry["env"])
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)  # opens the sealed payload
        found.append((event_id, envelope, request))
    return sorted(found, key=lambda f: f[2].source_version)


def latest(doc: dict) -> inbox_pb2.DeliverItemRequest:
    return staged(doc)[-1][2]


# --- the first sync ---------------------------------------------------------------------------------
def test_first_sync_stores_each_item_sealed_with_its_delivery_in_the_same_document(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1, patient_name="Briar Quillfeather", medication="Sertraline 50 mg tablet")
    rig.vendor.add("2001", PENDING_PRESCRIPTION, 2)
    rig.vendor.add("2001", TRANSACTION_ERROR, 3, detail="Pharmacy rejected the message")

    outcome = rig.sync(reyes)

    assert (outcome.added, outcome.updated, outcome.resolved, outcome.error) == (3, 0, 0, None)
    assert rig.vendor.calls == Counter({"counts": 1, REFILL_REQUEST: 1, PENDING_PRESCRIPTION: 1, TRANSACTION_ERROR: 1})
    docs = rig.docs()
    assert len(docs) == 3
    refill_id = domain.item_id(AGENCY, "dosespot", f"{REFILL_REQUEST}:2001:1")
    doc = docs[refill_id]
    assert doc["state"] == "open" and doc["version"] == 1 and doc["staff_id"] == "stf_reyes"
    # PHI is sealed: nothing of the patient, medication or vendor ids is in the stored bytes.
    raw = bson.encode({k: v for k, v in doc.items() if k != "_outbox"})
    for clear in (b"Quillfeather", b"Sertraline", b"Main Street", b"2001:1", b"501"):
        assert clear not in raw
    [(event_id, envelope, request)] = staged(doc)
    assert event_id == envelope.event_id == request.delivery_id == f"{refill_id}-v1"
    assert envelope.event_type == "board_item.delivery_requested.v1" and envelope.producer == "erx-bridge"
    assert envelope.agency_id == AGENCY
    assert request.kind == inbox_pb2.DELIVERED_KIND_ERX
    assert list(request.recipients.staff_ids) == ["stf_reyes"]
    assert request.title == "Refill request: Sertraline 50 mg tablet"
    # The date in the agency's zone (15:30 UTC is 09:30 in Chicago, the same day).
    assert request.summary == "Client Briar Quillfeather · Main Street Pharmacy · requested 2026-03-05"
    assert request.severity == inbox_pb2.SEVERITY_INFO and request.status == "refill_requested"
    assert (request.source, request.source_ref, request.source_version) == ("erx", refill_id, 1)
    assert not request.resolved and not request.mark_unread
    [link] = request.links
    assert link.label == "Open in ePrescribing"
    assert link.url == f"http://127.0.0.1:8000/api/v1/erx/sso/patient/{refill_id}"
    error = latest(docs[domain.item_id(AGENCY, "dosespot", f"{TRANSACTION_ERROR}:2001:3")])
    assert error.title.startswith("Prescription not sent: ") and error.severity == inbox_pb2.SEVERITY_ABNORMAL
    assert error.summary.endswith(" · Pharmacy rejected the message")  # why it failed: what to fix
    pending = latest(docs[domain.item_id(AGENCY, "dosespot", f"{PENDING_PRESCRIPTION}:2001:2")])
    assert pending.title.startswith("Awaiting your signature: ") and "written 2026-03-05" in pending.summary
    assert rig.bridge.store.prescriber(f"{AGENCY}|stf_reyes")["counts"] == {
        REFILL_REQUEST: 1,
        PENDING_PRESCRIPTION: 1,
        TRANSACTION_ERROR: 1,
    }


def test_a_second_sync_with_nothing_changed_asks_only_the_counts_and_writes_nothing(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    for n in range(3):
        rig.vendor.add("2001", REFILL_REQUEST, n)
    rig.sync(reyes)
    before = rig.docs()
    rig.vendor.calls.clear()

    outcome = rig.sync(reyes)

    assert rig.vendor.calls == Counter({"counts": 1})
    assert (outcome.added, outcome.updated, outcome.resolved, outcome.unchanged) == (0, 0, 0, 0)
    assert rig.docs() == before  # not one write: same versions, same outbox sequence


def test_a_prescriber_with_nothing_open_costs_one_call(rig):
    chen = rig.directory.add("stf_chen", "2002")
    assert rig.sync(chen).added == 0
    rig.vendor.calls.clear()
    rig.sync(chen)
    assert rig.vendor.calls == Counter({"counts": 1})


# --- changes at the vendor ------------------------------------------------------------------------
def test_an_item_gone_at_the_vendor_is_resolved_and_kept_out_of_the_open_items(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.vendor.add("2001", REFILL_REQUEST, 2)
    rig.sync(reyes)
    rig.vendor.remove("2001", f"{REFILL_REQUEST}:2001:1")
    rig.vendor.calls.clear()

    outcome = rig.sync(reyes)

    assert (outcome.added, outcome.updated, outcome.resolved) == (0, 0, 1)
    assert rig.vendor.calls == Counter({"counts": 1, REFILL_REQUEST: 1})
    gone = rig.items.find_one({"_id": domain.item_id(AGENCY, "dosespot", f"{REFILL_REQUEST}:2001:1")})
    assert gone["state"] == "resolved" and gone["version"] == 2 and "open_key" not in gone
    request = latest(gone)
    assert request.resolved and request.source_version == 2 and request.status == "resolved"
    assert request.title == "Refill request: Sertraline 1 mg tablet"  # the same item, now resolved
    assert [d["_id"] for d in rig.bridge.store.open_items(domain.open_key(AGENCY, "stf_reyes", REFILL_REQUEST))] == [
        domain.item_id(AGENCY, "dosespot", f"{REFILL_REQUEST}:2001:2")
    ]


def test_an_item_back_at_the_vendor_is_opened_again_unread(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    item = rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.sync(reyes)
    rig.vendor.remove("2001", item.vendor_item_id)
    rig.sync(reyes)
    rig.vendor.add("2001", REFILL_REQUEST, 1)

    outcome = rig.sync(reyes)

    assert outcome.added == 1
    doc = rig.items.find_one({"_id": domain.item_id(AGENCY, "dosespot", item.vendor_item_id)})
    assert doc["state"] == "open" and doc["version"] == 3 and "resolved_at" not in doc
    request = latest(doc)
    assert request.mark_unread and not request.resolved and request.source_version == 3


def test_changed_content_with_the_same_counts_waits_for_the_full_check(rig):
    """ERX_FULL_CHECK_EVERY=3: the third sync after the last full one fetches every kind with open
    items, so a change that leaves the counts alone (a medication edited) is found then, or at
    once with {"full": true}."""
    reyes = rig.directory.add("stf_reyes", "2001")
    item = rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.sync(reyes)  # the first sync fetched everything: it counts as a full check
    rig.vendor.change("2001", item.vendor_item_id, medication="Sertraline 100 mg tablet")
    rig.vendor.calls.clear()

    assert rig.sync(reyes).updated == 0
    assert rig.sync(reyes).updated == 0
    assert rig.vendor.calls == Counter({"counts": 2})
    outcome = rig.sync(reyes)  # the third: a full check

    assert outcome.updated == 1 and rig.vendor.calls[REFILL_REQUEST] == 1
    doc = rig.items.find_one({"_id": domain.item_id(AGENCY, "dosespot", item.vendor_item_id)})
    request = latest(doc)
    assert request.title == "Refill request: Sertraline 100 mg tablet"
    assert request.mark_unread and request.source_version == 2 and request.delivery_id.endswith("-v2")
    # Asked for at once:
    rig.vendor.change("2001", item.vendor_item_id, medication="Sertraline 150 mg tablet")
    assert rig.sync(reyes, full=True).updated == 1


def test_one_item_resolved_and_another_arrived_between_syncs_is_found_by_the_full_check(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    first = rig.vendor.add("2001", PENDING_PRESCRIPTION, 1)
    rig.sync(reyes)
    rig.vendor.remove("2001", first.vendor_item_id)
    rig.vendor.add("2001", PENDING_PRESCRIPTION, 2)

    assert rig.sync(reyes).added == 0  # same count: not looked at
    assert rig.sync(reyes).added == 0
    outcome = rig.sync(reyes, full=False)

    assert (outcome.added, outcome.resolved) == (1, 1)


def test_an_item_moved_to_another_prescriber_follows_them(rig):
    reyes, chen = rig.directory.add("stf_reyes", "2001"), rig.directory.add("stf_chen", "2002")
    item = rig.vendor.add("2001", REFILL_REQUEST, 1, vendor_item_id="refill:77")
    rig.sync(reyes)
    rig.vendor.remove("2001", "refill:77")
    rig.vendor.open.setdefault("2002", {})["refill:77"] = item

    assert rig.sync(reyes).resolved == 1
    assert rig.sync(chen).added == 1

    [doc] = rig.items.find({})
    assert doc["staff_id"] == "stf_chen" and doc["state"] == "open" and doc["version"] == 3
    request = latest(doc)
    assert list(request.recipients.staff_ids) == ["stf_chen"] and request.mark_unread


# --- failures --------------------------------------------------------------------------------------
def test_an_unavailable_vendor_is_asked_again_after_the_wait_it_named(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.vendor.fail("counts", VendorUnavailable("dosespot counts: HTTP 429", retry_after_s=2.0))
    rig.vendor.fail(REFILL_REQUEST, VendorUnavailable("dosespot refills: timed out"))

    outcome = rig.sync(reyes)

    assert outcome.error is None and outcome.added == 1
    assert rig.vendor.calls == Counter({"counts": 2, REFILL_REQUEST: 2})
    assert rig.waits == [(1, 2.0), (1, None)]


def test_a_vendor_still_unavailable_leaves_every_item_as_it_was_and_is_asked_again_next_time(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.vendor.add("2001", REFILL_REQUEST, 2)
    rig.sync(reyes)
    before = rig.docs()
    rig.vendor.remove("2001", f"{REFILL_REQUEST}:2001:1")
    rig.vendor.fail(REFILL_REQUEST, VendorUnavailable("dosespot refills: HTTP 503"), times=3)
    rig.vendor.calls.clear()

    outcome = rig.sync(reyes)

    assert outcome.error.code == "vendor_unavailable" and "503" in outcome.error.message
    assert rig.vendor.calls == Counter({"counts": 1, REFILL_REQUEST: 3})  # ERX_VENDOR_ATTEMPTS=3
    assert rig.docs() == before  # nothing resolved on the strength of a failed answer
    assert rig.bridge.store.prescriber(f"{AGENCY}|stf_reyes")["last_error"] == "vendor_unavailable"

    outcome = rig.sync(reyes)  # the count seen last is still 2, so the refills are fetched again
    assert outcome.error is None and outcome.resolved == 1
    assert "last_error" not in rig.bridge.store.prescriber(f"{AGENCY}|stf_reyes")


def test_an_unreadable_answer_changes_nothing(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", TRANSACTION_ERROR, 1)
    rig.sync(reyes)
    before = rig.docs()
    rig.vendor.remove("2001", f"{TRANSACTION_ERROR}:2001:1")
    rig.vendor.fail(TRANSACTION_ERROR, VendorMalformed("dosespot errors: unexpected answer (not JSON)"), times=3)

    outcome = rig.sync(reyes)

    assert outcome.error.code == "vendor_malformed"
    assert rig.docs() == before


def test_a_refusal_is_recorded_without_asking_again(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.fail("counts", VendorRejected("dosespot token: invalid_grant"))

    outcome = rig.sync(reyes)

    assert outcome.error.code == "vendor_rejected"
    assert rig.vendor.calls == Counter({"counts": 1}) and rig.waits == []


def test_a_retry_after_longer_than_the_limit_ends_the_attempts_at_once(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.bridge.engine.backoff = lambda attempt, retry_after_s: retry_after_s or 1.0  # as resilience.backoff_s
    rig.vendor.fail("counts", VendorUnavailable("dosespot counts: HTTP 429", retry_after_s=120.0))

    outcome = rig.sync(reyes)

    assert outcome.error.code == "vendor_unavailable" and rig.vendor.calls == Counter({"counts": 1})


def test_a_prescriber_without_a_clinician_id_is_reported_not_asked(rig):
    brooks = rig.directory.add("stf_brooks", "")
    outcome = rig.sync(brooks)
    assert outcome.error.code == "no_clinician_id" and rig.vendor.calls == Counter()


# --- the lease -------------------------------------------------------------------------------------
def test_a_prescriber_leased_by_another_sync_is_skipped_until_the_lease_is_released(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    key = f"{AGENCY}|stf_reyes"
    assert rig.bridge.store.take_lease(key, "other-replica", 60_000, {}) is not None

    assert rig.sync(reyes).skipped and rig.vendor.calls == Counter()

    rig.bridge.store.release_lease(key, "other-replica")
    assert rig.sync(reyes).added == 1


def test_two_syncs_of_one_prescriber_at_once_deliver_each_item_once(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    for n in range(5):
        rig.vendor.add("2001", REFILL_REQUEST, n)
    rig.vendor.gate = threading.Event()
    target = rig.target()
    outcomes = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(rig.bridge.engine.sync_prescriber(target, reyes)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(outcomes) == 3, message="three syncs finding the prescriber leased")
    rig.vendor.gate.set()
    for thread in threads:
        thread.join(30)

    assert sorted(o.skipped for o in outcomes) == [False, True, True, True]
    assert sum(o.added for o in outcomes) == 5
    assert all(len(staged(doc)) == 1 for doc in rig.docs().values())
    assert rig.vendor.calls["counts"] == 1


def test_a_lapsed_lease_is_taken_over(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    key = f"{AGENCY}|stf_reyes"
    rig.bridge.store.take_lease(key, "dead-replica", 60_000, {})
    rig.bridge.store.prescribers.update_one({"_id": key}, {"$set": {"lease_until": 1}})  # it lapsed long ago
    assert not rig.sync(reyes).skipped


def test_another_agencys_items_are_never_mixed_in(rig):
    rig.directory.subscribed[OTHER] = True
    rig.directory.clinic_ids[OTHER] = "1001"
    rig.bridge.runner.practices[OTHER] = rig.bridge.runner.practices[AGENCY]
    reyes = rig.directory.add("stf_reyes", "2001")
    ramirez = rig.directory.add("stf_ramirez", "2001", agency_id=OTHER)  # same clinician id, other agency
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.sync(reyes)
    rig.sync(ramirez)
    docs = list(rig.items.find({}))
    assert sorted(d["agency_id"] for d in docs) == [OTHER, AGENCY]
    assert len({d["_id"] for d in docs}) == 2  # the item id includes the agency
