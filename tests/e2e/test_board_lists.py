"""Board lists through the gateway: what a row says (a Sent copy's recipients, whole-agency
messages marked; automatic answers: tests/unit/test_board_list_marks.py), the three sort orders
with cursor paging, and bulk actions (mark read or unread, archive, label, mark a folder read) whose
counters stay exact and which name other people's or unknown items as not found, without telling
which."""

from __future__ import annotations

import time
import uuid

import pytest

KIM, CHEN = "stf_riverbend_kim", "stf_riverbend_chen"
INTAKE = "team_riverbend_intake"


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def send(client, **body) -> str:
    reply = client.send(**body)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def every_item(client, **params) -> list[dict]:
    """Every item of a listing, page by page (small pages, so the cursor is exercised)."""
    out: list[dict] = []
    cursor = None
    for _ in range(500):
        query = {**params, "limit": 7}
        if cursor:
            query["cursor"] = cursor
        page = client.items(**query)
        out += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return out
    raise AssertionError("the listing never ended")


def item_of(client, message_id: str, folder: str = "messages") -> dict:
    for item in every_item(client, folder=folder):
        if item.get("message_id") == message_id:
            return item
    raise AssertionError(f"{message_id} not in {folder}")


def assert_counts_exact(client, folder: str) -> None:
    """The tree's counters are what the folder's listings hold."""
    unread, total = client.counts(folder)
    assert total == len(every_item(client, folder=folder))
    assert unread == len(every_item(client, folder=folder, unread="true"))


def test_a_sent_copy_names_its_recipients_and_whole_agency_is_marked(reyes, kim):
    title = unique("Rows name recipients")
    message_id = send(reyes, to_staff_ids=[KIM, CHEN], to_team_ids=[INTAKE], subject=title)
    sent = item_of(reyes, message_id, "sent")
    assert sent["to"] == {"staff_ids": [KIM, CHEN], "team_ids": [INTAKE], "whole_agency": False}
    assert sent["auto_reply"] is False
    received = item_of(kim, message_id)
    assert "to" not in received  # a recipient's row names the sender, not the other addressees
    assert received["auto_reply"] is False

    everyone = send(reyes, to_whole_agency=True, subject=unique("Everyone"))
    row = item_of(kim, everyone)
    assert row["to"]["whole_agency"] is True
    assert item_of(reyes, everyone, "sent")["to"]["whole_agency"] is True


def test_three_orders_each_page_through_the_whole_folder(reyes, chen):
    titles = [unique(f"Order {n}") for n in range(4)]
    ids = [
        send(reyes, to_staff_ids=[CHEN], subject=titles[0]),
        send(reyes, to_staff_ids=[CHEN], subject=titles[1], priority="urgent"),
        send(reyes, to_staff_ids=[CHEN], subject=titles[2]),
        send(reyes, to_staff_ids=[CHEN], subject=titles[3], priority="urgent"),
    ]
    newest = every_item(chen, folder="messages")
    oldest = every_item(chen, folder="messages", order="oldest")
    urgent = every_item(chen, folder="messages", order="urgent")
    for listing in (oldest, urgent):
        assert sorted(i["id"] for i in listing) == sorted(i["id"] for i in newest)
        assert len({i["id"] for i in listing}) == len(listing)  # no item twice across pages
    assert [i["id"] for i in oldest] == [i["id"] for i in reversed(newest)]
    mine = [i["message_id"] for i in oldest if i.get("message_id") in ids]
    assert mine == ids
    flags = [i["urgent"] for i in urgent]
    assert flags == sorted(flags, reverse=True)  # every urgent item before the others
    first_urgent = [i for i in urgent if i["urgent"]]
    assert [i["id"] for i in first_urgent] == [i["id"] for i in newest if i["urgent"]]
    assert [i["id"] for i in urgent if not i["urgent"]] == [i["id"] for i in newest if not i["urgent"]]
    assert [i["message_id"] for i in first_urgent if i.get("message_id") in ids] == [ids[3], ids[1]]
    # Unread only, urgent first: the same partition of the unread listing.
    unread = every_item(chen, folder="messages", unread="true")
    unread_urgent = every_item(chen, folder="messages", order="urgent", unread="true")
    expected = [i["id"] for i in unread if i["urgent"]] + [i["id"] for i in unread if not i["urgent"]]
    assert [i["id"] for i in unread_urgent] == expected


def test_order_and_cursor_refuse_what_they_do_not_know(chen):
    reply = chen.get("/api/v1/board/items", params={"folder": "messages", "order": "sideways"})
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_query"
    reply = chen.get("/api/v1/board/items", params={"order": "urgent", "cursor": "zzz"})
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_cursor"


