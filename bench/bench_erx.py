"""An agency-wide eRx sync of many prescribers with many open items, through the whole system, against
the raw delivery rate of inbox measured in the same run.

- setup: the whole system as `make run` starts it (nx-27017, the local RabbitMQ in a private vhost,
  directory, inbox, erx-bridge, the gateway, the eRx vendor simulator), no scheduled sync. Riverbend's
  admin adds P prescribers with ePrescribing (clinician ids 3001...) through directory's API, and
  the simulator's bulk load gives each of them N open items (the three kinds in turn).
- first sync: the admin's POST /api/v1/erx/sync {"scope": "agency"} until its progress says done
  (wall time), the vendor calls it made per prescriber (the simulator's counters: counts, lists,
  and the patient / prescription look-ups the DoseSpot adapter makes for names), then until every
  item is on its prescriber's board (inbox's `board_item.delivered.v1`, one per item): items/s
  from the sync's start to the last item on a board.
- second sync, nothing changed: wall time and vendor calls per prescriber (target: 1, the counts).
- raw delivery: the same number of `board_item.delivery_requested.v1` events (erx items for the
  same prescribers) published straight to the exchange, timed until all are on the boards: what
  inbox takes at most, so the first sync's items/s can be read against it.

P and N: BENCH_ERX_PRESCRIBERS (200) and BENCH_ERX_ITEMS (50). Results also go to
artifacts/bench/erx.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika
import requests

from bench._env import machine, private_vhost, use_stack_keys, write_report
from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import BatchPublisher, Topology
from services.kit.events import new_envelope
from services.launcher import Ports, Stack, StackConfig
from tests.e2e.conftest import Client

PRESCRIBERS = int(os.environ.get("BENCH_ERX_PRESCRIBERS", "200"))
ITEMS = int(os.environ.get("BENCH_ERX_ITEMS", "50"))
FIRST_CLINICIAN = 3001
RIVERBEND = "agy_riverbend"
PASSWORD = "bench-Password-2026-erx"  # noqa: S105 - a throwaway stack's
DELIVERED = "board_item.delivered.v1"


class BoardArrivals:
    """Counts inbox's `board_item.delivered.v1` events for the eRx folder (one per item reaching a
    board), from a queue of its own bound before the work starts."""

    def __init__(self, amqp_url: str):
        self._connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._channel = self._connection.channel()
        Topology().declare(self._channel)
        self.queue = self._channel.queue_declare(queue="", exclusive=True).method.queue
        self._channel.queue_bind(self.queue, Topology().exchange_name, routing_key=DELIVERED)
        self.items: set[str] = set()
        self.last_at = 0.0

    def take(self) -> int:
        while True:
            method, _props, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return len(self.items)
            envelope = Envelope()
            envelope.ParseFromString(body)
            event = inbox_pb2.BoardItemDelivered()
            event.ParseFromString(envelope.payload)
            if event.board_kind == "erx" and event.item_id not in self.items:
                self.items.add(event.item_id)
                self.last_at = time.perf_counter()

    def wait_for(self, count: int, timeout_s: float = 900.0) -> float:
        """Until `count` items are on boards; the time the last one arrived."""
        deadline = time.monotonic() + timeout_s
        while self.take() < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(self.items)} of {count} items reached the boards in {timeout_s:.0f} s")
            self._connection.sleep(0.2)
        return self.last_at

    def close(self) -> None:
        self._connection.close()


def add_prescribers(admin: Client, count: int) -> list[str]:
    staff_ids = []
    tag = uuid.uuid4().hex[:6]
    for n in range(count):
        reply = admin.post(
            "/api/v1/directory/staff",
            json={
                "username": f"bench.{tag}.{n}",
                "display_name": f"Bench Prescriber {n}",
                "password": PASSWORD,
                "roles": ["staff", "prescriber"],
                "eprescribing_enabled": True,
                "erx_clinician_id": str(FIRST_CLINICIAN + n),
            },
        )
        if reply.status_code != 201:
            raise SystemExit(f"adding a prescriber failed: {reply.status_code} {reply.text[:300]}")
        staff_ids.append(reply.json()["id"])
    return staff_ids


def agency_sync(admin: Client) -> tuple[float, dict]:
    started = time.perf_counter()
    reply = admin.post("/api/v1/erx/sync", json={"scope": "agency"})
    if reply.status_code != 202:
        raise SystemExit(f"sync refused: {reply.status_code} {reply.text[:300]}")
    sync_id = reply.json()["sync_id"]
    deadline = time.monotonic() + 1800
    while True:
        progress = admin.get(f"/api/v1/erx/sync/{sync_id}").json()
        if progress["status"] != "running":
            return time.perf_counter() - started, progress
        if time.monotonic() > deadline:
            raise SystemExit(f"the sync did not finish in 30 minutes: {progress}")
        time.sleep(0.25)


def bench_calls(simulator: str, clinicians: set[str]) -> tuple[float, dict[str, int]]:
    """Vendor calls per bench prescriber, and the total per endpoint."""
    calls = requests.get(f"{simulator}/simulator/calls", timeout=30).json()["calls"]
    per_endpoint = {
        endpoint: sum(n for clinician, n in per.items() if clinician in clinicians) for endpoint, per in calls.items()
    }
    per_endpoint = {k: v for k, v in per_endpoint.items() if v}
    return sum(per_endpoint.values()) / len(clinicians), per_endpoint


def raw_delivery(amqp_url: str, staff_ids: list[str], count: int, arrivals: BoardArrivals, gateway: str) -> float:
    """`count` eRx delivery requests published straight to the exchange; items/s until on the boards."""
    tag = uuid.uuid4().hex[:8]
    envelopes = []
    for n in range(count):
        request = inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_ERX,
            recipients=inbox_pb2.Recipients(staff_ids=[staff_ids[n % len(staff_ids)]]),
            title=f"Refill request: Bench medication {n}",
            summary="Client Bench Patient · Bench Pharmacy · requested 2026-03-05",
            severity=inbox_pb2.SEVERITY_INFO,
            status="refill_requested",
            links=[inbox_pb2.ActionLink(label="Open in ePrescribing", url=f"{gateway}/api/v1/erx/sso/patient/x{n}")],
            source="erx",
            source_ref=f"erx_raw{tag}{n:06d}",
            source_version=1,
            delivery_id=f"erx_raw{tag}{n:06d}-v1",
        )
        envelopes.append(
            new_envelope(
                "board_item.delivery_requested.v1",
                request,
                agency_id=RIVERBEND,
                producer="erx-bridge",
                event_id=request.delivery_id,
            )
        )
    already = arrivals.take()
    publisher = BatchPublisher(amqp_url, Topology(), connection_name="bench-erx-raw")
    try:
        started = time.perf_counter()
        for start in range(0, count, 500):
            publisher.publish_batch(envelopes[start : start + 500])
    finally:
        publisher.close()
    last = arrivals.wait_for(already + count)
    return count / (last - started)


def main() -> int:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-erx-") as tmp, private_vhost() as amqp_url:
        stack = Stack(
            StackConfig(
                run_dir=Path(tmp),
                ports=Ports.free(),
                amqp_url=amqp_url,
                extra_env={"PASSWORD_HASH_PROFILE": "fast", "ERX_SYNC_INTERVAL_S": "0"},
                gateway_env={"DECK_RATE_LIMIT_MINUTE": "1000000"},
            )
        )
        try:
            stack.start()
            use_stack_keys(stack)
            report = run(stack, amqp_url)
        finally:
            stack.stop()
    report["load_average_before_after"] = (load_before, os.getloadavg()[0])
    first, second = report["first_sync"], report["second_sync"]
    print(f"{PRESCRIBERS} prescribers x {ITEMS} open items = {report['items']} items (+ the demo prescribers')")
    print(f"{'':44} {'wall s':>8} {'calls/prescriber':>17} {'items/s':>9} {'vs raw':>7}")
    print(
        f"{'first sync (agency), until done':44} {first['wall_s']:>8.1f} {first['calls_per_prescriber']:>17.1f}"
        f" {first['items_per_s_synced']:>9.0f}"
    )
    print(
        f"{'first sync, until every item on a board':44} {first['to_boards_s']:>8.1f} {'':>17}"
        f" {first['items_per_s_to_boards']:>9.0f} {first['items_per_s_to_boards'] / report['raw_delivery_per_s']:>7.1%}"
    )
    print(f"{'second sync, nothing changed':44} {second['wall_s']:>8.1f} {second['calls_per_prescriber']:>17.2f}")
    print(f"{'raw delivery (events straight to inbox)':44} {report['raw_delivery_s']:>8.1f} {'':>17} "
          f"{report['raw_delivery_per_s']:>9.0f} {1:>7.0%}")
    print(f"vendor calls of the first sync by endpoint: {first['calls_by_endpoint']}")
    print(f"vendor calls of the second sync by endpoint: {second['calls_by_endpoint']}")
    load = report["load_average_before_after"]
    print(f"machine load (1-minute average) before / after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs")
    path = write_report("erx", report)
    print(f"written to {path.relative_to(path.parents[2])}")
    ok = second["calls_per_prescriber"] == 1.0 and not first["errors"] and not second["errors"]
    return 0 if ok else 1


def run(stack: Stack, amqp_url: str) -> dict:
    admin = Client(stack.gateway_url, "admin")
    simulator = stack.erx_simulator_url
    staff_ids = add_prescribers(admin, PRESCRIBERS)
    clinicians = {str(FIRST_CLINICIAN + n) for n in range(PRESCRIBERS)}
    requests.post(
        f"{simulator}/simulator/bulk",
        json={"clinicians": PRESCRIBERS, "items": ITEMS, "first_clinician_id": FIRST_CLINICIAN},
        timeout=300,
    ).raise_for_status()
    requests.delete(f"{simulator}/simulator/calls", timeout=30).raise_for_status()
    total = PRESCRIBERS * ITEMS
    arrivals = BoardArrivals(amqp_url)
    try:
        started = time.perf_counter()
        wall, first = agency_sync(admin)
        calls_first, by_endpoint_first = bench_calls(simulator, clinicians)
        # The demo prescribers' items reach the boards too; wait for ours (and theirs) to land.
        demo_items = first["added"] - total
        last = arrivals.wait_for(total + max(0, demo_items))
        to_boards = last - started
        requests.delete(f"{simulator}/simulator/calls", timeout=30).raise_for_status()
        wall_second, second = agency_sync(admin)
        calls_second, by_endpoint_second = bench_calls(simulator, clinicians)
        raw_started = time.perf_counter()
        raw_rate = raw_delivery(amqp_url, staff_ids, total, arrivals, stack.gateway_url)
        raw_s = time.perf_counter() - raw_started
    finally:
        arrivals.close()
    return {
        "machine": machine(),
        "prescribers": PRESCRIBERS,
        "items_per_prescriber": ITEMS,
        "items": total,
        "first_sync": {
            "wall_s": wall,
            "status": first["status"],
            "added": first["added"],
            "errors": first["errors"],
            "calls_per_prescriber": calls_first,
            "calls_by_endpoint": by_endpoint_first,
            "items_per_s_synced": first["added"] / wall,
            "to_boards_s": to_boards,
            "items_per_s_to_boards": first["added"] / to_boards,
        },
        "second_sync": {
            "wall_s": wall_second,
            "status": second["status"],
            "added": second["added"],
            "updated": second["updated"],
            "resolved": second["resolved"],
            "errors": second["errors"],
            "calls_per_prescriber": calls_second,
            "calls_by_endpoint": by_endpoint_second,
        },
        "raw_delivery_s": raw_s,
        "raw_delivery_per_s": raw_rate,
    }


if __name__ == "__main__":
    sys.exit(main())
