"""The audit trail's pure logic: the canonical form, the chain's hashing, and verification finding a
changed record, a gap, a removed tail and a forged checkpoint (services/audit/chain.py, verify.py)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

import pytest

from services.audit import chain as chains
from services.audit.chain import Entry
from services.audit.checkpoints import signed_checkpoint
from services.audit.signing import SigningKey, TrustedKeys, generate_private_pem, load_public_keys, public_pem
from services.audit.verify import verify_chain

AGENCY = "agy_riverbend"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def entry(n: int, agency: str = AGENCY, **fields) -> Entry:
    values = {
        "event_id": f"evt{n:04d}",
        "event_type": "phi.accessed.v1",
        "category": chains.CATEGORY_PHI,
        "agency_id": agency,
        "occurred_at": T0 + n * 1000,
        "producer": "inbox",
        "service": "inbox",
        "actor_id": "stf_riverbend_kim",
        "actor_kind": "staff",
        "action": "read",
        "outcome": "allowed",
        "resource_type": "message",
        "resource_id": f"msg_{n}",
        "patient_id": "pat_7",
        **fields,
    }
    return Entry(**values)


def build_chain(count: int, agency: str = AGENCY) -> list[dict]:
    records, prev = [], chains.GENESIS
    for n in range(1, count + 1):
        record = chains.new_record(entry(n, agency), n, prev, T0 + n * 1000 + 5)
        records.append(record)
        prev = record["hash"]
    return records


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.from_pem(generate_private_pem())


@pytest.fixture(scope="module")
def trusted(key) -> TrustedKeys:
    return TrustedKeys([key.public_key])


# --- the canonical form and the links ----------------------------------------------------------------


def test_content_is_sorted_compact_ascii_json_of_strings_and_integers():
    record = chains.new_record(entry(1, resource_id="msg_é"), 1, chains.GENESIS, T0)
    text = record["content"]
    assert text.isascii() and " " not in text
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    content = json.loads(text)
    assert set(content) == set(chains.CONTENT_FIELDS)
    assert (content["chain"], content["seq"], content["v"], content["resource_id"]) == (AGENCY, 1, 2, "msg_é")
    assert content["clock_skew_ms"] == 0
    assert all(type(v) in (str, int) for v in content.values())


def test_the_hash_is_sha256_of_the_previous_hash_followed_by_the_content():
    first, second = build_chain(2)
    assert first["prev_hash"] == chains.GENESIS == "0" * 64
    assert first["hash"] == hashlib.sha256((chains.GENESIS + first["content"]).encode()).hexdigest()
    assert second["prev_hash"] == first["hash"]
    assert second["hash"] == hashlib.sha256((first["hash"] + second["content"]).encode()).hexdigest()


def test_record_ids_and_time_keys_sort_by_place_and_time():
    record = build_chain(1)[0]
    assert record["_id"] == f"{AGENCY}:000000000001"
    assert record["at_key"] == f"{T0 + 1000}.000000000001"
    assert chains.time_bound(T0 + 1000) <= record["at_key"] < chains.time_bound(T0 + 1001)


def test_events_of_no_agency_go_to_the_system_chain_and_odd_agency_ids_are_refused():
    assert entry(1, agency="").chain == chains.SYSTEM_CHAIN == "_system"
    for bad in ("_system", "agy:1", "a" * 65, "agy riverbend", "$ne"):
        with pytest.raises(ValueError):
            chains.chain_of(bad)


def test_recorded_text_keeps_printable_characters_only_and_is_clipped():
    assert chains.text("stf_1\x00\n\u202e") == "stf_1"
    assert len(chains.text("x" * 500)) == chains.MAX_TEXT


# --- verification --------------------------------------------------------------------------------------


def test_an_untouched_chain_verifies(trusted, key):
    records = build_chain(5)
    checkpoints = [
        signed_checkpoint(key, AGENCY, 3, records[2]["hash"], T0),
        signed_checkpoint(key, AGENCY, 5, records[4]["hash"], T0),
    ]
    report = verify_chain(AGENCY, records, checkpoints, trusted)
    assert report.intact and (report.records, report.checkpoints, report.head_seq) == (5, 2, 5)
    assert report.head_hash == records[-1]["hash"]


def test_an_empty_chain_is_intact(trusted):
    assert verify_chain(AGENCY, [], [], trusted).intact


@pytest.mark.parametrize(
    ("field", "value"),
    [("actor_id", "stf_riverbend_admin"), ("patient_id", ""), ("occurred_at", T0), ("action", "denied")],
)
def test_a_record_changed_in_place_is_named(trusted, field, value):
    records = build_chain(5)
    records[2][field] = value
    broken = verify_chain(AGENCY, records, [], trusted).broken
    assert broken is not None
    assert (broken.seq, broken.record_id, broken.problem) == (3, f"{AGENCY}:000000000003", "fields_differ_from_content")


def test_a_record_rewritten_with_its_own_new_hash_breaks_the_next_link(trusted):
    records = build_chain(5)
    changed = chains.new_record(entry(3, actor_id="stf_someone_else"), 3, records[1]["hash"], T0)
    records[2] = changed
    broken = verify_chain(AGENCY, records, [], trusted).broken
    assert (broken.seq, broken.problem) == (4, "prev_hash_mismatch")


def test_a_rewritten_last_record_is_caught_by_its_signed_checkpoint(trusted, key):
    records = build_chain(5)
    checkpoint = signed_checkpoint(key, AGENCY, 5, records[4]["hash"], T0)
    records[4] = chains.new_record(entry(5, actor_id="stf_someone_else"), 5, records[3]["hash"], T0)
    broken = verify_chain(AGENCY, records, [checkpoint], trusted).broken
    assert (broken.seq, broken.problem) == (5, "hash_differs_from_checkpoint")


def test_a_content_with_a_forged_hash_is_named(trusted):
    records = build_chain(3)
    records[1]["hash"] = "f" * 64
    broken = verify_chain(AGENCY, records, [], trusted).broken
    assert (broken.seq, broken.problem) == (2, "hash_mismatch")


def test_a_removed_record_is_a_gap_named_by_its_place(trusted):
    records = build_chain(5)
    del records[1]
    broken = verify_chain(AGENCY, records, [], trusted).broken
    assert (broken.seq, broken.record_id, broken.problem) == (2, f"{AGENCY}:000000000002", "missing_record")


def test_a_removed_tail_is_found_by_a_checkpoint_past_the_end(trusted, key):
    records = build_chain(5)
    checkpoint = signed_checkpoint(key, AGENCY, 5, records[4]["hash"], T0)
    broken = verify_chain(AGENCY, records[:3], [checkpoint], trusted).broken
    assert (broken.seq, broken.problem) == (4, "records_missing_at_end")


def test_a_record_moved_to_another_place_is_named(trusted):
    records = build_chain(3)
    records[1] = {**records[1], "_id": f"{AGENCY}:000000000009"}
    assert verify_chain(AGENCY, records, [], trusted).broken.problem == "record_out_of_place"


def test_a_checkpoint_with_a_bad_signature_or_an_untrusted_key_is_named(trusted, key):
    records = build_chain(4)
    forged = signed_checkpoint(key, AGENCY, 2, records[1]["hash"], T0)
    forged["signature"] = base64.b64encode(b"\x00" * 64).decode()
    broken = verify_chain(AGENCY, records, [forged], trusted).broken
    assert (broken.seq, broken.problem) == (2, "checkpoint_signature_invalid")
    stranger = SigningKey.from_pem(generate_private_pem())
    other = signed_checkpoint(stranger, AGENCY, 4, records[3]["hash"], T0)
    assert verify_chain(AGENCY, records, [other], trusted).broken.problem == "checkpoint_signature_invalid"
    # The same checkpoint verifies once that key is trusted.
    assert verify_chain(AGENCY, records, [other], TrustedKeys([stranger.public_key])).intact


def test_a_checkpoint_moved_to_another_chain_or_time_does_not_verify(trusted, key):
    records = build_chain(2)
    checkpoint = signed_checkpoint(key, AGENCY, 2, records[1]["hash"], T0)
    assert not verify_chain(AGENCY, records, [{**checkpoint, "at": T0 + 1}], trusted).intact
    other_chain = [{**r} for r in build_chain(2, "agy_lakeside")]
    moved = {**checkpoint, "chain": "agy_lakeside"}
    assert verify_chain("agy_lakeside", other_chain, [moved], trusted).broken.problem == "checkpoint_signature_invalid"


def test_the_earliest_problem_is_reported(trusted, key):
    records = build_chain(6)
    bad_checkpoint = signed_checkpoint(key, AGENCY, 5, records[4]["hash"], T0) | {"signature": "AAAA"}
    records[1]["resource_id"] = "msg_other"
    broken = verify_chain(AGENCY, records, [bad_checkpoint], trusted).broken
    assert (broken.seq, broken.problem) == (2, "fields_differ_from_content")


# --- keys -------------------------------------------------------------------------------------------


def test_signing_keys_name_themselves_and_load_from_pem(key):
    assert key.key_id.startswith("ed25519-") and len(key.key_id) == len("ed25519-") + 16
    [loaded] = load_public_keys(public_pem(key.public_key))
    assert TrustedKeys([loaded]).keys.keys() == {key.key_id}
    with pytest.raises(ValueError):
        SigningKey.from_pem("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----")
    with pytest.raises(ValueError):
        load_public_keys("no key here")


# --- record versions --------------------------------------------------------------------------------


def v1_record(n: int, prev: str) -> dict:
    """Record `n` as a version 1 writer stored it: no clock_skew_ms in its content, no rec_key."""
    fields = {**dataclasses.asdict(entry(n)), "chain": AGENCY, "seq": n, "v": 1, "recorded_at": T0 + n * 1000 + 5}
    del fields["clock_skew_ms"]
    content = chains.canonical({name: fields[name] for name in chains.CONTENT_FIELDS_BY_VERSION[1]})
    return {
        "_id": chains.record_id(AGENCY, n),
        **fields,
        "at_key": chains.at_key(fields["occurred_at"], n),
        "content": content,
        "prev_hash": prev,
        "hash": chains.link_hash(prev, content),
    }


def test_new_records_are_version_2_with_the_clock_skew_in_their_hashed_content():
    record = chains.new_record(entry(1, clock_skew_ms=-3_600_000), 1, chains.GENESIS, T0)
    content = json.loads(record["content"])
    assert (content["v"], content["clock_skew_ms"]) == (2, -3_600_000)
    assert record["rec_key"] == f"{T0}.000000000001"


def test_version_1_records_keep_verifying_and_a_chain_may_go_on_in_version_2(trusted):
    first = v1_record(1, chains.GENESIS)
    second = v1_record(2, first["hash"])
    third = chains.new_record(entry(3), 3, second["hash"], T0 + 9000)
    report = verify_chain(AGENCY, [first, second, third], [], trusted)
    assert report.intact and report.head_seq == 3


def test_a_record_passed_off_as_another_version_is_named(trusted):
    records = build_chain(3)
    downgraded = {**records[1], "v": 1}
    del downgraded["clock_skew_ms"]
    broken = verify_chain(AGENCY, [records[0], downgraded, records[2]], [], trusted).broken
    assert (broken.seq, broken.problem) == (2, "fields_differ_from_content")
    unknown = {**records[1], "v": 7}
    assert verify_chain(AGENCY, [records[0], unknown], [], trusted).broken.problem == "fields_missing_or_malformed"


@pytest.mark.parametrize(("column", "value"), [("clock_skew_ms", 12_345), ("rec_key", "9999999999999.000000000002")])
def test_a_changed_clock_skew_or_recorded_time_key_is_named(trusted, column, value):
    records = build_chain(3)
    records[1][column] = value
    broken = verify_chain(AGENCY, records, [], trusted).broken
    assert (broken.seq, broken.problem) == (2, "fields_differ_from_content")


# --- malformed checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"seq": "3"},  # the seq turned into a string: it must not be skipped
        {"seq": True},
        {"at": "1767225600000"},
        {"hash": None},
        {"signature": 12},
        {"key_id": None},
    ],
)
def test_a_checkpoint_with_fields_of_the_wrong_type_is_a_problem_not_ignored(trusted, key, change):
    records = build_chain(4)
    checkpoint = signed_checkpoint(key, AGENCY, 3, records[2]["hash"], T0)
    report = verify_chain(AGENCY, records, [{**checkpoint, **change}], trusted)
    assert not report.intact
    assert (report.broken.seq, report.broken.problem) == (3, "checkpoint_malformed")
    assert report.checkpoints == 1


def test_a_checkpoint_without_fields_is_malformed(trusted):
    records = build_chain(2)
    broken = verify_chain(AGENCY, records, [{"_id": f"{AGENCY}:000000000002", "chain": AGENCY}], trusted).broken
    assert (broken.seq, broken.problem) == (2, "checkpoint_malformed")
