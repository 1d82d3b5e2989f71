"""Revoked sessions: how long they are remembered, and the verifier's refusal of their tokens."""

from __future__ import annotations

import functools
import threading

import pytest

from services.directory import tokens
from services.kit.auth import AuthError, RevokedSessions, StaticKeySource, TokenVerifier
from tests.helpers import Clock


@functools.cache
def keys() -> tokens.KeySet:
    return tokens.KeySet.from_pem(tokens.generate_private_key_pem())


def staff_token(session_id: str = "ses_a", agency_id: str = "agy_riverbend") -> str:
    return tokens.issue_access_token(
        keys(),
        staff_id="stf_riverbend_kim",
        agency_id=agency_id,
        roles=["staff"],
        name="Jordan Kim, RN",
        session_id=session_id,
        ttl_s=900,
    ).token


def verifier(revoked=None) -> TokenVerifier:
    return TokenVerifier(StaticKeySource(keys().verification_keys), revoked=revoked)


def test_a_revoked_session_is_remembered_until_its_tokens_have_expired_plus_grace():
    clock = Clock()
    revoked = RevokedSessions(grace_ms=60_000, clock=clock)
    revoked.revoke("ses_a", clock.ms + 900_000)
    assert revoked.is_revoked("ses_a") and not revoked.is_revoked("ses_b")
    clock.advance(900 + 59)
    assert revoked.is_revoked("ses_a")
    clock.advance(1)
    assert not revoked.is_revoked("ses_a")
    assert len(revoked) == 0  # dropped when found expired


def test_a_later_expiry_wins_and_an_earlier_one_never_shortens():
    clock = Clock()
    revoked = RevokedSessions(grace_ms=0, clock=clock)
    revoked.revoke("ses_a", clock.ms + 10_000)
    revoked.revoke("ses_a", clock.ms + 5_000)  # e.g. the bootstrap listing an older copy
    clock.advance(7)
    assert revoked.is_revoked("ses_a")
    revoked.revoke("ses_a", clock.ms + 10_000)
    clock.advance(5)
    assert revoked.is_revoked("ses_a")


def test_expired_entries_are_pruned_as_new_ones_arrive():
    clock = Clock()
    revoked = RevokedSessions(grace_ms=0, clock=clock, prune_every_s=0)
    for i in range(100):
        revoked.revoke(f"ses_{i}", clock.ms + 1_000)
    assert len(revoked) == 100
    clock.advance(2)
    revoked.revoke("ses_new", clock.ms + 1_000)
    assert len(revoked) == 1
    clock.advance(2)
    assert revoked.prune() == 1 and len(revoked) == 0


def test_empty_session_ids_are_never_revoked():
    revoked = RevokedSessions()
    revoked.revoke("", 2**50)
    assert not revoked.is_revoked("") and len(revoked) == 0


def test_concurrent_revocations_and_checks():
    revoked = RevokedSessions(prune_every_s=0)
    far = 2**50

    def work(n: int) -> None:
        for i in range(500):
            revoked.revoke(f"ses_{n}_{i}", far)
            assert revoked.is_revoked(f"ses_{n}_{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(revoked) == 8 * 500


def test_the_verifier_refuses_a_revoked_sessions_token():
    revoked = RevokedSessions()
    check = verifier(revoked)
    token, other = staff_token("ses_a"), staff_token("ses_b")
    assert check.verify(token).session_id == "ses_a"
    revoked.revoke("ses_a", 2**50)
    with pytest.raises(AuthError) as caught:
        check.verify(token)
    assert caught.value.code == "session_revoked"
    assert check.verify(other).session_id == "ses_b"
    assert verifier().verify(token).session_id == "ses_a"  # without a revocation source: signature rules only


def test_the_revocation_check_is_not_consulted_for_bad_tokens():
    class Counting:
        calls = 0

        def is_revoked(self, session_id: str) -> bool:
            Counting.calls += 1
            return False

    with pytest.raises(AuthError):
        verifier(Counting()).verify(staff_token()[:-3] + "AAA")
    assert Counting.calls == 0


def test_service_tokens_may_be_platform_scope_staff_tokens_may_not():
    platform = tokens.issue_service_token(keys(), client_id="inbox", agency_id="", ttl_s=900).token
    identity = verifier(RevokedSessions()).verify(platform)
    assert identity.kind == "service" and identity.agency_id == "" and identity.subject == "svc:inbox"
    assert identity.roles == frozenset({"service"}) and identity.session_id == ""
    scoped = verifier().verify(tokens.issue_service_token(keys(), client_id="inbox", agency_id="agy_x", ttl_s=60).token)
    assert scoped.agency_id == "agy_x"
    with pytest.raises(AuthError) as caught:
        verifier().verify(staff_token(agency_id=""))
    assert caught.value.code == "invalid_token"
