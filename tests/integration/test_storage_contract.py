"""Every query and update shape the services use, against the real database server.

Runs against the embedded nx-27017 by default and against real MongoDB when
TEST_MONGO_URI is set, so a switch of database is safe. Known deviations of
nx-27017 are asserted here (and worked around in the code) so an upgrade that
changes them is noticed.
"""

from __future__ import annotations

import os

import pytest
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from clinic.inbox.v1 import inbox_pb2
from services.auto_reply.store import FOREVER
from services.auto_reply.store import INDEXES as AUTO_REPLY_INDEXES
from services.inbox.store import INDEXES as INBOX_INDEXES
from services.kit.mongo import ensure_indexes
from services.kit.outbox import with_outbox
from services.notifications.appointments import APPOINTMENTS
from services.notifications.compliance_alerts import COMPLIANCE_ITEMS
from services.notifications.compliance_alerts import INDEXES as COMPLIANCE_INDEXES
from services.notifications.delivery import delivery_requested

EMBEDDED = not os.environ.get("TEST_MONGO_URI")


@pytest.fixture
def db(mongo_client, db_name):
    database = mongo_client[db_name]
    ensure_indexes(database, INBOX_INDEXES)
    return database


def board_item(n: int, board: str = "agy|stf_1|messages", unread: bool = True) -> dict:
    key = f"{1_700_000_000_000 + n:013d}.msg_{n:06d}"
    return {
        "_id": f"msg_{n:06d}.stf_1.messages",
        "board": board,
        "unread_board": board if unread else None,
        "sort_key": key,
    }


def test_board_page_by_eq_and_indexed_sort_with_cursor(db):
    db.board_items.insert_many(
        [board_item(n) for n in range(50)] + [board_item(n + 100, "agy|stf_2|messages") for n in range(5)]
    )
    page = list(db.board_items.find({"board": {"$eq": "agy|stf_1|messages"}}).sort("sort_key", -1).limit(20))
    assert [d["_id"] for d in page] == [f"msg_{n:06d}.stf_1.messages" for n in range(49, 29, -1)]
    nxt = list(
        db.board_items.find({"board": {"$eq": "agy|stf_1|messages"}, "sort_key": {"$lt": page[-1]["sort_key"]}})
        .sort("sort_key", -1)
        .limit(20)
    )
    assert nxt[0]["_id"] == "msg_000029.stf_1.messages" and len(nxt) == 20


def test_unread_page_follows_the_unread_key(db):
    db.board_items.insert_many([board_item(n, unread=n % 2 == 0) for n in range(10)])
    unread = list(db.board_items.find({"unread_board": {"$eq": "agy|stf_1|messages"}}).sort("sort_key", -1).limit(20))
    assert len(unread) == 5
    db.board_items.find_one_and_update(
        {"_id": {"$eq": unread[0]["_id"]}}, {"$set": {"unread_board": None, "read_at": 5}}
    )
    assert len(list(db.board_items.find({"unread_board": {"$eq": "agy|stf_1|messages"}}).limit(20))) == 4


def test_find_one_and_update_returns_after_and_honours_eq_guards(db):
    db.board_items.insert_one({"_id": "a", "read_at": None, "n": 0})
    after = db.board_items.find_one_and_update(
        {"_id": {"$eq": "a"}, "read_at": {"$eq": None}},
        {"$set": {"read_at": 7}, "$inc": {"n": 1}},
        return_document=ReturnDocument.AFTER,
    )
    assert after["read_at"] == 7 and after["n"] == 1
    assert (
        db.board_items.find_one_and_update({"_id": {"$eq": "a"}, "read_at": {"$eq": None}}, {"$set": {"read_at": 9}})
        is None
    )


def test_primary_key_uniqueness_and_insert_many_skipping_duplicates(db):
    db.messages.insert_one({"_id": "m1"})
    with pytest.raises(DuplicateKeyError):
        db.messages.insert_one({"_id": "m1"})
    with pytest.raises(BulkWriteError) as caught:
        db.messages.insert_many([{"_id": "m1"}, {"_id": "m2"}], ordered=False)
    assert {e["code"] for e in caught.value.details["writeErrors"]} == {11000}
    assert db.messages.find_one({"_id": {"$eq": "m2"}}) is not None


