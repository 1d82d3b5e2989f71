"""The transactional outbox on nx-27017 and the real broker: nothing staged is ever lost."""

from __future__ import annotations

import threading
import uuid

import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.bus import BatchPublisher
from services.kit.events import new_envelope
from services.kit.outbox import (
    LEASE_TTL_S,
    OutboxRelay,
    outbox_fields,
    outbox_update,
    release_update,
    with_outbox,
)
from tests.waits import Worker, background, finish_all, wait_until

DELIVERED = "message.delivered.v1"
ITEMS = "board_items"


def delivered():
    payload = MessageDelivered(message_id=uuid.uuid4().hex, agency_id="agency-1", recipient_staff_id="staff-1")
    return new_envelope(DELIVERED, payload, agency_id="agency-1", producer="inbox")


class Sink:
    """Subscriber side: every event id received, duplicates included."""

    def __init__(self):
        self.received: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, envelope) -> None:
        with self._lock:
            self.received.append(envelope.event_id)

    def distinct(self) -> set[str]:
        with self._lock:
            return set(self.received)


@pytest.fixture
def items(mongo_client, db_name):
    return mongo_client[db_name][ITEMS]


@pytest.fixture
def sink(event_bus):
    handler = Sink()
    consumer = event_bus.consumer("outbox-sink", [DELIVERED], handler, prefetch=200)
    with consumer.running():
        yield handler


@pytest.fixture
def publisher(event_bus):
    real = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    yield real
    real.close()


def relay_for(items, publisher, **options) -> OutboxRelay:
    relay = OutboxRelay(items.database, [ITEMS], publisher, **options)
    relay.ensure_indexes()
    return relay


def stage(items, events_per_item: int, count: int, ready: bool = True) -> list[str]:
    """Insert board items, each created together with its events; returns all event ids."""
    staged = []
    for _ in range(count):
        events = [delivered() for _ in range(events_per_item)]
        items.insert_one({"_id": uuid.uuid4().hex, "state": "delivered", **outbox_fields(events, ready=ready)})
        staged += [event.event_id for event in events]
    return staged


def pending(items) -> list[str]:
    return [event_id for doc in items.find({}) for event_id in (doc.get("_outbox") or {})]


def due(items) -> list[dict]:
    return list(items.find({"_outbox_at": {"$lte": 10**13}}))


def drain(relay: OutboxRelay, items, timeout: float = 10.0) -> None:
    wait_until(lambda: relay.run_once() == 0 and not due(items) and not pending(items), timeout=timeout)


class CrashingPublisher:
    """Publishes the first `k` events of a batch for real, then dies before the relay can clean up."""

    def __init__(self, real: BatchPublisher, k: int):
        self.real, self.k = real, k

    def publish_batch(self, envelopes):
        self.real.publish_batch(envelopes[: self.k])
        raise RuntimeError("relay process killed")

    def idle(self, seconds):
        self.real.idle(seconds)


