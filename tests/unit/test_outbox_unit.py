"""Outbox staging documents: what producers merge into their writes."""

from __future__ import annotations

import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.events import decode_envelope, new_envelope
from services.kit.outbox import merge_update, outbox_fields, outbox_update, release_update, with_outbox


def event(event_id: str):
    return new_envelope("message.delivered.v1", MessageDelivered(message_id="m"), agency_id="a",
                        producer="inbox", event_id=event_id)


def test_outbox_fields_stage_events_for_an_insert():
    fields = outbox_fields([event("e1"), event("e2")], now=1000)
    assert fields["_outbox_seq"] == 1
    assert fields["_outbox_at"] == 1000
    assert set(fields["_outbox"]) == {"e1", "e2"}
    entry = fields["_outbox"]["e1"]
    assert entry["rk"] == "message.delivered.v1"
    assert decode_envelope(entry["env"]).event_id == "e1"


def test_held_events_have_no_due_time():
    fields = outbox_fields([event("e1")], ready=False)
    assert "_outbox_at" not in fields
    assert set(fields["_outbox"]) == {"e1"}


def test_outbox_update_sets_entries_and_bumps_the_sequence():
    update = outbox_update([event("e1"), event("e2")], now=2000)
    assert set(update["$set"]) == {"_outbox.e1", "_outbox.e2", "_outbox_at"}
    assert update["$set"]["_outbox_at"] == 2000
    assert update["$inc"] == {"_outbox_seq": 1}


def test_held_outbox_update_does_not_make_the_document_due():
    update = outbox_update([event("e1")], ready=False)
    assert "_outbox_at" not in update["$set"]
    assert update["$inc"] == {"_outbox_seq": 1}


def test_staging_nothing_changes_nothing():
    assert outbox_update([]) == {}
    assert "_outbox_at" not in outbox_fields([])


def test_with_outbox_merges_into_the_state_change():
    update = with_outbox({"$set": {"state": "sent"}, "$inc": {"sent_count": 1}}, [event("e1")])
    assert update["$set"]["state"] == "sent"
    assert "_outbox.e1" in update["$set"]
    assert update["$inc"] == {"sent_count": 1, "_outbox_seq": 1}


def test_merge_refuses_two_writes_to_one_field():
    with pytest.raises(ValueError):
        merge_update({"$set": {"_outbox_at": 1}}, {"$set": {"_outbox_at": 2}})


def test_merge_does_not_modify_its_inputs():
    base = {"$set": {"state": "sent"}}
    merge_update(base, {"$set": {"x": 1}})
    assert base == {"$set": {"state": "sent"}}


def test_release_makes_held_events_due():
    assert release_update(now=5) == {"$set": {"_outbox_at": 5}}


def test_event_ids_must_be_safe_field_names():
    bad = event("e1")
    bad.event_id = "e.1"
    with pytest.raises(ValueError):
        outbox_update([bad])
    bad.event_id = "$where"
    with pytest.raises(ValueError):
        outbox_fields([bad])


def test_outbox_collections_keep_the_services_own_then_each_features_new_ones_in_order():
    from types import SimpleNamespace

    from services.kit.outbox import outbox_collections

    features = [
        SimpleNamespace(outbox_collections=["notices", "messages"]),
        SimpleNamespace(outbox_collections=[]),
        SimpleNamespace(outbox_collections=["access", "notices"]),
    ]
    assert outbox_collections(["messages", "access_records", "messages"], features) == [
        "messages",
        "access_records",
        "notices",
        "access",
    ]
