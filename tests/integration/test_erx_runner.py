"""Syncs as jobs (the runner's pools and progress documents), the scheduler shared by replicas, and
the outbox relay publishing the deliveries to the real broker; the real embedded database, the
stand-in vendor and directory of test_erx_sync.py."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from services.erx_bridge import domain
from services.erx_bridge.runner import SCOPE_AGENCY, SCOPE_SELF, Scheduler
from services.erx_bridge.vendors.base import PENDING_PRESCRIPTION, REFILL_REQUEST, VendorRejected
from services.kit.bus import BatchPublisher
from services.kit.mongo import now_ms
from services.kit.outbox import OutboxRelay
from tests.integration.test_erx_sync import AGENCY, make_rig, staged
from tests.waits import wait_until

DELIVERY_REQUESTED = "board_item.delivery_requested.v1"


@pytest.fixture
def rig(mongo_uri, db_name, tmp_path):
    made = make_rig(mongo_uri, db_name, tmp_path, ERX_SYNC_WORKERS="3")
    yield made
    made.bridge.close()


def finished(rig, sync_id: str, timeout: float = 20.0) -> dict:
    """The sync's progress once it is no longer running."""
    return wait_until(
        lambda: (p := rig.bridge.runner.progress(rig.bridge.store.sync(sync_id)))["status"] != "running" and p,
        timeout=timeout,
        message=f"sync {sync_id} to finish",
    )


def test_an_agency_sync_runs_every_prescriber_and_reports_what_it_did(rig):
    rig.directory.add("stf_reyes", "2001")
    rig.directory.add("stf_chen", "2002")
    rig.directory.add("stf_brooks", "")  # no clinician id in directory
    for n in range(3):
        rig.vendor.add("2001", REFILL_REQUEST, n)
    rig.vendor.add("2002", PENDING_PRESCRIPTION, 1)

    sync_id, created = rig.bridge.runner.start(AGENCY, requested_by="stf_admin", scope=SCOPE_AGENCY)
    progress = finished(rig, sync_id)

    assert created and progress["status"] == "done" and progress["scope"] == SCOPE_AGENCY
    assert (progress["prescribers_total"], progress["prescribers_done"]) == (3, 3)
    assert (progress["added"], progress["updated"], progress["resolved"], progress["skipped"]) == (4, 0, 0, 0)
    [error] = progress["errors"]
    assert (error["code"], error["staff_id"]) == ("no_clinician_id", "stf_brooks")
    assert error["message"] == "directory has no ePrescribing clinician id for them"
    assert progress["started_at"] and progress["finished_at"]
    assert rig.bridge.store.items.count_documents({}) == 4


