"""The pure rules of signature/announcement deadlines and of retention."""

from __future__ import annotations

import pytest

from services.inbox import deadlines, domain, retention
from services.inbox.announcements import check_acknowledge_by
from services.kit import clock
from services.kit.errors import InvalidInput


def test_a_deadline_reminds_then_reports_then_is_done():
    assert deadlines.first_step(None) == {}
    assert deadlines.first_step(1_000) == {deadlines.STEP_AT: 1_000, deadlines.STAGE: deadlines.STAGE_REMIND}
    assert deadlines.next_step(deadlines.STAGE_REMIND, 1_000, 60) == (deadlines.STAGE_REPORT, 1_000 + 3_600_000)
    assert deadlines.next_step(deadlines.STAGE_REMIND, 1_000, 0) == (deadlines.STAGE_REPORT, 1_000)
    assert deadlines.next_step(deadlines.STAGE_REPORT, 1_000, 60) is None


def test_deadline_reminders_have_one_id_per_target_person_and_stage():
    ref = deadlines.deadline_ref("sig_1", "stf_a", deadlines.STAGE_REMIND)
    assert ref == deadlines.deadline_ref("sig_1", "stf_a", deadlines.STAGE_REMIND)
    others = {
        deadlines.deadline_ref("sig_1", "stf_b", deadlines.STAGE_REMIND),
        deadlines.deadline_ref("sig_1", "stf_a", deadlines.STAGE_REPORT),
        deadlines.deadline_ref("sig_2", "stf_a", deadlines.STAGE_REMIND),
    }
    assert ref not in others and len(others) == 3
    assert ref.startswith("dln_") and len(ref) <= 64


def signers(**states: str) -> dict:
    doc = {"signer_ids": list(states), "signers": {}}
    for sid, outcome in states.items():
        doc["signers"][sid] = {"responded_at": 5 if outcome else 0, "outcome": outcome}
    return doc


def test_pending_signers_are_those_without_an_answer_while_the_request_is_open():
    assert deadlines.pending_signers(signers(a="signed", b="", c="")) == ["b", "c"]
    assert deadlines.pending_signers(signers(a="", b="")) == ["a", "b"]
    assert deadlines.pending_signers(signers(a="declined", b="")) == []  # a decline closes it
    assert deadlines.pending_signers(signers(a="signed", b="signed")) == []
    assert deadlines.pending_signers({**signers(a="signed", b=""), "cancelled_at": 1}) == []  # cancelled


def test_reports_list_names_only_and_cap_long_lists():
    assert deadlines.report_text(deadlines.SIGNATURE, ["Ann", "Bo"], "Policy") == "Not yet signed (2): Ann, Bo | Policy"
    text = deadlines.report_text(deadlines.ANNOUNCEMENT, [f"N{i}" for i in range(60)], "T")
    assert text.startswith("Not yet acknowledged (60): N0, N1") and text.endswith("and 10 more | T")
    assert deadlines.reminder_text(deadlines.SIGNATURE, "X") == "Signature due: X"
    assert deadlines.reminder_text(deadlines.ANNOUNCEMENT, "X") == "Please acknowledge: X"


def test_acknowledge_by_needs_acknowledgement_a_future_time_and_not_after_expiry():
    now = clock.now_ms()
    check_acknowledge_by(None, False, None)
    check_acknowledge_by(now + 60_000, True, None)
    check_acknowledge_by(now + 60_000, True, now + 60_000)
    for args in ((now + 60_000, False, None), (now - 1, True, None), (now + 60_000, True, now + 30_000)):
        with pytest.raises(InvalidInput) as refused:
            check_acknowledge_by(*args)
        assert refused.value.code == "invalid_value"


def test_horizons_follow_the_policy_and_zero_turns_each_off():
    now = 1_000 * retention.YEAR_MS
    assert retention.archive_horizon(now, 0) is None and retention.delete_horizon(now, 0) is None
    assert retention.archive_horizon(now, 30) == now - 30 * retention.DAY_MS
    assert retention.delete_horizon(now, 7) == now - 7 * 365 * retention.DAY_MS


def test_a_hold_on_sender_recipient_or_patient_keeps_a_message():
    message = {"sender_id": "s", "recipient_ids": ["r1", "r2"], "patient_id": "p"}
    assert retention.is_held(message, {"s"}, set())
    assert retention.is_held(message, {"r2"}, set())
    assert retention.is_held(message, set(), {"p"})
    assert not retention.is_held(message, {"x"}, {"q"})
    assert not retention.is_held({"sender_id": "s", "recipient_ids": []}, set(), set())


def item(folder: str, read: bool = True, **fields) -> dict:
    made = domain.new_item(
        agency_id="agy", owner_id="stf", folder=folder, kind="message", ref_id="m1", at_ms=1, unread=not read
    )
    return {**made, **fields}


def test_only_visible_read_items_outside_sent_and_archive_are_archived():
    assert retention.archivable(item(domain.FOLDER_MESSAGES))
    assert retention.archivable(item(domain.FOLDER_LAB))
    assert not retention.archivable(item(domain.FOLDER_MESSAGES, read=False))
    assert not retention.archivable(item(domain.FOLDER_SENT))
    assert not retention.archivable({**item(domain.FOLDER_MESSAGES), "board": None, "folder": None})
    archived = {**item(domain.FOLDER_MESSAGES), **retention.archive_patch(item(domain.FOLDER_MESSAGES), 9)}
    assert archived["folder"] == domain.FOLDER_ARCHIVE and archived["archived_at"] == 9
    assert archived["board"] == domain.owner_folder("agy", "stf", domain.FOLDER_ARCHIVE)
    assert archived["unread_board"] is None
    assert retention.archive_patch(archived, 10) is None  # repeatable
    # The counters move from the folder to the archive, nothing else.
    assert domain.counter_delta(item(domain.FOLDER_MESSAGES), archived) == {"t_archive": 1, "t_messages": -1}


def test_holds_have_one_id_per_agency_kind_and_person():
    assert retention.hold_id("agy_a", "staff", "stf_1") == retention.hold_id("agy_a", "staff", "stf_1")
    assert retention.hold_id("agy_a", "staff", "stf_1") != retention.hold_id("agy_b", "staff", "stf_1")
    assert retention.hold_id("agy_a", "staff", "x") != retention.hold_id("agy_a", "patient", "x")


def test_the_stub_says_when_content_was_deleted():
    assert retention.stub_text(0) == "Content deleted under retention policy at 1970-01-01T00:00:00.000Z"