def test_outbox_map_set_unset_and_guarded_clear(db):
    db.messages.insert_one(
        {"_id": "m", "_outbox": {"e1": {"rk": "a.b.v1", "env": b"\x00"}}, "_outbox_seq": 1, "_outbox_at": 5}
    )
    db.messages.update_one(
        {"_id": {"$eq": "m"}}, {"$set": {"_outbox.e2": {"rk": "c.d.v1", "env": b"\x01"}}, "$inc": {"_outbox_seq": 1}}
    )
    assert set(db.messages.find_one({"_id": "m"})["_outbox"]) == {"e1", "e2"}
    assert [d["_id"] for d in db.messages.find({"_outbox_at": {"$lte": 10}}).sort("_outbox_at", 1).limit(5)] == ["m"]
    stale = db.messages.update_one({"_id": {"$eq": "m"}, "_outbox_seq": {"$eq": 1}}, {"$unset": {"_outbox_at": ""}})
    assert stale.modified_count == 0
    db.messages.update_one({"_id": {"$eq": "m"}}, {"$unset": {"_outbox.e1": "", "_outbox.e2": ""}})
    db.messages.update_one({"_id": {"$eq": "m"}, "_outbox_seq": {"$eq": 2}}, {"$unset": {"_outbox_at": ""}})
    doc = db.messages.find_one({"_id": "m"})
    assert doc["_outbox"] == {} and "_outbox_at" not in doc


def test_binary_round_trips_as_bytes(db):
    db.messages.insert_one({"_id": "b", "body": b"\x01\x00\xff"})
    assert bytes(db.messages.find_one({"_id": "b"})["body"]) == b"\x01\x00\xff"


def test_boolean_written_with_set_reads_back_as_an_integer_on_the_embedded_server(db):
    db.messages.insert_one({"_id": "f", "flag": True})
    db.messages.update_one({"_id": {"$eq": "f"}}, {"$set": {"flag": False}})
    value = db.messages.find_one({"_id": "f"})["flag"]
    assert value == 0 and not value  # same truthiness everywhere
    if EMBEDDED:
        assert value is not False  # the known deviation: 0, not False; code stores ints or timestamps
    else:
        assert value is False


def test_push_of_a_subdocument_is_stored_as_text_on_the_embedded_server(db):
    db.messages.insert_one({"_id": "p", "list": []})
    db.messages.update_one({"_id": {"$eq": "p"}}, {"$push": {"list": {"id": 1}}})
    value = db.messages.find_one({"_id": "p"})["list"][0]
    if EMBEDDED:
        assert value == '{"id":1}'  # why the code never $pushes documents
    else:
        assert value == {"id": 1}


def test_a_set_holding_bytes_that_breaks_a_unique_index_is_refused_without_a_duplicate_key_error(db):
    db.labels.insert_many(
        [
            {"_id": "l1", "owner": "o", "owner_name": "o|k1", "name_key": "k1", "name": b"\x01a"},
            {"_id": "l2", "owner": "o", "owner_name": "o|k2", "name_key": "k2", "name": b"\x01b"},
        ]
    )
    clash = {"$set": {"owner_name": "o|k1", "name_key": "k1", "name": b"\x01c"}}
    if EMBEDDED:  # the known deviation the inbox label store handles (services/inbox/store.py)
        with pytest.raises(WriteError) as caught:
            db.labels.update_one({"_id": {"$eq": "l2"}}, clash)
        assert caught.value.code == 8 and not isinstance(caught.value, DuplicateKeyError)
    else:
        with pytest.raises(DuplicateKeyError):
            db.labels.update_one({"_id": {"$eq": "l2"}}, clash)
    assert db.labels.find_one({"_id": "l2"})["name_key"] == "k2"  # nothing changed either way


def test_array_element_equality_does_not_match_on_the_embedded_server(db):
    db.messages.insert_one({"_id": "r", "recipient_ids": ["stf_1", "stf_2"]})
    found = db.messages.find_one({"recipient_ids": {"$eq": "stf_1"}})
    if EMBEDDED:
        assert found is None  # why membership lives in its own documents, never in array queries
    else:
        assert found is not None


def test_indexes_are_created_idempotently(db):
    ensure_indexes(db, INBOX_INDEXES)
    # nx-27017 names indexes itself and records every key ascending: compare key fields only.
    fields = {tuple(k for k, _ in spec["key"]) for spec in db.board_items.index_information().values()}
    assert {("board", "sort_key"), ("unread_board", "sort_key")} <= fields


def test_range_on_an_indexed_timestamp_sorted_and_two_field_equality(db):
    db.sessions.create_index([("revoked_at", 1)])
    db.sessions.create_index([("staff_id", 1), ("created_at", 1)])
    db.sessions.insert_many(
        [
            {"_id": f"ses_{n}", "staff_id": f"stf_{n % 2}", "created_at": n, "revoked_at": n * 10 if n % 3 else 0}
            for n in range(12)
        ]
    )
    recent = list(db.sessions.find({"revoked_at": {"$gte": 50}}).sort("revoked_at", 1).limit(3))
    assert [d["_id"] for d in recent] == ["ses_5", "ses_7", "ses_8"]
    open_sessions = db.sessions.find({"staff_id": {"$eq": "stf_0"}, "revoked_at": {"$eq": 0}})
    assert sorted(d["_id"] for d in open_sessions) == ["ses_0", "ses_6"]
    once = db.sessions.update_one({"_id": {"$eq": "ses_0"}, "revoked_at": {"$eq": 0}}, {"$set": {"revoked_at": 99}})
    again = db.sessions.update_one({"_id": {"$eq": "ses_0"}, "revoked_at": {"$eq": 0}}, {"$set": {"revoked_at": 100}})
    assert (once.modified_count, again.modified_count) == (1, 0)


