"""auto-reply's consumer throughput against the bare idempotent consumer, on nx-27017 and the local
RabbitMQ, measured in one run (three rounds of the three cases in turn; the median of each round's ratio):

- baseline: the kit's Consumer with ProcessedEvents and a handler that does nothing (the floor every
  consumer pays: decode, processed-event check and record, ack);
- not away: AutoReplier.handle for recipients with no active auto-reply (the common case: one
  primary-key read of the setting);
- answered: every event from a different sender to someone away (claim the slot, seal the text,
  SendMessage to an in-process gRPC stand-in of inbox that answers at once, mark sent).

Target: not away >= 60% of the baseline's events/s. Results also go to artifacts/bench/auto_reply.json.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
import pika
import pymongo
from google.protobuf.timestamp_pb2 import Timestamp

from bench._env import embedded_mongo, machine, private_vhost, write_report
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.auto_reply import domain
from services.auto_reply.clients import InboxClient
from services.auto_reply.replier import EVENT_TYPE, AutoReplier
from services.auto_reply.store import AutoReplyStore
from services.kit.auth import KIND_SERVICE, Identity
from services.kit.bus import Consumer, Topology, message_properties
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.events import new_envelope
from services.kit.mongo import now_ms
from services.kit.processed_events import ProcessedEvents

EVENTS = 1_000
ROUNDS = 3
TARGET_RATIO = 0.6
AGENCY = "agy_bench"
AWAY = "stf_away"


class InstantInbox(inbox_pb2_grpc.InboxServiceServicer):
    def SendMessage(self, request, context):  # noqa: N802
        return inbox_pb2.SendMessageResponse(message_id=f"msg_{uuid.uuid4().hex}", created=True)


class Tokens:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:auto-reply", agency_id=agency_id, kind=KIND_SERVICE, token="t")

    def forget(self, agency_id=None) -> None:
        pass


def events(count: int, recipient: str) -> list:
    sent_at = Timestamp()
    sent_at.FromMilliseconds(now_ms())
    out = []
    batch = uuid.uuid4().hex[:8]  # new senders every batch: a later round answers, not "already answered"
    for i in range(count):
        message_id = f"msg_{uuid.uuid4().hex}"
        payload = inbox_pb2.MessageDelivered(
            message_id=message_id,
            thread_id=message_id,
            agency_id=AGENCY,
            sender_staff_id=f"stf_sender_{batch}_{i}",
            recipient_staff_id=recipient,
            sent_at=sent_at,
            board_kind="messages",
            sender_kind="staff",
        )
        out.append(
            new_envelope(
                EVENT_TYPE, payload, agency_id=AGENCY, producer="inbox", event_id=f"{message_id}-{recipient}-delivered"
            )
        )
    return out


def run(amqp_url: str, db, handler, batch: list, name: str) -> float:
    """Events/s of a consumer working through `batch`, published before it starts."""
    done = threading.Event()
    seen = {"n": 0}

    def counted(envelope):
        handler(envelope)
        seen["n"] += 1
        if seen["n"] == len(batch):
            done.set()

    topology = Topology(prefix=f"bench{uuid.uuid4().hex[:6]}")
    consumer = Consumer(
        amqp_url,
        f"{name}.delivered",
        [EVENT_TYPE],
        counted,
        topology=topology,
        processed=ProcessedEvents(db, name),
        prefetch=64,
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    consumer.declare(channel)
    for envelope in batch:
        channel.basic_publish(
            topology.exchange_name, EVENT_TYPE, envelope.SerializeToString(), message_properties(envelope)
        )
    connection.close()
    started = time.perf_counter()
    with consumer.running():
        if not done.wait(600):
            raise SystemExit(f"{name}: only {seen['n']} of {len(batch)} events handled")
        elapsed = time.perf_counter() - started
    return len(batch) / elapsed


def main() -> int:
    logging.disable(logging.INFO)
    with embedded_mongo() as mongo_uri, private_vhost() as amqp_url:
        db = pymongo.MongoClient(mongo_uri)[f"bench_{uuid.uuid4().hex[:8]}"]
        store = AutoReplyStore(db, PhiCipher(KeyRing(db, {"k1": os.urandom(32)}, "k1")))
        store.ensure_indexes()
        store.save(
            domain.apply_change(
                domain.never_set(AGENCY, AWAY, "staff", "America/Chicago"),
                domain.Change(True, "Out until Monday.", None, None, "America/Chicago"),
                now_ms() - 60_000,
            )
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        inbox_pb2_grpc.add_InboxServiceServicer_to_server(InstantInbox(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        inbox = InboxClient(f"127.0.0.1:{port}")
        replier = AutoReplier(store, inbox, Tokens())
        try:
            # Rounds of the three cases in turn, medians reported: a shared machine's load comes and
            # goes within a run, and one round's ratio swung by a quarter.
            rates: dict[str, list[float]] = {"baseline": [], "not-away": [], "answered": []}
            for _ in range(ROUNDS):
                rates["baseline"].append(
                    run(amqp_url, db, lambda envelope: None, events(EVENTS, "stf_present"), "baseline")
                )
                rates["not-away"].append(run(amqp_url, db, replier.handle, events(EVENTS, "stf_present"), "not-away"))
                rates["answered"].append(run(amqp_url, db, replier.handle, events(EVENTS, AWAY), "answered"))
        finally:
            inbox.close()
            server.stop(0)
    baseline, not_away, answered = (statistics.median(rates[name]) for name in ("baseline", "not-away", "answered"))
    # Each round's ratio is taken against the baseline of that same round, then the median of those.
    not_away_ratio = statistics.median(n / b for n, b in zip(rates["not-away"], rates["baseline"], strict=True))
    answered_ratio = statistics.median(a / b for a, b in zip(rates["answered"], rates["baseline"], strict=True))
    report = {
        "events": EVENTS,
        "rounds": ROUNDS,
        "baseline_events_per_s": round(baseline, 1),
        "not_away_events_per_s": round(not_away, 1),
        "answered_events_per_s": round(answered, 1),
        "not_away_ratio": round(not_away_ratio, 3),
        "answered_ratio": round(answered_ratio, 3),
        "not_away_ratios": [round(n / b, 3) for n, b in zip(rates["not-away"], rates["baseline"], strict=True)],
        "target_not_away_ratio": TARGET_RATIO,
        "machine": machine(),
    }
    path = write_report("auto_reply", report)
    for key, value in report.items():
        print(f"{key:>24}: {value}")
    print(f"report: {path}")
    return 0 if report["not_away_ratio"] >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