def test_bulk_actions_keep_counters_exact_and_say_not_found_for_what_is_not_mine(reyes, kim, chen, inbox_db):
    ids = [send(reyes, to_staff_ids=[KIM, CHEN], subject=unique(f"Bulk {n}")) for n in range(3)]
    mine = [item_of(kim, message_id)["id"] for message_id in ids]
    theirs = item_of(chen, ids[0])["id"]
    unread_before, total_before = kim.counts("messages")

    reply = kim.post(
        "/api/v1/board/items/bulk", json={"action": "mark_read", "item_ids": [*mine, theirs, "itm_nothing_here"]}
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert (answer["done"], answer["not_found"], answer["refused"]) == (3, 2, 0)
    outcomes = {r["id"]: r["outcome"] for r in answer["results"]}
    assert outcomes[theirs] == outcomes["itm_nothing_here"] == "not_found"  # the same answer either way
    assert kim.counts("messages") == (unread_before - 3, total_before)
    assert chen.get(f"/api/v1/board/items/{theirs}").status_code == 200  # Chen's copy untouched...
    denied = inbox_db["access_denials"].find_one({"resource_id": theirs})
    assert denied is not None  # ...and Kim's try at it audited as refused
    assert_counts_exact(kim, "messages")

    # Again: nothing changes twice.
    again = kim.post("/api/v1/board/items/bulk", json={"action": "mark_read", "item_ids": mine}).json()
    assert again["done"] == 3 and kim.counts("messages") == (unread_before - 3, total_before)

    unread = kim.post("/api/v1/board/items/bulk", json={"action": "mark_unread", "item_ids": mine[:2]}).json()
    assert unread["done"] == 2 and kim.counts("messages") == (unread_before - 1, total_before)

    label = kim.post("/api/v1/labels", json={"name": unique("Bulk label")})
    assert label.status_code == 201, label.text
    label_id = label.json()["id"]
    labelled = kim.post(
        "/api/v1/board/items/bulk", json={"action": "label", "item_ids": mine, "label_id": label_id}
    ).json()
    assert labelled["done"] == 3
    tree_label = next(lbl for lbl in kim.tree()["labels"] if lbl["id"] == label_id)
    assert (tree_label["unread"], tree_label["total"]) == (2, 3)

    archive_before = kim.counts("archive")
    archived = kim.post("/api/v1/board/items/bulk", json={"action": "archive", "item_ids": mine}).json()
    assert archived["done"] == 3
    assert kim.counts("messages") == (unread_before - 3, total_before - 3)
    assert kim.counts("archive") == (archive_before[0] + 2, archive_before[1] + 3)
    assert_counts_exact(kim, "messages")
    assert_counts_exact(kim, "archive")


def test_a_sent_copy_cannot_be_marked_unread_in_bulk(reyes):
    message_id = send(reyes, to_staff_ids=[KIM], subject=unique("Sent bulk"))
    sent = item_of(reyes, message_id, "sent")
    answer = reyes.post("/api/v1/board/items/bulk", json={"action": "mark_unread", "item_ids": [sent["id"]]}).json()
    assert answer["refused"] == 1 and answer["results"][0]["code"] == "not_received"


def test_mark_all_read_empties_the_folder_unread_count(reyes, chen):
    for n in range(3):
        send(reyes, to_staff_ids=[CHEN], subject=unique(f"All read {n}"))
    unread, total = chen.counts("messages")
    assert unread >= 3
    reply = chen.post("/api/v1/board/folders/messages/mark-all-read")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"folder": "messages", "marked": unread, "more": False}
    assert chen.counts("messages") == (0, total)
    assert_counts_exact(chen, "messages")
    assert chen.post("/api/v1/board/folders/messages/mark-all-read").json()["marked"] == 0
    assert chen.post("/api/v1/board/folders/announcements/mark-all-read").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"action": "mark_read", "item_ids": [f"itm_{n}" for n in range(501)]}, 400, "too_many"),
        ({"action": "shred", "item_ids": ["itm_1"]}, 400, "invalid_value"),
        ({"action": "mark_read"}, 400, "missing_field"),
        ({"action": "mark_read", "item_ids": []}, 400, "missing_field"),
        ({"action": "mark_read", "item_ids": [{"$gt": ""}]}, 400, "invalid_type"),
        ({"action": "label", "item_ids": ["itm_1"]}, 400, "missing_field"),
        ({"action": "archive", "item_ids": ["itm_1"], "label_id": "lbl_1"}, 400, "invalid_value"),
        ({"action": "label", "item_ids": ["itm_1"], "label_id": "lbl_not_mine"}, 404, "label_not_found"),
        ({"action": "mark_read", "item_ids": ["itm_1"], "extra": 1}, 400, "unknown_field"),
    ],
)
def test_bad_bulk_requests_change_nothing(kim, body, status, code):
    before = kim.counts("messages")
    reply = kim.post("/api/v1/board/items/bulk", json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["code"] == code
    assert kim.counts("messages") == before


def test_five_hundred_items_in_one_request(reyes, login, capsys):
    """The most one request names, marked read then unread, with counters exact (the time it took is
    printed: a figure for the README, not asserted)."""
    white = login("nurse.white")
    for n in range(500):
        send(reyes, to_staff_ids=[white.staff_id], subject=f"Many {n}", body="x")
    items = [i["id"] for i in every_item(white, folder="messages", unread="true")][:500]
    assert len(items) == 500
    unread, total = white.counts("messages")
    started = time.perf_counter()
    answer = white.post("/api/v1/board/items/bulk", json={"action": "mark_read", "item_ids": items}).json()
    took = time.perf_counter() - started
    assert answer["done"] == 500
    assert white.counts("messages") == (unread - 500, total)
    again = white.post("/api/v1/board/items/bulk", json={"action": "mark_unread", "item_ids": items}).json()
    assert again["done"] == 500 and white.counts("messages") == (unread, total)
    started = time.perf_counter()
    marked = white.post("/api/v1/board/folders/messages/mark-all-read").json()
    all_read = time.perf_counter() - started
    assert white.counts("messages") == (0, total) and marked == {"folder": "messages", "marked": unread, "more": False}
    assert_counts_exact(white, "messages")
    with capsys.disabled():
        print(f"\nbulk mark_read of 500 items: {took:.2f} s; mark all read of {marked['marked']}: {all_read:.2f} s")
