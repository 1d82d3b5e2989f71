"""The auto-reply consumer against the real broker and the real database: one answer per slot through
redelivery, retries after each crash window, a claim left by a dead instance, two instances racing.

inbox is a gRPC stand-in that keeps inbox's idempotency contract (the same key answers the first
send, `created` False) and can fail before or after it records a send, as a lost connection would.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.auto_reply import domain
from services.auto_reply.clients import InboxClient
from services.auto_reply.replier import EVENT_TYPE, AutoReplier, InboxUnavailable
from services.auto_reply.store import AutoReplyStore
from services.kit.auth import KIND_SERVICE, Identity
from services.kit.bus import Publisher
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.events import Envelope, new_envelope
from services.kit.mongo import now_ms
from services.kit.processed_events import ProcessedEvents
from tests.waits import together, wait_until

AGENCY = "agy_a"
AWAY = "stf_away"
SENDER = "stf_colleague"
TEXT = "Out until Monday."


class StandInInbox(inbox_pb2_grpc.InboxServiceServicer):
    """SendMessage with inbox's idempotency: one message per key; failures on demand."""

    def __init__(self):
        self.calls: list[inbox_pb2.SendMessageRequest] = []
        self.messages: dict[str, inbox_pb2.SendMessageRequest] = {}  # idempotency key -> the send kept
        self.fail_before = 0  # the next n calls fail before anything is kept
        self.fail_after = 0  # the next n calls keep the send, then fail (the answer is lost)
        self.refuse: dict[str, grpc.StatusCode] = {}  # in_reply_to -> a permanent refusal
        self.delay_s = 0.0
        self._lock = threading.Lock()

    def SendMessage(self, request, context):  # noqa: N802
        time.sleep(self.delay_s)
        with self._lock:
            self.calls.append(request)
            if request.in_reply_to_message_id in self.refuse:
                context.abort(self.refuse[request.in_reply_to_message_id], "refused")
            if self.fail_before:
                self.fail_before -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            created = request.idempotency_key not in self.messages
            if created:
                self.messages[request.idempotency_key] = request
            message_id = f"msg_answer_{list(self.messages).index(request.idempotency_key)}"
            if self.fail_after:
                self.fail_after -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost")
        return inbox_pb2.SendMessageResponse(
            message_id=message_id, thread_id=request.in_reply_to_message_id, created=created
        )


class ServiceTokensStandIn:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:auto-reply", agency_id=agency_id, kind=KIND_SERVICE, token="service-token")

    def forget(self, agency_id: str | None = None) -> None:
        pass


@pytest.fixture
def inbox_stand_in():
    servicer = StandInInbox()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inbox_pb2_grpc.add_InboxServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = InboxClient(f"127.0.0.1:{port}")
    yield servicer, client
    client.close()
    server.stop(0)


@pytest.fixture
def db(mongo_client, db_name):
    return mongo_client[db_name]


MASTER_KEYS = {"k1": os.urandom(32)}


def new_store(db) -> AutoReplyStore:
    """One instance's store: its own key ring over the shared database and master key."""
    return AutoReplyStore(db, PhiCipher(KeyRing(db, MASTER_KEYS, "k1")))


@pytest.fixture
def store(db):
    store = new_store(db)
    store.ensure_indexes()
    setting = domain.apply_change(
        domain.never_set(AGENCY, AWAY, "staff", "America/Chicago"),
        domain.Change(enabled=True, message=TEXT, starts_at=None, ends_at=None, time_zone="America/Chicago"),
        now_ms() - 60_000,
    )
    store.save(setting)
    return store


def delivered(message_id: str, sender: str = SENDER, **fields):
    sent_at = Timestamp()
    sent_at.FromMilliseconds(now_ms())
    payload = inbox_pb2.MessageDelivered(
        message_id=message_id,
        thread_id=message_id,
        agency_id=AGENCY,
        sender_staff_id=sender,
        recipient_staff_id=AWAY,
        sent_at=sent_at,
        board_kind="messages",
        sender_kind="staff",
        **fields,
    )
    return new_envelope(
        EVENT_TYPE, payload, agency_id=AGENCY, producer="inbox", event_id=f"{message_id}-{AWAY}-delivered"
    )


