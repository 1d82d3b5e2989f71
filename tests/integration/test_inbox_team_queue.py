"""Team queues against the real database: concurrent claims (exactly one wins), every member's
counters exact after claim, release and done, a reply that handles the item and shows in the thread
to every member, and the repair of a change interrupted before the members' items were in line."""

from __future__ import annotations

import threading

import pytest

from services.inbox import domain
from services.inbox.board import Board
from services.inbox.team_queue import MARKER, TeamQueue
from services.kit.auth import current_identity
from services.kit.errors import Conflict, NotFound
from tests.integration.inbox_fixtures import staff

AGENCY = "agy_1"
TEAM = "team_care"


def as_caller(caller, call):
    token = current_identity.set(caller)
    try:
        return call()
    finally:
        current_identity.reset(token)


@pytest.fixture
def queue(inbox):
    """(components, feature, sender, members): a team of 6 and a sender outside it."""
    components, table = inbox
    member_ids = [f"stf_{n:02d}" for n in range(1, 7)]
    table.staff.update(dict.fromkeys(["stf_sender", "stf_else", *member_ids], AGENCY))
    table.teams[TEAM] = member_ids
    feature = TeamQueue(components)
    feature.ensure_indexes()
    feature.attach()
    members = [staff(AGENCY, m, name=f"Member {m[-2:]}") for m in member_ids]
    return components, feature, staff(AGENCY, "stf_sender", name="Sender"), members


def send_to_team(components, sender, **addressing) -> str:
    addressing = addressing or {"team_ids": (TEAM,)}
    draft = domain.Draft(domain.Addressing(**addressing), "Intake call back", "Please call Mrs. A back")
    return as_caller(sender, lambda: components.mailbox.send(sender, draft)).message_id


def unread(components, member) -> int:
    counts = Board(components.store, components.cipher).stored_counts(AGENCY, member.staff_id)
    return counts.get(domain.unread_field(domain.FOLDER_MESSAGES), 0)


def assert_exact(components, *people):
    board = Board(components.store, components.cipher)
    for person in people:
        assert board.stored_counts(AGENCY, person.staff_id) == board.recount(AGENCY, person.staff_id), person.staff_id


def test_concurrent_claims_exactly_one_wins(queue):
    components, feature, sender, members = queue
    message_id = send_to_team(components, sender)
    start = threading.Barrier(len(members))
    outcomes: dict[str, object] = {}

    def claim(member):
        start.wait()
        try:
            outcomes[member.staff_id] = feature.act(member, message_id, "claim")
        except Conflict as exc:
            outcomes[member.staff_id] = exc

    threads = [threading.Thread(target=claim, args=(m,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [staff_id for staff_id, outcome in outcomes.items() if isinstance(outcome, dict)]
    assert len(won) == 1
    winner = won[0]
    for staff_id, outcome in outcomes.items():
        if staff_id != winner:
            assert outcome.code == "already_claimed"
            assert outcome.details["claimed_by"]["id"] == winner
    # Out of every other member's unread count; the claimer's stays.
    for member in members:
        assert unread(components, member) == (1 if member.staff_id == winner else 0)
    assert_exact(components, sender, *members)


def test_release_and_done_move_every_members_counts(queue):
    components, feature, sender, (a, b, *rest) = queue
    message_id = send_to_team(components, sender)
    feature.act(a, message_id, "claim")
    components.mailbox.read(b, message_id)  # b opens it while a holds it: b's copy is read
    released = feature.act(a, message_id, "release")
    assert released["state"] == "open" and released["claimed_by"] is None
    assert [unread(components, m) for m in (a, b, *rest)] == [1, 0, *[1] * len(rest)]
    assert feature.act(b, message_id, "release")["state"] == "open"  # open already: the same answer
    feature.act(b, message_id, "claim")
    with pytest.raises(Conflict) as refused:
        feature.act(a, message_id, "release")  # b holds it now
    assert refused.value.code == "already_claimed"
    assert [unread(components, m) for m in (a, b, *rest)] == [0, 0, *[0] * len(rest)]
    feature.act(b, message_id, "done")
    assert all(unread(components, m) == 0 for m in (a, b, *rest))
    assert_exact(components, sender, a, b, *rest)


def test_done_handles_it_for_all_and_blocks_claims(queue):
    components, feature, sender, (a, b, *rest) = queue
    message_id = send_to_team(components, sender)
    done = feature.act(b, message_id, "done")
    assert done["state"] == "done" and done["done_by"] == {"id": b.staff_id, "name": b.name}
    assert all(unread(components, m) == 0 for m in (a, b, *rest))
    with pytest.raises(Conflict) as refused:
        feature.act(a, message_id, "claim")
    assert refused.value.code == "already_done"
    assert_exact(components, sender, a, b, *rest)
    # Each member's item shows the state; the message view too.
    shown = components.mailbox.read(a, message_id)
    assert shown["queue"]["state"] == "done" and shown["queue"]["done_by"]["id"] == b.staff_id


def test_a_members_reply_handles_it_and_shows_in_the_thread_to_every_member(queue):
    components, feature, sender, (a, b, *rest) = queue
    message_id = send_to_team(components, sender)
    feature.act(a, message_id, "claim")
    reply = as_caller(b, lambda: components.mailbox.reply(b, message_id, body="Called her back"))
    record = feature.queues.find_one({"_id": message_id})
    assert record["state"] == "done" and record["done_via"] == reply.message_id
    assert all(unread(components, m) == 0 for m in (a, b, *rest))
    for member in (a, *rest):
        thread = components.mailbox.thread(member, message_id)
        assert [m["id"] for m in thread["messages"]] == [message_id, reply.message_id]
    assert_exact(components, sender, a, b, *rest)


def test_an_automatic_answer_does_not_handle_it(queue):
    components, feature, sender, (a, *_) = queue
    message_id = send_to_team(components, sender)
    as_caller(a, lambda: components.mailbox.reply(a, message_id, body="Away today", auto_reply=True))
    assert feature.view(components.store.message(message_id))["state"] == "open"


def test_only_members_and_only_team_items(queue):
    components, feature, sender, (a, *_) = queue
    message_id = send_to_team(components, sender)
    for caller in (sender, staff(AGENCY, "stf_else"), staff("agy_2", a.staff_id)):
        with pytest.raises(NotFound):
            feature.act(caller, message_id, "claim")
    direct = send_to_team(components, sender, staff_ids=(a.staff_id,))
    with pytest.raises(Conflict) as refused:
        feature.act(a, direct, "claim")
    assert refused.value.code == "not_a_team_item"
    # A message to a team and a colleague by name is not a shared item either.
    mixed = send_to_team(components, sender, team_ids=(TEAM,), staff_ids=("stf_else",))
    assert feature.view(components.store.message(mixed)) is None


def test_an_interrupted_change_is_finished_by_the_repair(queue):
    components, feature, sender, (a, b, *rest) = queue
    message_id = send_to_team(components, sender)
    record = feature._record(components.store.message(message_id))
    # The record written (claimed by a), then the process stopped before the items were in line.
    feature.queues.update_one(
        {"_id": message_id},
        {"$set": {"state": "claimed", "claimed_by": a.staff_id, "claimed_by_name": a.name, "rev": 1, MARKER: 1}},
    )
    assert record["rev"] == 0 and unread(components, b) == 1
    assert feature.repair_pending() == 1
    assert unread(components, a) == 1 and all(unread(components, m) == 0 for m in (b, *rest))
    assert MARKER not in feature.queues.find_one({"_id": message_id})
    assert feature.repair_pending() == 0  # finished again: nothing moves
    assert_exact(components, sender, a, b, *rest)
