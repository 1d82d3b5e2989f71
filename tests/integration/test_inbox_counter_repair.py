"""Counters after a crash, against the real database: a fan-out interrupted between its board items
and its counters is counted exactly once by whoever finishes it (the repair, a second repair, a
retried send), and the periodic drift check finds a board whose counters are off, repairs it and
counts the repair in its metric, without ever touching a board that is busy or about to be counted.

A crash is simulated in-process: the fan-out's crash point raises instead of killing the process
(tests/e2e/test_faults_inbox_crash.py kills a real one)."""

from __future__ import annotations

import base64

import pytest
from prometheus_client import REGISTRY

from clinic.inbox.v1 import inbox_pb2
from services.inbox import config, domain, fanout
from services.inbox import delivery as delivery_module
from services.inbox.counter_check import CounterCheck
from services.inbox.delivery import Delivery
from services.inbox.http_api import build_app
from services.inbox.store import SEQ, tokens_of
from services.kit import faults
from services.kit.auth import Identity, current_identity
from services.kit.events import new_envelope
from services.kit.mongo import now_ms
from services.kit.service_identity import IssuedToken, ServiceTokens
from services.kit.settings import SettingsError
from tests.integration.inbox_fixtures import staff

AGENCY = "agy_1"
PEOPLE = ("stf_a", "stf_b", "stf_c", "stf_d")
A = staff(AGENCY, "stf_a")


class Died(Exception):
    """The process 'died' at a crash point."""


@pytest.fixture
def world(inbox):
    components, table = inbox
    table.staff.update(dict.fromkeys(PEOPLE, AGENCY))
    components.service_tokens = ServiceTokens(
        "unused:1", "inbox", "secret", issuer=lambda client, secret, agency: IssuedToken(f"token-{agency}", 900)
    )
    delivery = Delivery(components)
    delivery.ensure_indexes()
    delivery.attach()
    components.features.append(delivery)
    return components, delivery


@pytest.fixture
def crash_at(monkeypatch):
    """crash_at(point): the next time the fan-out reaches `point`, it raises Died (once)."""
    armed: set[str] = set()

    def point(name: str) -> None:
        if name in armed:
            armed.discard(name)
            raise Died(name)

    monkeypatch.setattr(fanout, "crash_point", point)
    return armed.add


def send(components, sender: Identity, *to: str, key: str | None = None):
    token = current_identity.set(sender)
    try:
        draft = domain.Draft(domain.Addressing(staff_ids=tuple(to)), "Coverage", "Body")
        return components.mailbox.send(sender, draft, key)
    finally:
        current_identity.reset(token)


def exact(components) -> None:
    """Every board's stored counts equal a recount of its items."""
    for staff_id in PEOPLE:
        assert components.board.stored_counts(AGENCY, staff_id) == components.board.recount(AGENCY, staff_id), staff_id


def counts(components, staff_id: str, folder: str) -> tuple[int, int]:
    stored = components.board.stored_counts(AGENCY, staff_id)
    return stored.get(domain.unread_field(folder), 0), stored.get(domain.total_field(folder), 0)


def only_message(components) -> dict:
    [message] = list(components.store.messages.find({}))
    return message


def age(collection, record_id: str) -> None:
    """Make a pending record old enough for the repair pass."""
    collection.update_one({"_id": record_id}, {"$set": {fanout.MARKER: now_ms() - 60_000}})


# --- a send --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["inbox.fanout.after_items", "inbox.fanout.after_counters"])
def test_a_send_that_died_around_its_counters_is_counted_once_by_the_repair(world, crash_at, point):
    components, _ = world
    send(components, A, "stf_b")  # a board with something on it already
    crash_at(point)
    with pytest.raises(Died):
        send(components, A, "stf_b", "stf_c", "stf_d", key="k-1")
    message = next(m for m in components.store.messages.find({}) if fanout.MARKER in m)
    items = list(components.store.board_items.find({"message_id": {"$eq": message["_id"]}}))
    assert len(items) == 4  # three recipients and the sender's Sent copy: written before the crash
    counted = point.endswith("after_counters")
    assert counts(components, "stf_c", "messages") == ((1, 1) if counted else (0, 0))

    age(components.store.messages, message["_id"])
    assert components.mailbox.fanout.repair_pending() == 1
    assert components.mailbox.fanout.repair_pending(older_than_ms=now_ms()) == 0  # finished: nothing left
    components.mailbox.fanout.complete(message)  # a second repair that read it while pending: no effect
    assert counts(components, "stf_b", "messages") == (2, 2)
    assert counts(components, "stf_c", "messages") == (1, 1) and counts(components, "stf_d", "messages") == (1, 1)
    assert counts(components, "stf_a", "sent") == (0, 2)
    exact(components)

    again = send(components, A, "stf_b", "stf_c", "stf_d", key="k-1")  # the client's retry
    assert again.message_id == message["_id"] and not again.created
    assert counts(components, "stf_c", "messages") == (1, 1) and counts(components, "stf_a", "sent") == (0, 2)
    exact(components)


