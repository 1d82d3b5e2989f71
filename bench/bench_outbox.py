"""Outbox relay throughput against raw publishing, on nx-27017 and the local RabbitMQ.

Measured in one run, all to the same durable queue through the topic exchange, persistent messages:

- raw: BlockingConnection, no confirms (the ceiling; nothing is known to have arrived); best of 3
- one at a time: `Publisher`, waiting for each confirm
- relay: events staged in board-item documents in nx-27017 -> `OutboxRelay` + `BatchPublisher`
  (pipelined confirms) -> until every event is confirmed and removed from its document.
  Once with one event per document (the worst case: one cleanup write per event) and once with
  ten per document.

Target: relay (one event per document) >= 25% of raw. Results also go to artifacts/bench/outbox.json.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid

import pika
import pymongo

from bench._env import embedded_mongo, machine, private_vhost, write_report
from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.bus import BatchPublisher, Publisher, Topology, message_properties
from services.kit.events import new_envelope
from services.kit.outbox import OutboxRelay, outbox_fields

RAW_EVENTS = 20_000
RAW_RUNS = 3
ONE_AT_A_TIME_EVENTS = 3_000
RELAY_EVENTS = 20_000
BATCH_SIZE = 500
TARGET_RATIO = 0.25
DELIVERED = "message.delivered.v1"


def envelopes(count: int) -> list:
    return [
        new_envelope(
            DELIVERED,
            MessageDelivered(message_id=uuid.uuid4().hex, agency_id="agency-1", recipient_staff_id=f"staff-{i}",
                             board_kind="messages"),
            agency_id="agency-1", producer="inbox",
        )
        for i in range(count)
    ]


class Broker:
    def __init__(self, amqp_url: str, topology: Topology):
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        topology.declare(self.channel)
        self.sink = topology.name("bench-sink")
        self.channel.queue_declare(self.sink, durable=True)
        self.channel.queue_bind(self.sink, topology.exchange_name, routing_key=DELIVERED)

    def queued(self) -> int:
        return self.channel.queue_declare(self.sink, passive=True).method.message_count

    def purge(self) -> None:
        self.channel.queue_purge(self.sink)


def bench_raw(amqp_url: str, topology: Topology, broker: Broker) -> float:
    """Best of RAW_RUNS: the ceiling the relay is compared with, so noise only makes the ratio harsher."""
    return max(_raw_once(amqp_url, topology, broker) for _ in range(RAW_RUNS))


def _raw_once(amqp_url: str, topology: Topology, broker: Broker) -> float:
    events = envelopes(RAW_EVENTS)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    started = time.perf_counter()
    for event in events:
        channel.basic_publish(topology.exchange_name, event.event_type, event.SerializeToString(),
                              message_properties(event))
    connection.process_data_events(0)
    elapsed = time.perf_counter() - started
    connection.close()
    _wait_for_queue(broker, RAW_EVENTS)
    broker.purge()
    return RAW_EVENTS / elapsed


def bench_one_at_a_time(amqp_url: str, topology: Topology, broker: Broker) -> float:
    events = envelopes(ONE_AT_A_TIME_EVENTS)
    publisher = Publisher(amqp_url, topology)
    publisher.publish(events[:10])  # connect and declare outside the timing
    started = time.perf_counter()
    for event in events[10:]:
        publisher.publish([event])
    elapsed = time.perf_counter() - started
    publisher.close()
    broker.purge()
    return (ONE_AT_A_TIME_EVENTS - 10) / elapsed


def bench_relay(mongo_uri: str, amqp_url: str, topology: Topology, broker: Broker, per_doc: int) -> dict:
    client = pymongo.MongoClient(mongo_uri)
    db = client[f"bench_{uuid.uuid4().hex[:8]}"]
    items = db.board_items
    publisher = BatchPublisher(amqp_url, topology)
    relay = OutboxRelay(db, ["board_items"], publisher, batch_size=BATCH_SIZE)
    relay.ensure_indexes()
    events = envelopes(RELAY_EVENTS)
    docs = [
        {"_id": uuid.uuid4().hex, "owner": "staff-1", "state": "delivered",
         **outbox_fields(events[i:i + per_doc])}
        for i in range(0, RELAY_EVENTS, per_doc)
    ]
    staged_at = time.perf_counter()
    for i in range(0, len(docs), 1000):
        items.insert_many(docs[i:i + 1000], ordered=False)
    staging_s = time.perf_counter() - staged_at

    publisher.publish_batch(envelopes(1))  # connect and declare outside the timing
    broker.purge()
    stop = threading.Event()
    relaying = threading.Thread(target=relay.run_forever, args=(stop,))
    started = time.perf_counter()
    relaying.start()
    try:
        # Done when no document is due any more (each poll is one indexed find_one).
        deadline = time.monotonic() + 120
        while items.find_one({"_outbox_at": {"$lte": 10**13}}, {"_id": 1}) is not None:
            if time.monotonic() > deadline:
                raise SystemExit("relay did not finish within 120s")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        relaying.join()
    publisher.close()

    left = sum(len(doc.get("_outbox") or {}) for doc in items.find({}, {"_outbox": 1}))
    _wait_for_queue(broker, RELAY_EVENTS)
    queued = broker.queued()
    broker.purge()
    client.drop_database(db.name)
    client.close()
    if left or queued < RELAY_EVENTS:
        raise SystemExit(f"relay lost events: {queued}/{RELAY_EVENTS} reached the queue, {left} left in documents")
    return {
        "events": RELAY_EVENTS, "events_per_document": per_doc, "documents": len(docs),
        "seconds": round(elapsed, 3), "events_per_s": round(RELAY_EVENTS / elapsed),
        "messages_queued": queued, "staging_docs_per_s": round(len(docs) / staging_s),
    }


def _wait_for_queue(broker: Broker, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while broker.queued() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {broker.queued()} of {count} messages reached the queue")
        time.sleep(0.05)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    with embedded_mongo() as mongo_uri, private_vhost() as amqp_url:
        topology = Topology(prefix="bench")
        broker = Broker(amqp_url, topology)
        raw = bench_raw(amqp_url, topology, broker)
        one_at_a_time = bench_one_at_a_time(amqp_url, topology, broker)
        relay_single = bench_relay(mongo_uri, amqp_url, topology, broker, per_doc=1)
        relay_ten = bench_relay(mongo_uri, amqp_url, topology, broker, per_doc=10)
        broker.connection.close()

    ratio = relay_single["events_per_s"] / raw
    rows = [
        (f"raw publish, no confirms (best of {RAW_RUNS})", RAW_EVENTS, raw),
        ("one at a time, confirmed", ONE_AT_A_TIME_EVENTS - 10, one_at_a_time),
        ("outbox relay, 1 event/doc, confirmed", RELAY_EVENTS, relay_single["events_per_s"]),
        ("outbox relay, 10 events/doc, confirmed", RELAY_EVENTS, relay_ten["events_per_s"]),
    ]
    print(f"{'path':42} {'events':>8} {'events/s':>10} {'vs raw':>8}")
    for label, count, rate in rows:
        print(f"{label:42} {count:>8} {rate:>10,.0f} {rate / raw:>8.0%}")
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"relay/raw = {ratio:.0%} ({verdict} the {TARGET_RATIO:.0%} target); relay batch size {BATCH_SIZE}")

    path = write_report("outbox", {
        "raw_events_per_s": round(raw),
        "raw_runs": RAW_RUNS,
        "one_at_a_time_confirmed_events_per_s": round(one_at_a_time),
        "relay": relay_single,
        "relay_ten_per_document": relay_ten,
        "relay_to_raw_ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "batch_size": BATCH_SIZE,
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    print(f"written to {path.relative_to(path.parents[2])}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
