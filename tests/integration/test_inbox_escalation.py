"""Critical-result escalation against the real database: passes run at once by two threads (two
processes) escalate once per stage, a result delivered in a batch is tracked like any other, the
boards' counters stay exact, and unread urgent messages are reported once."""

from __future__ import annotations

import threading
import uuid

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.inbox.agency_options import AgencyOptions
from services.inbox.delivery import NOTICES, Delivery
from services.inbox.delivery_rules import notice_id
from services.inbox.escalation import Escalation
from services.inbox.team_queue import TeamQueue
from services.kit import clock
from services.kit.auth import Identity, current_identity
from services.kit.errors import NotFound
from services.kit.events import new_envelope
from services.kit.service_identity import IssuedToken, ServiceTokens
from tests.integration.inbox_fixtures import staff

AGENCY = "agy_1"
MINUTE = 60_000


class Directory:
    """The directory calls escalation makes, beside the table's."""

    def __init__(self, table, supervisors: dict[str, str], admins: list[str]):
        self.table = table
        self.supervisor_of = supervisors
        self.admins = admins

    def __getattr__(self, name):
        return getattr(self.table, name)

    def supervisors(self, staff_ids):
        return {s: self.supervisor_of.get(s, "") for s in staff_ids}

    def admin_ids(self):
        return list(self.admins)


@pytest.fixture
def place(inbox):
    components, table = inbox
    table.staff.update({s: AGENCY for s in ("stf_a", "stf_b", "stf_boss", "stf_admin", "stf_t1")})
    table.teams["team_esc"] = ["stf_t1"]
    components.directory = Directory(table, {"stf_a": "stf_boss"}, ["stf_admin"])
    components.service_tokens = ServiceTokens(
        "unused:1", "inbox", "secret", issuer=lambda client, secret, agency: IssuedToken(f"token-{agency}", 900)
    )
    clock.reset()
    clock.enable(True)
    features = [AgencyOptions(components), Delivery(components), Escalation(components)]
    components.features = features
    for feature in features:
        feature.ensure_indexes()
        feature.attach()
    yield components, features[1], features[2]
    clock.reset()
    clock.enable(False)


def critical(delivery: Delivery, staff_ids: list[str]) -> str:
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=staff_ids),
        title="Lab result: Potassium (final)",
        severity=inbox_pb2.SEVERITY_URGENT,
        source="lab",
        source_ref=f"order-{uuid.uuid4().hex[:8]}",
    )
    token = current_identity.set(Identity(subject="svc:notifications", agency_id=AGENCY, kind="service"))
    try:
        return delivery.deliver(AGENCY, "notifications", request, None).notice_id
    finally:
        current_identity.reset(token)


def items_of(components, staff_id: str, ref_id: str) -> list[dict]:
    found = components.store.owner_items(AGENCY, staff_id, domain.ITEM_FOLDERS)
    return [item for item in found if item.get("ref_id") == ref_id]


def copy_id(result: str, level: int) -> str:
    return notice_id(AGENCY, "inbox.escalation", f"{result}.{level}")


def test_two_passes_at_once_escalate_once_per_stage(place):
    components, delivery, escalation = place
    result = critical(delivery, ["stf_a", "stf_b"])  # stf_b has no supervisor and no team is named
    clock.advance(31 * MINUTE)  # the registered pass runs here once ...
    start = threading.Barrier(2)

    def run():
        start.wait()
        escalation.critical_pass(clock.now_ms())

    threads = [threading.Thread(target=run) for _ in range(2)]  # ... and twice more, at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    notice = components.store.db[NOTICES].find_one({"_id": result})
    assert notice["escalation_stage"] == 1 and list(notice["escalations"]) == ["1"]
    assert notice["escalations"]["1"]["staff_ids"] == ["stf_admin", "stf_boss"]
    for owner in ("stf_boss", "stf_admin"):
        assert len(items_of(components, owner, copy_id(result, 1))) == 1
    assert components.board.observe(AGENCY, "stf_boss").drift == {}

    clock.advance(30 * MINUTE)
    notice = components.store.db[NOTICES].find_one({"_id": result})
    assert notice["escalation_stage"] == 2 and "escalation_due_at" not in notice
    assert len(items_of(components, "stf_admin", copy_id(result, 2))) == 1
    assert components.board.observe(AGENCY, "stf_admin").drift == {}


