"""The query and update shapes of board search (services/inbox/search.py), against the real database
server (nx-27017 by default, MongoDB when TEST_MONGO_URI is set)."""

from __future__ import annotations

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.errors import BulkWriteError

from services.inbox.search import INDEXES, JOBS, POSTINGS
from services.kit.mongo import ensure_indexes


def upsert(pk: str, bk: int, fields: dict) -> UpdateOne:
    return UpdateOne({"_id": {"$eq": f"{pk}|{bk}"}}, {"$set": {"pk": pk, "bk": bk, **fields}}, upsert=True)


def test_postings_upserted_with_flat_fields_and_read_newest_first(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, INDEXES)
    postings = db[POSTINGS]
    ops = [upsert("a|s|tok", bk, {f"i_itm_{bk}": bk * 100}) for bk in range(1, 11)]
    ops.append(upsert("a|s|other", 5, {"i_itm_5": 500}))
    postings.bulk_write(ops, ordered=False)
    # A second item in a bucket is one more flat field; a repeat changes nothing.
    postings.bulk_write([upsert("a|s|tok", 10, {"i_itm_10b": 1001})], ordered=False)
    again = postings.bulk_write([upsert("a|s|tok", 10, {"i_itm_10b": 1001})], ordered=False)
    assert again.modified_count == 0 and again.upserted_count == 0
    stored = postings.find_one({"_id": {"$eq": "a|s|tok|10"}})
    assert {k: v for k, v in stored.items() if k.startswith("i_")} == {"i_itm_10": 1000, "i_itm_10b": 1001}

    newest = postings.find({"pk": {"$eq": "a|s|tok"}, "bk": {"$lte": 8}}).sort("bk", DESCENDING).limit(3)
    assert [d["bk"] for d in newest] == [8, 7, 6]
    older = postings.find({"pk": {"$eq": "a|s|tok"}, "bk": {"$lt": 6}}).sort("bk", DESCENDING).limit(16)
    assert [d["bk"] for d in older] == [5, 4, 3, 2, 1]
    held = postings.find({"_id": {"$in": ["a|s|other|5", "a|s|other|6", "a|s|tok|5"]}})
    assert sorted(d["_id"] for d in held) == ["a|s|other|5", "a|s|tok|5"]


def test_two_writers_creating_one_posting_document(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, INDEXES)
    postings = db[POSTINGS]
    postings.insert_one({"_id": "a|s|t|1", "pk": "a|s|t", "bk": 1, "i_x": 1})
    try:  # a writer's upsert that lost the race reports 11000 on nx-27017 at worst: it is made again
        postings.bulk_write([upsert("a|s|t", 1, {"i_y": 2})], ordered=False)
    except BulkWriteError as exc:
        assert all(err["code"] == 11000 for err in exc.details["writeErrors"])
        postings.bulk_write([upsert("a|s|t", 1, {"i_y": 2})], ordered=False)
    assert {k for k in postings.find_one({"_id": {"$eq": "a|s|t|1"}}) if k.startswith("i_")} == {"i_x", "i_y"}


def test_jobs_recorded_once_claimed_once_and_dropped(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, INDEXES)
    jobs = db[JOBS]
    jobs.insert_many(
        [{"_id": "sj_1", "due_at": 10, "item_ids": ["itm_a"]}, {"_id": "sj_2", "due_at": 20, "item_ids": []}]
    )
    try:
        jobs.insert_many([{"_id": "sj_1", "due_at": 30, "item_ids": ["itm_a"]}], ordered=False)
    except BulkWriteError as exc:
        assert [err["code"] for err in exc.details["writeErrors"]] == [11000]
    due = list(jobs.find({"due_at": {"$lte": 15}}).sort("due_at", ASCENDING).limit(50))
    assert [d["_id"] for d in due] == ["sj_1"]
    guard = {"_id": {"$eq": "sj_1"}, "due_at": {"$eq": 10}}
    assert jobs.find_one_and_update(guard, {"$set": {"due_at": 60_010}}) is not None
    assert jobs.find_one_and_update(guard, {"$set": {"due_at": 60_010}}) is None  # another replica took it
    assert [d["_id"] for d in jobs.find({"due_at": {"$gte": 0}}, projection={"_id": 1}).limit(100)] != []
    assert jobs.delete_one({"_id": {"$eq": "sj_1"}, "due_at": {"$eq": 60_010}}).deleted_count == 1


def test_search_keys_made_once_per_agency(mongo_client, db_name):
    db = mongo_client[db_name]
    keys = db["phi_search_keys"]
    keys.insert_one({"_id": "agy_a:search", "agency_id": "agy_a", "master_key_id": "m", "wrapped": b"x"})
    assert keys.find_one({"_id": {"$eq": "agy_a:search"}})["wrapped"] == b"x"
    assert [d["_id"] for d in keys.find({"master_key_id": {"$ne": "n"}})] == ["agy_a:search"]


def test_stale_postings_unset_and_deleted_only_as_they_were_read(mongo_client, db_name):
    db = mongo_client[db_name]
    ensure_indexes(db, INDEXES)
    postings = db[POSTINGS]
    postings.bulk_write(
        [
            upsert("a|s|tok", 1, {"i_x": 100, "i_y": 101}),
            upsert("a|s|tok", 2, {"i_z": 200}),
            upsert("a|s2|tok", 1, {"i_w": 100}),  # owner "s2" is not owner "s"
        ],
        ordered=False,
    )
    # `$unset` guarded by each entry's value: an entry written again (another time) is kept.
    unset = {"$unset": {"i_x": ""}}
    assert postings.update_one({"_id": {"$eq": "a|s|tok|1"}, "i_x": {"$eq": 99}}, unset).modified_count == 0
    assert postings.update_one({"_id": {"$eq": "a|s|tok|1"}, "i_x": {"$eq": 100}}, unset).modified_count == 1
    assert {k for k in postings.find_one({"_id": {"$eq": "a|s|tok|1"}}) if k.startswith("i_")} == {"i_y"}
    # Delete guarded the same way.
    assert postings.delete_one({"_id": {"$eq": "a|s|tok|2"}, "i_z": {"$eq": 1}}).deleted_count == 0
    assert postings.delete_one({"_id": {"$eq": "a|s|tok|2"}, "i_z": {"$eq": 200}}).deleted_count == 1
    # One board's documents: a range on the key prefix "<agency>|<owner>|".
    board = postings.find({"pk": {"$gte": "a|s|", "$lt": "a|s|\uffff"}})
    assert sorted(d["_id"] for d in board) == ["a|s|tok|1"]
