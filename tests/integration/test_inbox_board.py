"""The board's counters, labels, archive and delete against the real database."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.inbox import domain, recount, reminders
from services.inbox.board import ItemFilter
from services.inbox.http_api import build_app
from services.kit.auth import current_identity
from services.kit.errors import Conflict, NotFound
from services.kit.mongo import now_ms
from tests.integration.conftest import own_inbox
from tests.integration.inbox_fixtures import AgencyTable, make_inbox, staff

AGENCY = "agy_1"


def send(components, sender, *to, subject="Hello", body="Body", priority="normal"):
    token = current_identity.set(sender)
    try:
        draft = domain.Draft(domain.Addressing(staff_ids=tuple(to)), subject, body, priority)
        return components.mailbox.send(sender, draft)
    finally:
        current_identity.reset(token)


def folder(tree, folder_id):
    return next(f for f in tree["folders"] if f["id"] == folder_id)


def test_a_received_message_counts_until_read(inbox):
    components, table = inbox
    table.staff.update({"stf_a": AGENCY, "stf_b": AGENCY})
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    result = send(components, a, "stf_b")
    tree = components.board.tree(b)
    assert folder(tree, "messages")["unread"] == 1 and folder(tree, "messages")["total"] == 1
    assert folder(components.board.tree(a), "sent") == {"id": "sent", "name": "Sent", "unread": 0, "total": 1}
    components.mailbox.read(b, result.message_id)
    assert folder(components.board.tree(b), "messages")["unread"] == 0


def two_staff(inbox):
    components, table = inbox
    table.staff.update({"stf_a": AGENCY, "stf_b": AGENCY})
    return components, staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")


def item_of(components, owner, message_id, folder="messages"):
    return components.store.item(domain.board_item_id(message_id, owner.staff_id, folder))


def test_labels_count_their_unread_items_and_deleting_a_label_keeps_the_messages(inbox):
    components, a, b = two_staff(inbox)
    board = components.board
    first, second = send(components, a, "stf_b").message_id, send(components, a, "stf_b").message_id
    first_item, second_item = item_of(components, b, first)["_id"], item_of(components, b, second)["_id"]
    added = board.add_label(b, first_item, None, "  Follow up ")
    label_id = added["label"]["id"]
    assert board.add_label(b, second_item, None, "follow UP")["label"]["id"] == label_id  # same label, by name
    assert board.tree(b)["labels"] == [{"id": label_id, "name": "Follow up", "unread": 2, "total": 2}]
    board.set_read(b, first_item, read=True)
    assert board.tree(b)["labels"][0]["unread"] == 1
    assert [i["id"] for i in board.label_page(b, label_id, None, 20, unread=False)["items"]] == [
        second_item,
        first_item,
    ]

    other = board.create_label(b, "Billing")["id"]
    board.move_label(b, second_item, label_id, other)
    assert {lbl["name"]: lbl["total"] for lbl in board.tree(b)["labels"]} == {"Billing": 1, "Follow up": 1}
    board.remove_label(b, first_item, label_id)
    assert board.label_page(b, label_id, None, 20, unread=False)["items"] == []

    board.delete_label(b, other)
    assert [lbl["name"] for lbl in board.tree(b)["labels"]] == ["Follow up"]
    assert item_of(components, b, second)["labels"] == {}
    assert folder(board.tree(b), "messages")["total"] == 2  # the messages stay


def test_label_names_are_unique_per_owner_and_private(inbox):
    components, a, b = two_staff(inbox)
    label = components.board.create_label(b, "Urgent follow-up")
    with pytest.raises(Conflict) as caught:
        components.board.create_label(b, "urgent FOLLOW-UP")
    assert caught.value.code == "label_exists"
    components.board.create_label(a, "Urgent follow-up")  # another owner may use the name
    with pytest.raises(NotFound):
        components.board.rename_label(a, label["id"], "Mine now")
    with pytest.raises(NotFound):
        components.board.label_page(a, label["id"], None, 20, unread=False)


def test_archive_restore_and_delete_move_the_counts(inbox):
    components, a, b = two_staff(inbox)
    board = components.board
    message_id = send(components, a, "stf_b").message_id
    item_id = item_of(components, b, message_id)["_id"]
    board.archive(b, item_id)
    tree = board.tree(b)
    assert folder(tree, "messages")["unread"] == 0 and folder(tree, "archive")["unread"] == 1
    assert board.page(b, "archive", ItemFilter(), None, 20)["items"][0]["archived_from"] == "messages"
    board.restore(b, item_id)
    assert folder(board.tree(b), "messages")["unread"] == 1 and folder(board.tree(b), "archive")["total"] == 0
    board.delete(b, item_id)
    assert folder(board.tree(b), "messages") == {"id": "messages", "name": "Messages", "unread": 0, "total": 0}
    assert folder(board.tree(a), "sent")["total"] == 1  # deleting from my board never touches anyone else's
    assert components.store.message(message_id) is not None


def test_another_persons_item_is_not_found(inbox):
    components, a, b = two_staff(inbox)
    message_id = send(components, a, "stf_b").message_id
    item_id = item_of(components, b, message_id)["_id"]
    for action in (
        lambda: components.board.archive(a, item_id),
        lambda: components.board.delete(a, item_id),
        lambda: components.board.open_item(a, item_id),
        lambda: components.board.open_item(staff("agy_2", "stf_b"), item_id),
    ):
        with pytest.raises(NotFound):
            action()
    assert item_of(components, b, message_id)["folder"] == "messages"


OPERATIONS = ("send", "read", "unread", "archive", "restore", "delete", "label", "unlabel", "drop_label")


def stored(components) -> list[dict[str, int]]:
    return [components.board.stored_counts(AGENCY, owner) for owner in ("stf_a", "stf_b")]


@settings(max_examples=12, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 50)), min_size=5, max_size=40))
def test_counters_equal_a_recount_after_any_sequence(mongo_client, steps):
    table = AgencyTable(staff={"stf_a": AGENCY, "stf_b": AGENCY})
    with own_inbox(mongo_client, table) as components:
        run_sequence(components, staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b"), steps)
        board = components.board
        assert board.stored_counts(AGENCY, "stf_b") == board.recount(AGENCY, "stf_b")
        assert board.stored_counts(AGENCY, "stf_a") == board.recount(AGENCY, "stf_a")
        assert board.repair_counts(AGENCY, "stf_b") == {}


def run_sequence(components, a, b, steps) -> None:  # noqa: C901 - one branch per operation
    """Apply `steps` to b's board; a refused step must leave every stored counter as it was."""
    board = components.board
    labels = [board.create_label(b, f"L{uuid.uuid4().hex[:6]}")["id"] for _ in range(2)]
    items: list[str] = []
    for op, n in steps:
        if op == "send" or not items:
            message_id = send(components, a, "stf_b", priority="urgent" if n % 3 == 0 else "normal").message_id
            items.append(item_of(components, b, message_id)["_id"])
            continue
        item_id = items[n % len(items)]
        label_id = labels[n % len(labels)]
        before = stored(components)
        try:
            if op == "read":
                board.set_read(b, item_id, read=True)
            elif op == "unread":
                board.set_read(b, item_id, read=False)
            elif op == "archive":
                board.archive(b, item_id)
            elif op == "restore":
                board.restore(b, item_id)
            elif op == "delete":
                board.delete(b, item_id)
                items.remove(item_id)
            elif op == "label":
                board.add_label(b, item_id, label_id, None)
            elif op == "unlabel":
                board.remove_label(b, item_id, label_id)
            elif op == "drop_label":
                board.delete_label(b, label_id)
                labels[labels.index(label_id)] = board.create_label(b, f"L{uuid.uuid4().hex[:6]}")["id"]
        except (NotFound, Conflict):  # e.g. restoring what is not archived
            assert stored(components) == before, f"the refused {op} moved the counters"


