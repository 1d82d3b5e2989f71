"""Reminders against the real database: hidden until due, the due worker, snooze, complete, counters."""

from __future__ import annotations

import pytest

from clinic.audit.v1 import audit_pb2
from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.reminders import (
    Reminders,
    complete_patch,
    due_patch,
    reminder_state,
    snooze_patch,
)
from services.kit.errors import Conflict, Forbidden, InvalidInput, NotFound
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.validation import instant_ms
from tests.integration.inbox_fixtures import staff
from tests.waits import background, together, wait_until

AGENCY = "agy_1"


@pytest.fixture
def reminders(inbox):
    components, _ = inbox
    feature = Reminders(components, due_interval_s=0.05)
    feature.ensure_indexes()
    feature.attach()
    return feature


def counts(components, who) -> tuple[int, int]:
    folder = next(f for f in components.board.tree(who)["folders"] if f["id"] == domain.FOLDER_REMINDERS)
    return folder["unread"], folder["total"]


def outcome(record: dict) -> str:
    """The outcome its audit event (phi.accessed.v1) reports for an access record."""
    [entry] = record["_outbox"].values()
    return unpack(decode_envelope(entry["env"]), audit_pb2.PhiAccessed).outcome


def listed(components, who) -> list[dict]:
    return components.board.page(who, domain.FOLDER_REMINDERS, ItemFilter(), None, 100)["items"]


