"""Coverage while away: the pure rules (services/inbox/coverage.py): when a window is in force,
which items a coverer receives a copy of, and what the copy looks like."""

from __future__ import annotations

from services.inbox import coverage, domain

AGENCY, OWNER, COVERER, SENDER = "agy_a", "stf_owner", "stf_coverer", "stf_sender"
POINTER = {
    "coverage_id": "cov_1",
    "coverer_id": COVERER,
    "coverer_name": "Dr. Kim",
    "owner_name": "Dr. Reyes",
    "starts_at": 1_000,
    "ends_at": 5_000,
}


def message_item(owner: str = OWNER, folder: str = domain.FOLDER_MESSAGES, sender: str = SENDER, **extra) -> dict:
    message = {
        "_id": "msg_1",
        "agency_id": AGENCY,
        "sent_at": 2_000,
        "priority": "urgent",
        "thread_id": "msg_1",
        "sender_id": sender,
        "recipient_ids": [owner],
        "subject": b"sealed",
    }
    return {**domain.board_item(message, owner, folder), **extra}


def test_a_window_is_in_force_from_its_start_to_just_before_its_end():
    assert not coverage.in_force(None, 2_000)
    assert not coverage.in_force(POINTER, 999)
    assert coverage.in_force(POINTER, 1_000)
    assert coverage.in_force(POINTER, 4_999)
    assert not coverage.in_force(POINTER, 5_000)


def test_received_items_are_covered_but_not_sent_copies_reminders_or_copies():
    assert coverage.is_covered(message_item())
    assert coverage.is_covered({**message_item(), "kind": domain.KIND_PORTAL_MESSAGE})
    assert coverage.is_covered({**message_item(), "kind": domain.KIND_NOTICE})
    assert not coverage.is_covered(message_item(folder=domain.FOLDER_SENT, owner=SENDER))
    assert not coverage.is_covered(message_item(sender=OWNER))  # one's own request or note to oneself
    assert not coverage.is_covered({**message_item(), "kind": domain.KIND_REMINDER})
    assert not coverage.is_covered({**message_item(), "covering_for": {"staff_id": "x"}})


def test_a_copy_is_the_coverers_item_marked_for_the_owner():
    item = message_item(
        _outbox={"e1": {}}, _outbox_at=1, placed_by="msg_1|0", due_pending_at=9, queue_state="open", labels={"l": 1}
    )
    copy = coverage.coverage_copy(item, POINTER)
    assert copy["_id"] == domain.board_item_id("msg_1", COVERER, domain.FOLDER_MESSAGES)
    assert copy["owner_id"] == COVERER and copy["folder"] == domain.FOLDER_MESSAGES
    assert copy["board"] == domain.owner_folder(AGENCY, COVERER, domain.FOLDER_MESSAGES)
    assert copy["unread_board"] == copy["board"] and copy["urgent_board"] == copy["board"]
    assert copy["read_at"] is None and copy["labels"] == {} and copy["version"] == 1
    assert copy["sort_key"] == domain.sort_key(2_000, copy["_id"])
    assert copy["covering_for"] == {"staff_id": OWNER, "name": "Dr. Reyes"}
    assert copy["coverage_id"] == "cov_1" and copy["covered_item_id"] == item["_id"]
    assert copy["subject"] == b"sealed" and copy["message_id"] == "msg_1"
    for field in ("_outbox", "_outbox_at", "placed_by", "due_pending_at", "queue_state"):
        assert field not in copy
    # It counts like any unread item on the coverer's board.
    assert domain.counter_delta(None, copy) == {"t_messages": 1, "u_messages": 1}


def test_a_read_item_is_copied_read_and_the_coverers_own_message_not_at_all():
    read = {**message_item(), "read_at": 3_000, "unread_board": None}
    copy = coverage.coverage_copy(read, POINTER)
    assert copy["read_at"] == 3_000 and copy["unread_board"] is None
    assert coverage.coverage_copy(message_item(sender=COVERER), POINTER) is None


def test_the_automatic_answer_line_names_the_coverer_and_the_end():
    pointer = {**POINTER, "ends_at": 1_767_268_800_000}  # 2026-01-01 12:00 UTC
    assert coverage.answer_line(pointer) == "Dr. Kim is covering for me until 2026-01-01 12:00 UTC."


def test_status_and_view():
    doc = {
        "_id": "cov_1",
        "owner_id": OWNER,
        "owner_name": "Dr. Reyes",
        "coverer_id": COVERER,
        "coverer_name": "Dr. Kim",
        "starts_at": 1_000,
        "ends_at": 5_000,
    }
    assert coverage.status(doc, 500) == "scheduled"
    assert coverage.status(doc, 1_000) == "active"
    assert coverage.status(doc, 5_000) == "ended"
    assert coverage.status({**doc, "cleared_at": 2_000}, 2_500) == "cleared"
    assert coverage.status({**doc, "cleared_at": 500}, 600) == "cleared"  # before it began
    assert coverage.status({**doc, "cleared_at": 6_000}, 6_000) == "ended"  # cleared after its end: it ended
    shown = coverage.view(doc, 2_000)
    assert shown["coverer"] == {"staff_id": COVERER, "name": "Dr. Kim"} and shown["status"] == "active"
    assert shown["starts_at"] == "1970-01-01T00:00:01.000Z" and shown["copies"] == 0
