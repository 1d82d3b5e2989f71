"""cloud-comms' query and update shapes against the real database server (nx-27017 by default, real
MongoDB with TEST_MONGO_URI), each served by the index the service declares; and the nx-27017
deviations its code works around, asserted so an upgrade that changes them is noticed."""

from __future__ import annotations

import os

import pytest
from pymongo.errors import WriteError

from services.cloud_comms.direct.feature import INDEXES as DIRECT_INDEXES
from services.cloud_comms.direct.outbound import DIRECT_OUTBOUND
from services.cloud_comms.direct.outbound import INDEXES as DIRECT_OUTBOUND_INDEXES
from services.cloud_comms.fax.feature import FAXES
from services.cloud_comms.fax.feature import INDEXES as FAX_INDEXES
from services.cloud_comms.fax.outbound import INDEXES as OUTBOUND_FAX_INDEXES
from services.cloud_comms.fax.outbound import OUTBOUND_FAXES
from services.cloud_comms.fax.pdf_store import FAX_CHUNKS
from services.cloud_comms.fax.pdf_store import INDEXES as CHUNK_INDEXES
from services.cloud_comms.triage.records import INDEXES as TRIAGE_INDEXES
from services.cloud_comms.triage.records import TRIAGE
from services.cloud_comms.triage.roster import INDEXES as ROSTER_INDEXES
from services.cloud_comms.triage.roster import NAME_KEYS, PATIENTS
from services.cloud_comms.triage.sources import DUE
from services.cloud_comms.triage.sources import INDEXES as DUE_INDEXES
from services.kit.mongo import ensure_indexes

EMBEDDED = not os.environ.get("TEST_MONGO_URI")


@pytest.fixture
def db(mongo_client, db_name):
    database = mongo_client[db_name]
    ensure_indexes(
        database,
        [
            *DIRECT_INDEXES,
            *DIRECT_OUTBOUND_INDEXES,
            *FAX_INDEXES,
            *OUTBOUND_FAX_INDEXES,
            *CHUNK_INDEXES,
            *TRIAGE_INDEXES,
            *ROSTER_INDEXES,
            *DUE_INDEXES,
        ],
    )
    return database


@pytest.mark.parametrize(
    "due_field,collection",
    [
        ("send_due_at", DIRECT_OUTBOUND),
        ("send_due_at", OUTBOUND_FAXES),
        ("mdn_due_at", DIRECT_OUTBOUND),
        (DUE, "direct_messages"),
        (DUE, FAXES),
    ],
)
def test_due_work_in_order_and_claimed_once_by_a_guarded_update(db, due_field, collection):
    docs = db[collection]
    docs.insert_many([{"_id": f"d{n:03d}", "agency_id": "agy", due_field: 1000 + n, "version": 1} for n in range(30)])
    docs.insert_one({"_id": "done", "agency_id": "agy"})  # no due time: not in the query
    due = [d["_id"] for d in docs.find({due_field: {"$lte": 1010}}).sort(due_field, 1).limit(20)]
    assert due == [f"d{n:03d}" for n in range(11)]
    claim = {"_id": {"$eq": "d000"}, due_field: {"$eq": 1000}}
    assert docs.update_one(claim, {"$set": {due_field: 99_000}}).modified_count == 1
    assert docs.update_one(claim, {"$set": {due_field: 99_000}}).modified_count == 0  # a second replica loses
    assert docs.update_one({"_id": {"$eq": "d001"}}, {"$unset": {due_field: ""}}).modified_count == 1
    assert [d["_id"] for d in docs.find({due_field: {"$lte": 1002}}).sort(due_field, 1)] == ["d002"]


def test_a_document_is_read_by_id_and_the_callers_agency_only(db):
    for name in (DIRECT_OUTBOUND, OUTBOUND_FAXES, TRIAGE, PATIENTS):
        db[name].insert_one({"_id": "x1", "agency_id": "agy_a"})
        assert db[name].find_one({"_id": {"$eq": "x1"}, "agency_id": {"$eq": "agy_a"}}) is not None
        assert db[name].find_one({"_id": {"$eq": "x1"}, "agency_id": {"$eq": "agy_b"}}) is None


