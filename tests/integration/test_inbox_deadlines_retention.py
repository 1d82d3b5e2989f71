"""Deadline passes and retention runs against the real database, two at once (as two inbox
processes would run them): every reminder placed once, every item archived once, every message's
content deleted, held ones kept, and the board counters equal to a recount afterwards."""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from types import SimpleNamespace

import pytest

from services.inbox import domain
from services.inbox.agency_options import AgencyOptions
from services.inbox.deadlines import STEP_AT, Deadlines
from services.inbox.retention import STUB_PREFIX, Retention
from services.inbox.retention import main as retention_cli
from services.inbox.signatures import Signatures
from services.kit import clock
from services.kit.auth import current_identity
from tests.integration.inbox_fixtures import AgencyTable, make_inbox, staff

AGENCY = "agy_1"
BOSS = "stf_boss"
MEMBERS = [f"stf_{n:03d}" for n in range(1, 41)]
DAY_MS = 86_400_000


class Directory:
    """Directory's answers from the table, with GetStaff's records (display names)."""

    def __init__(self, table: AgencyTable):
        self.table = table

    def resolve(self, addressing):
        return self.table.resolve(addressing)

    def staff(self, staff_ids):
        known = [sid for sid in staff_ids if sid in self.table.staff]
        records = [SimpleNamespace(staff_id=sid, display_name=f"Name {sid}") for sid in known]
        return records, [sid for sid in staff_ids if sid not in self.table.staff]


def as_caller(caller, call):
    token = current_identity.set(caller)
    try:
        return call()
    finally:
        current_identity.reset(token)


def at_once(*calls):
    """Run the calls in threads started together; their answers."""
    answers = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def worker(index):
        start.wait()
        answers[index] = calls[index]()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def assert_counters_exact(components, owners):
    for owner in owners:
        assert components.board.stored_counts(AGENCY, owner) == components.board.recount(AGENCY, owner), owner


@pytest.fixture
def agency(inbox):
    components, table = inbox
    table.staff.update(dict.fromkeys([BOSS, *MEMBERS], AGENCY))
    components.directory = Directory(table)
    AgencyOptions(components)
    signatures = Signatures(components)
    signatures.ensure_indexes()
    signatures.attach()
    passes = Deadlines(components, interval_s=0), Deadlines(components, interval_s=0)
    passes[0].ensure_indexes()
    retention = Retention(components, interval_s=0)
    retention.ensure_indexes()
    yield components, signatures, passes, retention
    clock.reset()
    clock.enable(False)


def reminders_of(components, owner):
    return components.store.page(domain.owner_folder(AGENCY, owner, domain.FOLDER_REMINDERS), None, 10)


def test_two_deadline_passes_at_once_remind_each_signer_once_and_report_once(agency):
    components, signatures, (first, second), _ = agency
    boss = staff(AGENCY, BOSS)
    due = clock.now_ms() + 60_000
    fields = {"document_kind": "staff", "title": "Policy", "document_ref": "ref", "due_at": due, "signer_ids": MEMBERS}
    made = as_caller(boss, lambda: signatures.create(boss, fields))
    signer = staff(AGENCY, MEMBERS[0], name="First")
    as_caller(signer, lambda: signatures.sign(signer, made["id"], "ok"))

    assert first.run_pass(due - 1) == {"reminded": 0, "reported": 0}
    answers = at_once(lambda: first.run_pass(due + 1), lambda: second.run_pass(due + 1))
    assert sum(answer["reminded"] for answer in answers) == len(MEMBERS) - 1
    later = due + 61 * 60_000
    answers = at_once(lambda: first.run_pass(later), lambda: second.run_pass(later))
    assert sum(answer["reported"] for answer in answers) == 1
    assert first.run_pass(due + 120 * 60_000) == {"reminded": 0, "reported": 0}

    for member in MEMBERS:
        assert len(reminders_of(components, member)) == (0 if member == MEMBERS[0] else 1), member
    report = reminders_of(components, BOSS)
    assert len(report) == 1
    title = components.cipher.open(AGENCY, report[0]["ref_id"], "title", report[0]["title"])
    assert title.startswith(f"Not yet signed ({len(MEMBERS) - 1}): Name {MEMBERS[1]}, Name {MEMBERS[2]}, ")
    assert title.endswith(" | Policy")
    assert STEP_AT not in signatures.requests.find_one({"_id": made["id"]})
    assert_counters_exact(components, [BOSS, *MEMBERS])