# --- directory shapes ----------------------------------------------------------------------------


@pytest.fixture
def directory_db(mongo_client, db_name):
    from services.directory.store import INDEXES as DIRECTORY_INDEXES

    database = mongo_client[db_name]
    ensure_indexes(database, DIRECTORY_INDEXES)
    return database


def test_portal_patient_page_by_agency_eq_and_sort_key_lt_descending(directory_db):
    patients = directory_db.portal_patients
    patients.insert_many(
        [
            {"_id": f"pat_{n}", "agency_id": agency, "portal_user_id": f"u{n}", "sort_key": f"{1_700 + n:015d}.pat_{n}"}
            for n in range(12)
            for agency in ["agy_a" if n % 3 else "agy_b"]
        ]
    )
    first = list(patients.find({"agency_id": {"$eq": "agy_a"}}).sort("sort_key", -1).limit(3))
    assert [d["_id"] for d in first] == ["pat_11", "pat_10", "pat_8"]
    nxt = list(
        patients.find({"agency_id": {"$eq": "agy_a"}, "sort_key": {"$lt": first[-1]["sort_key"]}})
        .sort("sort_key", -1)
        .limit(3)
    )
    assert [d["_id"] for d in nxt] == ["pat_7", "pat_5", "pat_4"]
    assert all(d["agency_id"] == "agy_a" for d in first + nxt)


