"""Sign-in limits over IPv6, against directory's real app and database: one holder of an IPv6 /64 (a
subscriber's or a host's block) has one budget, however many of its addresses it signs in from; an
address of another /64 has its own. The security events still name the address each attempt came
from."""

from __future__ import annotations

import pytest

from services.kit.mongo import now_ms
from tests.integration.test_security_events_http import recorded
from tests.integration.test_sessions_sign_in_limits import WRONG, sign_in

BLOCK = "2001:db8:aa:bb"  # one /64
ELSEWHERE = "2001:db8:aa:bc::1"  # the next /64


def in_block(host: int) -> str:
    return f"{BLOCK}:{host:x}:{host:x}:{host:x}:{host:x}"


def test_every_address_of_one_64_spends_one_lockout_budget(dut):
    # Ten failures on the account, each from a different address of the attacker's /64 ...
    for host in range(1, 11):
        assert sign_in(dut, "nurse.kim", WRONG, peer=in_block(host)).status_code == 401
    # ... lock the account for the whole /64, from an address not used yet, the right password too,
    locked = sign_in(dut, "nurse.kim", peer=in_block(999))
    assert locked.status_code == 429 and locked.get_json()["code"] == "too_many_attempts"
    # while the nurse, elsewhere, signs in as usual.
    assert sign_in(dut, "nurse.kim", peer=ELSEWHERE).status_code == 200
    [lock] = recorded(dut.store.db, "account_locked")
    assert lock.source == in_block(10)  # the address itself, not the block
    assert {e.source for e in recorded(dut.store.db, "sign_in_failed")} == {in_block(h) for h in range(1, 11)}


@pytest.mark.parametrize("directory_overrides", [{"LOGIN_SOURCE_ATTEMPTS_PER_MINUTE": "3"}])
def test_two_addresses_of_one_64_share_the_per_minute_budget(dut):
    minute_start = now_ms() // 60_000 * 60_000 + 1_000  # one minute for every attempt
    dut.directory.sessions.clock = lambda: minute_start
    first, second = f"{BLOCK}::1", f"{BLOCK}:ffff:ffff:ffff:fffe"
    answers = [sign_in(dut, "nurse.kim", peer=peer).status_code for peer in (first, second, first, second)]
    assert answers == [200, 200, 200, 429]
    assert sign_in(dut, "nurse.kim", peer=ELSEWHERE).status_code == 200
    [throttled] = recorded(dut.store.db, "sign_in_throttled")
    assert (throttled.reason, throttled.source) == ("source_rate_limit", second)


def test_ipv4_addresses_are_still_counted_one_by_one(dut):
    for _ in range(10):
        assert sign_in(dut, "nurse.kim", WRONG, peer="203.0.113.9").status_code == 401
    assert sign_in(dut, "nurse.kim", peer="203.0.113.9").status_code == 429
    assert sign_in(dut, "nurse.kim", peer="203.0.113.10").status_code == 200