def send(components, sender, recipient: str, subject: str):
    draft = domain.Draft(domain.Addressing(staff_ids=(recipient,)), subject, "Body")
    return as_caller(sender, lambda: components.mailbox.send(sender, draft))


def test_two_retention_runs_at_once_archive_and_delete_once_with_exact_counters(agency):
    components, _, _, retention = agency
    boss = staff(AGENCY, BOSS)
    options = {"retention_archive_read_after_days": 1, "retention_delete_content_after_years": 1}
    components.options.collection.insert_one({"_id": AGENCY, **options})
    owners = [BOSS, *MEMBERS[:10]]
    sent = [send(components, boss, member, f"S{n}") for n, member in enumerate(MEMBERS[:10])]
    for n, member in enumerate(MEMBERS[:10]):
        if n % 2 == 0:
            reader = staff(AGENCY, member)
            as_caller(reader, lambda r=reader, m=sent[n].message_id: components.mailbox.read(r, m))
    job = retention.job
    clock.enable(True)

    clock.advance(2 * DAY_MS)
    assert job.run(AGENCY, dry_run=True)["archived"] == 5
    assert_counters_exact(components, owners)
    reports = at_once(lambda: job.run(AGENCY), lambda: job.run(AGENCY))
    assert sum(report["archived"] for report in reports) == 5
    assert job.run(AGENCY, dry_run=True)["archived"] == 0
    assert_counters_exact(components, owners)
    for n, member in enumerate(MEMBERS[:10]):
        folder = domain.FOLDER_ARCHIVE if n % 2 == 0 else domain.FOLDER_MESSAGES
        item = components.store.item(domain.board_item_id(sent[n].message_id, member, domain.FOLDER_MESSAGES))
        assert item["folder"] == folder, n

    admin = staff(AGENCY, BOSS, "admin")
    hold, created = retention.place_hold(admin, {"staff_id": MEMBERS[0], "reason": "case 17"})
    assert created and hold["staff_id"] == MEMBERS[0]
    recorded = list(components.store.db["security_outbox"].find({"kind": {"$eq": "settings_changed"}}))
    assert len(recorded) == 1 and recorded[0]["agency_id"] == AGENCY
    clock.advance(366 * DAY_MS)
    dry = job.run(AGENCY, dry_run=True)
    assert (dry["deleted"], dry["held"]) == (9, 1)
    reports = at_once(lambda: job.run(AGENCY), lambda: job.run(AGENCY))
    assert sum(report["deleted"] for report in reports) == 9  # each message counted by the run that deleted it
    applied = list(components.store.db["security_outbox"].find({"kind": {"$eq": "retention_applied"}}))
    assert applied and all(doc["agency_id"] == AGENCY for doc in applied)
    for n, message in enumerate(sent):
        doc = components.store.message(message.message_id)
        subject = components.cipher.open(AGENCY, doc["_id"], "subject", doc["subject"])
        assert subject.startswith(STUB_PREFIX) == (n != 0), n
        item = components.store.item(domain.board_item_id(message.message_id, MEMBERS[n], domain.FOLDER_MESSAGES))
        shown = components.cipher.open(AGENCY, doc["_id"], "subject", item["subject"])
        assert shown.startswith(STUB_PREFIX) == (n != 0), n
    assert job.run(AGENCY, dry_run=True)["deleted"] == 0
    assert_counters_exact(components, owners)

    retention.release_hold(admin, hold["id"])
    assert len(list(components.store.db["security_outbox"].find({"kind": {"$eq": "settings_changed"}}))) == 2
    assert job.run(AGENCY)["deleted"] == 1
    doc = components.store.message(sent[0].message_id)
    assert components.cipher.open(AGENCY, doc["_id"], "subject", doc["subject"]).startswith(STUB_PREFIX)
    assert "patient_name" not in doc and doc["content_deleted_at"] and doc["recipient_ids"] == [MEMBERS[0]]