def test_login_attempt_window_lock_and_cleanup(directory_db):
    attempts = directory_db.login_attempts
    key, window_ms = "a" * 64, 60_000

    def fail(now: int) -> int:
        doc = attempts.find_one_and_update(
            {"_id": {"$eq": key}, "window_started_at": {"$gt": now - window_ms}},
            {"$inc": {"failures": 1}},
            projection={"failures": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return doc["failures"]
        attempts.delete_many({"expires_at": {"$lte": now}})
        attempts.update_one(
            {"_id": {"$eq": key}},
            {"$set": {"failures": 1, "window_started_at": now, "locked_until": 0, "expires_at": now + window_ms}},
            upsert=True,
        )
        return 1

    attempts.insert_many([{"_id": "spent", "expires_at": 500}, {"_id": "live", "expires_at": 10**13}])
    assert [fail(1_000), fail(2_000), fail(3_000)] == [1, 2, 3]
    assert {d["_id"] for d in attempts.find({})} == {key, "live"}  # the spent record went with the new window
    attempts.update_one({"_id": {"$eq": key}}, {"$set": {"locked_until": 500_000}, "$max": {"expires_at": 500_000}})
    attempts.update_one({"_id": {"$eq": key}}, {"$max": {"expires_at": 1}})  # $max never lowers it
    doc = attempts.find_one({"_id": {"$eq": key}}, {"locked_until": 1, "expires_at": 1})
    assert (doc["locked_until"], doc["expires_at"]) == (500_000, 500_000)
    assert fail(200_000) == 1  # a new window once the old one has passed
    assert attempts.delete_one({"_id": {"$eq": key}}).deleted_count == 1


def test_refresh_token_is_spent_once(directory_db):
    tokens = directory_db.refresh_tokens
    tokens.insert_one({"_id": "h1", "session_id": "ses_1", "used_at": 0})

    def spend(now: int):
        return tokens.find_one_and_update(
            {"_id": {"$eq": "h1"}, "used_at": {"$eq": 0}},
            {"$set": {"used_at": now}},
            projection={"session_id": 1},
            return_document=ReturnDocument.BEFORE,
        )

    assert spend(5) == {"_id": "h1", "session_id": "ses_1"}
    assert spend(6) is None
    assert tokens.find_one({"_id": {"$eq": "h1"}})["used_at"] == 5


def test_guarded_counter_and_compare_and_set_flag(directory_db):
    directory_db.agencies.insert_one({"_id": "agy_a", "active_admins": 2})
    directory_db.staff.insert_one({"_id": "stf_1", "agency_id": "agy_a", "admin_counted": 1})

    def release():
        return directory_db.agencies.find_one_and_update(
            {"_id": {"$eq": "agy_a"}, "active_admins": {"$gt": 1}}, {"$inc": {"active_admins": -1}}
        )

    assert release() is not None and release() is None
    assert directory_db.agencies.find_one({"_id": "agy_a"})["active_admins"] == 1
    flip = {"_id": {"$eq": "stf_1"}, "agency_id": {"$eq": "agy_a"}, "admin_counted": {"$eq": 1}}
    assert directory_db.staff.update_one(flip, {"$set": {"admin_counted": 0}}).matched_count == 1
    assert directory_db.staff.update_one(flip, {"$set": {"admin_counted": 0}}).matched_count == 0
    guarded = directory_db.staff.update_one(
        {"_id": {"$eq": "stf_1"}, "password_hash": {"$eq": "old"}}, {"$set": {"password_hash": "new"}}
    )
    assert guarded.matched_count == 0


def test_ne_in_an_update_does_not_match_a_missing_field_on_the_embedded_server(directory_db):
    directory_db.staff.insert_many([{"_id": "flagged", "admin_counted": 0}, {"_id": "older"}])
    found = {d["_id"] for d in directory_db.staff.find({"admin_counted": {"$ne": 1}})}
    assert found == {"flagged", "older"}  # a read matches the missing field, as on MongoDB
    updated = directory_db.staff.update_one({"_id": {"$eq": "older"}, "admin_counted": {"$ne": 1}}, {"$set": {"x": 1}})
    if EMBEDDED:
        assert updated.matched_count == 0  # an update does not: guarded writes compare with $eq, never $ne
    else:
        assert updated.matched_count == 1
    missing = directory_db.staff.find({"admin_counted": {"$exists": False}})
    assert [d["_id"] for d in missing] == ["older"]  # how the start-up migration finds documents to back-fill
    back_filled = directory_db.staff.update_many({"admin_counted": {"$exists": False}}, {"$set": {"admin_counted": 0}})
    assert back_filled.matched_count == 1  # $exists, unlike $ne, matches the same documents in an update


def test_outbox_resume_range_and_guarded_batch_settle(db):
    db.messages.create_index([("_outbox_at", 1)])
    db.messages.insert_many(
        [{"_id": f"m{n}", "_outbox_at": n, "_outbox_seq": 1, "_outbox": {"e": {}}} for n in range(10)]
    )
    resumed = list(db.messages.find({"_outbox_at": {"$gte": 4, "$lte": 7}}).sort("_outbox_at", 1).limit(10))
    assert [d["_id"] for d in resumed] == ["m4", "m5", "m6", "m7"]
    db.messages.update_one({"_id": {"$eq": "m5"}}, {"$inc": {"_outbox_seq": 1}})  # staged again meanwhile
    settled = db.messages.update_many(
        {"_id": {"$in": ["m4", "m5", "m6"]}, "_outbox_seq": {"$eq": 1}},
        {"$unset": {"_outbox": "", "_outbox_at": ""}},
    )
    assert settled.matched_count == 2
    assert "_outbox" in db.messages.find_one({"_id": "m5"})  # the guard kept the newer event


def test_lease_take_renew_and_expiry(db):
    leases = db.outbox_leases
    leases.insert_one({"_id": "relay", "holder": "a", "until": 100})
    assert leases.update_one({"_id": "relay", "holder": {"$eq": "b"}}, {"$set": {"until": 200}}).matched_count == 0
    assert leases.update_one({"_id": "relay", "until": {"$lt": 50}}, {"$set": {"holder": "b"}}).matched_count == 0
    taken = leases.update_one({"_id": "relay", "until": {"$lt": 150}}, {"$set": {"holder": "b", "until": 300}})
    assert taken.matched_count == 1 and leases.find_one({"_id": "relay"})["holder"] == "b"


def test_newest_data_key_and_keys_to_rewrap(db):
    db.phi_data_keys.create_index([("agency_id", 1), ("generation", -1)])
    db.phi_data_keys.insert_many(
        [
            {"_id": "agy_a:1", "agency_id": "agy_a", "generation": 1, "master_key_id": "old"},
            {"_id": "agy_a:2", "agency_id": "agy_a", "generation": 2, "master_key_id": "new"},
            {"_id": "agy_b:1", "agency_id": "agy_b", "generation": 1, "master_key_id": "old"},
        ]
    )
    newest = list(db.phi_data_keys.find({"agency_id": {"$eq": "agy_a"}}).sort("generation", -1).limit(1))
    assert newest[0]["_id"] == "agy_a:2"
    assert sorted(d["_id"] for d in db.phi_data_keys.find({"master_key_id": {"$ne": "new"}})) == ["agy_a:1", "agy_b:1"]


# --- the whole Message Board (inbox) --------------------------------------------------------


def test_optimistic_item_change_guarded_by_version(db):
    db.board_items.insert_one({"_id": "i", "version": 1, "labels": {}})
    first = db.board_items.update_one(
        {"_id": {"$eq": "i"}, "version": {"$eq": 1}}, {"$set": {"labels": {"lbl_a": 5}, "version": 2}}
    )
    stale = db.board_items.update_one({"_id": {"$eq": "i"}, "version": {"$eq": 1}}, {"$set": {"version": 9}})
    assert (first.matched_count, stale.matched_count) == (1, 0)
    assert db.board_items.find_one({"_id": "i"}) == {"_id": "i", "version": 2, "labels": {"lbl_a": 5}}
    db.board_items.update_one({"_id": {"$eq": "i"}}, {"$set": {"labels": {}}, "$unset": {"archived_at": ""}})
    assert db.board_items.find_one({"_id": "i"})["labels"] == {}


def test_flat_counter_fields_upserted_with_inc_in_bulk(db):
    from pymongo import UpdateOne

    db.board_counters.bulk_write(
        [
            UpdateOne({"_id": {"$eq": "agy|stf"}}, {"$inc": {"u_messages": 1, "l_lbl_a": 2}}, upsert=True),
            UpdateOne({"_id": {"$eq": "agy|stf"}}, {"$inc": {"u_messages": 1, "t_messages": 1}}, upsert=True),
        ],
        ordered=False,
    )
    db.board_counters.update_one({"_id": {"$eq": "agy|stf"}}, {"$unset": {"l_lbl_a": ""}})
    assert db.board_counters.find_one({"_id": "agy|stf"}) == {"_id": "agy|stf", "u_messages": 2, "t_messages": 1}


def test_an_upsert_with_a_dotted_inc_path_stores_the_dot_literally_on_the_embedded_server(db):
    db.board_counters.update_one({"_id": {"$eq": "x"}}, {"$inc": {"unread.messages": 1}}, upsert=True)
    stored = db.board_counters.find_one({"_id": "x"})
    if EMBEDDED:
        assert stored["unread.messages"] == 1  # the known deviation; hence flat counter names
    else:
        assert stored["unread"] == {"messages": 1}


def test_urgent_and_label_pages_and_owner_labels(db):
    db.board_items.insert_many(
        [{**board_item(n), "urgent_board": "agy|stf_1|messages" if n % 3 == 0 else None} for n in range(12)]
    )
    urgent = list(db.board_items.find({"urgent_board": {"$eq": "agy|stf_1|messages"}}).sort("sort_key", -1).limit(3))
    assert [d["_id"] for d in urgent] == [f"msg_{n:06d}.stf_1.messages" for n in (9, 6, 3)]
    db.label_items.insert_many(
        [
            {"_id": f"lbl_a|{n}", "label_board": "agy|stf_1|label:lbl_a", "item_id": str(n), "sort_key": f"{n:03d}"}
            for n in range(5)
        ]
    )
    page = list(
        db.label_items.find({"label_board": {"$eq": "agy|stf_1|label:lbl_a"}, "sort_key": {"$lt": "003"}})
        .sort("sort_key", -1)
        .limit(2)
    )
    assert [d["item_id"] for d in page] == ["2", "1"]
    db.labels.insert_many(
        [
            {"_id": "lbl_b", "owner": "agy|stf_1", "name_key": "billing", "owner_name": "agy|stf_1|billing"},
            {"_id": "lbl_a", "owner": "agy|stf_1", "name_key": "appeals", "owner_name": "agy|stf_1|appeals"},
            {"_id": "lbl_c", "owner": "agy|stf_2", "name_key": "appeals", "owner_name": "agy|stf_2|appeals"},
        ]
    )
    assert [d["_id"] for d in db.labels.find({"owner": {"$eq": "agy|stf_1"}}).sort("name_key", 1)] == ["lbl_a", "lbl_b"]
    with pytest.raises(DuplicateKeyError):  # a label name is unique per owner
        db.labels.insert_one(
            {"_id": "lbl_d", "owner": "agy|stf_1", "name_key": "billing", "owner_name": "agy|stf_1|billing"}
        )


def test_thread_in_order_and_due_reminders(db):
    db.messages.insert_many(
        [{"_id": f"m{n}", "thread_id": "t1" if n != 2 else "t2", "sent_at": 10 - n} for n in range(4)]
    )
    assert [d["_id"] for d in db.messages.find({"thread_id": {"$eq": "t1"}}).sort("sent_at", 1)] == ["m3", "m1", "m0"]
    db.board_items.insert_many([{"_id": f"r{n}", "due_pending_at": 100 + n} for n in range(5)])
    due = list(db.board_items.find({"due_pending_at": {"$lte": 102}}).sort("due_pending_at", 1).limit(200))
    assert [d["_id"] for d in due] == ["r0", "r1", "r2"]


def test_lazy_state_upsert_keeps_the_first_time(db):
    update = {"$setOnInsert": {"announcement_id": "ann_1", "staff_id": "stf"}, "$min": {"read_at": 20}}
    db.announcement_states.update_one({"_id": {"$eq": "ann_1|stf"}}, update, upsert=True)
    db.announcement_states.update_one(
        {"_id": {"$eq": "ann_1|stf"}}, {**update, "$min": {"read_at": 30, "acknowledged_at": 40}}, upsert=True
    )
    state = db.announcement_states.find_one({"_id": "ann_1|stf"})
    assert (state["read_at"], state["acknowledged_at"], state["announcement_id"]) == (20, 40, "ann_1")
    found = db.announcement_states.find({"_id": {"$in": ["ann_1|stf", "ann_2|stf"]}})
    assert [d["_id"] for d in found] == ["ann_1|stf"]


def test_map_entry_set_under_a_version_guard(db):
    db.signature_requests.insert_one({"_id": "sig", "version": 1, "signers": {"stf_a": {"responded_at": None}}})
    entry = {"responded_at": 5, "outcome": "signed", "note": b"\x01sealed"}
    won = db.signature_requests.update_one(
        {"_id": {"$eq": "sig"}, "version": {"$eq": 1}}, {"$set": {"signers.stf_a": entry}, "$inc": {"version": 1}}
    )
    lost = db.signature_requests.update_one(
        {"_id": {"$eq": "sig"}, "version": {"$eq": 1}}, {"$set": {"signers.stf_a": {}}, "$inc": {"version": 1}}
    )
    assert (won.matched_count, lost.matched_count) == (1, 0)
    stored = db.signature_requests.find_one({"_id": "sig"})
    assert stored["version"] == 2 and stored["signers"]["stf_a"] == entry


def test_move_to_the_top_never_back(db):
    db.portal_threads.insert_one({"_id": "t", "sort_key": "0000000000020.t"})
    older = db.portal_threads.update_one(
        {"_id": {"$eq": "t"}, "sort_key": {"$lt": "0000000000010.t"}}, {"$set": {"sort_key": "0000000000010.t"}}
    )
    newer = db.portal_threads.update_one(
        {"_id": {"$eq": "t"}, "sort_key": {"$lt": "0000000000030.t"}}, {"$set": {"sort_key": "0000000000030.t"}}
    )
    assert (older.matched_count, newer.matched_count) == (0, 1)


def test_due_reminders_of_one_kind_and_an_owners_reminders(db):
    db.board_items.insert_many(
        [
            {"_id": "r1", "due_pending_at": 5, "kind": "reminder", "reminder_owner": "agy|a", "created_key": "1"},
            {"_id": "r2", "due_pending_at": 6, "kind": "other", "reminder_owner": "agy|a", "created_key": "2"},
            {"_id": "r3", "due_pending_at": 9, "kind": "reminder", "reminder_owner": "agy|b", "created_key": "3"},
        ]
    )
    due = db.board_items.find({"due_pending_at": {"$lte": 8}, "kind": {"$eq": "reminder"}}).sort("due_pending_at", 1)
    assert [d["_id"] for d in due] == ["r1"]
    mine = db.board_items.find({"reminder_owner": {"$eq": "agy|a"}, "created_key": {"$lt": "2"}}).sort(
        "created_key", -1
    )
    assert [d["_id"] for d in mine] == ["r1"]


# --- notifications shapes -------------------------------------------------------------------------


def test_a_lab_result_is_stored_once_per_message_and_the_latest_version_of_an_order_is_found(db):
    from pymongo.errors import DuplicateKeyError

    from services.notifications.lab import INDEXES as LAB_INDEXES

    ensure_indexes(db, LAB_INDEXES)
    versions = [
        ("lr_a", "lab_1", 100, 1),
        ("lr_b", "lab_1", 300, 2),
        ("lr_c", "lab_1", 200, 3),
        ("lr_d", "lab_2", 900, 4),
    ]
    for result_id, order_id, version, received in versions:
        db.lab_results.insert_one(
            {"_id": result_id, "agency_id": "agy_a", "order_id": order_id, "version": version, "received_at": received}
        )
    db.lab_results.insert_one(
        {"_id": "lr_e", "agency_id": "agy_b", "order_id": "lab_1", "version": 999, "received_at": 5}
    )
    with pytest.raises(DuplicateKeyError):
        db.lab_results.insert_one({"_id": "lr_a", "agency_id": "agy_a", "order_id": "lab_1", "version": 1})
    latest = list(
        db.lab_results.find({"agency_id": {"$eq": "agy_a"}, "order_id": {"$eq": "lab_1"}})
        .sort([("version", -1), ("received_at", -1)])
        .limit(1)
    )
    assert [d["_id"] for d in latest] == ["lr_b"]
    # Same version twice: the later arrival wins.
    db.lab_results.insert_one(
        {"_id": "lr_f", "agency_id": "agy_a", "order_id": "lab_1", "version": 300, "received_at": 9}
    )
    latest = db.lab_results.find({"agency_id": {"$eq": "agy_a"}, "order_id": {"$eq": "lab_1"}})
    assert next(iter(latest.sort([("version", -1), ("received_at", -1)]).limit(1)))["_id"] == "lr_f"


# --- notifications: appointments and compliance items -------------------------------------------


def test_compliance_items_due_for_a_check_leave_the_query_when_their_check_is_unset(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, COMPLIANCE_INDEXES)
    items = db[COMPLIANCE_ITEMS]
    items.insert_many(
        [
            {"_id": "c1", "version": 1, "next_check_at": 30},
            {"_id": "c2", "version": 1, "next_check_at": 10},
            {"_id": "c3", "version": 1, "next_check_at": 99},
            {"_id": "c4", "version": 1},
        ]
    )
    due = items.find({"next_check_at": {"$lte": 50}}, {"_outbox": 0}).sort("next_check_at", 1).limit(100)
    assert [d["_id"] for d in due] == ["c2", "c1"]
    event = delivery_requested("agy", inbox_pb2.DeliverItemRequest(source="compliance", source_ref="c2"), "c2-v2-a")
    update = with_outbox({"$set": {"version": 2, "escalated_due": 10}, "$unset": {"next_check_at": ""}}, [event])
    won = items.update_one({"_id": {"$eq": "c2"}, "version": {"$eq": 1}}, update)
    lost = items.update_one({"_id": {"$eq": "c2"}, "version": {"$eq": 1}}, update)
    assert (won.matched_count, lost.matched_count) == (1, 0)
    stored = items.find_one({"_id": {"$eq": "c2"}})
    assert "next_check_at" not in stored and list(stored["_outbox"]) == ["c2-v2-a"] and stored["_outbox_seq"] == 1
    assert [d["_id"] for d in items.find({"next_check_at": {"$lte": 50}}).sort("next_check_at", 1)] == ["c1"]


def test_an_appointment_is_created_once_then_changed_under_its_version(mongo_client, db_name):
    appointments = mongo_client[db_name][APPOINTMENTS]
    appointments.insert_one({"_id": "apt_1", "version": 1, "staff_ids": ["a", "b"]})
    with pytest.raises(DuplicateKeyError):
        appointments.insert_one({"_id": "apt_1", "version": 1})
    changed = appointments.update_one(
        {"_id": {"$eq": "apt_1"}, "version": {"$eq": 1}}, {"$set": {"version": 2, "staff_ids": ["a"]}}
    )
    assert changed.matched_count == 1
    assert appointments.find_one({"_id": {"$eq": "apt_1"}}, {"_outbox": 0}) == {
        "_id": "apt_1",
        "version": 2,
        "staff_ids": ["a"],
    }


# --- auto-reply ------------------------------------------------------------------------------------
def test_auto_reply_settings_upsert_read_back_and_away_range(db):
    ensure_indexes(db, AUTO_REPLY_INDEXES)
    rows = [
        ("agy|stf_1|staff", "agy", 1, FOREVER),  # on until turned off
        ("agy|stf_2|staff", "agy", 1, 2_000),  # on until t=2000
        ("agy|stf_3|staff", "agy", 1, 500),  # over by t=1000
        ("agy|stf_4|staff", None, 0, 0),  # off
        ("other|stf_5|staff", "other", 1, FOREVER),  # another agency
    ]
    for doc_id, agency, enabled, until in rows:
        db.settings.update_one(
            {"_id": {"$eq": doc_id}},
            {
                "$set": {
                    "enabled": enabled,
                    "starts_at": None,
                    "away_agency": agency,
                    "away_until": until,
                    "message": b"\x01sealed",
                }
            },
            upsert=True,
        )
    found = db.settings.find_one({"_id": {"$eq": "agy|stf_1|staff"}})
    assert found["starts_at"] is None and bytes(found["message"]) == b"\x01sealed" and found["enabled"] == 1
    away = db.settings.find({"away_agency": {"$eq": "agy"}, "away_until": {"$gt": 1_000}}, {"message": 0}).limit(1000)
    listed = sorted(d["_id"] for d in away)
    assert listed == ["agy|stf_1|staff", "agy|stf_2|staff"]
    both = db.settings.find({"_id": {"$in": ["agy|stf_1|staff", "agy|stf_1|patient", "agy|stf_2|staff"]}})
    assert sorted(d["_id"] for d in both) == ["agy|stf_1|staff", "agy|stf_2|staff"]


def test_auto_reply_slot_claimed_once_marked_once_and_released_only_unsent(db):
    db.reply_slots.insert_one({"_id": "slot", "event_id": "e1", "sent_at": 0})
    with pytest.raises(DuplicateKeyError):
        db.reply_slots.insert_one({"_id": "slot", "event_id": "e2", "sent_at": 0})
    # Only the claiming event may release an unsent slot.
    assert (
        db.reply_slots.delete_one(
            {"_id": {"$eq": "slot"}, "event_id": {"$eq": "e2"}, "sent_at": {"$eq": 0}}
        ).deleted_count
        == 0
    )
    marked = db.reply_slots.update_one(
        {"_id": {"$eq": "slot"}, "sent_at": {"$eq": 0}}, {"$set": {"sent_at": 5, "reply_message_id": "m"}}
    )
    again = db.reply_slots.update_one({"_id": {"$eq": "slot"}, "sent_at": {"$eq": 0}}, {"$set": {"sent_at": 9}})
    assert (marked.modified_count, again.matched_count) == (1, 0)
    assert (
        db.reply_slots.delete_one(
            {"_id": {"$eq": "slot"}, "event_id": {"$eq": "e1"}, "sent_at": {"$eq": 0}}
        ).deleted_count
        == 0
    )
    assert db.reply_slots.find_one({"_id": {"$eq": "slot"}})["sent_at"] == 5
    # An unsent claim is released by the event that claimed it, and the slot can be claimed again.
    db.reply_slots.insert_one({"_id": "refused", "event_id": "e3", "sent_at": 0})
    released = db.reply_slots.delete_one({"_id": {"$eq": "refused"}, "event_id": {"$eq": "e3"}, "sent_at": {"$eq": 0}})
    assert released.deleted_count == 1 and db.reply_slots.find_one({"_id": {"$eq": "refused"}}) is None
    db.reply_slots.insert_one({"_id": "refused", "event_id": "e4", "sent_at": 0})


def test_staff_by_id_list_without_their_password_hashes(mongo_client, db_name):
    staff = mongo_client[db_name]["staff"]
    staff.insert_many([{"_id": f"stf_{i}", "agency_id": f"agy_{i % 2}", "password_hash": "h"} for i in range(8)])
    docs = list(staff.find({"_id": {"$in": ["stf_1", "stf_2", "stf_3", "stf_nobody"]}}, {"password_hash": 0}))
    assert sorted(d["_id"] for d in docs) == ["stf_1", "stf_2", "stf_3"]
    assert all("password_hash" not in d for d in docs)


def test_a_batch_of_new_notices_is_inserted_and_released_together(db):
    db.notices.insert_one({"_id": "ntc_b", "rev": 2, "fanout_pending_at": 5})  # rewritten meanwhile
    docs = [{"_id": f"ntc_{c}", "rev": 1, "fanout_pending_at": 5, "_outbox": {"e": {"rk": "a.b.v1"}}} for c in "abc"]
    with pytest.raises(BulkWriteError) as caught:
        db.notices.insert_many(docs, ordered=False)
    assert [(e["index"], e["code"]) for e in caught.value.details["writeErrors"]] == [(1, 11000)]
    found = db.notices.find({"_id": {"$in": ["ntc_a", "ntc_b", "ntc_c", "ntc_z"]}}, {"_id": 1})
    assert sorted(doc["_id"] for doc in found) == ["ntc_a", "ntc_b", "ntc_c"]
    released = db.notices.update_many(
        {"_id": {"$in": ["ntc_a", "ntc_b", "ntc_c"]}, "rev": {"$eq": 1}},
        {"$set": {"_outbox_at": 9}, "$unset": {"fanout_pending_at": ""}},
    )
    assert released.matched_count == 2
    by_id = {doc["_id"]: doc for doc in db.notices.find({})}
    assert by_id["ntc_a"]["_outbox_at"] == 9 and "fanout_pending_at" not in by_id["ntc_c"]
    assert by_id["ntc_b"]["fanout_pending_at"] == 5 and "_outbox_at" not in by_id["ntc_b"]


def test_a_consumer_batch_finds_and_records_processed_events(db):
    db.processed_events.insert_one({"_id": "q:e1", "consumer": "q", "processed_at": 1})
    found = db.processed_events.find({"_id": {"$in": ["q:e1", "q:e2", "q:e3"]}}, {"_id": 1})
    assert [doc["_id"] for doc in found] == ["q:e1"]
    with pytest.raises(BulkWriteError) as caught:
        db.processed_events.insert_many(
            [{"_id": f"q:e{n}", "consumer": "q", "processed_at": 2} for n in (1, 2, 3)], ordered=False
        )
    assert [e["code"] for e in caught.value.details["writeErrors"]] == [11000]
    assert db.processed_events.find_one({"_id": "q:e1"})["processed_at"] == 1
    assert db.processed_events.find_one({"_id": "q:e3"})["processed_at"] == 2
