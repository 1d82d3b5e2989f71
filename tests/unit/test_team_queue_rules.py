"""Team queues: which messages are a team's shared item, what each action does to the queue, and how
a member's board item follows it (services/inbox/team_queue.py)."""

from __future__ import annotations

import pytest

from services.inbox import domain
from services.inbox.store import REMOVE
from services.inbox.team_queue import (
    CLAIMED,
    DONE,
    OPEN,
    hidden_for,
    is_queue_message,
    item_patch,
    members,
    new_record,
    placed_fields,
    queue_view,
    shared_in_thread,
    transition,
)
from services.kit.auth import Identity
from services.kit.errors import Conflict

AGENCY = "agy_riverbend"
KIM = Identity(subject="stf_kim", agency_id=AGENCY, name="Jordan Kim, RN")
CHEN = Identity(subject="stf_chen", agency_id=AGENCY, name="Dr. Wei Chen")


def message(**fields) -> dict:
    doc = {
        "_id": "msg_1",
        "agency_id": AGENCY,
        "kind": domain.KIND_MESSAGE,
        "sender_kind": "staff",
        "sender_id": "stf_admin",
        "to_staff_ids": [],
        "to_team_ids": ["team_medical"],
        "to_whole_agency": 0,
        "recipient_ids": ["stf_kim", "stf_chen", "stf_reyes"],
        "thread_id": "msg_1",
    }
    doc.update(fields)
    return doc


def item(owner: str, *, unread: bool = True, **fields) -> dict:
    board = domain.owner_folder(AGENCY, owner, domain.FOLDER_MESSAGES)
    doc = {
        "_id": f"itm_{owner}",
        "owner_id": owner,
        "board": board,
        "unread_board": board if unread else None,
        "read_at": None if unread else 1,
        "queue_state": OPEN,
        "queue_rev": 0,
    }
    doc.update(fields)
    return doc


def test_a_message_to_teams_only_or_a_portal_message_to_a_team_is_a_queue_item():
    assert is_queue_message(message())
    assert not is_queue_message(message(to_staff_ids=["stf_white"]))
    assert not is_queue_message(message(to_whole_agency=1))
    assert not is_queue_message(message(to_team_ids=[]))
    # A patient's message in a thread to a team is one even when it also reaches staff who replied.
    portal = message(kind=domain.KIND_PORTAL_MESSAGE, sender_kind="patient", to_staff_ids=["stf_kim"])
    assert is_queue_message(portal)
    assert placed_fields(portal)["queue_state"] == OPEN
    assert placed_fields(message(to_staff_ids=["stf_white"])) == {}


def test_members_are_the_recipients_the_message_was_not_recalled_from():
    assert members(message(recall={"recalled": ["stf_chen"]})) == ["stf_kim", "stf_reyes"]


def test_claim_release_and_done_move_the_queue():
    record = new_record(message())
    claimed = transition(record, "claim", KIM, 5)
    assert claimed == {"state": CLAIMED, "claimed_by": "stf_kim", "claimed_by_name": "Jordan Kim, RN", "claimed_at": 5}
    record.update(claimed)
    assert transition(record, "claim", KIM, 6) is None  # claimed again by its holder: nothing to do
    released = transition(record, "release", KIM, 7)
    assert released["state"] == OPEN and released["claimed_by"] == ""
    record.update(released)
    assert transition(record, "release", KIM, 8) is None
    done = transition(record, "done", CHEN, 9)
    assert done["state"] == DONE and done["done_by"] == "stf_chen" and done["done_via"] == ""
    record.update(done)
    assert transition(record, "done", KIM, 10) is None


@pytest.mark.parametrize("action", ["claim", "release", "done"])
def test_an_item_another_member_holds_is_refused_naming_them(action):
    record = {**new_record(message()), "state": CLAIMED, "claimed_by": "stf_kim", "claimed_by_name": "Jordan Kim, RN"}
    with pytest.raises(Conflict) as refused:
        transition(record, action, CHEN, 5)
    assert refused.value.code == "already_claimed"
    assert "Jordan Kim, RN" in refused.value.message
    assert refused.value.details == {"claimed_by": {"id": "stf_kim", "name": "Jordan Kim, RN"}}


def test_a_reply_handles_an_item_whoever_holds_it():
    record = {**new_record(message()), "state": CLAIMED, "claimed_by": "stf_kim", "claimed_by_name": "Jordan Kim, RN"}
    done = transition(record, "done", CHEN, 5, via="msg_reply")
    assert done["state"] == DONE and done["done_via"] == "msg_reply"


