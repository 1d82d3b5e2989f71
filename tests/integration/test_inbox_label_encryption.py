"""Label names are PHI at rest: whoever reads the inbox's database (a copied file, a backup, a
replica) finds no label name in any document, in any case, while names stay unique per owner
regardless of case, private, and shown in order. The inbox is built through its `build()` and its
routes called through its Flask edge with real tokens, on the real embedded database; documents are
read back as raw BSON."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from services.directory import tokens
from services.inbox import config, domain
from services.inbox.http_api import build_app
from services.inbox.service import build
from services.inbox.store import LABELS
from services.kit.auth import StaticKeySource, TokenVerifier
from tests.helpers import bearer
from tests.integration.inbox_fixtures import AgencyTable

AGENCY, OTHER_AGENCY = "agy_1", "agy_2"
NAME = "Maria Lopez follow-up"
RAW = CodecOptions(document_class=RawBSONDocument)


def master_keys(**keys: bytes) -> str:
    return ",".join(f"{key_id}:{base64.b64encode(key).decode()}" for key_id, key in keys.items())


@dataclass
class Rig:
    db: object
    components: object
    client: object
    keys: tokens.KeySet

    def headers(self, staff_id: str, agency_id: str = AGENCY) -> dict[str, str]:
        token = tokens.issue_access_token(
            self.keys,
            staff_id=staff_id,
            agency_id=agency_id,
            roles=["staff"],
            name=staff_id,
            session_id="s1",
            ttl_s=300,
        ).token
        return bearer(token)

    def create(self, staff_id: str, name: str, agency_id: str = AGENCY):
        return self.client.post("/api/v1/labels", json={"name": name}, headers=self.headers(staff_id, agency_id))

    def names(self, staff_id: str) -> list[str]:
        reply = self.client.get("/api/v1/labels", headers=self.headers(staff_id))
        assert reply.status_code == 200, reply.get_json()
        return [label["name"] for label in reply.get_json()["labels"]]

    def tree_names(self, staff_id: str) -> list[str]:
        reply = self.client.get("/api/v1/board", headers=self.headers(staff_id))
        assert reply.status_code == 200, reply.get_json()
        return [label["name"] for label in reply.get_json()["labels"]]

    def stored(self, label_id: str) -> dict:
        return self.db[LABELS].find_one({"_id": {"$eq": label_id}})

    def raw_bytes(self, collection: str = LABELS) -> bytes:
        """Every document of a collection exactly as the database hands it out."""
        return b"".join(doc.raw for doc in self.db[collection].with_options(codec_options=RAW).find())

    def everything(self) -> bytes:
        return b"".join(self.raw_bytes(name) for name in self.db.list_collection_names())


def make_rig(db, keys: str, active: str | None = None, signing: tokens.KeySet | None = None) -> Rig:
    env = {"MONGO_URI": "mongodb://unused:1", "PHI_MASTER_KEYS": keys, "AMQP_URL": "amqp://unused/"}
    if active:
        env["PHI_MASTER_KEY_ID"] = active
    settings = config.load(env)
    table = AgencyTable(staff={"stf_a": AGENCY, "stf_b": AGENCY, "stf_x": OTHER_AGENCY})
    components = build(settings, db, directory=table, features=()).components
    signing = signing or tokens.KeySet.from_pem(tokens.generate_private_key_pem())
    client = build_app(components, TokenVerifier(StaticKeySource(signing.verification_keys))).test_client()
    return Rig(db, components, client, signing)


@pytest.fixture
def rig(mongo_client, db_name):
    return make_rig(mongo_client[db_name], master_keys(m1=os.urandom(32)))


def forms(name: str) -> list[bytes]:
    """The ways a name could be found in stored bytes."""
    return [f.encode("utf-8") for f in {name, name.lower(), name.casefold(), domain.label_key(name)}]


def assert_nowhere(data: bytes, *names: str) -> None:
    for name in names:
        for form in forms(name):
            assert form not in data, f"{form!r} is stored in clear"


def send(rig: Rig, sender: str, to: str, subject: str) -> str:
    reply = rig.client.post(
        "/api/v1/messages", json={"to_staff_ids": [to], "subject": subject, "body": "b"}, headers=rig.headers(sender)
    )
    assert reply.status_code == 201, reply.get_json()
    return reply.get_json()["id"]


def board_item(rig: Rig, staff_id: str) -> str:
    reply = rig.client.get("/api/v1/board/items", headers=rig.headers(staff_id), query_string={"folder": "messages"})
    return reply.get_json()["items"][0]["id"]


def test_no_stored_document_holds_a_label_name_in_clear(rig, caplog):
    caplog.set_level(logging.DEBUG)
    created = rig.create("stf_b", NAME)
    assert created.status_code == 201, created.get_json()
    label_id = created.get_json()["id"]
    # The label is used every way a name could spread: applied by name, listed, its items listed.
    send(rig, "stf_a", "stf_b", "Chart")
    item_id = board_item(rig, "stf_b")
    applied = rig.client.post(
        f"/api/v1/board/items/{item_id}/labels", json={"name": "maria lopez FOLLOW-UP"}, headers=rig.headers("stf_b")
    )
    assert applied.status_code == 200 and applied.get_json()["label"] == {"id": label_id, "name": NAME}
    assert rig.names("stf_b") == [NAME] and rig.tree_names("stf_b") == [NAME]
    listed = rig.client.get(f"/api/v1/labels/{label_id}/items", headers=rig.headers("stf_b")).get_json()
    assert listed["label"]["name"] == NAME and [i["id"] for i in listed["items"]] == [item_id]

    assert_nowhere(rig.raw_bytes(LABELS), NAME)  # the label itself
    assert_nowhere(rig.everything(), NAME)  # items, label entries, counters, the outbox's audit events
    doc = rig.stored(label_id)
    assert isinstance(doc["name"], bytes) and doc["name_key"].startswith("m1:") and len(doc["name_key"]) == 3 + 64
    assert doc["owner_name"] == f"{AGENCY}|stf_b|{doc['name_key']}"
    logged = " ".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    for form in forms(NAME):
        assert form.decode() not in logged


def test_names_stay_unique_per_owner_regardless_of_case_and_private(rig):
    mine = rig.create("stf_b", NAME).get_json()
    dup = rig.create("stf_b", "  maria lopez   FOLLOW-UP ")
    assert dup.status_code == 409 and dup.get_json()["code"] == "label_exists"
    theirs = rig.create("stf_a", NAME)  # another owner may use the name
    assert theirs.status_code == 201
    assert rig.names("stf_a") == [NAME] and rig.names("stf_b") == [NAME]
    elsewhere = rig.create("stf_x", NAME, agency_id=OTHER_AGENCY)
    assert elsewhere.status_code == 201

    same_agency = [rig.stored(mine["id"]), rig.stored(theirs.get_json()["id"])]
    other_agency = rig.stored(elsewhere.get_json()["id"])
    # One agency's key: the same name has the same hash (the owner keeps keys apart); another
    # agency's key gives another hash, so equal names cannot be matched across agencies.
    assert same_agency[0]["name_key"] == same_agency[1]["name_key"]
    assert other_agency["name_key"] != same_agency[0]["name_key"]
    assert hashlib.sha256(NAME.casefold().encode()).hexdigest() not in same_agency[0]["name_key"]  # keyed
    assert len({doc["owner_name"] for doc in [*same_agency, other_agency]}) == 3


def test_rename_and_delete_keep_working(rig):
    follow = rig.create("stf_b", NAME).get_json()["id"]
    billing = rig.create("stf_b", "Billing").get_json()["id"]
    renamed = rig.client.patch(
        f"/api/v1/labels/{follow}", json={"name": "Maria L. review"}, headers=rig.headers("stf_b")
    )
    assert renamed.status_code == 200 and renamed.get_json() == {"id": follow, "name": "Maria L. review"}
    assert rig.names("stf_b") == ["Billing", "Maria L. review"]
    assert_nowhere(rig.raw_bytes(), "Maria L. review", NAME)
    # The old name is free again; the new one is taken, by any case, also through a rename.
    assert rig.create("stf_b", NAME.upper()).status_code == 201
    clash = rig.client.patch(
        f"/api/v1/labels/{billing}", json={"name": "MARIA l. REVIEW"}, headers=rig.headers("stf_b")
    )
    assert clash.status_code == 409 and clash.get_json()["code"] == "label_exists"
    recased = rig.client.patch(f"/api/v1/labels/{billing}", json={"name": "BILLING"}, headers=rig.headers("stf_b"))
    assert recased.status_code == 200  # a label may change its own case
    assert rig.client.delete(f"/api/v1/labels/{follow}", headers=rig.headers("stf_b")).status_code == 204
    assert rig.names("stf_b") == ["BILLING", NAME.upper()]
    assert rig.create("stf_b", "maria l. review").status_code == 201  # a deleted label's name is free


def test_labels_are_listed_by_name_regardless_of_case(rig):
    for name in ("gamma", "Beta", "alpha two", "Alpha", "delta", "Charlie"):
        assert rig.create("stf_b", name).status_code == 201
    expected = ["Alpha", "alpha two", "Beta", "Charlie", "delta", "gamma"]
    assert rig.names("stf_b") == expected
    assert rig.tree_names("stf_b") == expected


def legacy_label(rig: Rig, owner_id: str, name: str) -> str:
    """A label as an earlier version stored it: the name and its key in clear."""
    label_id = domain.new_label_id()
    owner = domain.owner_key(AGENCY, owner_id)
    key = name.casefold()
    rig.db[LABELS].insert_one(
        {
            "_id": label_id,
            "agency_id": AGENCY,
            "owner_id": owner_id,
            "owner": owner,
            "name": name,
            "name_key": key,
            "owner_name": f"{owner}|{key}",
            "created_at": 1,
        }
    )
    return label_id


def test_a_label_stored_in_clear_is_shown_and_sealed_when_read(rig):
    legacy = legacy_label(rig, "stf_b", "Lopez intake")
    assert b"Lopez intake" in rig.raw_bytes()
    assert rig.tree_names("stf_b") == ["Lopez intake"]
    doc = rig.stored(legacy)
    assert isinstance(doc["name"], bytes) and doc["name_key"].startswith("m1:")
    assert_nowhere(rig.raw_bytes(), "Lopez intake")
    # Still the same label: shown, unique, usable.
    assert rig.names("stf_b") == ["Lopez intake"]
    assert rig.create("stf_b", "LOPEZ INTAKE").status_code == 409
    listed = rig.client.get(f"/api/v1/labels/{legacy}/items", headers=rig.headers("stf_b")).get_json()
    assert listed["label"] == {"id": legacy, "name": "Lopez intake"}


def test_a_clear_label_keeps_its_name_unique_before_it_is_ever_listed(rig):
    legacy = legacy_label(rig, "stf_b", "Lopez intake")
    assert rig.create("stf_b", "lopez INTAKE").status_code == 409
    send(rig, "stf_a", "stf_b", "Chart")
    item_id = board_item(rig, "stf_b")
    applied = rig.client.post(
        f"/api/v1/board/items/{item_id}/labels", json={"name": "LOPEZ intake"}, headers=rig.headers("stf_b")
    )
    assert applied.status_code == 200 and applied.get_json()["label"] == {"id": legacy, "name": "Lopez intake"}
    assert_nowhere(rig.everything(), "Lopez intake")
    other = legacy_label(rig, "stf_b", "Roe call back")
    renamed = rig.client.patch(f"/api/v1/labels/{other}", json={"name": "Roe callback"}, headers=rig.headers("stf_b"))
    assert renamed.status_code == 200
    assert_nowhere(rig.everything(), "Roe call back", "Roe callback")
    assert rig.names("stf_b") == ["Lopez intake", "Roe callback"]


def test_after_a_master_key_rotation_names_stay_unique_and_move_to_the_new_key(mongo_client, db_name):
    old, new = os.urandom(32), os.urandom(32)
    before = make_rig(mongo_client[db_name], master_keys(m1=old))
    label_id = before.create("stf_b", NAME).get_json()["id"]
    after = make_rig(mongo_client[db_name], master_keys(m1=old, m2=new), active="m2", signing=before.keys)
    dup = after.create("stf_b", NAME.lower())  # the stored key is the old key's: still a duplicate
    assert dup.status_code == 409
    assert after.stored(label_id)["name_key"].startswith("m2:")
    assert after.names("stf_b") == [NAME]
    assert_nowhere(after.raw_bytes(), NAME)


def test_a_name_write_that_clashes_is_refused_and_changes_nothing(rig):
    """The store's answer to a clash, on both servers: nx-27017 reports a unique-key clash of a write
    holding bytes as another error, which must still read as "taken", never as a 500."""
    store, names = rig.components.store, rig.components.board.label_names
    owner = domain.owner_key(AGENCY, "stf_b")
    taken = rig.create("stf_b", NAME).get_json()["id"]
    other = rig.create("stf_b", "Billing").get_json()["id"]
    before = rig.stored(other)
    assert store.rename_label(other, owner, names.fields(AGENCY, owner, other, NAME.lower())) is False
    assert store.rewrite_label_name(other, before["name_key"], names.fields(AGENCY, owner, other, NAME)) is False
    assert rig.stored(other) == before
    # A rewrite guarded by a key the label no longer has writes nothing either.
    assert store.rewrite_label_name(other, "m1:stale", names.fields(AGENCY, owner, other, "Billing")) is False
    assert rig.stored(other) == before and rig.stored(taken)["name_key"] != before["name_key"]