def test_repair_counts_fixes_drift(inbox):
    components, a, b = two_staff(inbox)
    send(components, a, "stf_b")
    owner = domain.owner_key(AGENCY, "stf_b")
    components.store.apply_deltas([({"agency_id": AGENCY, "owner_id": "stf_b"}, {"u_messages": 5})])
    assert components.board.repair_counts(AGENCY, "stf_b") == {"u_messages": 5}
    assert components.store.counter_doc(owner)["u_messages"] == 1


def test_the_recount_command_repairs_drift(mongo_client, mongo_uri, monkeypatch, capsys):
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    components = make_inbox(mongo_client[f"{prefix}inbox"], AgencyTable(staff={"stf_a": AGENCY, "stf_b": AGENCY}))
    try:
        send(components, staff(AGENCY, "stf_a"), "stf_b")
        components.store.apply_deltas([({"agency_id": AGENCY, "owner_id": "stf_b"}, {"u_messages": -1})])
        monkeypatch.setenv("MONGO_URI", mongo_uri)
        monkeypatch.setenv("MONGO_DB_PREFIX", prefix)
        assert recount.main(["--all"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {"agency_id": AGENCY, "staff_id": "stf_b", "drift": {"u_messages": -1}} in lines
        assert components.board.stored_counts(AGENCY, "stf_b") == {"u_messages": 1, "t_messages": 1}
        assert recount.main(["--agency", AGENCY, "--staff", "stf_b"]) == 0
        assert json.loads(capsys.readouterr().out)["drift"] == {}
    finally:
        mongo_client.drop_database(f"{prefix}inbox")


def test_moving_an_item_to_the_label_it_is_under_keeps_the_label(inbox):
    components, a, b = two_staff(inbox)
    board = components.board
    item_id = item_of(components, b, send(components, a, "stf_b").message_id)["_id"]
    label_id = board.add_label(b, item_id, None, "Follow up")["label"]["id"]
    assert board.move_label(b, item_id, label_id, label_id)["labels"] == [label_id]
    assert [i["id"] for i in board.label_page(b, label_id, None, 20, unread=False)["items"]] == [item_id]
    assert board.tree(b)["labels"][0]["total"] == 1


def test_both_copies_of_a_message_to_oneself_page_through_the_archive(inbox):
    components, a, _ = two_staff(inbox)
    board = components.board
    message_id = send(components, a, "stf_a").message_id
    copies = {item_of(components, a, message_id)["_id"], item_of(components, a, message_id, "sent")["_id"]}
    for item_id in copies:
        board.archive(a, item_id)
        board.add_label(a, item_id, None, "Mine")
    label_id = board.tree(a)["labels"][0]["id"]
    for listing in (
        lambda cursor: board.page(a, "archive", ItemFilter(), cursor, 1),
        lambda cursor: board.label_page(a, label_id, cursor, 1, unread=False),
    ):
        first = listing(None)
        second = listing(first["next_cursor"])
        assert {i["id"] for i in first["items"] + second["items"]} == copies


def test_a_labelled_reminder_that_comes_due_is_listed_once_under_its_label(inbox):
    components, a, _ = two_staff(inbox)
    board = components.board
    message_id = send(components, a, "stf_a").message_id
    reminder = domain.new_item(
        agency_id=AGENCY,
        owner_id="stf_a",
        folder=domain.FOLDER_REMINDERS,
        kind=domain.KIND_REMINDER,
        ref_id="rem_1",
        at_ms=now_ms() + 1,
        unread=True,
        visible=False,
        due_pending_at=now_ms() + 5,
    )
    components.store.insert_board_items([reminder])
    board.add_label(a, item_of(components, a, message_id)["_id"], None, "Later")
    label_id = board.add_label(a, reminder["_id"], None, "Later")["label"]["id"]
    components.store.change_item(reminder["_id"], lambda it: reminders.due_patch(it, now_ms() + 10))
    seen, cursor = [], None
    for _ in range(3):
        page = board.label_page(a, label_id, cursor, 1, unread=False)
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted([reminder["_id"], item_of(components, a, message_id)["_id"]])


def test_a_sent_copy_cannot_be_marked_unread(inbox):
    components, a, _ = two_staff(inbox)
    message_id = send(components, a, "stf_b").message_id
    sent_item = item_of(components, a, message_id, "sent")["_id"]
    with pytest.raises(Conflict) as refused:
        components.board.set_read(a, sent_item, read=False)
    assert refused.value.code == "not_received"
    assert folder(components.board.tree(a), "sent") == {"id": "sent", "name": "Sent", "unread": 0, "total": 1}


class TokenTable:
    """Bearer token -> identity, standing in for the verifier of directory's tokens."""

    def __init__(self, **identities):
        self.identities = identities

    def verify(self, token):
        return self.identities[token]


def test_a_forward_with_a_blank_note_is_sent_like_one_without(inbox):
    components, a, b = two_staff(inbox)
    client = build_app(components, TokenTable(a=a, b=b)).test_client()
    message_id = send(components, a, "stf_b", body="Original text").message_id
    forwarded = client.post(
        f"/api/v1/messages/{message_id}/forward",
        json={"to_staff_ids": ["stf_a"], "body": " \n"},
        headers={"Authorization": "Bearer b"},
    )
    assert forwarded.status_code == 201, forwarded.get_json()
    body = components.mailbox.read(a, forwarded.get_json()["id"])["body"]
    assert body.startswith("---------- Forwarded message ----------") and body.endswith("Original text")


def test_an_item_not_yet_on_the_board_cannot_be_archived(inbox):
    components, _, b = two_staff(inbox)
    hidden = domain.new_item(
        agency_id=AGENCY,
        owner_id="stf_b",
        folder="reminders",
        kind="reminder",
        ref_id="rem_x",
        at_ms=1,
        unread=True,
        visible=False,
    )
    components.store.insert_board_items([hidden])
    with pytest.raises(Conflict) as caught:
        components.board.archive(b, hidden["_id"])
    assert caught.value.code == "not_on_board"
    assert components.store.item(hidden["_id"])["folder"] is None


def test_items_from_before_counters_are_rewritten_once(inbox):
    components, a, b = two_staff(inbox)
    store = components.store
    doc = components.mailbox.compose(
        a, domain.Draft(domain.Addressing(staff_ids=("stf_b",)), "s", "b"), ["stf_b"], "msg_old1"
    )
    store.insert_message({k: v for k, v in doc.items() if k != "fanout_pending_at"})
    legacy = {  # the shape items had when a board was only Messages and Sent
        "agency_id": AGENCY,
        "message_id": "msg_old1",
        "thread_id": "msg_old1",
        "sender_id": "stf_a",
        "sender_name": "A",
        "recipient_count": 1,
        "priority": "normal",
        "subject": doc["subject"],
        "sent_at": doc["sent_at"],
        "sort_key": domain.sort_key(doc["sent_at"], "msg_old1"),
    }
    store.board_items.insert_many(
        [
            {
                **legacy,
                "_id": "msg_old1.stf_b.messages",
                "owner_id": "stf_b",
                "folder": "messages",
                "board": f"{AGENCY}|stf_b|messages",
                "unread_board": f"{AGENCY}|stf_b|messages",
                "read_at": None,
            },
            {
                **legacy,
                "_id": "msg_old1.stf_a.sent",
                "owner_id": "stf_a",
                "folder": "sent",
                "board": f"{AGENCY}|stf_a|sent",
                "unread_board": None,
                "read_at": doc["sent_at"],
            },
        ]
    )
    assert store.migrate_legacy_items() == 2
    assert store.migrate_legacy_items() == 0  # once
    assert store.item("msg_old1.stf_b.messages") is None
    assert folder(components.board.tree(b), "messages") == {
        "id": "messages",
        "name": "Messages",
        "unread": 1,
        "total": 1,
    }
    assert folder(components.board.tree(a), "sent")["total"] == 1
    assert components.mailbox.read(b, "msg_old1")["body"] == "b"
    assert folder(components.board.tree(b), "messages")["unread"] == 0
