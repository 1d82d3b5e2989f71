import pytest

from services.inbox import domain
from services.kit.errors import InvalidInput


def test_final_recipients_are_distinct_and_exclude_the_sender():
    addressing = domain.Addressing(team_ids=("team_a",))
    assert domain.final_recipients(["a", "b", "me", "a"], addressing, "me") == ["a", "b"]


def test_sender_who_addresses_themself_by_name_receives_it():
    addressing = domain.Addressing(staff_ids=("me",))
    assert domain.final_recipients(["me"], addressing, "me") == ["me"]


def test_a_message_only_to_the_sender_through_a_team_has_no_recipients():
    with pytest.raises(InvalidInput) as caught:
        domain.final_recipients(["me"], domain.Addressing(team_ids=("t",)), "me")
    assert caught.value.code == "no_recipients"


def test_sort_keys_order_by_time_then_id():
    keys = [domain.sort_key(5, "msg_b"), domain.sort_key(10, "msg_a"), domain.sort_key(5, "msg_c")]
    assert sorted(keys, reverse=True) == [keys[1], keys[2], keys[0]]


def test_cursor_round_trips_and_rejects_garbage():
    key = domain.sort_key(1_700_000_000_000, "msg_abc")
    assert domain.decode_cursor(domain.encode_cursor(key)) == key
    for bad in ("!!", "eyJhIjoxfQ", domain.encode_cursor("123.msg_x"), domain.encode_cursor("abcdefghijklm.msg_x")):
        with pytest.raises(InvalidInput):
            domain.decode_cursor(bad)


def test_board_key_scopes_agency_owner_and_folder():
    assert domain.owner_folder("agy_a", "stf_1", "messages") != domain.owner_folder("agy_b", "stf_1", "messages")
    assert domain.owner_folder("agy_a", "stf_1", "messages") != domain.owner_folder("agy_a", "stf_1", "sent")


def test_board_item_is_unread_in_messages_and_read_in_sent():
    message = {
        "_id": "msg_1",
        "agency_id": "agy_a",
        "thread_id": "msg_1",
        "sender_id": "stf_s",
        "recipient_ids": ["stf_r", "stf_q"],
        "priority": "urgent",
        "subject": b"sealed",
        "sent_at": 1_700_000_000_000,
    }
    received = domain.board_item(message, "stf_r", domain.FOLDER_MESSAGES)
    sent = domain.board_item(message, "stf_s", domain.FOLDER_SENT)
    assert received["unread_board"] == received["board"] == "agy_a|stf_r|messages" and received["read_at"] is None
    assert sent["unread_board"] is None and sent["read_at"] == message["sent_at"]
    assert received["_id"] != sent["_id"] and received["sort_key"] == sent["sort_key"]
    assert received["subject"] == b"sealed" and received["recipient_count"] == 2
