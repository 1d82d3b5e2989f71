"""Coverage while away, end to end through the gateway with inbox's controlled clock: a colleague
covers a staff member for a window, receives copies of what is addressed to them (marked "covering
for"), the automatic answer names the coverer, the copies are marked when the window ends and the
owner sees what was handled."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from clinic.inbox.v1 import inbox_pb2
from services.inbox.board import Board
from services.inbox.store import InboxStore
from tests.helpers import auth
from tests.waits import wait_until

OWNER, COVERER, SENDER = "therapist.nguyen", "therapist.johnson", "casemgr.garcia"
OWNER_NAME, COVERER_NAME = "Minh Nguyen, LPC", "Marcus Johnson, LMFT"
MINUTE = 60_000
JANE = "portal_riverbend_0001"  # a Riverbend client with a portal account


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


def clock_now(advance_clock) -> int:
    return advance_clock(0)["now_ms"]


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def send(sender, to, subject: str) -> str:
    reply = sender.send(to_staff_ids=[to.staff_id], subject=subject, body="Please look at the intake notes.")
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def item_for(client, folder: str, ref_id: str) -> dict | None:
    return next((i for i in client.items(folder=folder, limit=100)["items"] if i["ref_id"] == ref_id), None)


@pytest.fixture
def people(login):
    owner, coverer, sender = login(OWNER), login(COVERER), login(SENDER)
    owner.delete("/api/v1/board/coverage")  # none left over (404 when there is none)
    yield owner, coverer, sender
    owner.delete("/api/v1/board/coverage")


def lab_result(staff_id: str) -> inbox_pb2.DeliverItemRequest:
    return inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=[staff_id]),
        title="Lab result available",
        summary="Lipid panel, final",
        severity=inbox_pb2.SEVERITY_ABNORMAL,
        status="final",
        source="lab",
        source_ref=f"order-{uuid.uuid4().hex[:10]}",
    )


def assert_exact(inbox_db, *clients) -> None:
    """Each board's stored counters equal a fresh recount of its items."""
    board = Board(InboxStore(inbox_db), cipher=None)
    for client in clients:
        stored = board.stored_counts(client.agency_id, client.staff_id)
        assert stored == board.recount(client.agency_id, client.staff_id), client.staff_id


