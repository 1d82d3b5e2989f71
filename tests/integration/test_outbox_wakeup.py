"""The outbox relay wakes up at once when its own process stages due events, on nx-27017 and the real
broker; the poll stays the fallback for documents staged elsewhere, and nothing is lost or doubled."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit import outbox
from services.kit.bus import BatchPublisher
from services.kit.events import new_envelope
from services.kit.mongo import now_ms
from services.kit.outbox import OutboxRelay, outbox_fields, outbox_update
from tests.waits import background, wait_until

DELIVERED = "message.delivered.v1"
ITEMS = "board_items"
SLOW_POLL_S = 30.0  # far longer than any wait below: whatever arrives in time was woken, not polled


def delivered():
    payload = MessageDelivered(message_id=uuid.uuid4().hex, agency_id="agency-1", recipient_staff_id="staff-1")
    return new_envelope(DELIVERED, payload, agency_id="agency-1", producer="inbox")


class Sink:
    """Subscriber side: every event id received with when it arrived, duplicates included."""

    def __init__(self):
        self.received: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def __call__(self, envelope) -> None:
        with self._lock:
            self.received.append((envelope.event_id, time.monotonic()))

    def ids(self) -> list[str]:
        with self._lock:
            return [event_id for event_id, _ in self.received]

    def at(self, event_id: str) -> float | None:
        with self._lock:
            return next((at for seen, at in self.received if seen == event_id), None)


@pytest.fixture
def items(mongo_client, db_name):
    return mongo_client[db_name][ITEMS]


@pytest.fixture
def sink(event_bus):
    handler = Sink()
    consumer = event_bus.consumer("outbox-wakeup-sink", [DELIVERED], handler, prefetch=200)
    with consumer.running():
        yield handler


@pytest.fixture
def publisher(event_bus):
    real = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    yield real
    real.close()


def idle_relay(items, publisher, poll_interval_s: float) -> OutboxRelay:
    relay = OutboxRelay(items.database, [ITEMS], publisher, poll_interval_s=poll_interval_s)
    relay.ensure_indexes()
    return relay


def settled(relay: OutboxRelay, items) -> None:
    """The running relay holds the lease and has looked at least once (and found nothing)."""
    wait_until(lambda: items.database[outbox.LEASES].find_one({"holder": relay.relay_id}), timeout=10)
    time.sleep(0.3)


def test_an_event_staged_by_this_process_is_published_without_waiting_for_the_poll(items, sink, publisher):
    relay = idle_relay(items, publisher, SLOW_POLL_S)
    with background(relay.run_forever):
        settled(relay, items)
        samples = []
        for _ in range(5):
            event = delivered()
            staged_at = time.monotonic()
            items.insert_one({"_id": uuid.uuid4().hex, **outbox_fields([event])})
            wait_until(lambda e=event: sink.at(e.event_id), timeout=5, message="the woken relay's publish")
            samples.append(sink.at(event.event_id) - staged_at)
    assert max(samples) < 5 < SLOW_POLL_S
    assert sorted(samples)[len(samples) // 2] < 1.0


def test_an_update_staging_events_wakes_the_relay_too(items, sink, publisher):
    doc_id = uuid.uuid4().hex
    items.insert_one({"_id": doc_id, "state": "draft"})
    relay = idle_relay(items, publisher, SLOW_POLL_S)
    with background(relay.run_forever):
        settled(relay, items)
        event = delivered()
        items.update_one({"_id": doc_id}, outbox.with_outbox({"$set": {"state": "sent"}}, [event]))
        wait_until(lambda: sink.at(event.event_id), timeout=5, message="the woken relay's publish")
        held = delivered()
        items.update_one({"_id": doc_id}, outbox_update([held], ready=False))
        time.sleep(0.3)
        assert sink.at(held.event_id) is None  # held events do not wake it (nor are they due)
        items.update_one({"_id": doc_id}, outbox.release_update())
        wait_until(lambda: sink.at(held.event_id), timeout=5, message="the released event")
    assert sink.ids().count(event.event_id) == 1


def test_a_wake_up_that_comes_before_the_write_is_followed_up(items, sink, publisher):
    """The helpers run before the producer's write: the pass right after the wake-up may find nothing.
    The relay looks again shortly (2, 4, 8 ... ms) instead of waiting for the poll."""
    relay = idle_relay(items, publisher, SLOW_POLL_S)
    with background(relay.run_forever):
        settled(relay, items)
        event = delivered()
        fields = outbox_fields([event])  # wakes the relay now ...
        time.sleep(0.05)  # ... which looks before the document exists
        items.insert_one({"_id": uuid.uuid4().hex, **fields})
        written_at = time.monotonic()
        wait_until(lambda: sink.at(event.event_id), timeout=5, message="the followed-up publish")
    assert sink.at(event.event_id) - written_at < 5 < SLOW_POLL_S


def test_documents_staged_by_another_process_are_still_found_by_the_poll(items, sink, publisher):
    relay = idle_relay(items, publisher, 0.2)
    with background(relay.run_forever):
        settled(relay, items)
        event = delivered()
        fields = outbox_fields([event], ready=False)  # no wake-up: as if another process staged it
        generation = outbox._staged.generation
        items.insert_one({"_id": uuid.uuid4().hex, **fields, outbox.OUTBOX_AT: now_ms()})
        wait_until(lambda: sink.at(event.event_id), timeout=5, message="the polled publish")
        assert outbox._staged.generation == generation


def test_a_stream_of_stagings_is_published_once_each_and_in_order_per_document(items, sink, publisher):
    doc_id = uuid.uuid4().hex
    items.insert_one({"_id": doc_id, "state": "open"})
    relay = idle_relay(items, publisher, SLOW_POLL_S)
    staged: list[str] = []
    with background(relay.run_forever):
        settled(relay, items)
        for n in range(60):
            event = delivered()
            staged.append(event.event_id)
            items.update_one({"_id": doc_id}, outbox.with_outbox({"$set": {"n": n}}, [event]))
            if n % 10 == 0:
                time.sleep(0.01)
        wait_until(lambda: set(staged) <= set(sink.ids()), timeout=10, message="every staged event")
        wait_until(lambda: not items.find_one({"_id": doc_id}).get(outbox.OUTBOX), message="the outbox emptied")
    assert sorted(sink.ids()) == sorted(staged)  # one relay, no failures: each event exactly once
    received = [event_id for event_id in sink.ids() if event_id in set(staged)]
    assert received == staged  # one document: in the order staged


def test_a_relay_that_does_not_hold_the_lease_is_not_woken_into_publishing(items, sink, publisher):
    holder = idle_relay(items, publisher, SLOW_POLL_S)
    assert holder.hold_lease(now_ms())
    waiting = idle_relay(items, publisher, SLOW_POLL_S)
    with background(waiting.run_forever):
        time.sleep(0.3)
        event = delivered()
        items.insert_one({"_id": uuid.uuid4().hex, **outbox_fields([event])})
        time.sleep(0.5)
        assert sink.at(event.event_id) is None
        assert items.find_one({})[outbox.OUTBOX]  # still staged, for the holder
    assert holder.run_once() == 1
    wait_until(lambda: sink.at(event.event_id), timeout=5)