class HalfConfirmingPublisher:
    """Publishes everything but reports only the first half as confirmed (the rest nacked)."""

    def __init__(self, real: BatchPublisher):
        self.real = real

    def publish_batch(self, envelopes):
        confirmed = self.real.publish_batch(envelopes)
        return {event.event_id for event in envelopes[: len(envelopes) // 2]} & confirmed

    def idle(self, seconds):
        self.real.idle(seconds)


def test_staged_events_are_published_then_removed_from_the_document(items, sink, publisher):
    staged = stage(items, events_per_item=2, count=3)
    doc_id = uuid.uuid4().hex
    items.insert_one({"_id": doc_id, "state": "draft"})
    later = delivered()
    items.update_one({"_id": doc_id}, with_outbox({"$set": {"state": "sent"}}, [later]))
    staged.append(later.event_id)

    relay = relay_for(items, publisher)
    assert relay.run_once() == 7
    wait_until(lambda: sink.distinct() == set(staged))

    assert pending(items) == []
    assert due(items) == []
    assert items.find_one({"_id": doc_id})["state"] == "sent"
    assert relay.run_once() == 0


def test_relay_killed_between_publish_and_cleanup_loses_nothing(items, sink, publisher):
    staged = stage(items, events_per_item=2, count=20)
    crashing = relay_for(items, CrashingPublisher(publisher, k=15), lease_ttl_s=None)
    with pytest.raises(RuntimeError):
        crashing.run_once()
    assert sorted(pending(items)) == sorted(staged)  # published or not, nothing was removed

    drain(relay_for(items, publisher, lease_ttl_s=None), items)
    wait_until(lambda: sink.distinct() == set(staged))
    assert len(sink.received) >= len(staged)  # duplicates are allowed, losses are not


def test_unconfirmed_events_stay_for_a_later_pass(items, sink, publisher):
    staged = stage(items, events_per_item=1, count=10)
    partial = relay_for(items, HalfConfirmingPublisher(publisher), lease_ttl_s=None, max_backoff_s=0.05)
    assert partial.run_once() == 5
    left = pending(items)
    assert len(left) == 5
    assert all(doc["_outbox_tries"] == 1 for doc in due(items))

    drain(relay_for(items, publisher, lease_ttl_s=None), items)
    wait_until(lambda: sink.distinct() == set(staged))
    assert all("_outbox_tries" not in doc for doc in items.find({}))


def test_event_staged_during_a_relay_pass_is_not_lost(items, sink, publisher):
    doc_id = uuid.uuid4().hex
    first, second = delivered(), delivered()
    items.insert_one({"_id": doc_id, "state": "delivered", **outbox_fields([first])})

    class StagingMeanwhile:
        """Another request stages an event on the same item while the relay is publishing."""

        def publish_batch(self, envelopes):
            items.update_one({"_id": doc_id}, outbox_update([second]))
            return publisher.publish_batch(envelopes)

        def idle(self, seconds):
            publisher.idle(seconds)

    assert relay_for(items, StagingMeanwhile(), lease_ttl_s=None).run_once() == 1
    doc = items.find_one({"_id": doc_id})
    assert list(doc["_outbox"]) == [second.event_id]  # the confirmed one is gone, the new one stays
    assert "_outbox_at" in doc  # and the item is still due

    assert relay_for(items, publisher, lease_ttl_s=None).run_once() == 1
    wait_until(lambda: sink.distinct() == {first.event_id, second.event_id})
    assert pending(items) == []


def test_held_events_are_not_published_until_released(items, sink, publisher):
    held = stage(items, events_per_item=2, count=1, ready=False)
    relay = relay_for(items, publisher)
    assert relay.run_once() == 0
    assert sorted(pending(items)) == sorted(held)

    doc = items.find_one({})
    items.update_one({"_id": doc["_id"]}, release_update())
    assert relay.run_once() == 2
    wait_until(lambda: sink.distinct() == set(held))


def test_only_the_lease_holder_relays_until_it_lets_go(items, sink, publisher):
    first, second = relay_for(items, publisher), relay_for(items, publisher)
    stage(items, events_per_item=1, count=2)
    assert first.run_once() == 2
    stage(items, events_per_item=1, count=1)
    assert second.run_once() == 0  # the first relay holds the lease

    stopped = threading.Event()
    stopped.set()
    first.run_forever(stopped)  # returns at once and releases the lease
    assert second.run_once() == 1


def test_a_relay_that_stopped_renewing_is_replaced_within_the_lease_ttl(items, sink, publisher):
    """A killed holder never releases its lease: a waiting relay takes over once LEASE_TTL_S has
    passed since the holder's last renewal, and the old holder, if it comes back, stands down."""
    assert LEASE_TTL_S <= 5.0  # events flow again within seconds of a replacement starting
    ttl = int(LEASE_TTL_S * 1000)
    first, second = relay_for(items, publisher), relay_for(items, publisher)
    t = 1_000_000_000_000
    assert first.hold_lease(t)
    assert first.hold_lease(t + ttl // 2)  # renewed once a third of the TTL has passed
    assert not second.hold_lease(t + ttl)  # still held: renewed at t + ttl/2
    # first is killed here: it never renews again.
    assert not second.hold_lease(t + ttl // 2 + ttl - 1)
    assert second.hold_lease(t + ttl // 2 + ttl + 1)
    assert not first.hold_lease(t + ttl // 2 + ttl + 2)  # the old holder stands down


def test_concurrent_relays_without_a_lease_lose_nothing(items, sink, event_bus):
    staged = stage(items, events_per_item=2, count=100)
    stop = threading.Event()
    publishers = [BatchPublisher(event_bus.amqp_url, event_bus.topology) for _ in range(3)]
    relays = [
        Worker(relay_for(items, p, batch_size=20, lease_ttl_s=None).run_forever, stop, name=f"relay-{n}").start()
        for n, p in enumerate(publishers)
    ]
    try:
        wait_until(lambda: sink.distinct() == set(staged), timeout=20)
        wait_until(lambda: not pending(items) and not due(items))
    finally:
        stop.set()
        finish_all(relays, 10)  # every relay ended, none raised
        for p in publishers:
            p.close()


def test_running_relay_works_through_a_backlog_without_duplicates(items, sink, publisher):
    staged = stage(items, events_per_item=1, count=120)
    relay = relay_for(items, publisher, batch_size=25)
    with background(relay.run_forever):  # stopped afterwards: it must end, without an error
        wait_until(lambda: sink.distinct() == set(staged), timeout=20)
        wait_until(lambda: not pending(items) and not due(items))
        late = stage(items, events_per_item=1, count=1)  # picked up by the idle poll
        wait_until(lambda: set(late) <= sink.distinct())
    assert sorted(sink.received) == sorted(staged + late)  # one relay, no failures: each event once


def test_an_unreadable_entry_is_set_aside_and_the_rest_still_published(items, sink, publisher):
    good = delivered()
    fields = outbox_fields([good])
    fields["_outbox"]["broken"] = {"rk": DELIVERED, "env": b"\xff\xfe not an envelope"}
    items.insert_one({"_id": "item-1", **fields})

    relay = relay_for(items, publisher)
    assert relay.run_once() == 1
    wait_until(lambda: sink.distinct() == {good.event_id})
    doc = items.find_one({"_id": "item-1"})
    assert not doc.get("_outbox") and "_outbox_at" not in doc  # nothing left to retry forever
    assert bytes(doc["_outbox_failed"]["broken"]["env"]) == b"\xff\xfe not an envelope"  # kept for a person
    assert relay.run_once() == 0
