"""A send interrupted between the message write and the board items is finished by the repair pass."""

from __future__ import annotations

import os

import pika
import pytest
from pymongo.errors import AutoReconnect

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain, store
from services.inbox.mailbox import Mailbox
from services.kit.auth import Identity
from services.kit.bus import BatchPublisher, Topology
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.outbox import OutboxRelay
from tests.waits import background, wait_until


def never_called(addressing):
    raise AssertionError("the repair pass must not resolve recipients again")


@pytest.fixture
def inbox(mongo_client, db_name):
    db = mongo_client[db_name]
    inbox_store = store.InboxStore(db)
    inbox_store.ensure_indexes()
    cipher = PhiCipher(KeyRing(db, {"m": os.urandom(32)}, "m"))
    return Mailbox(inbox_store, cipher, resolve=never_called), db


def interrupted_send(mailbox: Mailbox, sender: Identity, recipients: list[str]) -> dict:
    """Write the message document exactly as send() does, then 'crash' part way through the fan-out."""
    draft = domain.Draft(domain.Addressing(staff_ids=tuple(recipients)), subject="s", body="b")
    doc = mailbox.compose(sender, draft, recipients, domain.new_message_id())
    doc["fanout_pending_at"] = doc["sent_at"] = now_ms() - 60_000
    mailbox.store.insert_message(doc)
    mailbox.store.insert_board_items([domain.board_item(doc, recipients[0], domain.FOLDER_MESSAGES)])
    return doc


def test_repair_finishes_the_fanout_once_and_releases_the_events(inbox, amqp_url, name_prefix):
    mailbox, db = inbox
    sender = Identity(subject="stf_a", agency_id="agy_1", name="A")
    doc = interrupted_send(mailbox, sender, ["stf_b", "stf_c"])
    assert db.messages.find_one({"_id": doc["_id"]}).get("_outbox_at") is None  # held: nothing published yet

    with background(mailbox.repair_fanouts, 0.05):  # stopped afterwards: it must end, without an error
        wait_until(lambda: "fanout_pending_at" not in db.messages.find_one({"_id": doc["_id"]}))

    stored = db.messages.find_one({"_id": doc["_id"]})
    assert "fanout_pending_at" not in stored and stored["_outbox_at"] > 0  # events released to the relay
    owners = sorted(item["owner_id"] for item in db.board_items.find({"message_id": doc["_id"]}))
    assert owners == ["stf_a", "stf_b", "stf_c"]  # sender's Sent copy + each recipient once
    reader = Identity(subject="stf_c", agency_id="agy_1")
    assert mailbox.page(reader, domain.FOLDER_MESSAGES, False, None, 20)["items"][0]["id"] == doc["_id"]

    # The released events reach the broker: one message.delivered per recipient, none lost.
    topology = Topology(prefix=name_prefix)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    topology.declare(channel)
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue, topology.exchange_name, routing_key="message.delivered.v1")
    publisher = BatchPublisher(amqp_url, topology)
    try:
        relay = OutboxRelay(db, list(store.OUTBOX_COLLECTIONS), publisher, lease_ttl_s=None)
        assert relay.run_once() == 3  # two message.delivered, and the listing read above (phi.accessed)
        recipients = set()
        for _method, _props, body in channel.consume(queue, inactivity_timeout=5):
            if body is None:
                break
            recipients.add(unpack(decode_envelope(body), inbox_pb2.MessageDelivered).recipient_staff_id)
            if len(recipients) == 2:
                break
        assert recipients == {"stf_b", "stf_c"}
        assert not db.messages.find_one({"_id": doc["_id"]}).get("_outbox")  # drained
    finally:
        publisher.close()
        channel.exchange_delete(topology.exchange_name)
        channel.exchange_delete(topology.unrouted_name)
        channel.queue_delete(topology.unrouted_name)
        connection.close()


def test_a_failing_repair_pass_does_not_stop_the_worker(inbox, monkeypatch):
    mailbox, _db = inbox
    calls = []

    def flaky(older_than_ms, limit=100):
        calls.append(older_than_ms)
        if len(calls) == 1:
            raise AutoReconnect("primary stepped down")
        return []

    monkeypatch.setattr(mailbox.store, "pending_fanouts", flaky)
    with background(mailbox.repair_fanouts, 0.01):  # stopped afterwards: it must end, without an error
        wait_until(lambda: len(calls) >= 3)  # it kept going after the failed pass
