"""Inbox's short memory of directory's answer for explicitly addressed staff (RecipientCache)."""

from __future__ import annotations

import pytest

from services.inbox.directory_client import RecipientCache, Resolution
from services.inbox.domain import Addressing
from services.kit.errors import InvalidInput
from tests.helpers import Clock


class Directory:
    """What directory answers for one agency: staff id -> active."""

    def __init__(self, staff: dict[str, bool]):
        self.staff = staff
        self.calls: list[Addressing] = []

    def resolve(self, addressing: Addressing) -> Resolution:
        self.calls.append(addressing)
        known = [s for s in addressing.staff_ids if s in self.staff]
        return Resolution(
            sorted(s for s in known if self.staff[s]), [s for s in addressing.staff_ids if s not in self.staff], []
        )


def to(*staff_ids: str) -> Addressing:
    return Addressing(staff_ids=staff_ids)


@pytest.fixture
def setup():
    directory, clock = Directory({"stf_a": True, "stf_b": True, "stf_c": False}), Clock()
    return directory, clock, RecipientCache(directory.resolve, 10.0, clock=clock)


def test_a_repeated_request_is_answered_without_directory_with_the_same_answer(setup):
    directory, clock, cache = setup
    first = cache.resolve("agy_1", to("stf_b", "stf_a", "stf_c"))
    clock.now += 9.9
    again = cache.resolve("agy_1", to("stf_a", "stf_b"))
    assert first == Resolution(["stf_a", "stf_b"], [], [])
    assert again == Resolution(["stf_a", "stf_b"], [], [])
    assert cache.resolve("agy_1", to("stf_c")) == Resolution([], [], [])  # known, deactivated: left out
    assert len(directory.calls) == 1


def test_a_deactivated_member_is_left_out_once_the_bound_has_passed(setup):
    directory, clock, cache = setup
    cache.resolve("agy_1", to("stf_a", "stf_b"))
    directory.staff["stf_b"] = False  # deactivated in directory
    clock.now += 9.9
    assert cache.resolve("agy_1", to("stf_a", "stf_b")).staff_ids == ["stf_a", "stf_b"]  # within the bound
    clock.now += 0.1
    assert cache.resolve("agy_1", to("stf_a", "stf_b")).staff_ids == ["stf_a"]
    assert len(directory.calls) == 2


def test_unknown_ids_are_never_remembered(setup):
    directory, clock, cache = setup
    with pytest.raises(InvalidInput):
        cache.resolve("agy_1", to("stf_a", "stf_new")).require_known()
    directory.staff["stf_new"] = True  # created meanwhile: a recipient at once
    assert cache.resolve("agy_1", to("stf_a", "stf_new")).staff_ids == ["stf_a", "stf_new"]
    del directory.staff["stf_new"]
    directory.staff["stf_gone"] = True
    cache.resolve("agy_1", to("stf_gone"))
    del directory.staff["stf_gone"]  # removed (or moved to another agency): still within the bound
    clock.now += 10
    assert cache.resolve("agy_1", to("stf_gone")).missing_staff_ids == ["stf_gone"]
    assert len(directory.calls) == 4


def test_one_unseen_id_sends_the_whole_request_to_directory(setup):
    directory, clock, cache = setup
    cache.resolve("agy_1", to("stf_a"))
    assert cache.resolve("agy_1", to("stf_a", "stf_b")).staff_ids == ["stf_a", "stf_b"]
    assert directory.calls[-1] == to("stf_a", "stf_b")


def test_agencies_do_not_share_answers(setup):
    directory, clock, cache = setup
    cache.resolve("agy_1", to("stf_a"))
    cache.resolve("agy_2", to("stf_a"))
    assert len(directory.calls) == 2


def test_teams_and_the_whole_agency_always_ask_directory(setup):
    directory, clock, cache = setup
    cache.resolve("agy_1", to("stf_a"))
    for addressing in (Addressing(staff_ids=("stf_a",), team_ids=("team_x",)), Addressing(whole_agency=True)):
        cache.resolve("agy_1", addressing)
        cache.resolve("agy_1", addressing)
    assert len(directory.calls) == 5


def test_zero_turns_it_off():
    directory = Directory({"stf_a": True})
    cache = RecipientCache(directory.resolve, 0.0, clock=Clock())
    cache.resolve("agy_1", to("stf_a"))
    cache.resolve("agy_1", to("stf_a"))
    assert len(directory.calls) == 2


def test_memory_is_bounded():
    directory, clock = Directory({f"stf_{n}": True for n in range(30)}), Clock()
    cache = RecipientCache(directory.resolve, 10.0, clock=clock, max_ids=10)
    for n in range(30):
        cache.resolve("agy_1", to(f"stf_{n}"))
    assert len(cache._seen) <= 10
    cache.resolve("agy_1", to("stf_29"))
    assert len(directory.calls) == 30  # the newest answer is still remembered
