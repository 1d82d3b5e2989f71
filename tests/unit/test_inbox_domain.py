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
    assert received["_id"] != sent["_id"]
    # Same time, each its own key: both copies can share a board (the archive, a label).
    assert received["sort_key"] == f"1700000000000.{received['_id']}" != sent["sort_key"]
    assert received["subject"] == b"sealed" and received["recipient_count"] == 2


# --- reply-all recipients --------------------------------------------------------------------


def original(**fields):
    base = {"sender_id": "stf_s", "to_staff_ids": ["stf_a", "stf_b"], "to_team_ids": [], "to_whole_agency": 0}
    return {**base, **fields}


def test_reply_goes_to_the_sender_only():
    assert domain.reply_addressing(original(), "stf_a") == domain.Addressing(staff_ids=("stf_s",))


def test_reply_all_is_the_sender_and_every_recipient_but_the_replier():
    addressing = domain.reply_all_addressing(original(), "stf_a")
    assert addressing.staff_ids == ("stf_s", "stf_b")
    assert addressing.team_ids == () and not addressing.whole_agency


def test_reply_all_keeps_teams_as_teams_and_the_whole_agency():
    addressing = domain.reply_all_addressing(original(to_team_ids=["team_x"], to_whole_agency=1), "stf_b")
    assert addressing.staff_ids == ("stf_s", "stf_a")
    assert addressing.team_ids == ("team_x",) and addressing.whole_agency


def test_reply_all_by_the_sender_goes_to_the_original_recipients():
    assert domain.reply_all_addressing(original(), "stf_s").staff_ids == ("stf_a", "stf_b")


def test_reply_all_names_each_person_once():
    assert domain.reply_all_addressing(original(to_staff_ids=["stf_a", "stf_s", "stf_a"]), "stf_b").staff_ids == (
        "stf_s",
        "stf_a",
    )


def test_subject_prefixes_are_not_repeated():
    assert domain.prefixed_subject("Re:", "Labs") == "Re: Labs"
    assert domain.prefixed_subject("Re:", "re: Labs") == "re: Labs"
    assert domain.prefixed_subject("Fwd:", "Re: Labs") == "Fwd: Re: Labs"


def test_forward_quotes_the_original():
    body = domain.quoted_forward("FYI", "Dr Reyes", "2026-11-26T10:00:00.000Z", "Labs", "The results are in")
    assert body.startswith("FYI\n")
    assert "From: Dr Reyes" in body and "Subject: Labs" in body and body.endswith("The results are in")
    assert domain.quoted_forward("", "A", "t", "s", "b").startswith("----------")


# --- folders and compose permissions ------------------------------------------------------------


def test_every_folder_has_a_name_and_the_portal_uses_the_agency_term():
    assert len(domain.FOLDERS) == 12 and domain.FOLDERS[0] == "messages" and domain.FOLDERS[-1] == "archive"
    assert domain.folder_name("portal", "Client") == "Client Portal Messages"
    assert domain.folder_name("portal") == "Patient Portal Messages"
    assert domain.folder_name("lab", "Client") == "Lab Report Notifications"


def test_delivered_kinds_land_in_their_own_folders():
    assert set(domain.DELIVERED_FOLDERS) == {"schedule", "erx", "compliance", "lab", "cloud"}
    assert domain.FOLDER_ANNOUNCEMENTS not in domain.ITEM_FOLDERS


@pytest.mark.parametrize(
    ("roles", "allowed"),
    [
        ({"staff"}, ["message", "reminder", "signature_request"]),
        ({"admin"}, ["message", "reminder", "signature_request", "announcement"]),
        ({"staff", "admin"}, ["message", "reminder", "signature_request", "announcement"]),
        ({"compliance_officer"}, ["message", "reminder", "signature_request"]),
        (set(), []),
        ({"service"}, []),
    ],
)
def test_compose_permissions_follow_the_roles(roles, allowed):
    assert domain.composable(roles) == allowed
    assert domain.may_compose(roles, "announcement") == ("announcement" in allowed)


# --- counter arithmetic --------------------------------------------------------------------------


def item(folder="messages", unread=True, labels=(), visible=True):
    keys = domain.item_keys("agy", "stf", folder if visible else None, unread=unread, urgent=False)
    return {**keys, "labels": dict.fromkeys(labels, 1)}


def test_an_unread_item_counts_in_its_folder_and_labels():
    expected = {"t_messages": 1, "u_messages": 1, "lt_lbl_a": 1, "l_lbl_a": 1}
    assert domain.contribution(item(labels=["lbl_a"])) == expected
    assert domain.contribution(item(unread=False)) == {"t_messages": 1}
    assert domain.contribution(item(visible=False)) == {}
    assert domain.contribution(None) == {}


def test_deltas_move_counts_between_states():
    assert domain.counter_delta(None, item()) == {"t_messages": 1, "u_messages": 1}
    assert domain.counter_delta(item(), item(unread=False)) == {"u_messages": -1}
    assert domain.counter_delta(item(), item(folder="archive")) == {
        "t_archive": 1,
        "t_messages": -1,
        "u_archive": 1,
        "u_messages": -1,
    }
    assert domain.counter_delta(item(unread=False), item(unread=False, labels=["lbl_a"])) == {"lt_lbl_a": 1}
    assert domain.counter_delta(item(labels=["lbl_a"]), None) == {
        "l_lbl_a": -1,
        "lt_lbl_a": -1,
        "t_messages": -1,
        "u_messages": -1,
    }
    assert domain.counter_delta(item(), item()) == {}


def test_deltas_add_up_and_cancel():
    assert domain.add_deltas({"u_messages": 1}, {"u_messages": -1, "t_sent": 1}) == {"t_sent": 1}


@pytest.mark.parametrize("raw", ["", "   ", "x" * 41])
def test_label_names_are_checked(raw):
    with pytest.raises(InvalidInput) as caught:
        domain.label_name(raw)
    assert caught.value.code == "invalid_label_name"


def test_label_names_are_trimmed_and_unique_without_case():
    assert domain.label_name("  Follow   up ") == ("Follow up", "follow up")
    assert domain.label_name("FOLLOW UP")[1] == domain.label_name("follow up")[1]


def test_item_ids_are_url_safe_and_distinct_per_owner_and_folder():
    ids = {domain.board_item_id("msg_1", o, f) for o in ("stf_a", "stf_b") for f in ("messages", "sent")}
    assert len(ids) == 4 and all(i.startswith("itm_") and len(i) == 36 for i in ids)


def test_the_draft_digest_tells_apart_drafts_that_only_move_a_separator():
    to = domain.Addressing(staff_ids=("stf_b",))
    first = domain.Draft(to, subject="Lab|results", body="ready")
    second = domain.Draft(to, subject="Lab", body="results|ready")
    assert domain.draft_digest(first) != domain.draft_digest(second)
    assert domain.draft_digest(first) == domain.draft_digest(domain.Draft(to, subject="Lab|results", body="ready"))
