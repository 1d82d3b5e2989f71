"""What a list row needs stored on a board item (automatic answers, whole-agency messages, a Sent
copy's addressees) and the neutral time a forward quotes."""

from __future__ import annotations

from services.inbox import domain

MESSAGE = {
    "_id": "msg_auto1",
    "agency_id": "agency_x",
    "thread_id": "msg_auto1",
    "sender_id": "stf_a",
    "recipient_ids": ["stf_b"],
    "priority": "normal",
    "subject": b"sealed",
    "sent_at": 1_700_000_000_123,
    "auto_reply": 1,
    "to_staff_ids": ["stf_b"],
    "to_team_ids": ["team_c"],
    "to_whole_agency": 0,
}


def test_an_automatic_answer_is_marked_and_only_the_sent_copy_names_addressees():
    received = domain.board_item(MESSAGE, "stf_b", domain.FOLDER_MESSAGES)
    assert received["auto_reply"] == 1 and "to_staff_ids" not in received and "to_whole_agency" not in received
    sent = domain.board_item(MESSAGE, "stf_a", domain.FOLDER_SENT)
    assert (sent["to_staff_ids"], sent["to_team_ids"]) == (["stf_b"], ["team_c"])
    plain = domain.board_item({**MESSAGE, "auto_reply": 0}, "stf_b", domain.FOLDER_MESSAGES)
    assert "auto_reply" not in plain


def test_a_whole_agency_message_is_marked_on_every_copy():
    everyone = {**MESSAGE, "auto_reply": 0, "to_staff_ids": [], "to_team_ids": [], "to_whole_agency": 1}
    assert domain.board_item(everyone, "stf_b", domain.FOLDER_MESSAGES)["to_whole_agency"] == 1
    assert domain.board_item(everyone, "stf_a", domain.FOLDER_SENT)["to_whole_agency"] == 1


def test_a_forward_quotes_the_time_in_utc_to_the_second():
    assert domain.quoted_time(1_700_000_000_999) == "2023-11-14T22:13:20Z"
    body = domain.quoted_forward("", "A", domain.quoted_time(MESSAGE["sent_at"]), "s", "b")
    assert "Sent: 2023-11-14T22:13:20Z" in body
