"""The Message Board through the gateway: folder tree and counts, threads, reply, reply-all, forward,
labels, archive, delete, compose permissions and bad input."""

from __future__ import annotations

import uuid

import pytest
import requests

INTAKE = "team_riverbend_intake"
INTAKE_MEMBERS = {
    "stf_riverbend_wilson",
    "stf_riverbend_thompson",
    "stf_riverbend_davis",
    "stf_riverbend_lopez",
    "stf_riverbend_garcia",
}


def subject() -> str:
    return f"Board check {uuid.uuid4().hex[:8]}"


def item_for(client, message_id: str, folder: str = "messages") -> dict:
    for item in client.items(folder=folder, limit=100)["items"]:
        if item.get("message_id") == message_id or item["ref_id"] == message_id:
            return item
    raise AssertionError(f"{message_id} not on the {folder} board")


def test_the_tree_has_every_folder_in_the_agency_terms(kim, outsider):
    tree = kim.tree()
    names = [f["name"] for f in tree["folders"]]
    assert names == [
        "Messages",
        "Sent",
        "Schedule Notifications",
        "eRx Notifications",
        "Reminders",
        "Signature Requests",
        "Agency Announcement",
        "Client Portal Messages",  # Riverbend says Client
        "Compliance Alerts",
        "Lab Report Notifications",
        "Cloud Communications",
        "Archive",
    ]
    assert "Patient Portal Messages" in [f["name"] for f in outsider.tree()["folders"]]
    assert tree["compose"] == ["message", "reminder", "signature_request"]
    assert "announcement" in outsider.tree()["compose"]  # an admin


def test_counts_follow_send_read_and_unread(reyes, kim):
    before = kim.folder("messages")
    sent = reyes.send(to_staff_ids=[kim.staff_id], subject=subject())
    assert sent.status_code == 201, sent.text
    message_id = sent.json()["id"]
    after = kim.folder("messages")
    assert (after["unread"], after["total"]) == (before["unread"] + 1, before["total"] + 1)
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    assert kim.folder("messages")["unread"] == before["unread"]
    item = item_for(kim, message_id)
    assert kim.post(f"/api/v1/board/items/{item['id']}/unread").status_code == 200
    assert kim.folder("messages")["unread"] == before["unread"] + 1
    opened = kim.get(f"/api/v1/board/items/{item['id']}")
    assert opened.status_code == 200 and opened.json()["body"] and opened.json()["read"] is True
    assert kim.folder("messages")["unread"] == before["unread"]


def test_section_state_is_remembered(kim):
    assert kim.put("/api/v1/board/sections/labels", json={"expanded": False}).status_code == 200
    assert kim.tree()["sections"]["labels"] is False
    assert kim.put("/api/v1/board/sections/labels", json={"expanded": True}).status_code == 200
    assert kim.tree()["sections"]["labels"] is True
    assert kim.put("/api/v1/board/sections/nope", json={"expanded": True}).status_code == 404
    assert kim.put("/api/v1/board/sections/labels", json={"expanded": "yes"}).json()["code"] == "invalid_type"


def test_reply_lands_in_the_same_thread_for_the_sender_only(reyes, kim, chen):
    original = reyes.send(to_staff_ids=[kim.staff_id, chen.staff_id], subject=subject()).json()
    chen_unread = chen.folder("messages")["unread"]
    reply = kim.post(f"/api/v1/messages/{original['id']}/reply", json={"body": "On it."})
    assert reply.status_code == 201, reply.text
    assert reply.json()["recipient_ids"] == [reyes.staff_id]
    assert chen.folder("messages")["unread"] == chen_unread  # not in a plain reply
    on_board = item_for(reyes, reply.json()["id"])
    assert on_board["thread_id"] == original["id"] and on_board["title"].startswith("Re: Board check")
    thread = reyes.get(f"/api/v1/threads/{original['id']}").json()
    assert [m["id"] for m in thread["messages"]] == [original["id"], reply.json()["id"]]
    assert thread["messages"][1]["in_reply_to"] == original["id"] and thread["messages"][1]["body"] == "On it."
    # chen sees the thread's first message only: the reply was not addressed to them
    assert [m["id"] for m in chen.get(f"/api/v1/threads/{original['id']}").json()["messages"]] == [original["id"]]


def test_reply_all_keeps_teams_and_leaves_out_the_replier(reyes, kim, wilson):
    original = reyes.send(to_staff_ids=[kim.staff_id], to_team_ids=[INTAKE], subject=subject()).json()
    reply = wilson.post(f"/api/v1/messages/{original['id']}/reply-all", json={"body": "Noted by intake"})
    assert reply.status_code == 201, reply.text
    recipients = set(reply.json()["recipient_ids"])
    assert recipients == {reyes.staff_id, kim.staff_id} | (INTAKE_MEMBERS - {wilson.staff_id})
    read = kim.get(f"/api/v1/messages/{reply.json()['id']}").json()
    assert read["to"]["team_ids"] == [INTAKE] and read["thread_id"] == original["id"]
    assert wilson.staff_id not in read["to"]["staff_ids"]