def test_a_retried_send_finishes_what_its_first_attempt_left_and_counts_it_once(world, crash_at):
    components, _ = world
    crash_at("inbox.fanout.after_items")
    with pytest.raises(Died):
        send(components, A, "stf_b", "stf_c", key="k-2")
    again = send(components, A, "stf_b", "stf_c", key="k-2")  # before the repair: the retry finishes it
    assert not again.created and fanout.MARKER not in only_message(components)
    assert counts(components, "stf_b", "messages") == (1, 1) and counts(components, "stf_a", "sent") == (0, 1)
    assert components.mailbox.fanout.repair_pending(older_than_ms=now_ms()) == 0
    exact(components)


def test_an_item_written_before_counting_by_placement_is_left_to_whoever_counted_it(world):
    """Items a send placed before passes counted (inserted and counted one by one) are not counted
    again when the repair finishes that send."""
    components, _ = world
    draft = domain.Draft(domain.Addressing(staff_ids=("stf_b", "stf_c")), "s", "b")
    doc = components.mailbox.compose(A, draft, ["stf_b", "stf_c"], domain.new_message_id())
    doc[fanout.MARKER] = now_ms() - 60_000
    components.store.insert_message(doc)
    components.store.insert_board_items([domain.board_item(doc, "stf_b", domain.FOLDER_MESSAGES)])  # counted
    assert components.mailbox.fanout.repair_pending() == 1
    assert counts(components, "stf_b", "messages") == (1, 1) and counts(components, "stf_c", "messages") == (1, 1)
    exact(components)


def test_a_released_sends_tokens_are_swept_from_its_boards(world):
    components, _ = world
    send(components, A, "stf_b", "stf_c")
    message = only_message(components)
    owners = [domain.owner_key(AGENCY, s) for s in ("stf_a", "stf_b", "stf_c")]
    assert all(len(tokens_of(components.store.counter_doc(owner))) == 1 for owner in owners)
    assert fanout.COUNTED_AT in message
    assert components.mailbox.fanout.sweep_counted() == 0  # not before TOKEN_KEEP_MS
    assert components.mailbox.fanout.sweep_counted(older_than_ms=now_ms()) == 1
    assert all(tokens_of(components.store.counter_doc(owner)) == {} for owner in owners)
    assert fanout.COUNTED_AT not in only_message(components)
    assert counts(components, "stf_b", "messages") == (1, 1)  # counts untouched
    exact(components)


# --- a delivered notice ----------------------------------------------------------------------------------


def request(source_ref: str, *to: str) -> inbox_pb2.DeliverItemRequest:
    return inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        recipients=inbox_pb2.Recipients(staff_ids=list(to)),
        title="Lab result available",
        source="lab",
        source_ref=source_ref,
    )


def deliver(delivery: Delivery, req):
    token = current_identity.set(Identity(subject="svc:notifications", agency_id=AGENCY, kind="service"))
    try:
        return delivery.deliver(AGENCY, "notifications", req, None)
    finally:
        current_identity.reset(token)


def test_a_delivery_that_died_before_its_counters_is_counted_once(world, crash_at):
    components, delivery = world
    crash_at("inbox.delivery.after_items")
    with pytest.raises(Died):
        deliver(delivery, request("order-1", "stf_b", "stf_c"))
    nid = delivery_module.notice_id(AGENCY, "lab", "order-1")
    assert counts(components, "stf_b", "lab") == (0, 0)
    age(delivery.notices, nid)
    assert delivery.fanout.repair_pending() == 1
    delivery.fanout.complete(delivery.find_notice(nid))  # finished: no effect
    assert counts(components, "stf_b", "lab") == (1, 1) and counts(components, "stf_c", "lab") == (1, 1)
    # A later revision adds a recipient: only that new item is counted, once.
    deliver(delivery, request("order-1", "stf_b", "stf_c", "stf_d"))
    assert counts(components, "stf_d", "lab") == (1, 1) and counts(components, "stf_b", "lab") == (1, 1)
    exact(components)


def test_a_batch_that_died_before_its_counters_is_counted_once_one_by_one(world, crash_at):
    components, delivery = world
    events = [
        new_envelope(
            delivery_module.REQUESTED_EVENT, request(f"order-{n}", "stf_b"), agency_id=AGENCY, producer="notifications"
        )
        for n in (1, 2, 3)
    ]
    crash_at("inbox.delivery.after_items")
    with pytest.raises(Died):
        delivery.handle_batch(events)
    assert counts(components, "stf_b", "lab") == (0, 0)
    for event in events:  # what the consumer does with a failed batch: each again, one by one
        delivery.handle_event(event)
    assert counts(components, "stf_b", "lab") == (3, 3)
    exact(components)


# --- the drift check -------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def repaired(folder: str) -> float:
    return REGISTRY.get_sample_value("inbox_counter_drift_repaired_total", {"folder": folder}) or 0.0