def test_the_escalation_team_takes_recipients_without_a_supervisor(place):
    components, delivery, _ = place
    components.options.set(staff(AGENCY, "stf_admin", "staff", "admin"), {"escalation_team_id": "team_esc"})
    result = critical(delivery, ["stf_b"])
    clock.advance(31 * MINUTE)
    assert len(items_of(components, "stf_t1", copy_id(result, 1))) == 1
    assert items_of(components, "stf_admin", copy_id(result, 1)) == []


def test_acknowledged_on_a_copy_the_chain_stops_and_the_audit_names_it(place):
    components, delivery, escalation = place
    result = critical(delivery, ["stf_a"])
    clock.advance(31 * MINUTE)
    [copy] = items_of(components, "stf_boss", copy_id(result, 1))
    trail = escalation.acknowledge(staff(AGENCY, "stf_boss", name="Boss"), copy["_id"])["critical_result"]
    assert trail["acknowledged"]["by"] == {"id": "stf_boss", "name": "Boss"}
    clock.advance(31 * MINUTE)
    assert items_of(components, "stf_admin", copy_id(result, 2)) == []
    actions = {doc.get("action") for doc in components.store.access_denials.find({"resource_id": result})}
    assert {"escalate", "acknowledge"} <= actions
    with pytest.raises(NotFound):  # a non-recipient's attempt is a 404
        escalation.acknowledge(staff(AGENCY, "stf_b"), copy["_id"])


def test_a_result_delivered_in_a_batch_is_tracked(place):
    components, delivery, _ = place
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=["stf_a"]),
        title="Lab result",
        severity=inbox_pb2.SEVERITY_URGENT,
        source="lab",
        source_ref="order-batch",
    )
    envelope = new_envelope("board_item.delivery_requested.v1", request, agency_id=AGENCY, producer="notifications")
    token = current_identity.set(Identity(subject="svc:notifications", agency_id=AGENCY, kind="service"))
    try:
        assert delivery.handle_batch([envelope]) == []
    finally:
        current_identity.reset(token)
    notice = components.store.db[NOTICES].find_one({"_id": notice_id(AGENCY, "lab", "order-batch")})
    assert notice["unacked_since"] and notice["escalation_due_at"] == notice["escalation_from"] + 30 * MINUTE


def test_an_unread_urgent_message_is_reported_once(place):
    components, _, escalation = place
    sender = staff(AGENCY, "stf_b")
    draft = domain.Draft(
        addressing=domain.Addressing(staff_ids=("stf_a",)), subject="Call", body="x", priority="urgent"
    )
    token = current_identity.set(sender)
    try:
        sent = components.mailbox.send(sender, draft)
    finally:
        current_identity.reset(token)
    clock.advance(0)
    clock.advance(61 * MINUTE)
    clock.advance(61 * MINUTE)
    ref = notice_id(AGENCY, "inbox.urgent-unread", sent.message_id)
    assert len(items_of(components, "stf_b", ref)) == 1
    watched = components.store.db["urgent_watch"].find_one({"_id": sent.message_id})
    assert watched["outcome"] == "told" and "due_at" not in watched


def test_an_urgent_team_message_a_member_claimed_is_not_reported(place):
    components, _, escalation = place
    queue = TeamQueue(components)
    queue.ensure_indexes()
    queue.attach()
    sender, member = staff(AGENCY, "stf_b"), staff(AGENCY, "stf_t1")
    draft = domain.Draft(
        addressing=domain.Addressing(team_ids=("team_esc",)), subject="Call", body="x", priority="urgent"
    )
    token = current_identity.set(sender)
    try:
        sent = components.mailbox.send(sender, draft)
    finally:
        current_identity.reset(token)
    clock.advance(0)
    token = current_identity.set(member)
    try:
        assert queue.act(member, sent.message_id, "claim")["state"] == "claimed"
    finally:
        current_identity.reset(token)
    clock.advance(61 * MINUTE)
    ref = notice_id(AGENCY, "inbox.urgent-unread", sent.message_id)
    assert items_of(components, "stf_b", ref) == []
    watched = components.store.db["urgent_watch"].find_one({"_id": sent.message_id})
    assert watched["outcome"] == "claimed" and "due_at" not in watched