def running_consumer(event_bus, store, inbox_client, db, **options):
    replier = AutoReplier(store, inbox_client, ServiceTokensStandIn())
    return event_bus.consumer(
        "auto-reply.message-delivered",
        [EVENT_TYPE],
        replier.handle,
        processed=ProcessedEvents(db, "auto-reply"),
        **options,
    ).running()


def publish(event_bus, *envelopes) -> None:
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    try:
        publisher.publish(envelopes)
    finally:
        publisher.close()


def processed(db, *envelopes) -> bool:
    return all(db.processed_events.find_one({"_id": f"auto-reply:{e.event_id}"}) for e in envelopes)


def the_one_slot(db) -> dict:
    [slot] = list(db.reply_slots.find({"replier_id": {"$eq": AWAY}}))
    return slot


def leave_an_unsent_claim(store, inbox, client, message_id: str) -> None:
    """As an instance that crashed between the claim and the send would: the answer to `message_id`
    claimed by the service's own code, never sent (the stand-in's calls are then forgotten)."""
    inbox.fail_before = 1
    with pytest.raises(InboxUnavailable):
        AutoReplier(store, client, ServiceTokensStandIn()).handle(delivered(message_id))
    [claim] = list(store.slots.find({"in_reply_to": {"$eq": message_id}}))
    assert claim["sent_at"] == 0 and inbox.messages == {}
    inbox.calls.clear()


