"""Read receipts and recall against the real database: the first read noted once on the message,
the recall's version-guarded delete against a read of the same version, counters exact after a
recall of a large message, and the patient carried by a forward."""

from __future__ import annotations

import threading

import pytest

from services.inbox import domain
from services.inbox.board import read_patch, unread_patch
from services.inbox.recall import Receipts
from services.inbox.store import FIRST_READ_AT, READ_BY
from services.kit.auth import current_identity
from services.kit.errors import Conflict, NotFound
from services.kit.mongo import now_ms
from tests.integration.inbox_fixtures import staff

AGENCY = "agy_1"


def as_caller(caller, call):
    token = current_identity.set(caller)
    try:
        return call()
    finally:
        current_identity.reset(token)


def send(components, sender, addressing: domain.Addressing, subject="Plan"):
    draft = domain.Draft(addressing, subject, "Body")
    return as_caller(sender, lambda: components.mailbox.send(sender, draft))


def item_id(message_id, staff_id, folder=domain.FOLDER_MESSAGES):
    return domain.board_item_id(message_id, staff_id, folder)


@pytest.fixture
def team(inbox):
    """(components, sender, recipients): an agency of a sender and `n` colleagues, receipts attached."""
    components, table = inbox
    members = [f"stf_{n:04d}" for n in range(1, 251)]
    table.staff.update(dict.fromkeys(["stf_sender", *members], AGENCY))
    table.teams["team_all"] = members
    feature = Receipts(components)
    feature.attach()
    return components, staff(AGENCY, "stf_sender"), [staff(AGENCY, m) for m in members], feature


def test_the_first_read_is_noted_once_on_the_message(team):
    components, sender, (b, c, *_), _ = team
    sent = send(components, sender, domain.Addressing(staff_ids=(b.staff_id, c.staff_id)))
    store = components.store
    components.mailbox.read(b, sent.message_id)
    first = store.message(sent.message_id)[READ_BY]
    assert list(first) == [b.staff_id]
    assert store.item(item_id(sent.message_id, b.staff_id))[FIRST_READ_AT] == first[b.staff_id]
    # Unread and read again: the receipt keeps the first time; the sender's own Sent copy notes nothing.
    store.change_item(item_id(sent.message_id, b.staff_id), unread_patch)
    store.change_item(item_id(sent.message_id, b.staff_id), read_patch)
    components.mailbox.read(sender, sent.message_id)
    assert store.message(sent.message_id)[READ_BY] == first


def test_a_read_and_a_recall_of_the_same_version_exactly_one_wins(team):
    components, sender, (b, c, *_), _ = team
    store = components.store
    sent = send(components, sender, domain.Addressing(staff_ids=(b.staff_id, c.staff_id)))
    # The read goes first: the recall, holding the older version, finds it read and leaves it.
    stale = store.item(item_id(sent.message_id, b.staff_id))
    assert store.change_item(stale["_id"], read_patch, current=stale) is not None
    assert store.recall_item(stale) == "read"
    assert store.item(stale["_id"]) is not None
    # The recall goes first: the read, holding the older version, finds nothing to change.
    stale = store.item(item_id(sent.message_id, c.staff_id))
    assert store.recall_item(stale) == "recalled"
    assert store.change_item(stale["_id"], read_patch, current=stale) is None
    assert store.recall_item(stale) == "recalled" or store.item(stale["_id"]) is None
    counts = components.board.stored_counts(AGENCY, c.staff_id)
    assert counts.get("u_messages", 0) == 0 and counts.get("t_messages", 0) == 0


def test_opening_an_item_a_recall_took_back_meanwhile_is_404_not_its_content(team, monkeypatch):
    """The reading pane reads the item, then marks it read: a recall that deletes it between the two
    wins, and the pane answers 404 instead of the content it had already read."""
    components, sender, (b, *_), _ = team
    store = components.store
    sent = send(components, sender, domain.Addressing(staff_ids=(b.staff_id,)))
    target = item_id(sent.message_id, b.staff_id)
    change_item = store.change_item

    def recalled_first(item_id_, change, *args, **kwargs):
        if item_id_ == target:
            assert store.recall_item(store.item(target)) == "recalled"
        return change_item(item_id_, change, *args, **kwargs)

    monkeypatch.setattr(store, "change_item", recalled_first)
    with pytest.raises(NotFound):
        as_caller(b, lambda: components.board.open_item(b, target))
    assert store.item(target) is None


