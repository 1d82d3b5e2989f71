"""Fail-over of the outbox relay: after a kill -9, events flow again within seconds of the replacement
process being ready, not once a dead holder's half-minute lease has run out.

A private stack (its own vhost, database prefix and processes). inbox is killed right after its relay
renewed the lease (the worst moment: the newcomer waits out nearly a whole lease), restarted, and a
message sent at once; its delivery must be published (heard on the bus), pushed to the recipient's
open page (web's consumer) and answered by the recipient's auto-reply (auto-reply's consumer,
then inbox again) within the target. notifications is killed in the middle of a burst of lab results
over MLLP; the lab's engine sends again what was not acknowledged, and every result reaches every
lab-flagged board exactly once.
"""

from __future__ import annotations

import time
import uuid

import pytest

from services.kit.mongo import now_ms
from tests.e2e.conftest import Client, EventBus
from tests.e2e.fault_stack import (
    LAB_STAFF,
    LiveStream,
    MllpSender,
    go_away,
    lab_patients,
    lab_results,
    listed,
    send_once,
)
from tests.waits import Worker, wait_until

TARGET_S = 5.0  # events flow again within this of a replacement being ready (issue 19)
HEADROOM_S = 3.0  # a busy 2-core machine
WAIT_S = 60.0


@pytest.fixture(scope="module")
def inbox_leases(fault_stack, mongo_client):
    return mongo_client[f"{fault_stack.db_prefix}inbox"]["outbox_leases"]


def live_leases(leases) -> dict[str, dict]:
    """Lease name -> lease document, of the leases some relay holds now."""
    return {doc["_id"]: doc for doc in leases.find({"until": {"$gt": now_ms()}})}


def just_renewed(leases) -> dict[str, dict]:
    """Wait for the next renewal of inbox's relay lease(s), and return them as renewed: killing the
    holder now leaves a newcomer the longest wait."""
    before = wait_until(lambda: live_leases(leases), timeout=WAIT_S, message="a held relay lease")
    return wait_until(
        lambda: (
            (now := live_leases(leases))
            and all(now.get(name, {}).get("until", 0) > doc["until"] for name, doc in before.items())
            and now
        ),
        timeout=WAIT_S,
        message="the relay lease renewed",
    )


def test_events_flow_again_within_seconds_of_a_restarted_inbox(fault_stack, inbox_leases):
    sender = Client(fault_stack.gateway_url, "therapist.patel")
    recipient = Client(fault_stack.gateway_url, "therapist.nguyen")
    bus = EventBus(fault_stack.config.amqp_url, fault_stack.run_dir)
    subject = f"Coverage {uuid.uuid4().hex[:8]}"
    with bus.listen("message.delivered.v1") as heard, LiveStream(recipient) as live:
        warm_id, _ = send_once(sender, to_staff_ids=[recipient.staff_id], subject="Before the crash")
        heard.wait_for(lambda event: event.payload.message_id == warm_id, timeout=WAIT_S)
        go_away(recipient)

        held = just_renewed(inbox_leases)
        fault_stack.kill("inbox")
        killed = time.monotonic()
        fault_stack.restart("inbox")
        ready = time.monotonic()
        message_id, attempts = send_once(sender, to_staff_ids=[recipient.staff_id], subject=subject)
        sent = time.monotonic()
        heard.wait_for(
            lambda event: event.payload.message_id == message_id and event.payload.recipient_staff_id,
            timeout=WAIT_S,
        )
        published = time.monotonic()
        wait_until(lambda: live.board_events_since(ready, "messages"), timeout=WAIT_S, message="a live board event")
        pushed = time.monotonic()
        answer = wait_until(
            lambda: [m for m in listed(sender, "/api/v1/messages") if m["subject"] == f"Re: {subject}"],
            timeout=WAIT_S,
            message="the auto-reply",
        )
        answered = time.monotonic()

    print(
        f"\nrelay fail-over: inbox restarted in {ready - killed:.1f}s; from ready: send answered "
        f"{sent - ready:.2f}s ({attempts} attempt(s)), published {published - ready:.2f}s, live update "
        f"{pushed - ready:.2f}s, auto-reply listed {answered - ready:.2f}s"
    )
    assert published - ready <= TARGET_S + HEADROOM_S, f"events flowed {published - ready:.1f}s after inbox was ready"
    assert pushed - ready <= TARGET_S + HEADROOM_S
    assert len(answer) == 1 and answer[0]["sender"]["id"] == recipient.staff_id
    # The replacement holds every lease the killed process held (it took them over, not waited them out).
    after = live_leases(inbox_leases)
    assert set(after) >= set(held)
    assert all(after[name]["holder"] != doc["holder"] for name, doc in held.items())


def test_lab_results_survive_a_killed_notifications_exactly_once(fault_stack):
    count, kill_after = 60, 20
    tag = uuid.uuid4().hex[:6].upper()
    readers = {username: Client(fault_stack.gateway_url, username) for username in LAB_STAFF}
    before = {username: reader.counts("lab") for username, reader in readers.items()}  # other fault tests' results
    engine = MllpSender(fault_stack.config.ports.notifications_mllp, deadline_s=180, pause_s=0.02)
    worker = Worker(engine.send_all, lab_results(tag, count), name="lab-engine").start()

    wait_until(lambda: engine.acked >= kill_after, timeout=WAIT_S, message=f"{kill_after} results acknowledged")
    fault_stack.kill("notifications")
    acked_at_kill = engine.acked
    fault_stack.restart("notifications")
    ready = time.monotonic()
    failed_attempts = worker.finish(timeout=180)

    expected = sorted(f"MRN-{tag}-{n:05d}" for n in range(count))
    for username, reader in readers.items():
        wait_until(
            lambda reader=reader: len([p for p in lab_patients(reader) if p.startswith(f"MRN-{tag}-")]) >= count,
            timeout=WAIT_S,
            message=f"every result on {username}'s board",
        )
    on_boards = time.monotonic()
    for username, reader in readers.items():
        patients = sorted(p for p in lab_patients(reader) if p.startswith(f"MRN-{tag}-"))
        assert patients == expected, f"{username}: lost {set(expected) - set(patients)}, doubled " + str(
            sorted({p for p in patients if patients.count(p) > 1})
        )
        unread, total = before[username]
        assert reader.counts("lab") == (unread + count, total + count), username
    print(
        f"\nnotifications killed after {acked_at_kill} of {count} results; {failed_attempts} failed attempt(s) "
        f"sent again; all {count} on {len(readers)} boards {on_boards - ready:.1f}s after the restart"
    )
    assert acked_at_kill < count, "the kill landed after the burst: nothing was tested"


def test_a_lease_lapses_within_its_ttl(fault_stack, inbox_leases):
    """The lease a killed holder leaves behind runs out within the target, whoever looks."""
    held = just_renewed(inbox_leases)
    longest = max(doc["until"] for doc in held.values()) - now_ms()
    assert 0 < longest <= TARGET_S * 1000, f"a lease runs {longest} ms ahead"