def test_redelivered_and_repeated_events_answer_once(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    first, second = delivered("msg_1"), delivered("msg_2")
    with running_consumer(event_bus, store, client, db):
        publish(event_bus, first, first, second, first, second)
        wait_until(lambda: processed(db, first, second))
    assert len(inbox.messages) == 1
    [answer] = inbox.messages.values()
    assert answer.sender_staff_id == AWAY and answer.auto_reply and answer.body == TEXT
    assert answer.in_reply_to_message_id in ("msg_1", "msg_2")
    slot = the_one_slot(db)
    assert slot["sent_at"] > 0 and slot["reply_message_id"] == "msg_answer_0"
    assert answer.idempotency_key == domain.idempotency_key(slot["_id"])


def test_a_send_lost_before_inbox_kept_it_is_retried_with_the_same_key(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    inbox.fail_before = 2
    event = delivered("msg_1")
    with running_consumer(event_bus, store, client, db):
        publish(event_bus, event)
        wait_until(lambda: processed(db, event))
    assert len(inbox.calls) == 3 and len({c.idempotency_key for c in inbox.calls}) == 1
    assert len(inbox.messages) == 1 and the_one_slot(db)["sent_at"] > 0


def test_an_answer_lost_after_inbox_sent_is_not_sent_twice(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    inbox.fail_after = 1
    event = delivered("msg_1")
    with running_consumer(event_bus, store, client, db):
        publish(event_bus, event)
        wait_until(lambda: processed(db, event))
    assert len(inbox.calls) == 2 and inbox.calls[0] == inbox.calls[1]
    assert len(inbox.messages) == 1
    assert the_one_slot(db)["reply_message_id"] == "msg_answer_0"


def test_a_claim_left_by_a_dead_instance_is_sent_as_claimed_by_the_next_message(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    leave_an_unsent_claim(store, inbox, client, "msg_1")
    setting = store.setting(AGENCY, AWAY, "staff")
    # The instance died before sending; meanwhile the text was reworded (same activation).
    store.save(domain.apply_change(setting, domain.Change(True, "Reworded.", None, None, "America/Chicago"), now_ms()))
    later = delivered("msg_2")
    with running_consumer(event_bus, store, client, db):
        publish(event_bus, later)
        wait_until(lambda: processed(db, later))
    [answer] = inbox.messages.values()
    assert (answer.in_reply_to_message_id, answer.body) == ("msg_1", TEXT)
    assert the_one_slot(db)["sent_at"] > 0


def test_a_permanent_refusal_releases_the_slot_for_the_next_message(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    inbox.refuse["msg_gone"] = grpc.StatusCode.NOT_FOUND
    gone, later = delivered("msg_gone"), delivered("msg_2")
    with running_consumer(event_bus, store, client, db) as consumer:
        publish(event_bus, gone)
        wait_until(lambda: processed(db, gone))
        assert list(db.reply_slots.find({})) == []
        publish(event_bus, later)
        wait_until(lambda: processed(db, later))
        assert event_bus.message_count(consumer.parking_queue) == 0
    [answer] = inbox.messages.values()
    assert answer.in_reply_to_message_id == "msg_2"


def test_a_dead_instances_claim_that_inbox_refuses_does_not_cost_the_next_message_its_answer(
    event_bus, store, inbox_stand_in, db
):
    """A claim for msg_gone was left unsent by a crash; msg_gone is gone by the time msg_2 arrives. The
    refused claim is released and msg_2 is answered in its place."""
    inbox, client = inbox_stand_in
    leave_an_unsent_claim(store, inbox, client, "msg_gone")
    inbox.refuse["msg_gone"] = grpc.StatusCode.NOT_FOUND
    later = delivered("msg_2")
    with running_consumer(event_bus, store, client, db) as consumer:
        publish(event_bus, later)
        wait_until(lambda: processed(db, later))
        assert event_bus.message_count(consumer.parking_queue) == 0
    assert [c.in_reply_to_message_id for c in inbox.calls] == ["msg_gone", "msg_2"]
    [answer] = inbox.messages.values()
    assert answer.in_reply_to_message_id == "msg_2"
    sent = the_one_slot(db)
    assert (sent["in_reply_to"], sent["event_id"]) == ("msg_2", later.event_id) and sent["sent_at"] > 0


def test_two_instances_racing_for_one_slot_send_one_message(store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    inbox.delay_s = 0.05
    repliers = [AutoReplier(new_store(db), client, ServiceTokensStandIn()) for _ in range(2)]
    events = [delivered("msg_1"), delivered("msg_2")]
    outcomes = together(*(lambda r=r, e=e: r.handle(e) for r, e in zip(repliers, events, strict=True)), timeout=10)
    assert len(inbox.messages) == 1
    assert sorted(outcomes) in (["already_answered", "answered"], ["answered", "answered"])
    assert the_one_slot(db)["sent_at"] > 0


def test_an_event_handled_after_the_auto_reply_was_turned_off_is_not_answered(event_bus, store, inbox_stand_in, db):
    """Off means off: a message sent while it was on, whose event is handled after it was turned off
    (or turned off and on again, a new activation), gets no answer."""
    inbox, client = inbox_stand_in
    sent_while_on = delivered("msg_1")
    setting = store.setting(AGENCY, AWAY, "staff")
    off = domain.apply_change(setting, domain.Change(False, None, None, None, "America/Chicago"), now_ms())
    store.save(off)
    with running_consumer(event_bus, store, client, db):
        publish(event_bus, sent_while_on)
        wait_until(lambda: processed(db, sent_while_on))
        assert inbox.calls == [] and list(db.reply_slots.find({})) == []
        # On again: the earlier message belongs to the previous activation.
        store.save(domain.apply_change(off, domain.Change(True, None, None, None, "America/Chicago"), now_ms() + 1))
        redelivered = Envelope()
        redelivered.CopyFrom(sent_while_on)  # the same message, sent before this activation
        redelivered.event_id = "msg_1-stf_away-delivered-again"
        publish(event_bus, redelivered)
        wait_until(lambda: processed(db, redelivered))
        assert inbox.calls == []
        later = delivered("msg_2")
        publish(event_bus, later)
        wait_until(lambda: processed(db, later))
    [answer] = inbox.messages.values()
    assert answer.in_reply_to_message_id == "msg_2"


def test_messages_never_answered_are_processed_without_a_send(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    never = [
        delivered("msg_all", to_whole_agency=True),
        delivered("msg_auto", auto_reply=True),
        delivered("msg_self", sender=AWAY),
        delivered("msg_machine", sender="svc:erx-bridge"),  # a service that sent a message as itself
    ]
    with running_consumer(event_bus, store, client, db):
        publish(event_bus, *never)
        wait_until(lambda: processed(db, *never))
    assert inbox.calls == [] and list(db.reply_slots.find({})) == []


def test_a_malformed_event_is_parked_and_the_consumer_keeps_answering(event_bus, store, inbox_stand_in, db):
    inbox, client = inbox_stand_in
    wrong = new_envelope(
        EVENT_TYPE, inbox_pb2.AnnouncementPosted(announcement_id="a"), agency_id=AGENCY, producer="inbox"
    )
    good = delivered("msg_1")
    with running_consumer(event_bus, store, client, db) as consumer:
        publish(event_bus, wrong, good)
        properties, _ = event_bus.get(consumer.parking_queue)
        assert properties.message_id == wrong.event_id
        wait_until(lambda: processed(db, good))
    assert len(inbox.messages) == 1