def test_asking_again_while_a_sync_runs_answers_the_running_one(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.vendor.gate = threading.Event()

    first, created = rig.bridge.runner.start(AGENCY, requested_by="stf_reyes", scope=SCOPE_SELF, prescriber=reyes)
    again, created_again = rig.bridge.runner.start(AGENCY, requested_by="stf_reyes", scope=SCOPE_SELF, prescriber=reyes)
    rig.vendor.gate.set()

    assert created and not created_again and again == first
    assert finished(rig, first)["added"] == 1
    later, created_later = rig.bridge.runner.start(AGENCY, requested_by="stf_reyes", scope=SCOPE_SELF, prescriber=reyes)
    assert created_later and later != first
    assert finished(rig, later)["added"] == 0
    assert rig.vendor.calls["counts"] == 2


def test_a_sync_of_an_agency_that_does_not_subscribe_fails_before_asking_the_vendor(rig):
    rig.directory.add("stf_reyes", "2001")
    rig.directory.subscribed[AGENCY] = False

    sync_id, _ = rig.bridge.runner.start(AGENCY, requested_by="scheduler", scope=SCOPE_AGENCY)
    progress = finished(rig, sync_id)

    assert progress["status"] == "failed"
    assert [e["code"] for e in progress["errors"]] == ["erx_not_subscribed"]
    assert rig.vendor.calls == Counter()


def test_a_practice_other_than_the_one_directory_names_is_not_synced(rig):
    rig.directory.add("stf_reyes", "2001")
    rig.directory.clinic_ids[AGENCY] = "9999"

    progress = finished(rig, rig.bridge.runner.start(AGENCY, requested_by="scheduler", scope=SCOPE_AGENCY)[0])

    assert progress["status"] == "failed" and [e["code"] for e in progress["errors"]] == ["practice_mismatch"]
    assert rig.vendor.calls == Counter()


def test_a_sync_where_every_prescriber_failed_is_failed(rig):
    rig.directory.add("stf_reyes", "2001")
    rig.directory.add("stf_chen", "2002")
    rig.vendor.fail("counts", VendorRejected("dosespot token: invalid_client"), times=2)

    progress = finished(rig, rig.bridge.runner.start(AGENCY, requested_by="scheduler", scope=SCOPE_AGENCY)[0])

    assert progress["status"] == "failed" and progress["prescribers_done"] == 2
    assert sorted((e["staff_id"], e["code"]) for e in progress["errors"]) == [
        ("stf_chen", "vendor_rejected"),
        ("stf_reyes", "vendor_rejected"),
    ]


def test_a_running_sync_whose_process_died_is_reported_interrupted(rig):
    long_ago = now_ms() - 3_600_000
    rig.bridge.store.insert_sync(
        {"_id": "sync_dead", "agency_id": AGENCY, "status": "running", "scope": SCOPE_AGENCY, "errors": {},
         "started_at": long_ago, "heartbeat_at": long_ago}
    )
    progress = rig.bridge.runner.progress(rig.bridge.store.sync("sync_dead"))
    assert progress["status"] == "failed" and progress["errors"][0]["code"] == "sync_interrupted"


def test_stopping_ends_the_syncs_in_hand_as_interrupted(rig):
    reyes = rig.directory.add("stf_reyes", "2001")
    rig.vendor.add("2001", REFILL_REQUEST, 1)
    rig.vendor.gate = threading.Event()
    sync_id, _ = rig.bridge.runner.start(AGENCY, requested_by="stf_reyes", scope=SCOPE_SELF, prescriber=reyes)
    wait_until(lambda: rig.bridge.store.prescriber(f"{AGENCY}|stf_reyes"), message="the sync to hold the lease")

    stopping = threading.Thread(target=rig.bridge.runner.shutdown)
    stopping.start()
    rig.vendor.gate.set()  # the counts call in hand finishes; the sync stops before the next one
    stopping.join(30)

    progress = rig.bridge.runner.progress(rig.bridge.store.sync(sync_id))
    assert progress["status"] == "failed"
    assert {e["code"] for e in progress["errors"]} == {"sync_interrupted"}
    assert rig.bridge.store.items.count_documents({}) == 0
    assert rig.bridge.store.prescriber(f"{AGENCY}|stf_reyes")["lease_until"] == 0  # released on the way out


def test_each_due_scheduled_sync_is_started_by_one_replica(rig):
    rig.directory.add("stf_reyes", "2001")
    replicas = [
        Scheduler(rig.bridge.store, rig.bridge.runner, [AGENCY], interval_s=60.0, first_delay_s=0.0) for _ in range(3)
    ]
    assert replicas[0].run_once() == []  # the agency's schedule is created, due now
    started = [sync_id for replica in replicas for sync_id in replica.run_once()]

    assert len(started) == 1
    assert finished(rig, started[0])["status"] == "done"
    assert [replica.run_once() for replica in replicas] == [[], [], []]  # next one in 48-72 s
    schedule = rig.bridge.store.schedule.find_one({"_id": AGENCY})
    assert 48_000 <= schedule["next_at"] - schedule["claimed_at"] <= 72_000


def test_the_relay_publishes_each_delivery_and_a_repeated_sync_stages_nothing_more(rig, event_bus):
    reyes = rig.directory.add("stf_reyes", "2001")
    for n in range(4):
        rig.vendor.add("2001", REFILL_REQUEST, n)
    rig.sync(reyes)
    received: list[str] = []
    consumer = event_bus.consumer(
        "erx-deliveries", [DELIVERY_REQUESTED], lambda envelope: received.append(envelope.event_id), prefetch=50
    )
    publisher = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    relay = OutboxRelay(rig.bridge.store.db, list(rig.bridge.outbox_collections), publisher, lease_ttl_s=None)
    relay.ensure_indexes()
    try:
        with consumer.running():
            expected = sorted(f"{doc['_id']}-v1" for doc in rig.docs().values())
            assert relay.run_once() == 4
            wait_until(lambda: sorted(received) == expected, message="the four deliveries")
            assert all(not staged(doc) for doc in rig.docs().values())  # confirmed, then cleared
            rig.vendor.remove("2001", f"{REFILL_REQUEST}:2001:0")
            rig.sync(reyes)
            rig.sync(reyes)  # nothing more changed
            assert relay.run_once() == 1
            gone = domain.item_id(AGENCY, "dosespot", f"{REFILL_REQUEST}:2001:0")
            wait_until(lambda: f"{gone}-v2" in received, message="the resolution")
            assert len(received) == 5
    finally:
        publisher.close()
