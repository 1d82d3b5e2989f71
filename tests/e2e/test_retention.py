"""Retention (archive read items, delete old content) and legal holds, end to end through the gateway.

Lakeside's policy is set for these tests and put back to "keep everything" afterwards; ages are
made by moving the deadline clock forward (`advance_clock`), a year at most per step."""

from __future__ import annotations

import uuid

import pytest

OPTIONS = "/api/v1/board/agency-options"
HOLDS = "/api/v1/board/legal-holds"
RUN = "/api/v1/board/retention/run"
DAY_MINUTES = 24 * 60
STUB = "Content deleted under retention policy at "


@pytest.fixture(scope="module")
def lakeside(login):
    return {name: login(name) for name in ("lakeside.admin", "dr.ramirez", "nurse.foster", "frontdesk.baker")}


@pytest.fixture
def policy(lakeside):
    admin = lakeside["lakeside.admin"]

    def _set(**changes) -> dict:
        reply = admin.patch(OPTIONS, json=changes)
        assert reply.status_code == 200, reply.text
        return reply.json()

    yield _set
    _set(retention_archive_read_after_days=0, retention_delete_content_after_years=0)
    for hold in admin.get(HOLDS).json()["holds"]:
        admin.delete(f"{HOLDS}/{hold['id']}")


def run(admin, dry_run: bool) -> dict:
    reply = admin.post(RUN, json={"dry_run": dry_run})
    assert reply.status_code == 200, reply.text
    return reply.json()


def send(sender, recipient, subject: str) -> str:
    reply = sender.send(subject=subject, body="Details of the case.", to_staff_ids=[recipient.staff_id])
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def board_sums(client) -> tuple[int, int]:
    """(unread, total) over every item folder of the caller's board."""
    folders = [f for f in client.tree()["folders"] if "total" in f]
    return sum(f["unread"] for f in folders), sum(f["total"] for f in folders)


def item_of(client, message_id: str, folder: str) -> dict | None:
    items = client.items(folder=folder, limit=100)["items"]
    return next((item for item in items if item["ref_id"] == message_id), None)


def test_read_items_are_archived_after_the_agency_s_days_dry_run_first(lakeside, policy, advance_clock):
    admin, ramirez, foster = lakeside["lakeside.admin"], lakeside["dr.ramirez"], lakeside["nurse.foster"]
    policy(retention_archive_read_after_days=30, retention_delete_content_after_years=0)
    read_one = send(ramirez, foster, f"Retention read {uuid.uuid4().hex[:8]}")
    unread_one = send(ramirez, foster, f"Retention unread {uuid.uuid4().hex[:8]}")
    assert foster.get(f"/api/v1/messages/{read_one}").status_code == 200  # read now
    assert item_of(foster, read_one, "messages")["read"]

    advance_clock(31 * DAY_MINUTES)
    messages_before, archive_before = foster.counts("messages"), foster.counts("archive")
    sums_before = board_sums(foster)
    dry = run(admin, dry_run=True)
    assert dry["dry_run"] and dry["archived"] >= 1 and dry["archive_read_after_days"] == 30
    assert item_of(foster, read_one, "messages") is not None  # nothing changed
    assert foster.counts("messages") == messages_before and foster.counts("archive") == archive_before

    done = run(admin, dry_run=False)
    assert not done["dry_run"] and done["archived"] == dry["archived"]
    archived = item_of(foster, read_one, "archive")
    assert archived is not None and archived["archived_from"] == "messages"
    assert item_of(foster, read_one, "messages") is None
    assert item_of(foster, unread_one, "messages") is not None  # unread: stays
    assert item_of(ramirez, read_one, "sent") is not None  # sent copies stay
    unread, total = foster.counts("messages")
    assert unread == messages_before[0] and total <= messages_before[1] - 1
    archive_unread, archive_total = foster.counts("archive")
    assert archive_unread == archive_before[0] and archive_total >= archive_before[1] + 1
    # Counters stay exact: items moved between folders, none appeared or vanished, none turned unread.
    assert board_sums(foster) == sums_before

    # A second run finds nothing more to do.
    assert run(admin, dry_run=False)["archived"] == 0


