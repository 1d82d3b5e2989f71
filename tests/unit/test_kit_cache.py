"""The kit's TtlCache: fresh for its time from before the load, bounded, off at 0, thread-safe."""

from __future__ import annotations

import threading

import pytest

from services.kit.auth import Identity, current_identity
from services.kit.cache import TtlCache
from services.kit.service_identity import acting_as
from tests.helpers import Clock


def counting_loader(answers: list[str]):
    calls: list[str] = []

    def load(key: str):
        def _load() -> str:
            calls.append(key)
            return answers[len(calls) - 1]

        return _load

    return load, calls


def test_an_answer_is_reused_until_its_time_is_up_then_asked_again():
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(30.0, clock=clock)
    load, calls = counting_loader(["first", "second"])
    assert cache.get_or_load("agy_a", load("agy_a")) == "first"
    clock.now += 29.9
    assert cache.get_or_load("agy_a", load("agy_a")) == "first"
    clock.now += 0.1
    assert cache.get_or_load("agy_a", load("agy_a")) == "second"
    assert calls == ["agy_a", "agy_a"]


def test_freshness_counts_from_before_the_load_so_a_slow_answer_is_not_kept_longer():
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(10.0, clock=clock)

    def slow() -> str:
        clock.now += 4.0  # directory took 4 s to answer
        return "answer"

    cache.get_or_load("agy_a", slow)
    clock.now += 6.0  # 10 s after the question was asked
    assert cache.get("agy_a") is None


def test_each_key_has_its_own_entry():
    cache: TtlCache[str, str] = TtlCache(60.0, clock=Clock())
    cache.put("agy_a", "A")
    cache.put("agy_b", "B")
    assert (cache.get("agy_a"), cache.get("agy_b"), cache.get("agy_c", "none")) == ("A", "B", "none")


def test_a_failed_load_stores_nothing():
    cache: TtlCache[str, str] = TtlCache(60.0, clock=Clock())

    def failing() -> str:
        raise RuntimeError("directory unavailable")

    with pytest.raises(RuntimeError):
        cache.get_or_load("agy_a", failing)
    assert len(cache) == 0
    assert cache.get_or_load("agy_a", lambda: "later") == "later"


def test_a_time_of_zero_turns_the_cache_off():
    cache: TtlCache[str, str] = TtlCache(0.0, clock=Clock())
    load, calls = counting_loader(["one", "two"])
    assert cache.get_or_load("agy_a", load("agy_a")) == "one"
    assert cache.get_or_load("agy_a", load("agy_a")) == "two"
    assert len(cache) == 0


def test_a_full_cache_drops_expired_entries_first_then_the_oldest():
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(10.0, max_entries=3, clock=clock)
    cache.put("old", 1)
    clock.now += 5.0
    cache.put("b", 2)
    cache.put("c", 3)
    clock.now += 5.0  # "old" has expired, b and c have not
    cache.put("d", 4)
    assert len(cache) == 3 and cache.get("b") == 2 and cache.get("c") == 3 and cache.get("d") == 4
    cache.put("e", 5)  # nothing expired: the least recently stored (b) goes
    assert cache.get("b") is None and [cache.get(k) for k in ("c", "d", "e")] == [3, 4, 5]
    cache.put("c", 33)  # storing again makes it the newest
    cache.put("f", 6)
    assert cache.get("d") is None and cache.get("c") == 33


def test_forget_and_clear():
    cache: TtlCache[str, int] = TtlCache(10.0, clock=Clock())
    cache.put("a", 1)
    cache.put("b", 2)
    cache.forget("a")
    assert cache.get("a") is None and cache.get("b") == 2
    cache.clear()
    assert len(cache) == 0


def test_many_threads_share_one_cache_within_its_bound():
    cache: TtlCache[int, int] = TtlCache(60.0, max_entries=50)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(2000):
                key = (i + offset) % 80
                assert cache.get_or_load(key, lambda k=key: k * 2) == key * 2
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(cache) <= 50


def test_max_entries_must_allow_one():
    with pytest.raises(ValueError):
        TtlCache(1.0, max_entries=0)


def test_refresh_ahead_answers_at_once_and_reloads_once_in_the_background():
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(30.0, clock=clock)
    release = threading.Event()
    calls: list[str] = []

    def load() -> str:
        calls.append("load")
        if len(calls) > 1:
            release.wait(5)  # the background reload is slow
        return f"answer {len(calls)}"

    assert cache.get_or_load("agy_a", load, refresh_after_s=15.0) == "answer 1"
    clock.now += 14.9
    assert cache.get_or_load("agy_a", load, refresh_after_s=15.0) == "answer 1"
    assert calls == ["load"]  # not yet old enough to reload
    clock.now += 0.2
    # Old enough: answered from the cache at once, one reload started, a second caller starts none.
    assert cache.get_or_load("agy_a", load, refresh_after_s=15.0) == "answer 1"
    assert cache.get_or_load("agy_a", load, refresh_after_s=15.0) == "answer 1"
    release.set()
    for _ in range(200):
        if cache.get("agy_a") == "answer 2":
            break
        threading.Event().wait(0.01)
    assert cache.get("agy_a") == "answer 2" and calls == ["load", "load"]
    # The reloaded answer is fresh from when its load started: 30 s more, no older answer ever served.
    clock.now += 29.9
    assert cache.get("agy_a") == "answer 2"


def test_a_failed_background_reload_leaves_the_entry_to_expire_and_load_again():
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(10.0, clock=clock)
    answers = iter(["first", RuntimeError("directory down"), "third"])

    def load() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert cache.get_or_load("k", load, refresh_after_s=5.0) == "first"
    clock.now += 6
    assert cache.get_or_load("k", load, refresh_after_s=5.0) == "first"  # reload fails in the background
    for _ in range(200):
        if not cache._refreshing:
            break
        threading.Event().wait(0.01)
    clock.now += 4
    assert cache.get_or_load("k", load, refresh_after_s=5.0) == "third"  # expired: its caller loads it


def test_a_background_reload_runs_as_its_caller_so_its_outgoing_calls_carry_the_identity():
    """A load that calls another service needs the caller's identity (the gRPC client refuses a
    call without one): the background reload sees the context of the call that started it."""
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(30.0, clock=clock)
    seen: list[str | None] = []
    reloaded = threading.Event()

    def load() -> str:
        identity = current_identity.get()
        seen.append(identity.subject if identity else None)
        if len(seen) > 1:
            reloaded.set()
        return f"answer {len(seen)}"

    with acting_as(Identity(subject="svc:notifications", agency_id="agy_a", kind="service", token="t")):
        assert cache.get_or_load("agy_a", load, refresh_after_s=15.0) == "answer 1"
        clock.now += 16
        assert cache.get_or_load("agy_a", load, refresh_after_s=15.0) == "answer 1"
    assert reloaded.wait(5)
    assert seen == ["svc:notifications", "svc:notifications"]


def test_age_counts_from_the_load_and_ends_with_the_entry():
    clock = Clock()
    cache: TtlCache[str, str] = TtlCache(10.0, clock=clock)
    assert cache.age("k") is None
    cache.put("k", "v")
    clock.now += 4
    assert cache.age("k") == 4
    clock.now += 6
    assert cache.age("k") is None  # expired
