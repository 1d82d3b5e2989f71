"""The board's counters, labels, archive and delete against the real database."""

from __future__ import annotations

from services.inbox import domain
from services.kit.auth import current_identity
from tests.integration.inbox_fixtures import staff

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