def test_content_deletion_reaches_a_coverers_copy(agency):
    """A coverer's copy of a received message carries its content too (services/inbox/coverage.py):
    deleting the content stubs the copy as well as the owner's and sender's items."""
    components, _, _, retention = agency
    boss, owner, coverer = staff(AGENCY, BOSS), MEMBERS[0], MEMBERS[1]
    sent = send(components, boss, owner, "About Harold Finch")
    store = components.store
    owners_item = store.item(domain.board_item_id(sent.message_id, owner, domain.FOLDER_MESSAGES))
    copy_id = domain.board_item_id(sent.message_id, coverer, domain.FOLDER_MESSAGES)
    copy = {**owners_item, "_id": copy_id, "owner_id": coverer, "covering_for": {"staff_id": owner, "name": "O"}}
    copy = {k: v for k, v in copy.items() if not k.startswith("_outbox")}
    copy["board"] = owners_item["board"].replace(f"|{owner}|", f"|{coverer}|")
    store.board_items.insert_one(copy)
    key = domain.owner_key(AGENCY, owner)
    store.db["coverages"].insert_one({"_id": "cov_1", "owner_key": key, "owner_id": owner, "coverer_id": coverer})
    retention.job.delete_content(AGENCY, store.message(sent.message_id), retention.job.coverers(AGENCY))
    for item_key in (owners_item["_id"], copy_id):
        item = store.item(item_key)
        assert item.get("content_deleted_at"), item_key
        subject = components.cipher.open(AGENCY, sent.message_id, "subject", item["subject"])
        assert subject.startswith(STUB_PREFIX), item_key


def test_the_command_line_reports_then_archives_with_progress(mongo_uri, mongo_client, monkeypatch, capsys):
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    db = mongo_client[f"{prefix}inbox"]
    try:
        table = AgencyTable()
        table.staff.update({BOSS: AGENCY, MEMBERS[0]: AGENCY})
        components = make_inbox(db, table)
        boss, reader = staff(AGENCY, BOSS), staff(AGENCY, MEMBERS[0])
        sent = [send(components, boss, MEMBERS[0], f"S{n}") for n in range(3)]
        as_caller(reader, lambda: components.mailbox.read(reader, sent[0].message_id))
        db["message_options"].insert_one({"_id": AGENCY, "retention_archive_read_after_days": 1})
        clock.enable(True)
        clock.advance(2 * DAY_MS)
        monkeypatch.setenv("MONGO_URI", mongo_uri)
        monkeypatch.setenv("MONGO_DB_PREFIX", prefix)
        monkeypatch.setenv("PHI_MASTER_KEYS", f"m:{base64.b64encode(os.urandom(32)).decode()}")

        assert retention_cli(["--dry-run"]) == 0
        out, err = capsys.readouterr()
        report = json.loads(out)
        assert report["agency_id"] == AGENCY and report["dry_run"] and report["archived"] == 1
        assert f"{AGENCY}: would archive 1 items" in err
        item_id = domain.board_item_id(sent[0].message_id, MEMBERS[0], domain.FOLDER_MESSAGES)
        assert components.store.item(item_id)["folder"] == domain.FOLDER_MESSAGES

        assert retention_cli(["--agency", AGENCY]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["archived"] == 1 and f"{AGENCY}: archived 1 items" in err
        assert components.store.item(item_id)["folder"] == domain.FOLDER_ARCHIVE
        assert_counters_exact(components, [BOSS, MEMBERS[0]])
    finally:
        clock.reset()
        clock.enable(False)
        mongo_client.drop_database(f"{prefix}inbox")
