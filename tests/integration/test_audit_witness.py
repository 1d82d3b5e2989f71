"""The audit witness against the real embedded database: the checkpoint pass appends signed heads
to the witness file, and each attack that removes or rewrites what the database vouches with is
found by `verify` (in process and as `python -m services.audit verify --witness FILE`): the tail
of a chain removed with its checkpoints, a whole chain removed with its checkpoints and
registration, a chain rewritten with fresh hashes; a checkpoint whose seq became a string is
named instead of skipped; replicas' interleaved witness lines read as one witness."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import uuid

import pymongo
import pytest

from services.audit import chain as chains
from services.audit import config
from services.audit.chain import Entry
from services.audit.service import build
from services.audit.store import AuditStore
from services.audit.verify import verify_store
from services.audit.witness import read_witness
from services.kit.mongo import now_ms
from services.kit.settings import REPO_ROOT
from tests.waits import Worker

AGENCY = "agy_riverbend"
OTHER = "agy_lakeside"


@pytest.fixture
def environ(mongo_uri, db_name, tmp_path):
    return {
        "MONGO_URI": mongo_uri,
        "MONGO_DB_PREFIX": f"{db_name}_",
        "AUDIT_CHECKPOINT_EVERY": "4",
        "CLINIC_RUN_DIR": str(tmp_path),
    }


@pytest.fixture
def settings(environ):
    return config.load(environ)


@pytest.fixture
def db(mongo_client, settings):
    yield mongo_client[settings.mongo_db]
    mongo_client.drop_database(settings.mongo_db)


@pytest.fixture
def audit(settings, db):
    return build(settings, db, features=())


def entry(n: int, agency: str = AGENCY, **fields) -> Entry:
    return Entry(
        event_id=f"evt-{uuid.uuid4().hex}-{n}",
        event_type="phi.accessed.v1",
        category="phi_access",
        agency_id=agency,
        occurred_at=now_ms(),
        producer="inbox",
        service="inbox",
        actor_id="stf_riverbend_kim",
        action="read",
        resource_type="message",
        resource_id=f"msg_{n}",
        **fields,
    )


def fill(audit, count: int, agency: str = AGENCY) -> None:
    store, checkpointer = audit.components.store, audit.components.checkpointer
    for n in range(count):
        checkpointer.after_append([store.append(entry(n, agency))])


def reports(settings, db, witness: bool = True) -> dict:
    reading = read_witness([settings.witness_file], settings.trusted_keys, db.name) if witness else None
    found = verify_store(AuditStore(db), settings.trusted_keys, witness=reading)
    return {report.chain: report for report in found}


def problem(report) -> tuple[int, str] | None:
    return None if report.broken is None else (report.broken.seq, report.broken.problem)


def run_verify(environ: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "verify", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_each_checkpoint_pass_appends_the_signed_heads_of_every_chain(settings, db, audit, tmp_path):
    fill(audit, 6)
    fill(audit, 2, OTHER)
    audit.components.checkpointer.run_pass()
    audit.components.checkpointer.run_pass()  # nothing grew: a line all the same
    path = settings.witness_file
    assert path == tmp_path / "audit" / "witness.jsonl"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    heads = {chain: (r.head_seq, r.head_hash) for chain, r in reports(settings, db).items()}
    assert lines[-1]["heads"] == {chain: list(head) for chain, head in heads.items()}
    assert lines[-1]["db"] == db.name and lines[-1]["key_id"] == settings.signing_key.key_id
    assert all(report.intact for report in reports(settings, db).values())


def test_a_tail_removed_with_its_checkpoints_is_found_by_the_witness(settings, db, audit):
    fill(audit, 10)  # checkpoints at 4 and 8
    audit.components.checkpointer.run_pass()  # and 10; the witness sees 10
    # The attack: every record from seq 7 on, and every checkpoint at or after 7.
    db.audit_records.delete_many({"chain": {"$eq": AGENCY}, "seq": {"$gte": 7}})
    db.audit_checkpoints.delete_many({"chain": {"$eq": AGENCY}, "seq": {"$gte": 7}})
    assert reports(settings, db, witness=False)[AGENCY].intact  # the database alone cannot tell
    report = reports(settings, db)[AGENCY]
    assert problem(report) == (7, "truncated") and report.broken.detail == "the witness saw seq 10"


def test_a_whole_chain_removed_with_checkpoints_and_registration_is_found(settings, environ, db, audit):
    fill(audit, 5)
    fill(audit, 3, OTHER)
    audit.components.checkpointer.run_pass()
    for collection, field in (("audit_records", "chain"), ("audit_checkpoints", "chain"), ("audit_chains", "_id")):
        db[collection].delete_many({field: {"$eq": OTHER}})
    assert set(reports(settings, db, witness=False)) == {AGENCY}  # gone without a trace in the database
    found = reports(settings, db)
    assert problem(found[OTHER]) == (1, "chain_missing") and found[AGENCY].intact
    result = run_verify(environ, "--witness", str(settings.witness_file))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{OTHER}: BROKEN at seq 1, record {OTHER}:000000000001: chain_missing" in result.stdout
    assert f"{AGENCY}: intact" in result.stdout and "audit trail BROKEN" in result.stdout
    # Without --witness, verify reads the service's own witness file (AUDIT_WITNESS_PATH) when it exists.
    assert run_verify(environ).returncode == 1
    assert run_verify(environ, "--no-witness").returncode == 0


def test_a_chain_rewritten_with_fresh_hashes_and_no_checkpoints_is_found(settings, environ, db, audit):
    fill(audit, 3)
    audit.components.checkpointer.run_pass()
    # The attack: the whole chain rebuilt (another actor in record 2), links recomputed, checkpoints removed.
    originals = list(db.audit_records.find({"chain": {"$eq": AGENCY}}).sort("seq", 1))
    db.audit_records.delete_many({"chain": {"$eq": AGENCY}})
    db.audit_checkpoints.delete_many({"chain": {"$eq": AGENCY}})
    prev = chains.GENESIS
    for doc in originals:
        fields = {name: doc[name] for name in chains.ENTRY_TEXT_FIELDS} | {"occurred_at": doc["occurred_at"]}
        if doc["seq"] == 2:
            fields["actor_id"] = "stf_someone_else"
        record = chains.new_record(Entry(**fields), doc["seq"], prev, doc["recorded_at"])
        db.audit_records.insert_one(record)
        prev = record["hash"]
    assert reports(settings, db, witness=False)[AGENCY].intact
    assert problem(reports(settings, db)[AGENCY]) == (3, "rewritten")
    result = run_verify(environ, "--witness", str(settings.witness_file), "--agency", AGENCY)
    assert result.returncode == 1 and "BROKEN at seq 3" in result.stdout and "rewritten" in result.stdout


def test_a_checkpoint_whose_seq_became_a_string_is_named(settings, db, audit):
    fill(audit, 5)  # a checkpoint at 4
    db.audit_checkpoints.update_one({"_id": f"{AGENCY}:000000000004"}, {"$set": {"seq": "4"}})
    assert problem(reports(settings, db, witness=False)[AGENCY]) == (4, "checkpoint_malformed")


def test_a_forged_or_changed_witness_line_breaks_verification(settings, environ, db, audit):
    fill(audit, 2)
    audit.components.checkpointer.run_pass()
    path = settings.witness_file
    line = json.loads(path.read_text())
    line["heads"][AGENCY] = [1, line["heads"][AGENCY][1]]  # claim a shorter chain
    with path.open("a") as out:
        out.write(json.dumps(line) + "\n")
    result = run_verify(environ, "--json")
    shown = json.loads(result.stdout)
    assert result.returncode == 1 and not shown["intact"]
    assert [(p["line"], p["problem"]) for p in shown["witness"]["problems"]] == [(2, "witness_signature_invalid")]
    assert all(chain["intact"] for chain in shown["chains"])


def test_replicas_witnessing_at_once_interleave_lines_that_verify(mongo_uri, settings, db, audit):
    """Two processes' worth of writers: two clients and checkpointers, appending and passing at once."""
    clients = [pymongo.MongoClient(mongo_uri) for _ in range(2)]
    replicas = [build(settings, client[settings.mongo_db], features=()) for client in clients]
    start = threading.Barrier(2)

    def work(replica, base: int) -> None:
        store, checkpointer = replica.components.store, replica.components.checkpointer
        start.wait()
        for n in range(15):
            checkpointer.after_append([store.append(entry(base + n, AGENCY if n % 2 else OTHER))])
            checkpointer.run_pass()

    try:
        workers = [Worker(work, replica, base * 100).start() for base, replica in enumerate(replicas)]
        for worker in workers:
            worker.finish(timeout=120)
    finally:
        for client in clients:
            client.close()
    reading = read_witness([settings.witness_file], settings.trusted_keys, db.name)
    assert reading.lines == 30 and reading.problems == [] and reading.warnings == []
    found = reports(settings, db)
    assert all(report.intact for report in found.values()) and sum(r.records for r in found.values()) == 30
    assert {chain: reading.head(chain)[0] for chain in found} == {chain: r.head_seq for chain, r in found.items()}


def test_records_long_past_the_last_checkpoint_and_witness_line_are_warned_about(settings, db, audit):
    fill(audit, 2)
    audit.components.checkpointer.run_pass()
    fill(audit, 1)  # seq 3: neither checkpointed nor witnessed yet
    reading = read_witness([settings.witness_file], settings.trusted_keys, db.name)
    store = AuditStore(db)
    soon = verify_store(store, settings.trusted_keys, [AGENCY], witness=reading, now=now_ms(), overdue_ms=900_000)
    assert soon[0].intact and soon[0].warnings == ()
    later = now_ms() + 3_600_000  # as if the pass had stopped an hour ago
    [report] = verify_store(store, settings.trusted_keys, [AGENCY], witness=reading, now=later, overdue_ms=900_000)
    assert report.intact
    assert [(w.seq, w.problem) for w in report.warnings] == [(3, "checkpoint_overdue"), (3, "not_witnessed")]
