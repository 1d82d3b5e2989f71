"""inbox killed (kill -9) in the middle of a send: the counts come out exact without anyone running a tool.

A private stack (its own vhost, database prefix and processes) whose inbox kills itself at a crash
point of the send path (CLINIC_FAULT_CRASH_AT, services.kit.faults): once after the board items are
written and before any counter moved, once after the counters moved and before the send was
released. The gateway answers the sender with a retryable failure; inbox is started again without
the setting; within the deadline every recipient's board shows the message exactly once, each
board's unread and total counts (and the sender's Sent total) are exact, equal to a fresh recount
of the items; and the client's retry of the same send under the same Idempotency-Key answers the
stored message and moves no count. inbox's drift check runs every second meanwhile and never has
anything to repair (GET /metrics on inbox's own port).
"""

from __future__ import annotations

import uuid

import pytest
import requests

from services.inbox.board import Board
from services.inbox.store import InboxStore
from services.kit.embedded_mongo import pid_alive
from tests.e2e.conftest import Client
from tests.e2e.fault_stack import RETRYABLE, listed
from tests.waits import wait_until

SENDER = "therapist.patel"
RECIPIENTS = ("therapist.nguyen", "casemgr.garcia", "intake.wilson", "billing.lee")
CRASH_SETTING = "CLINIC_FAULT_CRASH_AT"
WAIT_S = 90.0  # the repair waits 10 s for a writer, passes every 5 s; a busy 2-core machine


def restart_inbox(stack, crash_at: str | None) -> None:
    """inbox again, crashing at `crash_at` (None: not at all)."""
    stack.restart("inbox", env_overrides={CRASH_SETTING: crash_at or None})


def board_counts(client: Client) -> dict[str, tuple[int, int]]:
    tree = client.tree()
    return {folder["id"]: (folder["unread"], folder.get("total", 0)) for folder in tree["folders"]}


def copies(client: Client, folder: str, subject: str) -> list[dict]:
    return [item for item in listed(client, "/api/v1/board/items", folder=folder) if item["title"] == subject]


def plus(counts: tuple[int, int], unread: int, total: int) -> tuple[int, int]:
    return counts[0] + unread, counts[1] + total


@pytest.mark.parametrize("point", ["inbox.fanout.after_items", "inbox.fanout.after_counters"])
def test_a_send_killed_mid_way_ends_with_exact_counts(fault_stack, mongo_client, point):
    gateway = fault_stack.gateway_url
    fault_stack.kill("inbox")  # this round's inbox: with the crash point armed
    restart_inbox(fault_stack, point)
    sender = Client(gateway, SENDER)
    recipients = [Client(gateway, name) for name in RECIPIENTS]
    before = {client.staff_id: board_counts(client) for client in [sender, *recipients]}
    subject = f"Crash {point.rsplit('.', 1)[-1]} {uuid.uuid4().hex[:8]}"
    body = {"to_staff_ids": [r.staff_id for r in recipients], "subject": subject, "body": "Who covers Friday?"}
    key = uuid.uuid4().hex
    crashed_pid = fault_stack.pid("inbox")

    def post() -> requests.Response:
        return sender.post("/api/v1/messages", json=body, headers={"Idempotency-Key": key}, timeout=60)

    reply = post()
    assert reply.status_code in RETRYABLE, f"{reply.status_code} {reply.text}"  # inbox died before answering
    wait_until(lambda: not pid_alive(crashed_pid), timeout=30, message="inbox gone")
    restart_inbox(fault_stack, None)

    def settled() -> bool:
        boards = [copies(r, "messages", subject) for r in recipients]
        sent = copies(sender, "sent", subject)
        if any(len(found) != 1 for found in [*boards, sent]):
            return False
        return all(board_counts(r)["messages"] == plus(before[r.staff_id]["messages"], 1, 1) for r in recipients)

    wait_until(settled, timeout=WAIT_S, message="every board shows the message once, counted")
    for client in recipients:
        assert board_counts(client)["messages"] == plus(before[client.staff_id]["messages"], 1, 1)
    assert board_counts(sender)["sent"] == plus(before[sender.staff_id]["sent"], 0, 1)

    # Exact: equal to a fresh recount of each board's items.
    board = Board(InboxStore(mongo_client[f"{fault_stack.db_prefix}inbox"]), cipher=None)
    for client in [sender, *recipients]:
        assert board.stored_counts(client.agency_id, client.staff_id) == board.recount(
            client.agency_id, client.staff_id
        ), client.staff_id

    # The client's retry is answered with the stored message and moves nothing.
    message_id = copies(sender, "sent", subject)[0]["ref_id"]
    again = post()
    assert again.status_code in (200, 201), again.text
    assert again.json()["id"] == message_id
    assert all(len(copies(r, "messages", subject)) == 1 for r in recipients)
    expected = {
        r.staff_id: {**before[r.staff_id], "messages": plus(before[r.staff_id]["messages"], 1, 1)} for r in recipients
    }
    expected[sender.staff_id] = {**before[sender.staff_id], "sent": plus(before[sender.staff_id]["sent"], 0, 1)}
    assert {c.staff_id: board_counts(c) for c in [sender, *recipients]} == expected

    # The drift check ran meanwhile, on inbox's own port, and found nothing to repair.
    def metrics() -> str:
        reply = requests.get(f"{fault_stack.inbox_url}/metrics", timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.text

    wait_until(lambda: "inbox_counter_check_boards_total{" in metrics(), timeout=30, message="a drift check pass")
    repaired = [line for line in metrics().splitlines() if line.startswith("inbox_counter_drift_repaired_total{")]
    assert all(line.endswith(" 0.0") for line in repaired), repaired
    assert "inbox_counter" not in requests.get(f"{gateway}/metrics", timeout=10).text  # never routed