def test_old_content_is_deleted_except_under_legal_hold(lakeside, policy, advance_clock, admin):
    lake_admin, ramirez, foster, baker = (
        lakeside[n] for n in ("lakeside.admin", "dr.ramirez", "nurse.foster", "frontdesk.baker")
    )
    policy(retention_archive_read_after_days=0, retention_delete_content_after_years=1)
    plain_subject = f"Retention plain {uuid.uuid4().hex[:8]}"
    held_subject = f"Retention held {uuid.uuid4().hex[:8]}"
    plain = send(ramirez, foster, plain_subject)
    held = send(ramirez, baker, held_subject)
    placed = lake_admin.post(HOLDS, json={"staff_id": baker.staff_id, "reason": "litigation 2026-17"})
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    assert hold["kind"] == "staff" and hold["staff_id"] == baker.staff_id and hold["reason"] == "litigation 2026-17"
    again = lake_admin.post(HOLDS, json={"staff_id": baker.staff_id})
    assert again.status_code == 200 and again.json()["id"] == hold["id"]
    assert [h["id"] for h in lake_admin.get(HOLDS).json()["holds"]] == [hold["id"]]

    advance_clock(366 * DAY_MINUTES)
    dry = run(lake_admin, dry_run=True)
    assert dry["deleted"] >= 1 and dry["held"] >= 1
    assert ramirez.get(f"/api/v1/messages/{plain}").json()["subject"] == plain_subject  # dry: unchanged

    foster_counts = foster.counts("messages")
    done = run(lake_admin, dry_run=False)
    assert done["deleted"] == dry["deleted"] and done["held"] == dry["held"]
    opened = foster.get(f"/api/v1/messages/{plain}").json()
    assert opened["subject"].startswith(STUB) and opened["body"].startswith(STUB)
    assert opened["sender"]["id"] == ramirez.staff_id and opened["to"]["staff_ids"] == [foster.staff_id]
    assert item_of(foster, plain, "messages")["title"].startswith(STUB)
    assert item_of(ramirez, plain, "sent")["title"].startswith(STUB)
    unread, total = foster.counts("messages")
    assert total == foster_counts[1] and unread <= foster_counts[0]  # nothing moved but the read just now
    kept = baker.get(f"/api/v1/messages/{held}").json()
    assert kept["subject"] == held_subject and kept["body"] == "Details of the case."

    # Released, the held message goes at the next run.
    assert lake_admin.delete(f"{HOLDS}/{hold['id']}").status_code == 204
    assert lake_admin.delete(f"{HOLDS}/{hold['id']}").status_code == 404
    after = run(lake_admin, dry_run=False)
    assert after["held"] == 0 and after["deleted"] >= 1
    assert baker.get(f"/api/v1/messages/{held}").json()["subject"].startswith(STUB)
    assert run(lake_admin, dry_run=True)["deleted"] == 0


def test_a_patient_hold_and_another_agency_s_holds(lakeside, policy, admin, reyes):
    lake_admin = lakeside["lakeside.admin"]
    placed = lake_admin.post(HOLDS, json={"patient_id": "pat_lakeside_demo"})
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    assert hold["kind"] == "patient" and hold["patient_id"] == "pat_lakeside_demo" and hold["staff_id"] is None
    # Riverbend's admin neither sees nor releases Lakeside's hold.
    assert all(h["id"] != hold["id"] for h in admin.get(HOLDS).json()["holds"])
    refused = admin.delete(f"{HOLDS}/{hold['id']}")
    assert refused.status_code == 404 and refused.json()["code"] == "legal_hold_not_found"
    assert admin.delete(f"{HOLDS}/no-such-hold").status_code == 404
    # Another agency's people are unknown here.
    foreign = lake_admin.post(HOLDS, json={"staff_id": reyes.staff_id})
    assert foreign.status_code == 400 and foreign.json()["code"] == "unknown_staff"
    foreign = lake_admin.post(HOLDS, json={"patient_id": "pat_riverbend_demo"})
    assert foreign.status_code == 400 and foreign.json()["code"] == "unknown_patient"


def test_legal_holds_and_runs_are_for_admins_and_bad_input_is_refused(lakeside, admin, reyes, kim):
    assert reyes.post(HOLDS, json={"staff_id": kim.staff_id}).status_code == 403
    assert reyes.get(HOLDS).status_code == 403
    assert reyes.post(RUN, json={"dry_run": True}).status_code == 403
    for body in ({}, {"staff_id": kim.staff_id, "patient_id": "pat_x"}, {"staff_id": "bad id!"}, {"other": 1}):
        reply = admin.post(HOLDS, json=body)
        assert reply.status_code == 400, (body, reply.text)
    assert admin.post(RUN, json={"dry_run": "yes"}).status_code == 400
    assert admin.get(HOLDS, params={"limit": 0}).status_code == 400
    bad = admin.patch(OPTIONS, json={"retention_delete_content_after_years": -1})
    assert bad.status_code == 400
    bad = admin.patch(OPTIONS, json={"retention_archive_read_after_days": "thirty"})
    assert bad.status_code == 400
    # Riverbend keeps everything: a dry run there reports nothing to do.
    report = run(admin, dry_run=True)
    assert report["archived"] == 0 and report["deleted"] == 0 and report["agency_id"] == admin.agency_id