def test_forward_quotes_the_original_to_new_recipients(reyes, kim, chen):
    original = reyes.send(to_staff_ids=[kim.staff_id], subject=subject(), body="Labs are back").json()
    forwarded = kim.post(
        f"/api/v1/messages/{original['id']}/forward", json={"to_staff_ids": [chen.staff_id], "body": "FYI"}
    )
    assert forwarded.status_code == 201, forwarded.text
    read = chen.get(f"/api/v1/messages/{forwarded.json()['id']}").json()
    assert read["subject"].startswith("Fwd: Board check")
    assert (
        read["body"].startswith("FYI") and "Labs are back" in read["body"] and "From: Dr. Elena Reyes" in read["body"]
    )
    assert read["thread_id"] == forwarded.json()["id"]  # a forward starts its own thread


def test_labels_through_the_gateway(reyes, kim):
    message_id = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    item = item_for(kim, message_id)
    name = f"Follow up {uuid.uuid4().hex[:4]}"
    added = kim.post(f"/api/v1/board/items/{item['id']}/labels", json={"name": name})
    assert added.status_code == 200, added.text
    label_id = added.json()["label"]["id"]
    labels = {lbl["id"]: lbl for lbl in kim.tree()["labels"]}
    assert labels[label_id]["unread"] == 1 and labels[label_id]["name"] == name
    listed = kim.items(folder="messages", label=label_id)["items"]
    assert [i["id"] for i in listed] == [item["id"]]
    dup = kim.post("/api/v1/labels", json={"name": name.upper()})
    assert dup.status_code == 409 and dup.json()["code"] == "label_exists"
    other = kim.post("/api/v1/labels", json={"name": f"Billing {uuid.uuid4().hex[:4]}"}).json()["id"]
    moved = kim.post(
        f"/api/v1/board/items/{item['id']}/labels/move", json={"from_label_id": label_id, "to_label_id": other}
    )
    assert moved.status_code == 200 and moved.json()["labels"] == [other]
    assert kim.delete(f"/api/v1/board/items/{item['id']}/labels/{other}").status_code == 200
    assert kim.get(f"/api/v1/labels/{other}/items").json()["items"] == []
    new_name = "Renamed " + uuid.uuid4().hex[:4]
    renamed = kim.patch(f"/api/v1/labels/{other}", json={"name": new_name})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["id"] == other and renamed.json()["name"] == new_name
    assert {lbl["id"]: lbl["name"] for lbl in kim.tree()["labels"]}[other] == new_name  # the tree shows the new name
    assert kim.delete(f"/api/v1/labels/{label_id}").status_code == 204
    assert label_id not in {lbl["id"] for lbl in kim.tree()["labels"]}
    assert item_for(kim, message_id)["id"] == item["id"]  # deleting a label never deletes messages
    assert reyes.get(f"/api/v1/labels/{other}/items").status_code == 404  # labels are private
    unknown = kim.post(f"/api/v1/board/items/{item['id']}/labels", json={"label_id": "lbl_unknown"})
    assert unknown.status_code == 404 and unknown.json()["code"] == "label_not_found"


def test_archive_restore_and_delete_through_the_gateway(reyes, kim):
    message_id = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    item = item_for(kim, message_id)
    archive_before = kim.folder("archive")["total"]
    assert kim.post(f"/api/v1/board/items/{item['id']}/archive").json()["folder"] == "archive"
    assert kim.folder("archive")["total"] == archive_before + 1
    assert kim.post(f"/api/v1/board/items/{item['id']}/restore").json()["folder"] == "messages"
    assert kim.delete(f"/api/v1/board/items/{item['id']}").status_code == 204
    assert kim.get(f"/api/v1/board/items/{item['id']}").status_code == 404
    assert item_for(reyes, message_id, folder="sent")  # only from my board
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 404


def test_urgent_and_unread_filters(reyes, kim):
    urgent = reyes.send(to_staff_ids=[kim.staff_id], subject=subject(), priority="urgent").json()["id"]
    normal = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    urgent_ids = [i["message_id"] for i in kim.items(urgent="true", limit=100)["items"]]
    assert urgent in urgent_ids and normal not in urgent_ids
    kim.get(f"/api/v1/messages/{urgent}")
    unread_urgent = [i["message_id"] for i in kim.items(urgent="true", unread="true", limit=100)["items"]]
    assert urgent not in unread_urgent
    kinds = {i["kind"] for i in kim.items(kind="message", limit=100)["items"]}
    assert kinds == {"message"}


def test_pages_are_stable_while_messages_arrive(reyes, kim):
    for _ in range(4):
        reyes.send(to_staff_ids=[kim.staff_id], subject=subject())
    top = [i["id"] for i in kim.items(limit=4)["items"]]
    assert len(top) == 4
    first = kim.items(limit=2)
    arrived = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]  # arrives between pages
    second = kim.items(limit=2, cursor=first["next_cursor"])
    paged = [i["id"] for i in first["items"]] + [i["id"] for i in second["items"]]
    assert paged == top
    assert item_for(kim, arrived)["id"] not in paged
    assert first["items"][-1]["sent_at"] >= second["items"][0]["sent_at"]