def test_the_drift_check_repairs_a_board_found_off_and_counts_it(world):
    components, _ = world
    clock = Clock()
    check = CounterCheck(components, clock=clock)
    send(components, A, "stf_b", "stf_c")
    send(components, A, "stf_b")
    owner = domain.owner_key(AGENCY, "stf_b")
    # Corrupted in the database: one unread and one total lost, as a crash between an item's write
    # and its $inc would leave them (no count moved, so `seq` stays).
    components.store.counters.update_one({"_id": owner}, {"$inc": {"u_messages": -1, "t_messages": -1}})
    components.store.counters.update_one({"_id": domain.owner_key(AGENCY, "stf_c")}, {"$inc": {"u_messages": 2}})
    before = repaired("messages")

    first = check.check_pass()
    assert first.boards == 3 and first.drifting == 2 and first.repaired == 0  # seen once: not yet
    assert counts(components, "stf_b", "messages") == (1, 1)
    clock.now += check.confirm_s + 1
    second = check.check_pass()
    assert second.repaired == 2 and second.drifting == 0
    assert counts(components, "stf_b", "messages") == (2, 2) and counts(components, "stf_c", "messages") == (1, 1)
    assert repaired("messages") == before + 2
    exact(components)
    assert check.check_pass().repaired == 0  # nothing left

    # The service's own port serves it (the feature's blueprint).
    app = build_app(components, verifier=None)
    app.register_blueprint(check.blueprint())
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert f'inbox_counter_drift_repaired_total{{folder="messages"}} {before + 2}' in text
    assert "inbox_counter_check_last_pass_seconds" in text


def test_the_drift_check_leaves_a_board_whose_counts_moved_or_are_about_to(world, crash_at):
    components, _ = world
    clock = Clock()
    check = CounterCheck(components, clock=clock)
    send(components, A, "stf_b")
    owner = domain.owner_key(AGENCY, "stf_b")
    components.store.counters.update_one({"_id": owner}, {"$inc": {"u_messages": 5}})
    assert check.check_pass().drifting == 1
    send(components, A, "stf_b")  # the board moved since: the drift must be seen again from scratch
    clock.now += check.confirm_s + 1
    assert check.check_pass().repaired == 0
    assert counts(components, "stf_b", "messages") == (7, 2)

    # A crashed send whose repair has not run yet: its items are there, uncounted. Nothing is
    # repaired while it is pending (its repair will count them), and nothing is counted twice.
    crash_at("inbox.fanout.after_items")
    with pytest.raises(Died):
        send(components, A, "stf_b", "stf_c")
    message = next(m for m in components.store.messages.find({}) if fanout.MARKER in m)
    age(components.store.messages, message["_id"])
    for _ in range(2):
        clock.now += check.confirm_s + 1
        assert check.check_pass().repaired == 0
    assert components.mailbox.fanout.repair_pending() == 1
    clock.now += check.confirm_s + 1
    check.check_pass()
    clock.now += check.confirm_s + 1
    assert check.check_pass().repaired == 1  # stf_b's corrupted unread count, now that nothing is pending
    exact(components)


def test_the_drift_check_reads_a_bounded_turn_of_boards_per_pass(world):
    components, _ = world
    for staff_id in PEOPLE[1:]:
        send(components, A, staff_id)
    check = CounterCheck(components, clock=Clock())
    check.boards_per_pass = 2
    seen = [check.check_pass().boards for _ in range(3)]
    assert seen == [2, 2, 2]  # four boards, two at a time, round and round
    check.max_items = 1
    assert check.check_pass().items_read <= 2  # stops once the budget is spent


def test_a_drift_repair_never_overwrites_a_count_that_moved(world):
    components, _ = world
    send(components, A, "stf_b")
    owner = domain.owner_key(AGENCY, "stf_b")
    seq = components.store.counter_doc(owner)[SEQ]
    send(components, A, "stf_b")
    assert not components.store.correct_counters(owner, seq, {"u_messages": -1})
    assert counts(components, "stf_b", "messages") == (2, 2)


# --- the fault setting -----------------------------------------------------------------------------------


def test_production_refuses_crash_points_and_development_arms_them(monkeypatch, tmp_path):
    base = {"CLINIC_RUN_DIR": str(tmp_path), "PHI_MASTER_KEYS": f"m:{base64.b64encode(bytes(32)).decode()}"}
    points = "inbox.fanout.after_items, inbox.send.before_answer"
    with pytest.raises(SettingsError) as refused:
        config.load({**base, "CLINIC_MODE": "production", "CLINIC_FAULT_CRASH_AT": points})
    assert "CLINIC_FAULT_CRASH_AT is for fault tests only" in str(refused.value)
    settings = config.load({**base, "CLINIC_FAULT_CRASH_AT": points})
    assert settings.crash_points == {"inbox.fanout.after_items", "inbox.send.before_answer"}
    killed = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    faults.arm(settings.crash_points)
    try:
        faults.crash_point("inbox.delivery.after_items")
        faults.crash_point("inbox.fanout.after_items")
    finally:
        faults.arm(())
    assert killed == [faults.signal.SIGKILL]