def test_outbound_lookups_by_message_id_and_provider_fax_id(db):
    db[DIRECT_OUTBOUND].insert_many(
        [{"_id": f"dmo_{n}", "agency_id": "agy", "message_id": f"<{n}@clinic>"} for n in range(5)]
    )
    found = db[DIRECT_OUTBOUND].find_one({"message_id": {"$eq": "<3@clinic>"}, "agency_id": {"$eq": "agy"}})
    assert found["_id"] == "dmo_3"
    db[OUTBOUND_FAXES].insert_many(
        [{"_id": f"fxo_{n}", "provider": "phaxio", "provider_fax_id": str(n)} for n in range(5)]
    )
    assert db[OUTBOUND_FAXES].find_one({"provider_fax_id": {"$eq": "4"}})["_id"] == "fxo_4"


def test_roster_lookups_by_keyed_mrn_birth_date_and_name_key(db):
    db[PATIENTS].insert_many(
        [{"_id": f"p{n}", "agency_id": "agy", "mrn_key": f"m{n}", "dob_key": f"d{n % 3}"} for n in range(9)]
    )
    assert [d["_id"] for d in db[PATIENTS].find({"agency_id": {"$eq": "agy"}, "mrn_key": {"$eq": "m4"}})] == ["p4"]
    same_day = db[PATIENTS].find({"agency_id": {"$eq": "agy"}, "dob_key": {"$eq": "d1"}}).limit(50)
    assert sorted(d["_id"] for d in same_day) == ["p1", "p4", "p7"]
    # One MRN per agency (the unique index the import's upsert relies on).
    with pytest.raises(Exception):  # noqa: B017 - DuplicateKeyError, or the server's WriteError form of it
        db[PATIENTS].insert_one({"_id": "p99", "agency_id": "agy", "mrn_key": "m4"})
    db[NAME_KEYS].insert_many(
        [{"_id": f"k{n}", "agency_id": "agy", "k": "lopez", "patient_id": f"p{n}"} for n in range(3)]
    )
    keys = db[NAME_KEYS].find({"agency_id": {"$eq": "agy"}, "k": {"$eq": "lopez"}}, projection={"patient_id": 1})
    assert sorted(d["patient_id"] for d in keys.limit(500)) == ["p0", "p1", "p2"]


def test_pdf_pieces_upserted_with_set_and_read_back_in_order(db):
    chunks = db[FAX_CHUNKS]
    for n in (2, 0, 1):
        chunks.update_one({"_id": f"f1_{n}"}, {"$set": {"fax_id": "f1", "n": n, "data": bytes([n])}}, upsert=True)
    # A retry overwrites a piece with $set (what the fax store does).
    chunks.update_one({"_id": "f1_1"}, {"$set": {"fax_id": "f1", "n": 1, "data": b"\x09"}}, upsert=True)
    assert [d["data"] for d in chunks.find({"fax_id": {"$eq": "f1"}}).sort("n", 1)] == [b"\x00", b"\x09", b"\x02"]


def test_a_replacement_holding_bytes_of_an_existing_document_is_refused_on_the_embedded_server(db):
    """Why every upsert of sealed bytes uses $set: nx-27017 cannot replace an existing document with
    one that holds bytes (real MongoDB can)."""
    docs = db["replace_probe"]
    docs.replace_one({"_id": "a"}, {"_id": "a", "data": b"\x01"}, upsert=True)  # an insert is fine
    if EMBEDDED:
        with pytest.raises(WriteError, match="not JSON serializable"):
            docs.replace_one({"_id": "a"}, {"_id": "a", "data": b"\x02"}, upsert=True)
    else:
        docs.replace_one({"_id": "a"}, {"_id": "a", "data": b"\x02"}, upsert=True)
        assert docs.find_one({"_id": "a"})["data"] == b"\x02"