def test_what_is_not_yours_is_not_found(reyes, kim, chen, outsider):
    message_id = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    item = item_for(kim, message_id)
    unread_before = kim.folder("messages")["unread"]
    for client in (chen, outsider):
        for reply, code in (
            (client.get(f"/api/v1/board/items/{item['id']}"), "item_not_found"),
            (client.post(f"/api/v1/board/items/{item['id']}/archive"), "item_not_found"),
            (client.delete(f"/api/v1/board/items/{item['id']}"), "item_not_found"),
            (client.post(f"/api/v1/messages/{message_id}/reply", json={"body": "x"}), "message_not_found"),
            (client.post(f"/api/v1/messages/{message_id}/reply-all", json={"body": "x"}), "message_not_found"),
            (client.get(f"/api/v1/threads/{message_id}"), "thread_not_found"),
        ):
            assert (reply.status_code, reply.json()["code"]) == (404, code), reply.text
    still = item_for(kim, message_id)
    assert still["id"] == item["id"] and still["folder"] == "messages" and still["read"] is False
    assert kim.folder("messages")["unread"] == unread_before


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/api/v1/labels", {"name": {"$gt": ""}}, 400, "invalid_type"),
        ("/api/v1/labels", {"name": "x" * 41}, 400, "invalid_label_name"),
        ("/api/v1/labels", {"name": "   "}, 400, "invalid_value"),
        ("/api/v1/labels", {"name": "ok", "owner": "stf_x"}, 400, "unknown_field"),
        (
            "/api/v1/messages",
            {"to_staff_ids": ["stf_riverbend_kim"], "subject": "s", "body": "b", "links": ["javascript:alert(1)"]},
            400,
            "invalid_link",
        ),
        (
            "/api/v1/messages",
            {"to_staff_ids": ["stf_riverbend_kim"], "subject": "s" * 201, "body": "b"},
            400,
            "too_long",
        ),
    ],
)
def test_bad_input_gets_a_stable_code(kim, path, body, status, code):
    reply = kim.post(path, json=body)
    assert (reply.status_code, reply.json()["code"]) == (status, code), reply.text


def test_malformed_json_and_bad_queries(kim):
    reply = kim.post("/api/v1/labels", data=b"{nope", headers={"Content-Type": "application/json"})
    assert (reply.status_code, reply.json()["code"]) == (400, "malformed_json")
    assert kim.get("/api/v1/board/items", params={"folder": "nope"}).json()["code"] == "invalid_query"
    assert kim.get("/api/v1/board/items", params={"kind": "nope"}).json()["code"] == "invalid_query"
    assert kim.get("/api/v1/board/items", params={"cursor": "!!"}).json()["code"] == "invalid_cursor"
    assert kim.get("/api/v1/board/items", params={"label": "$gt"}).json()["code"] == "invalid_query"
    assert kim.get("/api/v1/board").status_code == 200  # and the service keeps serving


def test_thread_and_reading_pane_reads_are_audited(reyes, kim, events):
    with events.listen("phi.accessed.v1") as heard:
        original = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
        reply = kim.post(f"/api/v1/messages/{original}/reply", json={"body": "ok"}).json()["id"]
        assert reyes.get(f"/api/v1/threads/{original}").status_code == 200
        item = item_for(kim, original)
        assert kim.get(f"/api/v1/board/items/{item['id']}").status_code == 200
        for actor, resource, action in (
            (reyes.staff_id, original, "read_thread"),
            (reyes.staff_id, reply, "read_thread"),
            (kim.staff_id, original, "read"),
        ):
            heard.wait_for(
                lambda e, wanted=(actor, resource, action): (
                    (
                        e.payload.actor_id,
                        e.payload.resource_id,
                        e.payload.action,
                    )
                    == wanted
                )
            )


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/board",
        "/api/v1/board/items",
        "/api/v1/labels",
        "/api/v1/threads/msg_x",
        "/api/v1/announcements",
        "/api/v1/reminders",
        "/api/v1/signature-requests",
    ],
)
def test_every_board_route_needs_a_staff_token_at_the_gateway(stack, path):
    reply = requests.get(f"{stack.gateway_url}{path}", timeout=10)
    assert reply.status_code == 401 and reply.json()["message"] == "Unauthorized"


def test_a_service_token_is_refused_on_staff_routes(stack, service_token):
    # Past the gateway (the token is validly signed), inbox refuses it: a board belongs to a person.
    reply = requests.get(
        f"{stack.gateway_url}/api/v1/board",
        headers={"Authorization": f"Bearer {service_token('notifications')}"},
        timeout=10,
    )
    assert reply.status_code == 403 and reply.json()["code"] == "staff_only"