def test_concurrent_reads_and_recall_leave_each_item_either_read_or_gone(team):
    components, sender, members, feature = team
    store = components.store
    sent = send(components, sender, domain.Addressing(team_ids=("team_all",)))
    readers = members[:40]
    start = threading.Barrier(len(readers) + 1)
    outcomes: dict[str, str] = {}

    def read(person):
        start.wait()
        try:
            components.mailbox.read(person, sent.message_id)
            outcomes[person.staff_id] = "read"
        except Exception as exc:  # noqa: BLE001 - the loser's 404, or "busy" after many clashes
            outcomes[person.staff_id] = getattr(exc, "code", repr(exc))

    threads = [threading.Thread(target=read, args=(person,)) for person in readers]
    for thread in threads:
        thread.start()
    start.wait()
    answer = feature.recall(sender, sent.message_id)
    for thread in threads:
        thread.join(60)
    recalled, already_read = set(answer["recalled"]), set(answer["already_read"])
    assert recalled | already_read == {m.staff_id for m in members} and not recalled & already_read
    for person in readers:
        item = store.item(item_id(sent.message_id, person.staff_id))
        if outcomes[person.staff_id] == "read":
            assert person.staff_id in already_read and item is not None
        else:
            assert outcomes[person.staff_id] == "message_not_found"
            assert person.staff_id in recalled and item is None
    for person in members:  # every board's counters agree with its items
        assert components.board.observe(AGENCY, person.staff_id).drift == {}


def test_receipts_of_a_team_message_page_through_every_recipient(team):
    components, sender, members, feature = team
    sent = send(components, sender, domain.Addressing(team_ids=("team_all",)))
    for person in members[:7]:
        components.mailbox.read(person, sent.message_id)
    seen, cursor, pages = [], None, 0
    while True:
        page = feature.receipts(sender, sent.message_id, cursor, 100)
        assert page["counts"] == {"recipients": 250, "delivered": 250, "recalled": 0, "read": 7}
        seen += page["recipients"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and [e["staff_id"] for e in seen] == [m.staff_id for m in members]
    assert {e["staff_id"] for e in seen if e["status"] == "read"} == {m.staff_id for m in members[:7]}


def test_a_recall_after_the_window_is_refused_and_a_repeated_one_answers_the_same(team):
    components, sender, (b, *_), feature = team
    sent = send(components, sender, domain.Addressing(staff_ids=(b.staff_id,)))
    first = feature.recall(sender, sent.message_id)
    assert feature.recall(sender, sent.message_id) == first
    late = send(components, sender, domain.Addressing(staff_ids=(b.staff_id,)))
    components.store.messages.update_one(
        {"_id": {"$eq": late.message_id}}, {"$set": {"sent_at": now_ms() - 11 * 60_000}}
    )
    with pytest.raises(Conflict) as refused:
        feature.recall(sender, late.message_id)
    assert refused.value.code == "recall_window_passed"


def test_a_forward_of_a_message_about_a_patient_keeps_the_patient(team):
    components, sender, (b, *_), _ = team
    sent = send(components, sender, domain.Addressing(staff_ids=(b.staff_id,)))
    store, cipher = components.store, components.cipher
    sealed = cipher.seal(AGENCY, sent.message_id, "patient_name", "Jane Doe")
    store.messages.update_one(
        {"_id": {"$eq": sent.message_id}}, {"$set": {"patient_id": "pat_1", "patient_name": sealed}}
    )
    forward = as_caller(
        b,
        lambda: components.mailbox.forward(
            b, sent.message_id, addressing=domain.Addressing(staff_ids=(sender.staff_id,)), note="FYI"
        ),
    )
    copy = store.message(forward.message_id)
    assert copy["patient_id"] == "pat_1" and copy["patient_name"] != sealed  # sealed anew for the copy
    shown = components.mailbox.read(sender, forward.message_id)
    assert shown["patient"] == {"id": "pat_1", "name": "Jane Doe"} and shown["patient_term"] == "Patient"