@pytest.mark.parametrize("action", ["claim", "release"])
def test_a_done_item_cannot_be_claimed_or_released(action):
    record = {**new_record(message()), "state": DONE, "done_by": "stf_chen"}
    with pytest.raises(Conflict) as refused:
        transition(record, action, KIM, 5)
    assert refused.value.code == "already_done"


def test_a_claim_takes_the_item_out_of_the_other_members_unread_count_only():
    record = {**new_record(message()), "state": CLAIMED, "claimed_by": "stf_kim", "claimed_by_name": "K", "rev": 1}
    assert not hidden_for(record, "stf_kim") and hidden_for(record, "stf_chen")
    mine = item_patch(item("stf_kim"), record, 50)
    assert "unread_board" not in mine and mine["queue_state"] == CLAIMED and mine["queue_claimed_by"] == "stf_kim"
    theirs = item_patch(item("stf_chen"), record, 50)
    assert theirs["unread_board"] is None and theirs["queue_hid_at"] == 50 and theirs["queue_rev"] == 1
    assert "read_at" not in theirs  # nobody read it: receipts stay true
    # What it does to the counters: the unread count drops, the total stays.
    before = item("stf_chen", folder=domain.FOLDER_MESSAGES, agency_id=AGENCY)
    after = {**before, **theirs}
    assert domain.counter_delta(before, after) == {"u_messages": -1}


def test_a_release_brings_back_unread_only_what_the_claim_took():
    record = {**new_record(message()), "state": OPEN, "rev": 2}
    hidden = item("stf_chen", unread=False, read_at=None, queue_hid_at=50, queue_rev=1, queue_state=CLAIMED)
    back = item_patch(hidden, record, 60)
    assert back["unread_board"] == hidden["board"] and back["queue_hid_at"] is REMOVE
    opened_meanwhile = {**hidden, "read_at": 55}
    assert "unread_board" not in item_patch(opened_meanwhile, record, 60)
    read_before = item("stf_reyes", unread=False, queue_rev=1, queue_state=CLAIMED)
    assert "unread_board" not in item_patch(read_before, record, 60)


def test_done_takes_the_item_out_of_every_members_unread_count():
    record = {**new_record(message()), "state": DONE, "done_by": "stf_chen", "rev": 3}
    for owner in ("stf_kim", "stf_chen", "stf_reyes"):
        assert item_patch(item(owner), record, 70)["unread_board"] is None


def test_a_late_pass_never_undoes_a_newer_one():
    record = {**new_record(message()), "state": CLAIMED, "claimed_by": "stf_kim", "rev": 1}
    assert item_patch(item("stf_chen", queue_rev=2), record, 80) is None
    assert item_patch(item("stf_chen", queue_rev=1), record, 80) is None


def test_the_view_names_who_claimed_and_who_handled():
    record = {
        **new_record(message()),
        "state": DONE,
        "claimed_by": "stf_kim",
        "claimed_by_name": "Jordan Kim, RN",
        "claimed_at": 1_700_000_000_000,
        "done_by": "stf_chen",
        "done_by_name": "Dr. Wei Chen",
        "done_at": 1_700_000_060_000,
        "done_via": "msg_reply",
    }
    view = queue_view(record)
    assert view["state"] == DONE
    assert view["claimed_by"] == {"id": "stf_kim", "name": "Jordan Kim, RN"}
    assert view["done_by"] == {"id": "stf_chen", "name": "Dr. Wei Chen"}
    assert view["done_at"] == "2023-11-14T22:14:20.000Z" and view["handled_by_reply"] == "msg_reply"
    assert queue_view(new_record(message()))["claimed_by"] is None


def test_a_member_sees_what_fellow_members_wrote_in_the_thread():
    original = message()
    reply = {**message(_id="msg_2", to_team_ids=[], recipient_ids=["stf_admin"]), "sender_id": "stf_chen"}
    patient_reply = {**reply, "_id": "msg_3", "sender_id": "stf_other"}
    docs = [original, reply, patient_reply]
    assert shared_in_thread("stf_kim", AGENCY, docs) == {"msg_2"}
    assert shared_in_thread("stf_outsider", AGENCY, docs) == set()
    assert shared_in_thread("stf_kim", "agy_other", docs) == set()
    recalled = {**original, "recall": {"recalled": ["stf_kim"]}}
    assert shared_in_thread("stf_kim", AGENCY, [recalled, reply]) == set()