def test_a_reminder_is_hidden_until_the_worker_finds_it_due(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    remind_at = now_ms() + 60_000
    made = reminders.create(me, "Call the pharmacy about the refill", remind_at)
    assert made["state"] == "pending" and made["folder"] is None
    assert counts(components, me) == (0, 0) and listed(components, me) == []
    assert reminders.deliver_due(remind_at - 1) == 0  # not yet (the worker's clock, given)

    assert reminders.deliver_due(remind_at) == 1
    assert counts(components, me) == (1, 1)
    [item] = listed(components, me)
    assert item["id"] == made["id"] and item["title"] == "Call the pharmacy about the refill"
    assert item["kind"] == domain.KIND_REMINDER and item["read"] is False
    stored = components.store.board_items.find_one({"_id": made["id"]})
    assert "due_pending_at" not in stored
    assert stored["sort_key"].startswith(f"{stored['sent_at']:013d}.")
    # The arrival and its event were one write.
    [entry] = stored["_outbox"].values()
    assert entry["rk"] == "board_item.delivered.v1"
    assert reminders.deliver_due() == 0 and counts(components, me) == (1, 1)


def test_two_workers_count_each_arrival_once(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    made = 60  # enough that the two passes overlap
    for n in range(made):
        reminders.create(me, f"Reminder {n}", now_ms() + 300)
    other = Reminders(components)
    clock = now_ms() + 1_000  # both workers' clock, past every reminder
    delivered = together(lambda: reminders.deliver_due(clock), lambda: other.deliver_due(clock))
    assert len(delivered) == 2 and sum(delivered) == made
    assert counts(components, me) == (made, made)
    assert len(listed(components, me)) == made


def test_the_background_worker_delivers_on_its_own(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    reminders.create(me, "Sign the discharge summary", now_ms() + 300)
    [(_name, run)] = reminders.background()
    with background(run):  # stopped afterwards: it must end, without an error
        wait_until(lambda: counts(components, me) == (1, 1))


def test_a_reminder_already_due_is_visible_at_once(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    made = reminders.create(me, "Overdue follow-up", now_ms() - 60_000, link="https://ehr.example/clients/42")
    assert made["state"] == "due" and made["folder"] == domain.FOLDER_REMINDERS
    assert made["link"] == "https://ehr.example/clients/42"
    assert counts(components, me) == (1, 1)
    assert "_outbox_at" in components.store.board_items.find_one({"_id": made["id"]})


def test_snooze_and_complete_move_the_counters(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    made = reminders.create(me, "Renew the license", now_ms() - 1)
    assert counts(components, me) == (1, 1)

    snoozed = reminders.snooze(me, made["id"], None, 10)
    assert snoozed["state"] == "snoozed" and snoozed["folder"] is None
    assert counts(components, me) == (0, 0)
    stored = components.store.board_items.find_one({"_id": made["id"]})
    assert 9 * 60_000 < stored["due_pending_at"] - now_ms() <= 10 * 60_000

    # Back when the snooze ends (the worker is told the time), unread again, and not announced as new.
    assert reminders.deliver_due(now_ms() + 11 * 60_000) == 1
    assert counts(components, me) == (1, 1)
    events = components.store.board_items.find_one({"_id": made["id"]})["_outbox"]
    assert len(events) == 2

    done = reminders.complete(me, made["id"])
    assert done["state"] == "completed" and done["read"] is True
    assert counts(components, me) == (0, 1)
    assert reminders.complete(me, made["id"])["state"] == "completed"  # idempotent
    assert counts(components, me) == (0, 1)
    with pytest.raises(Conflict) as refused:
        reminders.snooze(me, made["id"], None, 5)
    assert refused.value.code == "reminder_completed"


def test_snooze_until_must_be_in_the_future_and_exactly_one_way(inbox, reminders):
    me = staff(AGENCY, "stf_a")
    made = reminders.create(me, "Check labs", now_ms() - 1)
    with pytest.raises(InvalidInput):
        reminders.snooze(me, made["id"], now_ms() - 1000, None)
    with pytest.raises(InvalidInput):
        reminders.snooze(me, made["id"], now_ms() + 60_000, 5)
    with pytest.raises(InvalidInput):
        reminders.snooze(me, made["id"], None, None)
    until = now_ms() + 3_600_000
    assert reminders.snooze(me, made["id"], until, None)["state"] == "snoozed"


def test_completing_a_pending_reminder_keeps_it_from_ever_arriving(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    made = reminders.create(me, "Maybe later", now_ms() + 200)
    reminders.complete(me, made["id"])
    assert reminders.deliver_due(now_ms() + 1_000) == 0
    assert counts(components, me) == (0, 0)
    assert reminders.page(me, None, 20)["reminders"][0]["state"] == "completed"


def test_my_reminders_list_every_state_newest_first_with_a_cursor(inbox, reminders):
    me, other = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")

    def next_millisecond() -> None:
        # Equally new reminders are ordered by id; the test expects creation order.
        start = now_ms()
        while now_ms() <= start:
            pass

    due = reminders.create(me, "First", now_ms() - 1)
    next_millisecond()
    pending = reminders.create(me, "Second", now_ms() + 3_600_000)
    next_millisecond()
    done = reminders.create(me, "Third", now_ms() - 1)
    reminders.complete(me, done["id"])
    reminders.create(other, "Someone else's", now_ms() - 1)

    first = reminders.page(me, None, 2)
    assert [(r["id"], r["state"]) for r in first["reminders"]] == [
        (done["id"], "completed"),
        (pending["id"], "pending"),
    ]
    rest = reminders.page(me, first["next_cursor"], 2)
    assert [r["id"] for r in rest["reminders"]] == [due["id"]] and rest["next_cursor"] is None


def test_someone_elses_reminder_is_not_found_and_the_attempt_audited(inbox, reminders):
    components, _ = inbox
    me, other, outsider = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b"), staff("agy_2", "stf_a")
    made = reminders.create(me, "Private", now_ms() - 1)
    for stranger in (other, outsider):
        for attempt in (
            lambda who: reminders.complete(who, made["id"]),
            lambda who: reminders.snooze(who, made["id"], None, 5),
        ):
            with pytest.raises(NotFound) as refused:
                attempt(stranger)
            assert refused.value.code == "reminder_not_found"
    denials = list(components.store.access_denials.find({"resource_id": made["id"]}))
    assert sorted(d["actor_id"] for d in denials) == ["stf_a", "stf_a", "stf_b", "stf_b"]  # each attempt, by whom
    assert {outcome(d) for d in denials} == {"denied"}
    assert reminders.page(other, None, 20)["reminders"] == []
    assert counts(components, me) == (1, 1)


def test_the_reading_pane_shows_the_reminder_and_is_audited(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    made = reminders.create(me, "Fax the release form", now_ms() - 1, link="pat_1234")
    opened = components.board.open_item(me, made["id"])
    assert opened["text"] == "Fax the release form" and opened["link"] == "pat_1234"
    assert opened["state"] == "due" and opened["read"] is True
    records = list(components.store.access_denials.find({"resource_id": made["id"]}))
    assert [(r["actor_id"], r["action"], outcome(r)) for r in records] == [("stf_a", "read", "allowed")]
    assert counts(components, me) == (0, 1)


def test_text_and_link_are_ciphertext_at_rest(inbox, reminders):
    components, _ = inbox
    me = staff(AGENCY, "stf_a")
    made = reminders.create(me, "Client Jane Roe needs a callback", now_ms() + 60_000, link="https://ehr.example/jane")
    raw = repr(components.store.board_items.find_one({"_id": made["id"]})).encode()
    assert b"Jane Roe" not in raw and b"ehr.example" not in raw


def test_composing_a_reminder_needs_the_permission(inbox, reminders):
    nobody = staff(AGENCY, "stf_x", "patient_liaison")
    with pytest.raises(Forbidden):
        reminders.create(nobody, "x", now_ms())


# --- pure rules -------------------------------------------------------------------------------------------


def test_times_need_an_offset_and_a_sane_year():
    assert instant_ms("t", "2030-01-02T03:04:05Z") == instant_ms("t", "2030-01-01T21:04:05-06:00")
    assert instant_ms("t", "2030-01-02T03:04:05.250+00:00") % 1000 == 250
    for bad in ("2030-01-02T03:04:05", "2030-01-02", "tomorrow", "1999-12-31T00:00:00Z", "2150-01-01T00:00:00Z"):
        with pytest.raises(InvalidInput) as refused:
            instant_ms("remind_at", bad)
        assert refused.value.code == "invalid_time"


def test_state_and_patches_follow_the_item():
    base = {"_id": "itm_1", "agency_id": AGENCY, "owner_id": "stf_a", "kind": domain.KIND_REMINDER, "ref_id": "rem_1"}
    pending = {**base, "due_pending_at": 1_000}
    assert reminder_state(pending) == "pending"
    assert reminder_state({**pending, "snoozed_at": 5}) == "snoozed"
    assert reminder_state({**base, "board": "b"}) == "due"
    assert reminder_state({**base, "completed_at": 9}) == "completed"

    assert due_patch(pending, 999) is None
    assert due_patch({**base, "kind": domain.KIND_NOTICE, "due_pending_at": 1}, 5) is None
    arrived = due_patch(pending, 1_000)
    assert arrived["board"] == domain.owner_folder(AGENCY, "stf_a", domain.FOLDER_REMINDERS)
    assert arrived["unread_board"] == arrived["board"] and arrived["urgent_board"] is None
    assert arrived["sent_at"] == 1_000 and arrived["sort_key"] == domain.sort_key(1_000, "itm_1")

    hidden = snooze_patch({**base, "board": "b"}, 5_000, 10)
    assert hidden["board"] is None and hidden["due_pending_at"] == 5_000
    with pytest.raises(Conflict):
        snooze_patch({**base, "completed_at": 1}, 5_000, 10)
    assert complete_patch({**base, "completed_at": 1}, 10) is None
    assert complete_patch(base, 10)["read_at"] == 10
