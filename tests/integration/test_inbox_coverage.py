"""Coverage while away against the real (embedded) database: copies land on the coverer's board,
counted exactly once however often a fan-out is repeated; the end pass is repeatable and safe when
two run at once; the test clock decides the window."""

from __future__ import annotations

import datetime as dt
import threading
from types import SimpleNamespace

import pytest

from services.inbox import domain
from services.inbox.board import Board
from services.inbox.coverage import Coverage
from services.kit import clock
from services.kit.auth import current_identity
from tests.integration.inbox_fixtures import staff

AGENCY = "agy_cov"
OWNER, COVERER, SENDER = (staff(AGENCY, s, name=s.upper()) for s in ("stf_owner", "stf_coverer", "stf_sender"))
MINUTE = 60_000


@pytest.fixture
def covered(inbox):
    components, table = inbox
    table.staff.update({p.staff_id: AGENCY for p in (OWNER, COVERER, SENDER)})
    feature = Coverage(components)
    feature.ensure_indexes()
    feature.attach()
    # directory's GetStaff as the table would answer it
    feature._people = lambda ids: {
        i: SimpleNamespace(staff_id=i, active=True, display_name=i.upper()) for i in ids if i in table.staff
    }
    clock.enable()
    token = current_identity.set(OWNER)
    yield components, feature
    current_identity.reset(token)
    clock.reset()
    clock.enable(False)


def send(components, subject: str) -> str:
    token = current_identity.set(SENDER)
    try:
        draft = domain.Draft(domain.Addressing(staff_ids=(OWNER.staff_id,)), subject, "body")
        return components.mailbox.send(SENDER, draft).message_id
    finally:
        current_identity.reset(token)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


def exact(components, who) -> dict:
    board = Board(components.store, cipher=None)
    stored = board.stored_counts(AGENCY, who.staff_id)
    assert stored == board.recount(AGENCY, who.staff_id)
    return stored


def test_copies_are_counted_once_and_marked_at_the_end(covered):
    components, feature = covered
    now = clock.now_ms()
    body = {"coverer_id": COVERER.staff_id, "starts_at": iso(now + MINUTE), "ends_at": iso(now + 10 * MINUTE)}
    cov = feature.set(OWNER, OWNER.staff_id, body)["coverage"]
    assert cov["status"] == "scheduled"

    before = send(components, "before")
    copy_id = domain.board_item_id(before, COVERER.staff_id, domain.FOLDER_MESSAGES)
    assert components.store.item(copy_id) is None

    clock.advance(MINUTE)
    during = send(components, "during")
    copy_id = domain.board_item_id(during, COVERER.staff_id, domain.FOLDER_MESSAGES)
    copy = components.store.item(copy_id)
    assert copy["covering_for"] == {"staff_id": OWNER.staff_id, "name": "STF_OWNER"}
    assert exact(components, COVERER) == {"t_messages": 1, "u_messages": 1}

    # The fan-out repeated (a repair, a retried send): nothing moves twice.
    message = components.store.message(during)
    components.mailbox.fanout.bring_in_line(message)
    components.mailbox.fanout.bring_in_line(message)
    assert exact(components, COVERER) == {"t_messages": 1, "u_messages": 1}
    assert feature.coverages.find_one({"_id": cov["id"]})["copies"] == 1

    # Two end passes at once: the copies marked once, the pointer gone, the window noted ended.
    clock.advance(10 * MINUTE)  # runs the registered pass too
    results: list[int] = []
    passes = [threading.Thread(target=lambda: results.append(feature.end_due(clock.now_ms()))) for _ in range(2)]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()
    assert results == [0, 0]  # the advance's own pass ended it already
    ended = components.store.item(copy_id)
    assert ended["coverage_ended_at"] == cov_end(feature, cov["id"])
    assert feature.pointer(AGENCY, OWNER.staff_id) is None
    assert feature.get(OWNER, OWNER.staff_id) == {"coverage": None}
    after = send(components, "after")
    assert components.store.item(domain.board_item_id(after, COVERER.staff_id, domain.FOLDER_MESSAGES)) is None
    assert exact(components, COVERER) == {"t_messages": 1, "u_messages": 1}
    assert exact(components, OWNER) == {"t_messages": 3, "u_messages": 3}


def cov_end(feature, coverage_id: str) -> int:
    return feature.coverages.find_one({"_id": coverage_id})["ended_at"]


def test_a_copy_placed_after_the_end_is_marked_ended_at_once(covered):
    components, feature = covered
    now = clock.now_ms()
    cov = feature.set(OWNER, OWNER.staff_id, {"coverer_id": COVERER.staff_id, "ends_at": iso(now + MINUTE)})
    pointer = feature.pointer(AGENCY, OWNER.staff_id)
    feature.clear(OWNER, OWNER.staff_id)
    # A fan-out that read the pointer just before the clear places its copy just after it.
    feature.current.insert_one(pointer)
    try:
        late = send(components, "raced")
    finally:
        feature.current.delete_one({"_id": pointer["_id"]})
    copy = components.store.item(domain.board_item_id(late, COVERER.staff_id, domain.FOLDER_MESSAGES))
    assert copy["coverage_ended_at"] == cov_end(feature, cov["coverage"]["id"])
    assert feature.history(OWNER, OWNER.staff_id, 5)["items"][0]["status"] == "cleared"


def test_an_automatic_answer_names_the_coverer_while_the_coverage_is_in_force(covered):
    components, feature = covered
    now = clock.now_ms()
    body = {"coverer_id": COVERER.staff_id, "starts_at": iso(now + MINUTE), "ends_at": iso(now + 2 * MINUTE)}
    feature.set(OWNER, OWNER.staff_id, body)

    def answer(auto_reply: bool = True) -> str:
        asked = send(components, "question")
        sent = components.mailbox.reply(OWNER, asked, body="I am away.", auto_reply=auto_reply)
        message = components.store.message(sent.message_id)
        return components.cipher.open(AGENCY, message["_id"], "body", message["body"])

    assert answer() == "I am away."  # not yet in force
    clock.advance(MINUTE)
    assert answer() == "I am away.\n\nSTF_COVERER is covering for me until " + iso_minute(now + 2 * MINUTE) + " UTC."
    assert answer(auto_reply=False) == "I am away."  # a reply typed by the person is theirs alone
    clock.advance(MINUTE)
    assert answer() == "I am away."


def iso_minute(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
