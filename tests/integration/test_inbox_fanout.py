"""A send interrupted between the message write and the board items is finished by the repair pass."""

from __future__ import annotations

import os
import threading

import pytest

from services.inbox import domain, store
from services.inbox.mailbox import Mailbox
from services.kit.auth import Identity
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields


@pytest.fixture
def inbox(mongo_client, db_name):
    db = mongo_client[db_name]
    inbox_store = store.InboxStore(db)
    inbox_store.ensure_indexes()
    cipher = PhiCipher(KeyRing(db, {"m": os.urandom(32)}, "m"))
    return Mailbox(inbox_store, cipher, resolve=lambda addressing: None), db


def interrupted_send(mailbox: Mailbox, sender: Identity, recipients: list[str]) -> dict:
    """Write the message document exactly as send() does, then 'crash' before the fan-out."""
    message_id = domain.new_message_id()
    sent_at = now_ms() - 60_000
    doc = {
        "_id": message_id,
        "agency_id": sender.agency_id,
        "thread_id": message_id,
        "sender_id": sender.staff_id,
        "sender_name": "A",
        "to_staff_ids": recipients,
        "to_team_ids": [],
        "to_whole_agency": 0,
        "recipient_ids": recipients,
        "priority": "normal",
        "links": [],
        "subject": mailbox.cipher.seal(sender.agency_id, message_id, "subject", "s"),
        "body": mailbox.cipher.seal(sender.agency_id, message_id, "body", "b"),
        "sent_at": sent_at,
        "fanout_pending_at": sent_at,
    }
    doc.update(outbox_fields([mailbox._delivered_event(doc, r) for r in recipients], ready=False))
    mailbox.store.insert_message(doc)
    # Half the board items made it before the crash.
    mailbox.store.insert_board_items([domain.board_item(doc, recipients[0], domain.FOLDER_MESSAGES)])
    return doc


def test_repair_finishes_the_fanout_once_and_releases_the_events(inbox):
    mailbox, db = inbox
    sender = Identity(subject="stf_a", agency_id="agy_1", name="A")
    doc = interrupted_send(mailbox, sender, ["stf_b", "stf_c"])
    assert db.messages.find_one({"_id": doc["_id"]}).get("_outbox_at") is None  # held: nothing published yet

    stop = threading.Event()
    worker = threading.Thread(target=mailbox.repair_fanouts, args=(stop, 0.05))
    worker.start()
    try:
        for _ in range(100):
            if "fanout_pending_at" not in db.messages.find_one({"_id": doc["_id"]}):
                break
            stop.wait(0.05)
    finally:
        stop.set()
        worker.join()

    stored = db.messages.find_one({"_id": doc["_id"]})
    assert "fanout_pending_at" not in stored and stored["_outbox_at"] > 0  # events released to the relay
    assert len(stored["_outbox"]) == 2
    owners = sorted(item["owner_id"] for item in db.board_items.find({"message_id": doc["_id"]}))
    assert owners == ["stf_a", "stf_b", "stf_c"]  # sender's Sent copy + each recipient once
    reader = Identity(subject="stf_c", agency_id="agy_1")
    assert mailbox.page(reader, domain.FOLDER_MESSAGES, False, None, 20)["items"][0]["id"] == doc["_id"]
