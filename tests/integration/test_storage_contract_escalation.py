"""The query and update shapes of critical-result and urgent-message escalation
(services/inbox/escalation.py), against the real database server (nx-27017 by default, MongoDB
when TEST_MONGO_URI is set)."""

from __future__ import annotations

from pymongo import ASCENDING

from services.kit.mongo import IndexSpec, ensure_indexes

INDEXES = [
    IndexSpec("notices", [("escalation_due_at", 1)], name="escalation_due"),
    IndexSpec("notices", [("unacked_since", 1)], name="unacked_since"),
    IndexSpec("messages", [("priority", 1), ("sent_at", 1)], name="priority_sent"),
    IndexSpec("urgent_watch", [("due_at", 1)], name="urgent_due"),
]


def test_due_results_by_range_and_the_stage_moved_once_under_its_deadline(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, INDEXES)
    db.notices.insert_many(
        [
            {"_id": f"ntc_{n}", "escalation_due_at": 1_000 + n, "unacked_since": n, "escalation_stage": 0}
            for n in range(5)
        ]
        + [{"_id": "ntc_plain"}]
    )
    due = list(db.notices.find({"escalation_due_at": {"$lte": 1_002}}).sort("escalation_due_at", ASCENDING).limit(2))
    assert [d["_id"] for d in due] == ["ntc_0", "ntc_1"]
    guard = {"_id": {"$eq": "ntc_0"}, "escalation_due_at": {"$eq": 1_000}}
    step = {"$set": {"escalation_stage": 1, "escalation_due_at": 5_000, "escalations.1": {"at": 7, "staff_ids": ["a"]}}}
    assert db.notices.update_one(guard, step).modified_count == 1
    assert db.notices.update_one(guard, step).modified_count == 0  # another pass took it first
    assert db.notices.find_one({"_id": "ntc_0"})["escalations"] == {"1": {"at": 7, "staff_ids": ["a"]}}

    # Acknowledged once: "not acknowledged yet" is `$eq None` on a missing field.
    ack = {"$set": {"acknowledged_at": 9}, "$unset": {"unacked_since": "", "escalation_due_at": ""}}
    first = db.notices.update_one({"_id": {"$eq": "ntc_1"}, "acknowledged_at": {"$eq": None}}, ack)
    second = db.notices.update_one({"_id": {"$eq": "ntc_1"}, "acknowledged_at": {"$eq": None}}, ack)
    assert (first.modified_count, second.modified_count) == (1, 0)
    open_ones = db.notices.find({"unacked_since": {"$gte": 0}}, projection={"escalation_stage": 1}).limit(100)
    assert sorted(d["_id"] for d in open_ones) == ["ntc_0", "ntc_2", "ntc_3", "ntc_4"]
    assert [d["_id"] for d in db.notices.find({"escalation_due_at": {"$lte": 1_002}})] == ["ntc_2"]


def test_urgent_messages_from_a_watermark_and_their_watch(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, INDEXES)
    db.messages.insert_many(
        [{"_id": f"msg_{n}", "priority": "urgent" if n % 2 else "normal", "sent_at": 100 + n} for n in range(8)]
    )
    found = db.messages.find({"priority": {"$eq": "urgent"}, "sent_at": {"$gte": 103}}, projection={"sent_at": 1})
    assert [d["_id"] for d in found.sort("sent_at", ASCENDING).limit(1000)] == ["msg_3", "msg_5", "msg_7"]
    db.urgent_watch.insert_many([{"_id": "msg_3", "due_at": 50}, {"_id": "msg_5", "due_at": 70}])
    known = db.urgent_watch.find({"_id": {"$in": ["msg_3", "msg_5", "msg_7"]}}, {"_id": 1})
    assert sorted(d["_id"] for d in known) == ["msg_3", "msg_5"]
    guard = {"_id": {"$eq": "msg_3"}, "due_at": {"$eq": 50}}
    assert db.urgent_watch.update_one(guard, {"$unset": {"due_at": ""}, "$set": {"outcome": "told"}}).modified_count
    assert [d["_id"] for d in db.urgent_watch.find({"due_at": {"$lte": 100}}).sort("due_at", ASCENDING)] == ["msg_5"]
