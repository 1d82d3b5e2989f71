import os

import pytest

from services.kit.crypto import DecryptionError, KeyRing, PhiCipher
from tests.helpers import Clock


@pytest.fixture
def db(mongo_client, db_name):
    return mongo_client[db_name]


def master(n: int = 1) -> dict[str, bytes]:
    return {f"m{i}": os.urandom(32) for i in range(1, n + 1)}


def test_seal_and_open_round_trip_with_a_per_agency_key(db):
    cipher = PhiCipher(KeyRing(db, master(), "m1"))
    blob = cipher.seal("agy_a", "msg_1", "body", "Client reports nausea")
    assert b"nausea" not in blob
    assert cipher.open("agy_a", "msg_1", "body", blob) == "Client reports nausea"
    assert db.phi_data_keys.find_one({"agency_id": "agy_a"})["wrapped"] != b""


def test_ciphertext_is_bound_to_agency_record_and_field(db):
    cipher = PhiCipher(KeyRing(db, master(), "m1"))
    blob = cipher.seal("agy_a", "msg_1", "body", "text")
    for agency, record, field in (
        ("agy_b", "msg_1", "body"),
        ("agy_a", "msg_2", "body"),
        ("agy_a", "msg_1", "subject"),
    ):
        with pytest.raises(DecryptionError):
            cipher.open(agency, record, field, blob)
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(DecryptionError):
        cipher.open("agy_a", "msg_1", "body", bytes(damaged))


def test_data_key_rotation_keeps_old_ciphertexts_readable(db):
    keyring = KeyRing(db, master(), "m1")
    cipher = PhiCipher(keyring)
    old = cipher.seal("agy_a", "r", "f", "before rotation")
    keyring.rotate("agy_a")
    new = cipher.seal("agy_a", "r", "f", "after rotation")
    assert key_id(old) == "agy_a:1" and key_id(new) == "agy_a:2"
    fresh = PhiCipher(KeyRing(db, keyring.master_keys, "m1"))  # another process
    assert fresh.open("agy_a", "r", "f", old) == "before rotation"
    assert fresh.open("agy_a", "r", "f", new) == "after rotation"


def test_master_key_rotation_rewraps_data_keys(db):
    keys = master(2)
    cipher = PhiCipher(KeyRing(db, {"m1": keys["m1"]}, "m1"))
    blob = cipher.seal("agy_a", "r", "f", "text")
    rotated = KeyRing(db, keys, "m2")
    assert rotated.rewrap_all() == 1
    only_new = PhiCipher(KeyRing(db, {"m2": keys["m2"]}, "m2"))
    assert only_new.open("agy_a", "r", "f", blob) == "text"


def test_wrong_master_key_cannot_open(db):
    blob = PhiCipher(KeyRing(db, {"m1": os.urandom(32)}, "m1")).seal("agy_a", "r", "f", "x")
    impostor = PhiCipher(KeyRing(db, {"m1": os.urandom(32)}, "m1"))  # same id, other key material
    with pytest.raises(DecryptionError, match="unwrapped"):
        impostor.open("agy_a", "r", "f", blob)


def test_a_rotation_by_another_process_reaches_a_running_keyring(db):
    clock = Clock(now=0.0)
    keys = master()
    running = PhiCipher(KeyRing(db, keys, "m1", active_ttl_s=60, clock=clock))
    assert key_id(running.seal("agy_a", "r", "f", "x")) == "agy_a:1"
    KeyRing(db, keys, "m1").rotate("agy_a")  # e.g. `python -m services.kit.keys rotate`
    assert key_id(running.seal("agy_a", "r", "f", "x")) == "agy_a:1"  # within the cache period
    clock.now = 61.0
    assert key_id(running.seal("agy_a", "r", "f", "x")) == "agy_a:2"


def key_id(blob: bytes) -> str:
    return blob[2 : 2 + blob[1]].decode()