def test_coverage_copies_marks_answer_and_summary(people, advance_clock, stack, inbox_stub, service_token, inbox_db):
    owner, coverer, sender = people
    now = clock_now(advance_clock)
    body = {"coverer_id": coverer.staff_id, "starts_at": iso(now + 60 * MINUTE), "ends_at": iso(now + 180 * MINUTE)}
    reply = owner.put("/api/v1/board/coverage", json=body)
    assert reply.status_code == 200, reply.text
    coverage = reply.json()["coverage"]
    assert coverage["status"] == "scheduled"
    assert coverage["coverer"] == {"staff_id": coverer.staff_id, "name": COVERER_NAME}
    assert owner.get("/api/v1/board/coverage").json()["coverage"]["id"] == coverage["id"]

    # Before the window: the owner alone receives it.
    early = send(sender, owner, unique("Before coverage"))
    assert item_for(owner, "messages", early) is not None
    assert item_for(coverer, "messages", early) is None

    # In the window: the owner and the coverer, marked, counted exactly once.
    advance_clock(61)
    assert owner.get("/api/v1/board/coverage").json()["coverage"]["status"] == "active"
    unread_before, total_before = coverer.counts("messages")
    sig_before = coverer.counts("signatures")
    during = send(sender, owner, unique("During coverage"))
    mine = item_for(owner, "messages", during)
    copy = item_for(coverer, "messages", during)
    assert mine is not None and "covering_for" not in mine
    assert copy is not None and copy["read"] is False
    assert copy["covering_for"]["staff_id"] == owner.staff_id
    assert copy["covering_for"]["name"] == OWNER_NAME
    assert copy["covering_for"]["ended"] is False
    assert coverer.counts("messages") == (unread_before + 1, total_before + 1)

    # A signature request addressed to the owner reaches the coverer too.
    title = unique("Consent form")
    created = sender.post(
        "/api/v1/signature-requests",
        json={
            "document_kind": "patient",
            "title": title,
            "document_ref": "chart/1/consent",
            "due_at": iso(now + 3 * 86_400_000),
            "signer_ids": [owner.staff_id],
        },
    )
    assert created.status_code == 201, created.text
    sig_copy = item_for(coverer, "signatures", created.json()["id"])
    assert sig_copy is not None and sig_copy["title"] == title
    assert sig_copy["covering_for"]["staff_id"] == owner.staff_id
    assert coverer.counts("signatures") == (sig_before[0] + 1, sig_before[1] + 1)
    # The coverer opens it as the signer would see it (signing stays the signer's).
    opened = coverer.get(f"/api/v1/board/items/{sig_copy['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["signature_request"]["title"] == title

    # A patient's portal message and a lab result addressed to the owner reach the coverer too.
    portal = requests.Session()
    portal.headers["apikey"] = stack.patient_portal_api_key
    asked_by_patient = portal.post(
        f"{stack.gateway_url}/api/v1/partner/portal/agencies/agy_riverbend/patients/{JANE}/messages",
        json={"to_staff_id": owner.staff_id, "subject": unique("Refill"), "body": "Can you call me back?"},
    )
    assert asked_by_patient.status_code == 201, asked_by_patient.text
    patient_message = asked_by_patient.json()["id"]
    portal_copy = item_for(coverer, "portal", patient_message)
    assert portal_copy is not None and portal_copy["covering_for"]["staff_id"] == owner.staff_id
    assert item_for(owner, "portal", patient_message) is not None
    lab = inbox_stub.DeliverItem(lab_result(owner.staff_id), metadata=auth(service_token("notifications")), timeout=10)
    assert lab.created and list(lab.recipient_staff_ids) == [owner.staff_id]
    lab_copy = item_for(coverer, "lab", lab.item_id)
    assert lab_copy is not None and lab_copy["summary"] == "Lipid panel, final"
    assert lab_copy["covering_for"] == {**lab_copy["covering_for"], "staff_id": owner.staff_id, "name": OWNER_NAME}
    opened = coverer.get(f"/api/v1/board/items/{lab_copy['id']}")  # the coverer reads it as the owner would
    assert opened.status_code == 200, opened.text
    answered_patient = coverer.post(f"/api/v1/messages/{patient_message}/reply", json={"body": "I will call you."})
    assert answered_patient.status_code == 201, answered_patient.text
    assert_exact(inbox_db, owner, coverer, sender)

    # The coverer reads and answers the copy like their own.
    read = coverer.get(f"/api/v1/messages/{during}")
    assert read.status_code == 200, read.text
    assert read.json()["covering_for"]["staff_id"] == owner.staff_id
    answered = coverer.post(f"/api/v1/messages/{during}/reply", json={"body": "Handled, I saw the notes."})
    assert answered.status_code == 201, answered.text
    assert coverer.counts("messages")[0] == unread_before

    # The automatic answer names the coverer.
    away = owner.put(
        "/api/v1/auto-replies/me/staff",
        json={"enabled": True, "message": "I am away this week.", "starts_at": None, "ends_at": None},
    )
    assert away.status_code == 200, away.text
    try:
        asked = send(sender, owner, unique("Are you in?"))

        def automatic_answer():
            thread = sender.get(f"/api/v1/threads/{asked}").json()
            return next((m for m in thread.get("messages", []) if m["auto_reply"]), None)

        answer = wait_until(automatic_answer, timeout=30, message="the automatic answer")
        assert answer["body"].startswith("I am away this week.")
        assert f"{COVERER_NAME} is covering for me until" in answer["body"]
    finally:
        assert owner.put("/api/v1/auto-replies/me/staff", json={"enabled": False}).status_code == 200

    # Past the end: only the owner; the coverer's copies are marked ended.
    advance_clock(121)
    assert owner.get("/api/v1/board/coverage").json()["coverage"] is None
    late = send(sender, owner, unique("After coverage"))
    assert item_for(owner, "messages", late) is not None
    assert item_for(coverer, "messages", late) is None
    ended = item_for(coverer, "messages", during)
    assert ended["covering_for"]["ended"] is True and ended["covering_for"]["ended_at"]
    assert item_for(coverer, "signatures", created.json()["id"])["covering_for"]["ended"] is True
    assert item_for(coverer, "lab", lab.item_id)["covering_for"]["ended"] is True
    assert_exact(inbox_db, owner, coverer, sender)

    # The owner's summary: what came in, whether the coverer read and answered it.
    history = owner.get("/api/v1/board/coverage/history").json()["items"]
    assert history[0]["id"] == coverage["id"] and history[0]["status"] == "ended"
    # the message, the signature request, the portal message, the lab result, the question answered automatically
    assert history[0]["copies"] == 5
    summary = owner.get(f"/api/v1/board/coverage/{coverage['id']}/summary")
    assert summary.status_code == 200, summary.text
    by_ref = {entry["ref_id"]: entry for entry in summary.json()["items"]}
    assert set(by_ref) == {during, asked, created.json()["id"], patient_message, lab.item_id}
    assert by_ref[patient_message]["answered_by_coverer"] is True
    assert by_ref[lab.item_id]["answered_by_coverer"] is None and by_ref[lab.item_id]["read_by_coverer"] is True
    assert by_ref[during]["read_by_coverer"] is True and by_ref[during]["answered_by_coverer"] is True
    assert by_ref[during]["item_id"] == mine["id"]
    assert by_ref[asked]["read_by_coverer"] is False and by_ref[asked]["answered_by_coverer"] is False
    assert by_ref[created.json()["id"]]["answered_by_coverer"] is None
    # Only the owner sees it.
    assert coverer.get(f"/api/v1/board/coverage/{coverage['id']}/summary").status_code == 404


def test_clearing_ends_coverage_at_once(people, advance_clock):
    owner, coverer, sender = people
    now = clock_now(advance_clock)
    reply = owner.put(
        "/api/v1/board/coverage", json={"coverer_id": coverer.staff_id, "ends_at": iso(now + 60 * MINUTE)}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["coverage"]["status"] == "active"
    during = send(sender, owner, unique("Covered"))
    assert item_for(coverer, "messages", during)["covering_for"]["ended"] is False
    assert owner.delete("/api/v1/board/coverage").status_code == 204
    assert item_for(coverer, "messages", during)["covering_for"]["ended"] is True
    after = send(sender, owner, unique("Not covered"))
    assert item_for(coverer, "messages", after) is None
    assert owner.get("/api/v1/board/coverage/history").json()["items"][0]["status"] == "cleared"
    assert owner.delete("/api/v1/board/coverage").json()["code"] == "coverage_not_found"


def test_coverages_set_at_once_leave_one_in_force(login, advance_clock):
    """Four sets racing for one person: whatever order they land in, exactly one coverage is in force
    afterwards, the one the person's coverage names, and every other one is ended."""
    owner = login("np.brooks")
    coverers = [login(name) for name in ("therapist.johnson", "therapist.nguyen", "casemgr.garcia", "intake.wilson")]
    ends = iso(clock_now(advance_clock) + 60 * MINUTE)
    barrier = threading.Barrier(len(coverers))

    def put(coverer) -> int:
        barrier.wait()
        return owner.put("/api/v1/board/coverage", json={"coverer_id": coverer.staff_id, "ends_at": ends}).status_code

    with ThreadPoolExecutor(len(coverers)) as pool:
        statuses = list(pool.map(put, coverers))
    assert set(statuses) <= {200, 409} and 200 in statuses, statuses
    current = owner.get("/api/v1/board/coverage").json()["coverage"]
    history = owner.get("/api/v1/board/coverage/history").json()["items"]
    in_force = [c for c in history if c["status"] in ("active", "scheduled")]
    assert [c["id"] for c in in_force] == [current["id"]], history
    assert owner.delete("/api/v1/board/coverage").status_code == 204
    assert not [c for c in owner.get("/api/v1/board/coverage/history").json()["items"] if c["status"] == "active"]


def settings_changed(inbox_db, since_ms: int) -> int:
    """settings_changed security events inbox recorded since then (each set and each clear is one)."""
    return len(list(inbox_db["security_outbox"].find({"kind": "settings_changed", "at": {"$gte": since_ms}})))


def test_admin_sets_coverage_for_a_staff_member(login, admin, outsider, advance_clock, inbox_db):
    owner, coverer = login(OWNER), login(COVERER)
    since = int(time.time() * 1000)
    now = clock_now(advance_clock)
    body = {"coverer_id": coverer.staff_id, "starts_at": iso(now + 10 * MINUTE), "ends_at": iso(now + 70 * MINUTE)}
    path = f"/api/v1/board/coverage/staff/{owner.staff_id}"
    assert coverer.put(path, json=body).json()["code"] == "forbidden"
    reply = admin.put(path, json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["coverage"]["set_by"] == admin.staff_id
    assert owner.get("/api/v1/board/coverage").json()["coverage"]["id"] == reply.json()["coverage"]["id"]
    assert admin.get(path).json()["coverage"]["coverer"]["staff_id"] == coverer.staff_id
    assert admin.delete(path).status_code == 204
    assert admin.get(path).json()["coverage"] is None
    assert settings_changed(inbox_db, since) == 2
    # Another agency's staff member is not found.
    assert admin.get(f"/api/v1/board/coverage/staff/{outsider.staff_id}").status_code == 404
    foreign = admin.put(f"/api/v1/board/coverage/staff/{outsider.staff_id}", json=body)
    assert foreign.status_code == 404 and foreign.json()["code"] == "staff_not_found"


def test_invalid_coverage_is_refused(login, outsider, advance_clock):
    owner, coverer = login(OWNER), login(COVERER)
    now = clock_now(advance_clock)
    start, end = iso(now + MINUTE), iso(now + 60 * MINUTE)

    def refused(body: dict) -> tuple[int, str]:
        reply = owner.put("/api/v1/board/coverage", json=body)
        return reply.status_code, reply.json().get("code")

    assert refused({"coverer_id": owner.staff_id, "ends_at": end}) == (400, "invalid_coverer")
    assert refused({"coverer_id": outsider.staff_id, "ends_at": end}) == (400, "unknown_coverer")
    assert refused({"coverer_id": "stf_nobody_here", "ends_at": end}) == (400, "unknown_coverer")
    assert refused({"coverer_id": coverer.staff_id, "starts_at": end, "ends_at": start}) == (400, "invalid_window")
    assert refused({"coverer_id": coverer.staff_id, "ends_at": iso(now - MINUTE)}) == (400, "invalid_window")
    too_long = iso(now + 91 * 86_400_000)
    assert refused({"coverer_id": coverer.staff_id, "ends_at": too_long}) == (400, "invalid_window")
    assert refused({"coverer_id": coverer.staff_id}) == (400, "missing_field")
    assert refused({"coverer_id": coverer.staff_id, "ends_at": "tomorrow"}) == (400, "invalid_time")
    assert refused({"coverer_id": {"$gt": ""}, "ends_at": end}) == (400, "invalid_type")
    assert refused({"coverer_id": coverer.staff_id, "ends_at": end, "extra": 1}) == (400, "unknown_field")
    assert owner.get("/api/v1/board/coverage").json()["coverage"] is None
    assert owner.get("/api/v1/board/coverage/cov_unknown/summary").status_code == 404
