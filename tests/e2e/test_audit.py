"""The audit trail through the gateway, as an auditor uses it: a staff member reads a message and the
admin's query shows who read what; others are refused; another agency sees nothing; after one
stored record is changed in the database, `python -m services.audit verify` names it; and `verify`
checks the chains against the stack's witness file."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import requests

from services.kit.settings import REPO_ROOT
from tests.waits import wait_until

RECORDS = "/api/v1/audit/records"


@pytest.fixture(scope="module")
def officer(login):
    """Riverbend's compliance officer."""
    return login("compliance.ortiz")


@pytest.fixture(scope="module")
def read_message(admin, kim, reyes) -> str:
    """A message Dr. Reyes sent to Nurse Kim, which Nurse Kim opened; its id."""
    sent = reyes.send(to_staff_ids=[kim.staff_id], subject=f"Audit {uuid.uuid4().hex[:6]}")
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    return message_id


def records(client, **params) -> list[dict]:
    reply = client.get(RECORDS, params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["items"]


def the_read(client, kim, message_id: str) -> dict | None:
    found = records(client, actor=kim.staff_id, resource_type="message")
    return next((r for r in found if r["resource_id"] == message_id and r["action"] == "read"), None)


def test_an_auditor_sees_who_read_a_message(admin, officer, kim, read_message):
    read = wait_until(lambda: the_read(admin, kim, read_message), timeout=20, message="the read in the audit trail")
    assert (read["actor_id"], read["actor_kind"], read["resource_type"], read["outcome"], read["service"]) == (
        kim.staff_id,
        "staff",
        "message",
        "allowed",
        "inbox",
    )
    assert read["chain"] == kim.agency_id and read["category"] == "phi_access"
    assert the_read(officer, kim, read_message) == read
    exported = officer.get("/api/v1/audit/export", params={"format": "csv", "actor": kim.staff_id})
    assert exported.status_code == 200 and read["id"] in exported.text
    # The admin's own query is in the trail too.
    wait_until(
        lambda: records(admin, actor=admin.staff_id, resource_type="audit_trail"),
        timeout=20,
        message="the admin's query of the trail, recorded",
    )


def test_staff_without_an_auditor_role_are_refused(kim, stack):
    reply = kim.get(RECORDS)
    assert reply.status_code == 403 and reply.json()["code"] == "auditor_only"
    assert requests.get(f"{stack.gateway_url}{RECORDS}", timeout=10).status_code == 401


def test_another_agency_sees_nothing_of_it(outsider, kim, read_message, admin):
    wait_until(lambda: the_read(admin, kim, read_message), timeout=20, message="the read in the audit trail")
    assert records(outsider, actor=kim.staff_id) == []
    assert all(r["chain"] == outsider.agency_id for r in records(outsider, limit=200))
    injected = outsider.get(f"{RECORDS}?agency_id={kim.agency_id}")
    assert injected.status_code == 400 and injected.json()["code"] == "invalid_query"


def verify(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "verify", *args],
        cwd=REPO_ROOT,
        env=stack.service_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_verify_names_a_record_changed_in_the_database(stack, mongo_client, admin, kim, read_message):
    read = wait_until(lambda: the_read(admin, kim, read_message), timeout=20, message="the read in the audit trail")
    intact = verify(stack, "--agency", kim.agency_id)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert f"{kim.agency_id}: intact" in intact.stdout
    stored = mongo_client[f"{stack.db_prefix}audit"].audit_records
    stored.update_one({"_id": read["id"]}, {"$set": {"actor_id": admin.staff_id}})
    try:
        broken = verify(stack)
        assert broken.returncode == 1
        assert f"BROKEN at seq {read['seq']}, record {read['id']}: fields_differ_from_content" in broken.stdout
        report = admin.get("/api/v1/audit/verify").json()
        assert report["broken"]["record_id"] == read["id"] and not report["intact"]
    finally:
        stored.update_one({"_id": read["id"]}, {"$set": {"actor_id": kim.staff_id}})
    assert verify(stack, "--agency", kim.agency_id).returncode == 0


def test_verify_checks_the_stacks_witness_file(stack, mongo_client, admin, kim, read_message):
    """A checkpoint pass (here of a second replica over the stack's database, as a scaled-out audit
    service runs it) appends the heads to the witness file in the run folder; `verify` reads that
    file by default and the reader's chain is found there."""
    from services.audit import config
    from services.audit.service import build

    wait_until(lambda: the_read(admin, kim, read_message), timeout=20, message="the read in the audit trail")
    settings = config.load(stack.service_env())
    replica = build(settings, mongo_client[settings.mongo_db], features=())
    replica.components.checkpointer.run_pass()
    assert settings.witness_file == stack.run_dir / "audit" / "witness.jsonl" and settings.witness_file.exists()
    checked = verify(stack, "--agency", kim.agency_id, "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["witness"]["files"] == [str(settings.witness_file)] and report["witness"]["lines"] >= 1
    assert report["witness"]["problems"] == [] and [c["chain"] for c in report["chains"]] == [kim.agency_id]
    assert report["intact"] and report["chains"][0]["intact"]
