"""The broker drops every connection of the stack in the middle of a burst: nothing is lost or doubled.

A private stack (its own vhost, database prefix and processes). Four staff members send messages to
two colleagues who are away (Staff Auto-Reply on) while a lab's engine sends results over MLLP; twice
during the burst the broker closes every connection of the vhost (the relays' publishers, every
consumer). The services reconnect with backoff; the relays publish again what was not confirmed and
the consumers deduplicate. Afterwards every board holds every message and result exactly once, every
counter is exact, each sender got exactly one answer from each away colleague, and no event was parked.
"""

from __future__ import annotations

import time
import uuid

from tests.e2e.conftest import Client
from tests.e2e.fault_stack import (
    LAB_STAFF,
    LiveStream,
    MllpSender,
    close_broker_connections,
    go_away,
    lab_patients,
    lab_results,
    listed,
    rabbitmqctl,
    send_once,
)
from tests.waits import Worker, finish_all, wait_until

SENDERS = ("admin", "therapist.patel", "intake.wilson", "billing.lee")
AWAY = ("nurse.kim", "dr.reyes")
PER_SENDER = 40
LAB_RESULTS = 40
DROPS = 2
RECOVER_S = 30.0  # reconnection backoff starts at 0.5 s; a busy machine
WAIT_S = 90.0


def parked(vhost: str) -> dict[str, int]:
    """Parking queues of the vhost holding messages (an event that failed for good)."""
    out = rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {name: int(count) for name, count in rows if name.endswith(".parking") and int(count)}


def test_nothing_lost_or_doubled_when_the_broker_drops_every_connection(fault_stack, mongo_client):
    gateway = fault_stack.gateway_url
    senders = [Client(gateway, name) for name in SENDERS]
    away = [Client(gateway, name) for name in AWAY]
    lab_readers = {name: Client(gateway, name) for name in LAB_STAFF}
    for colleague in away:
        go_away(colleague)
    tag = uuid.uuid4().hex[:6].upper()
    sent: dict[str, list[tuple[str, str]]] = {sender.staff_id: [] for sender in senders}  # (message, recipient)
    total = len(senders) * PER_SENDER

    def burst(sender: Client) -> int:
        retried = 0
        for n in range(PER_SENDER):
            recipient = away[n % len(away)]
            message_id, attempts = send_once(
                sender, to_staff_ids=[recipient.staff_id], subject=f"Burst {tag} {n}", deadline_s=WAIT_S
            )
            sent[sender.staff_id].append((message_id, recipient.staff_id))
            retried += attempts - 1
            time.sleep(0.1)  # a paced burst: the drops land in the middle of it
        return retried

    def done() -> int:
        return sum(len(mine) for mine in sent.values())

    engine = MllpSender(fault_stack.config.ports.notifications_mllp, deadline_s=WAIT_S * 2, pause_s=0.15)
    recovered: list[float] = []
    with LiveStream(away[0]) as live:
        workers = [Worker(burst, sender, name=f"burst-{sender.staff_id}").start() for sender in senders]
        workers.append(Worker(engine.send_all, lab_results(tag, LAB_RESULTS), name="lab-engine").start())
        for drop in range(1, DROPS + 1):
            wait_until(lambda drop=drop: done() >= total * drop // (DROPS + 1), timeout=WAIT_S)
            close_broker_connections(fault_stack.vhost)
            closed = time.monotonic()
            assert done() < total, "the burst ended before the drop: nothing was tested"
            # Events flow again: the next message to the away colleague reaches their open page
            # (inbox's relay published it on a new connection, web's consumer took it on another).
            wait_until(lambda closed=closed: live.board_events_since(closed, "messages"), timeout=RECOVER_S)
            recovered.append(time.monotonic() - closed)
        retries = finish_all(workers, timeout=WAIT_S * 2)

    # Every delivery event was handled by auto-reply (so every answer it will ever send is sent).
    processed = mongo_client[f"{fault_stack.db_prefix}auto-reply"]["processed_events"]
    keys = [f"auto-reply:{m}-{r}-delivered" for mine in sent.values() for m, r in mine]
    wait_until(
        lambda: processed.count_documents({"_id": {"$in": keys}}) == len(keys),
        timeout=WAIT_S,
        message="auto-reply handled every delivery",
    )
    for sender in senders:
        mine = sent[sender.staff_id]
        sent_ids = [m["id"] for m in listed(sender, "/api/v1/messages", folder="sent")]
        assert sorted(sent_ids) == sorted(m for m, _ in mine), f"{sender.staff_id}: Sent differs"
        answers = [m for m in listed(sender, "/api/v1/messages") if m["subject"].startswith(f"Re: Burst {tag} ")]
        assert sorted(a["sender"]["id"] for a in answers) == sorted(c.staff_id for c in away), sender.staff_id
        assert sender.counts("sent") == (0, PER_SENDER)
        assert sender.counts("messages") == (len(away), len(away))
    for colleague in away:
        expected = sorted(m for mine in sent.values() for m, r in mine if r == colleague.staff_id)
        received = sorted(m["id"] for m in listed(colleague, "/api/v1/messages"))
        assert received == expected, f"{colleague.staff_id}: lost or doubled messages"
        assert colleague.counts("messages") == (len(expected), len(expected))

    patients = sorted(f"MRN-{tag}-{n:05d}" for n in range(LAB_RESULTS))
    for name, reader in lab_readers.items():
        wait_until(
            lambda reader=reader: len([p for p in lab_patients(reader) if p.startswith(f"MRN-{tag}-")]) >= LAB_RESULTS,
            timeout=WAIT_S,
            message=f"every result on {name}'s board",
        )
        assert sorted(p for p in lab_patients(reader) if p.startswith(f"MRN-{tag}-")) == patients, name
        assert reader.counts("lab") == (LAB_RESULTS, LAB_RESULTS), name
    assert parked(fault_stack.vhost) == {}

    print(
        f"\nbroker connections dropped {DROPS}x during {total} sends and {LAB_RESULTS} lab results: "
        f"events flowed again {', '.join(f'{s:.1f}s' for s in recovered)} after each drop; "
        f"{sum(retries[:-1])} send(s) retried, {retries[-1]} failed lab attempt(s) sent again"
    )
