"""The audit service's consumer and store against the real broker (a private vhost) and the real
embedded database: events in, chained records out; a redelivery records once; writers racing for
one chain never fork it; checkpoints are signed; `verify` names a tampered record and exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import replace

import pika
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2, security_pb2
from services.audit import chain as chains
from services.audit import config
from services.audit.chain import Entry
from services.audit.ingest import declare_queues
from services.audit.service import build
from services.audit.store import AuditStore, Filters
from services.audit.verify import verify_store
from services.kit.bus import Publisher, Topology
from services.kit.events import decode_envelope, new_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.settings import REPO_ROOT
from tests.waits import Worker, wait_until

AGENCY = "agy_riverbend"
OTHER = "agy_lakeside"


@pytest.fixture
def names():
    """Exchange and queue names of this test's own in the session vhost."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return {"exchange": f"{prefix}.events", "queue": f"{prefix}.audit.records"}


@pytest.fixture
def environ(mongo_uri, amqp_url, names, db_name, tmp_path):
    """The audit service's environment for this test: its database is `<db_name>_audit`."""
    return {
        "MONGO_URI": mongo_uri,
        "MONGO_DB_PREFIX": f"{db_name}_",
        "AMQP_URL": amqp_url,
        "EVENTS_EXCHANGE": names["exchange"],
        "AUDIT_QUEUE": names["queue"],
        "AUDIT_RETRY_DELAY_MS": "50",
        "AUDIT_CHECKPOINT_EVERY": "10",
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
def broker(amqp_url, names):
    """Deletes this test's exchanges and queues afterwards."""
    yield
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for queue in (
        names["queue"],
        f"{names['queue']}.retry",
        f"{names['queue']}.parking",
        f"{names['exchange']}.unrouted",
    ):
        channel.queue_delete(queue)
    for exchange in (names["exchange"], f"{names['exchange']}.unrouted"):
        channel.exchange_delete(exchange)
    connection.close()


def stamp(ms: int) -> Timestamp:
    value = Timestamp()
    value.FromMilliseconds(ms)
    return value


def phi_read(agency: str = AGENCY, resource_id: str = "msg_1", actor: str = "stf_riverbend_kim", **fields):
    payload = audit_pb2.PhiAccessed(
        agency_id=agency,
        actor_id=actor,
        actor_kind="staff",
        resource_type="message",
        resource_id=resource_id,
        action="read",
        outcome="allowed",
        service="inbox",
        **{"accessed_at": stamp(now_ms()), **fields},
    )
    return new_envelope("phi.accessed.v1", payload, agency_id=agency, producer="inbox")


def security(kind: str = "sign_in_failed", agency: str = AGENCY):
    payload = security_pb2.SecurityEvent(
        agency_id=agency,
        kind=kind,
        actor_kind="anonymous",
        outcome="refused",
        reason="bad_password",
        service="directory",
        occurred_at=stamp(now_ms()),
    )
    return new_envelope("security_event.recorded.v1", payload, agency_id=agency, producer="directory")


def publish(settings, *envelopes) -> None:
    publisher = Publisher(settings.amqp_url, Topology(exchange=settings.events_exchange))
    try:
        publisher.publish(envelopes)
    finally:
        publisher.close()


def records(db, chain: str = AGENCY) -> list[dict]:
    return list(db.audit_records.find({"chain": {"$eq": chain}}).sort("seq", 1))


def intact(settings, db) -> bool:
    reports = verify_store(AuditStore(db), settings.trusted_keys)
    return bool(reports) and all(r.intact for r in reports)


def entry(n: int, agency: str = AGENCY) -> Entry:
    return Entry(
        event_id=f"evt-{uuid.uuid4().hex}-{n}",
        event_type="phi.accessed.v1",
        category="phi_access",
        agency_id=agency,
        occurred_at=now_ms(),
        actor_id=f"stf_{n % 3}",
        action="read",
        resource_type="message",
        resource_id=f"msg_{n}",
    )


def test_events_of_the_stream_become_chained_records_of_their_agency(settings, db, broker):
    audit = build(settings, db)
    reads = [phi_read(resource_id=f"msg_{n}", patient_id="pat_7" if n == 2 else "") for n in range(3)]
    with audit.recording.consumer.running():
        publish(settings, *reads, phi_read(OTHER, "msg_lake"), security(), security("forged_identity_refused", ""))
        wait_until(lambda: db.audit_records.count_documents({}) == 6, message="six records")
    mine = records(db)
    assert [r["seq"] for r in mine] == [1, 2, 3, 4]
    assert {r["event_id"] for r in mine} == {*(e.event_id for e in reads), mine[-1]["event_id"]}
    read = next(r for r in mine if r["resource_id"] == "msg_2")
    assert (read["actor_id"], read["action"], read["resource_type"], read["patient_id"], read["category"]) == (
        "stf_riverbend_kim",
        "read",
        "message",
        "pat_7",
        "phi_access",
    )
    refusal = next(r for r in mine if r["category"] == "security")
    assert (refusal["action"], refusal["reason"], refusal["service"]) == ("sign_in_failed", "bad_password", "directory")
    assert [r["resource_id"] for r in records(db, OTHER)] == ["msg_lake"]
    [system] = records(db, chains.SYSTEM_CHAIN)
    assert (system["seq"], system["action"]) == (1, "forged_identity_refused")
    assert intact(settings, db)
    # Each record links to the one before it in its own chain only.
    assert mine[0]["prev_hash"] == chains.GENESIS and mine[1]["prev_hash"] == mine[0]["hash"]


def test_a_redelivered_event_is_recorded_once(settings, db, broker):
    audit = build(settings, db)
    event = phi_read(resource_id="msg_once")
    with audit.recording.consumer.running():
        publish(settings, event, event)
        wait_until(lambda: db.processed_events.find_one({"_id": f"audit:{event.event_id}"}), message="processed")
        # As after a crash between the record and the processed mark: the broker delivers it again.
        db.processed_events.delete_many({})
        publish(settings, event, phi_read(resource_id="msg_after"))
        wait_until(lambda: len(records(db)) == 2, message="the next event recorded")
    assert [r["resource_id"] for r in records(db)] == ["msg_once", "msg_after"]
    assert intact(settings, db)


def test_an_event_that_cannot_be_recorded_is_parked_not_dropped(settings, db, broker):
    audit = build(settings, db)
    forged = new_envelope(
        "phi.accessed.v1",
        audit_pb2.PhiAccessed(agency_id=OTHER, resource_id="msg_x"),
        agency_id=AGENCY,
        producer="inbox",
    )
    consumer = audit.recording.consumer
    with consumer.running():
        publish(settings, forged, phi_read(resource_id="msg_fine"))
        wait_until(lambda: len(records(db)) == 1, message="the good event recorded")
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        method, _properties, body = connection.channel().basic_get(consumer.parking_queue, auto_ack=True)
    finally:
        connection.close()
    assert method is not None and forged.event_id.encode() in body
    assert db.audit_records.find_one({"event_id": {"$eq": forged.event_id}}) is None


def test_events_published_before_the_service_first_runs_wait_in_its_queue(settings, db, broker):
    declare_queues(settings)  # as the launcher does before any service starts
    early = phi_read(resource_id="msg_early")
    publish(settings, early)
    audit = build(settings, db)
    with audit.recording.consumer.running():
        wait_until(lambda: records(db), message="the early event recorded")
    assert records(db)[0]["event_id"] == early.event_id


def test_two_writers_racing_for_one_chain_never_fork_it(mongo_uri, settings, db):
    """Two stores on two connections (as two replicas), appending to the same chain at once."""
    import pymongo

    clients = [pymongo.MongoClient(mongo_uri) for _ in range(2)]
    stores = [AuditStore(client[settings.mongo_db]) for client in clients]
    stores[0].ensure_indexes()
    start = threading.Barrier(2)

    def write(store: AuditStore, base: int) -> None:
        start.wait()
        for n in range(60):
            store.append(entry(base + n))

    try:
        writers = [Worker(write, store, base * 1000).start() for base, store in enumerate(stores)]
        for writer in writers:
            writer.finish(timeout=120)
    finally:
        for client in clients:
            client.close()
    stored = records(db)
    assert [r["seq"] for r in stored] == list(range(1, 121))
    assert len({r["event_id"] for r in stored}) == 120
    assert intact(settings, db)


def test_the_same_event_appended_by_two_writers_at_once_is_recorded_once(settings, db):
    store = AuditStore(db)
    store.ensure_indexes()
    store.append(entry(0))
    same = entry(1)
    start = threading.Barrier(8)

    def write():
        start.wait()
        return store.append(same)["_id"]

    writers = [Worker(write).start() for _ in range(8)]
    assert {writer.finish(30) for writer in writers} == {f"{AGENCY}:000000000002"}
    assert len(records(db)) == 2 and intact(settings, db)


def test_two_consumers_sharing_the_queue_keep_one_chain(settings, db, broker):
    first, second = build(settings, db), build(settings, db)
    events = [phi_read(resource_id=f"msg_{n}") for n in range(80)]
    with first.recording.consumer.running(), second.recording.consumer.running():
        publish(settings, *events)
        wait_until(lambda: len(records(db)) == 80, timeout=60, message="every event recorded")
    assert [r["seq"] for r in records(db)] == list(range(1, 81))
    assert intact(settings, db)


def test_checkpoints_are_signed_every_n_records_and_for_a_grown_chain(settings, db):
    audit = build(settings, db)
    store, checkpointer = audit.components.store, audit.components.checkpointer
    for n in range(25):
        checkpointer.after_append([store.append(entry(n))])
    assert [cp["seq"] for cp in store.checkpoints_of(AGENCY)] == [10, 20]
    assert checkpointer.run_pass() == 1 and checkpointer.run_pass() == 0  # the head (25), once
    checkpoints = store.checkpoints_of(AGENCY)
    assert [cp["seq"] for cp in checkpoints] == [10, 20, 25]
    assert checkpoints[-1]["key_id"] == settings.signing_key.key_id
    assert checkpoints[-1]["hash"] == records(db)[-1]["hash"]
    assert intact(settings, db)
    # Removing the newest records is caught by the last checkpoint.
    db.audit_records.delete_many({"chain": {"$eq": AGENCY}, "seq": {"$gte": 24}})
    [report] = verify_store(store, settings.trusted_keys, [AGENCY])
    assert (report.broken.seq, report.broken.problem) == (24, "records_missing_at_end")


def run_verify(environ: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environ}
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "verify", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_verify_reports_an_intact_trail_then_names_the_record_changed_in_the_database(environ, settings, db):
    store = build(settings, db).components.store
    for n in range(12):
        store.append(entry(n))
    store.append(entry(0, OTHER))
    result = run_verify(environ)
    assert result.returncode == 0, result.stderr
    assert "audit trail intact: 2 chains, 13 records, 0 broken" in result.stdout
    db.audit_records.update_one({"_id": f"{AGENCY}:000000000007"}, {"$set": {"actor_id": "stf_nobody"}})
    result = run_verify(environ)
    assert result.returncode == 1
    assert f"{AGENCY}: BROKEN at seq 7, record {AGENCY}:000000000007: fields_differ_from_content" in result.stdout
    assert f"{OTHER}: intact" in result.stdout
    # One agency only, as JSON.
    result = run_verify(environ, "--agency", OTHER, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["chains"][0]["chain"] == OTHER


def test_verify_trusts_only_the_keys_it_is_given(environ, settings, db, tmp_path):
    from services.audit.signing import SigningKey, generate_private_pem, public_pem

    audit = build(settings, db)
    store = audit.components.store
    for n in range(10):
        audit.components.checkpointer.after_append([store.append(entry(n))])
    own = tmp_path / "audit.pub"
    own.write_text(public_pem(settings.signing_key.public_key))
    assert run_verify(environ, "--public-key", str(own)).returncode == 0
    stranger = tmp_path / "stranger.pub"
    stranger.write_text(public_pem(SigningKey.from_pem(generate_private_pem()).public_key))
    result = run_verify(environ, "--public-key", str(stranger))
    assert result.returncode == 1 and "checkpoint_signature_invalid" in result.stdout
    assert run_verify(environ, "--agency", "_bad").returncode == 2


def parked(settings, consumer, count: int) -> dict[str, str]:
    """The parking queue's first `count` messages: event id -> the reason they were parked for."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    found = {}
    try:
        channel = connection.channel()
        for _ in range(count):
            method, properties, body = channel.basic_get(consumer.parking_queue, auto_ack=True)
            assert method is not None, "fewer parked messages than expected"
            event_id = decode_envelope(body).event_id
            reason = properties.headers["x-error-reason"]
            found[event_id] = reason.decode() if isinstance(reason, bytes) else reason
    finally:
        connection.close()
    return found


def staged_refusals(db) -> list:
    events = []
    for doc in db.security_outbox.find({}):
        for staged in doc["_outbox"].values():
            events.append(unpack(decode_envelope(bytes(staged["env"])), security_pb2.SecurityEvent))
    return events


def test_a_service_cannot_speak_for_another_in_the_audit_stream(settings, db, broker):
    """inbox signs (the bus authenticates it as inbox) events that claim to come from the directory:
    a read attributed to it, and a sign-in only the directory could have seen. Both are parked, never
    recorded, and each refusal is itself a security event of the audit service."""
    audit = build(settings, db)
    read = audit_pb2.PhiAccessed(agency_id=AGENCY, actor_id="stf_riverbend_kim", action="read", service="directory")
    claims_directory = new_envelope("phi.accessed.v1", read, agency_id=AGENCY, producer="inbox")
    sign_in = security_pb2.SecurityEvent(
        agency_id=AGENCY, kind="sign_in_succeeded", outcome="succeeded", service="inbox", occurred_at=stamp(now_ms())
    )
    inbox_sign_in = new_envelope("security_event.recorded.v1", sign_in, agency_id=AGENCY, producer="inbox")
    consumer = audit.recording.consumer
    with consumer.running():
        publish(settings, claims_directory, inbox_sign_in, phi_read(resource_id="msg_fine"), security())
        wait_until(lambda: len(records(db)) == 2, message="the two genuine events recorded")
    assert parked(settings, consumer, 2) == {
        claims_directory.event_id: "service_not_producer",
        inbox_sign_in.event_id: "security_kind_not_allowed",
    }
    assert {r["resource_id"] for r in records(db)} == {"msg_fine", ""}
    assert [r["action"] for r in records(db) if r["category"] == "security"] == ["sign_in_failed"]
    refusals = {e.target_id: e for e in staged_refusals(db)}
    assert {e.kind for e in refusals.values()} == {"event_refused"}
    assert (refusals[inbox_sign_in.event_id].reason, refusals[inbox_sign_in.event_id].actor_id) == (
        "security_kind_not_allowed",
        "inbox",
    )
    assert refusals[claims_directory.event_id].reason == "service_not_producer"
    assert refusals[claims_directory.event_id].service == "audit"


def test_an_event_from_a_skewed_clock_is_recorded_with_its_skew(settings, db, broker):
    audit = build(settings, db)
    hour = 3_600_000
    late = phi_read(resource_id="msg_behind", accessed_at=stamp(now_ms() - hour))
    ahead = phi_read(resource_id="msg_ahead", accessed_at=stamp(now_ms() + hour))
    with audit.recording.consumer.running():
        publish(settings, late, ahead, phi_read(resource_id="msg_on_time"))
        wait_until(lambda: len(records(db)) == 3, message="three records")
    skew = {r["resource_id"]: r["clock_skew_ms"] for r in records(db)}
    assert skew["msg_on_time"] == 0
    assert -hour - 60_000 < skew["msg_behind"] < -hour + 60_000
    assert hour - 60_000 < skew["msg_ahead"] < hour + 60_000
    assert all(r["v"] == 2 and f'"clock_skew_ms":{r["clock_skew_ms"]}' in r["content"] for r in records(db))
    assert intact(settings, db)


def test_a_search_over_several_patient_references_pages_newest_first_without_gaps(settings, db):
    """A record-number search asks for several references (one per identifier space and key): the
    pages merge them newest first, each record once, and the cursor continues where a page ended."""
    store = AuditStore(db)
    store.ensure_indexes()
    refs = ("pref_" + "a" * 32, "pref_" + "b" * 32, "pref_" + "c" * 32)
    written = [
        store.append(replace(entry(n), occurred_at=1_800_000_000_000 + n, patient_id=refs[n % 3])) for n in range(11)
    ]
    wanted = [r["_id"] for r in sorted(written, key=lambda r: r["at_key"], reverse=True) if r["patient_id"] != refs[2]]
    filters = Filters(patient_ids=refs[:2])
    seen, cursor = [], None
    while True:
        page, cursor = store.page(AGENCY, filters, 3, cursor)
        seen.extend(r["_id"] for r in page)
        if cursor is None:
            break
    assert seen == wanted
    store.note_ref_system(AGENCY, "mrn:riverbend")
    store.note_ref_system(AGENCY, "mrn:riverbend")
    store.note_ref_system(AGENCY, "erx:dosespot")
    assert store.ref_systems_of(AGENCY) == ["erx:dosespot", "mrn:riverbend"]
    assert store.ref_systems_of("agy_lakeside") == []
