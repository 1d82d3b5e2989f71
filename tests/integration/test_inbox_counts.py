"""Every kind of board item in one random sequence: the stored folder and label counters must equal a
recount of the items afterwards (the tree never counts on read, so this is what keeps it honest)."""

from __future__ import annotations

import uuid

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.inbox.delivery import Delivery
from services.inbox.reminders import Reminders
from services.inbox.signatures import Signatures
from services.kit.auth import Identity, current_identity
from services.kit.errors import DomainError
from services.kit.mongo import now_ms
from tests.integration.conftest import own_inbox
from tests.integration.inbox_fixtures import AgencyTable, staff

AGENCY = "agy_1"
A, B = staff(AGENCY, "stf_a", name="A"), staff(AGENCY, "stf_b", name="B")
SERVICE = Identity(subject="svc:notifications", agency_id=AGENCY, kind="service")

OPERATIONS = (
    "message",
    "notice",
    "notice_update",
    "notice_resolve",
    "notice_withdraw",
    "reminder",
    "reminders_due",
    "snooze",
    "complete",
    "signature",
    "sign",
    "read",
    "unread",
    "archive",
    "restore",
    "delete",
    "label",
    "unlabel",
)


def as_caller(identity, call):
    token = current_identity.set(identity)
    try:
        return call()
    finally:
        current_identity.reset(token)


class World:
    """The inbox with its features, and what the sequence has made so far."""

    def __init__(self, components):
        self.components = components
        self.delivery = Delivery(components)
        self.reminders = Reminders(components, due_interval_s=0.05)
        self.signatures = Signatures(components)
        for feature in (self.delivery, self.reminders, self.signatures):
            feature.ensure_indexes()
            feature.attach()
        self.items: list[str] = []  # B's board items
        self.sources: list[str] = []
        self.reminder_ids: list[str] = []
        self.requests: list[str] = []
        self.labels = [components.board.create_label(B, f"L{uuid.uuid4().hex[:6]}")["id"] for _ in range(2)]

    def counts(self) -> list[dict[str, int]]:
        """Both staff members' stored counters, as the tree reads them."""
        return [self.components.board.stored_counts(AGENCY, who.staff_id) for who in (A, B)]

    def refresh_items(self):
        docs = self.components.store.board_items.find(
            {"owner_id": {"$eq": B.staff_id}, "agency_id": {"$eq": AGENCY}}, projection={"_id": 1, "board": 1}
        )
        self.items = sorted(d["_id"] for d in docs if d.get("board"))

    def deliver(self, source_ref: str, **fields):
        fields = {"title": "Result available", "status": "final", **fields}
        request = inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_LAB,
            recipients=inbox_pb2.Recipients(staff_ids=[B.staff_id]),
            source="lab",
            source_ref=source_ref,
            **fields,
        )
        as_caller(SERVICE, lambda: self.delivery.deliver(AGENCY, "notifications", request, None))

    def step(self, op: str, n: int) -> None:  # noqa: C901, PLR0912 - one branch per operation
        board = self.components.board

        def pick(choices: list[str]) -> str:
            return choices[n % len(choices)]

        if op == "message":
            draft = domain.Draft(domain.Addressing(staff_ids=(B.staff_id,)), "s", "b", "urgent" if n % 2 else "normal")
            as_caller(A, lambda: self.components.mailbox.send(A, draft))
        elif op == "notice":
            self.sources.append(f"order-{uuid.uuid4().hex[:6]}")
            self.deliver(self.sources[-1], severity=inbox_pb2.SEVERITY_URGENT if n % 2 else inbox_pb2.SEVERITY_INFO)
        elif op == "notice_update" and self.sources:
            self.deliver(pick(self.sources), status="corrected", mark_unread=True)
        elif op == "notice_resolve" and self.sources:
            self.deliver(pick(self.sources), resolved=True)
        elif op == "notice_withdraw" and self.sources:
            self.deliver(pick(self.sources), withdrawn=True)
        elif op == "reminder":
            made = self.reminders.create(B, "Call back", now_ms() - 1 if n % 2 else now_ms() + 60_000)
            self.reminder_ids.append(made["id"])
        elif op == "reminders_due":
            self.reminders.deliver_due(now_ms() + 120_000)
        elif op == "snooze" and self.reminder_ids:
            self.reminders.snooze(B, pick(self.reminder_ids), None, 5)
        elif op == "complete" and self.reminder_ids:
            self.reminders.complete(B, pick(self.reminder_ids))
        elif op == "signature":
            body = {"document_kind": "staff", "title": "Policy", "document_ref": "p-1", "signer_ids": [B.staff_id]}
            self.requests.append(as_caller(A, lambda: self.signatures.create(A, body))["id"])
        elif op == "sign" and self.requests:
            self.signatures.sign(B, pick(self.requests), "Read and agreed.")
        elif self.items:
            item_id = pick(self.items)
            label_id = self.labels[n % 2]
            if op == "read":
                board.set_read(B, item_id, read=True)
            elif op == "unread":
                board.set_read(B, item_id, read=False)
            elif op == "archive":
                board.archive(B, item_id)
            elif op == "restore":
                board.restore(B, item_id)
            elif op == "delete":
                board.delete(B, item_id)
            elif op == "label":
                board.add_label(B, item_id, label_id, None)
            elif op == "unlabel":
                board.remove_label(B, item_id, label_id)


@settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a failure is reported as found, unshrunk
)
@given(steps=st.lists(st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 100)), min_size=10, max_size=45))
def test_counters_equal_a_recount_whatever_the_kinds_and_operations(mongo_client, steps):
    with own_inbox(mongo_client, AgencyTable(staff={A.staff_id: AGENCY, B.staff_id: AGENCY})) as components:
        world = World(components)
        for op, n in steps:
            world.refresh_items()
            before = world.counts()
            try:
                world.step(op, n)
            except DomainError:  # refused (e.g. snoozing a completed reminder): a refusal must move nothing
                assert world.counts() == before, f"the refused {op} moved the counters"
        for who in (A, B):
            assert components.board.stored_counts(AGENCY, who.staff_id) == components.board.recount(
                AGENCY, who.staff_id
            )
