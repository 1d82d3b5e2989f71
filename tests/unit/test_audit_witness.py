"""The witness outside the database (services/audit/witness.py) and what verification makes of it:
each attack that removes or rewrites what the database itself vouches with (records with their
checkpoints, a whole chain with its registration) is named; forged, changed and malformed witness
lines are problems; replicas' interleaved lines are read as one witness; and records no checkpoint
or witness line covers long after they were recorded are warned about."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from services.audit import chain as chains
from services.audit.checkpoints import signed_checkpoint
from services.audit.signing import SigningKey, TrustedKeys, generate_private_pem
from services.audit.verify import verify_chain
from services.audit.witness import Witness, read_witness, witness_line
from tests.unit.test_audit_chain import AGENCY, T0, build_chain, entry

DB = "clinic_audit"
OTHER = "agy_lakeside"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.from_pem(generate_private_pem())


@pytest.fixture(scope="module")
def trusted(key) -> TrustedKeys:
    return TrustedKeys([key.public_key])


def write(path, *lines: str) -> None:
    with path.open("a") as out:
        out.writelines(lines)


def head_of(records: list[dict]) -> tuple[int, str]:
    return records[-1]["seq"], records[-1]["hash"]


# --- the attacks ------------------------------------------------------------------------------------


def test_records_removed_from_seq_k_on_with_their_checkpoints_are_named_truncated(trusted, key):
    records = build_chain(8)
    checkpoints = [signed_checkpoint(key, AGENCY, 4, records[3]["hash"], T0)]
    # Removed from seq 6 on, with every checkpoint at or after 6: the database alone looks intact.
    assert verify_chain(AGENCY, records[:5], checkpoints, trusted).intact
    report = verify_chain(AGENCY, records[:5], checkpoints, trusted, witnessed=head_of(records))
    assert (report.broken.seq, report.broken.problem) == (6, "truncated")
    assert report.broken.detail == "the witness saw seq 8"


def test_a_whole_chain_removed_with_its_checkpoints_and_registration_is_named_missing(trusted):
    report = verify_chain(AGENCY, [], [], trusted, witnessed=(12, "a" * 64))
    assert (report.broken.seq, report.broken.problem) == (1, "chain_missing")


def test_a_chain_rewritten_with_fresh_consistent_hashes_is_named_rewritten(trusted):
    original = build_chain(5)
    rewritten, prev = [], chains.GENESIS
    for n in range(1, 6):
        record = chains.new_record(entry(n, actor_id="stf_someone_else"), n, prev, T0 + n)
        rewritten.append(record)
        prev = record["hash"]
    assert verify_chain(AGENCY, rewritten, [], trusted).intact  # links hold: only the witness knows
    broken = verify_chain(AGENCY, rewritten, [], trusted, witnessed=head_of(original[:4])).broken
    assert (broken.seq, broken.problem) == (4, "rewritten")


def test_a_chain_grown_past_its_witnessed_head_is_intact(trusted):
    records = build_chain(6)
    assert verify_chain(AGENCY, records, [], trusted, witnessed=head_of(records[:4])).intact
    assert verify_chain(AGENCY, records, [], trusted, witnessed=(0, chains.GENESIS)).intact


# --- the witness file ---------------------------------------------------------------------------------


def test_a_line_is_compact_signed_json_of_every_head(key, tmp_path):
    line = witness_line(key, DB, {AGENCY: (3, "a" * 64), "_system": (1, "b" * 64)}, T0)
    assert line.endswith("\n") and line.count("\n") == 1 and " " not in line
    fields = json.loads(line)
    assert set(fields) == {"v", "at", "db", "heads", "key_id", "signature"}
    assert fields["heads"] == {AGENCY: [3, "a" * 64], "_system": [1, "b" * 64]}
    assert fields["key_id"] == key.key_id and fields["db"] == DB


def test_appended_lines_are_read_back_newest_head_per_chain_whatever_their_order(key, trusted, tmp_path):
    path = tmp_path / "witness.jsonl"
    witness = Witness(path, key, DB)
    assert witness.append({AGENCY: (5, "c" * 64), OTHER: (2, "d" * 64)}, T0 + 2)
    # A replica that read the heads earlier writes after it: lines interleave out of order.
    assert witness.append({AGENCY: (3, "e" * 64)}, T0 + 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reading = read_witness([path], trusted, DB)
    assert reading.problems == [] and reading.lines == 2 and reading.newest_at == T0 + 2
    assert reading.head(AGENCY) == (5, "c" * 64) and reading.head(OTHER) == (2, "d" * 64)
    assert reading.head("agy_never") == (0, chains.GENESIS)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda fields: fields["heads"].update({AGENCY: [2, "f" * 64]}),  # an older head claimed
        lambda fields: fields["heads"].pop(AGENCY),  # a chain dropped from the line
        lambda fields: fields.update({"at": fields["at"] + 1}),
        lambda fields: fields.update({"signature": "AAAA"}),
    ],
)
def test_a_changed_line_no_longer_verifies(key, trusted, tmp_path, tamper):
    fields = json.loads(witness_line(key, DB, {AGENCY: (4, "a" * 64), OTHER: (1, "b" * 64)}, T0))
    tamper(fields)
    path = tmp_path / "witness.jsonl"
    write(path, json.dumps(fields) + "\n")
    reading = read_witness([path], trusted, DB)
    assert [(p.line, p.problem) for p in reading.problems] == [(1, "witness_signature_invalid")]
    assert reading.heads == {}  # nothing of it is believed


def test_a_line_signed_by_another_key_is_refused(trusted, tmp_path):
    stranger = SigningKey.from_pem(generate_private_pem())
    path = tmp_path / "witness.jsonl"
    write(path, witness_line(stranger, DB, {AGENCY: (99, "a" * 64)}, T0))
    assert [p.problem for p in read_witness([path], trusted, DB).problems] == ["witness_signature_invalid"]


@pytest.mark.parametrize(
    "line",
    [
        "not json\n",
        "[]\n",
        '{"v":1}\n',
        "\xff\n",
    ],
)
def test_a_line_that_is_not_a_witness_line_is_malformed(trusted, tmp_path, line):
    path = tmp_path / "witness.jsonl"
    path.write_bytes(line.encode("latin-1"))
    assert [p.problem for p in read_witness([path], trusted, DB).problems] == ["witness_line_malformed"]


@pytest.mark.parametrize(
    "heads",
    [
        {AGENCY: ["3", "a" * 64]},  # a seq that is not an integer
        {AGENCY: [True, "a" * 64]},
        {AGENCY: [0, "a" * 64]},
        {AGENCY: [3, "not a hash"]},
        {"agy riverbend": [3, "a" * 64]},
    ],
)
def test_signed_lines_of_the_wrong_shape_are_malformed_not_skipped(key, trusted, tmp_path, heads):
    fields = {"v": 1, "at": T0, "db": DB, "heads": heads, "key_id": key.key_id}
    fields["signature"] = key.sign(chains.canonical(fields))
    path = tmp_path / "witness.jsonl"
    write(path, chains.canonical(fields) + "\n")
    assert [p.problem for p in read_witness([path], trusted, DB).problems] == ["witness_line_malformed"]


def test_two_signed_lines_disagreeing_about_one_place_are_a_conflict(key, trusted, tmp_path):
    path = tmp_path / "witness.jsonl"
    write(path, witness_line(key, DB, {AGENCY: (3, "a" * 64)}, T0), witness_line(key, DB, {AGENCY: (3, "b" * 64)}, T0))
    assert [(p.line, p.problem) for p in read_witness([path], trusted, DB).problems] == [(2, "witness_conflict")]


def test_lines_of_another_database_are_counted_apart_and_an_unfinished_last_line_is_a_warning(key, trusted, tmp_path):
    path = tmp_path / "witness.jsonl"
    write(path, witness_line(key, "staging_audit", {AGENCY: (40, "a" * 64)}, T0), witness_line(key, DB, {}, T0))
    write(path, witness_line(key, DB, {AGENCY: (1, "b" * 64)}, T0).rstrip("\n"))
    reading = read_witness([path], trusted, DB)
    assert (reading.lines, reading.other_lines, reading.heads) == (1, 1, {})
    assert reading.problems == [] and [(w.line, w.problem) for w in reading.warnings] == [
        (3, "witness_line_incomplete")
    ]


def test_replicas_appending_at_once_leave_only_whole_lines(key, trusted, tmp_path):
    path = tmp_path / "witness.jsonl"
    heads = {f"agy_{n:03d}": (n + 1, f"{n:064x}") for n in range(200)}  # a line of about 16 KB
    writers = [Witness(path, key, DB) for _ in range(4)]
    start = threading.Barrier(len(writers))

    def run(witness: Witness) -> None:
        start.wait()
        for n in range(25):
            assert witness.append(heads, T0 + n)

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    reading = read_witness([path], trusted, DB)
    assert reading.problems == [] and reading.warnings == [] and reading.lines == 100
    assert len(reading.heads) == 200


def test_a_witness_that_cannot_be_written_is_reported_not_raised(key, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert not Witness(blocked / "witness.jsonl", key, DB).append({AGENCY: (1, "a" * 64)}, T0)


# --- warnings -----------------------------------------------------------------------------------------


def test_records_long_uncovered_by_a_checkpoint_or_the_witness_are_warned_about(key, trusted):
    records = build_chain(6)  # recorded at T0 + n s + 5 ms
    checkpoints = [signed_checkpoint(key, AGENCY, 2, records[1]["hash"], T0)]
    later = T0 + 3_600_000
    report = verify_chain(
        AGENCY, records, checkpoints, trusted, witnessed=head_of(records[:4]), now=later, overdue_ms=900_000
    )
    assert report.intact
    assert [(w.seq, w.problem) for w in report.warnings] == [(3, "checkpoint_overdue"), (5, "not_witnessed")]
    # Recently recorded: the checkpoint pass has not been due yet.
    soon = verify_chain(AGENCY, records, checkpoints, trusted, now=T0 + 10_000, overdue_ms=900_000)
    assert soon.warnings == ()
    # Covered: nothing to warn about.
    covered = [signed_checkpoint(key, AGENCY, 6, records[5]["hash"], T0)]
    assert (
        verify_chain(AGENCY, records, covered, trusted, witnessed=head_of(records), now=later, overdue_ms=1).warnings
        == ()
    )
