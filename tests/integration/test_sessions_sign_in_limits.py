"""Sign-in limits per client address over the directory's real HTTP app and database: an attacker
cannot lock the real user out from elsewhere, brute force from one address is still stopped, the
address is taken from X-Forwarded-For only as far as trusted hops vouch for it, the budget is one
for every replica, and every sign-in leaves a security event without what was typed."""

from __future__ import annotations

import json

import jwt
import pytest

from clinic.audit.v1 import security_pb2
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.outbox import OUTBOX
from services.kit.security_events import COLLECTION
from tests.helpers import DEMO_PASSWORD
from tests.integration.directory_fixtures import start_directory

ATTACKER = "203.0.113.9"
NURSE_AT_WORK = "198.51.100.7"
WRONG = "not-the-password!"


def sign_in(dut, username: str, password: str = DEMO_PASSWORD, *, peer: str, real_ip: str | None = None):
    headers = {"X-Real-IP": real_ip} if real_ip is not None else {}
    return dut.client.post(
        "/api/v1/auth/token",
        json={"username": username, "password": password},
        headers=headers,
        environ_base={"REMOTE_ADDR": peer},
    )


def security_events(dut) -> list[security_pb2.SecurityEvent]:
    """The security events staged in directory's outbox so far, in the order recorded."""
    found = []
    for doc in dut.store.db[COLLECTION].find({}).sort("at", 1):
        for entry in (doc.get(OUTBOX) or {}).values():
            found.append(unpack(decode_envelope(bytes(entry["env"])), security_pb2.SecurityEvent))
    return found


def of_kind(dut, kind: str) -> list[security_pb2.SecurityEvent]:
    return [event for event in security_events(dut) if event.kind == kind]


def test_an_attacker_cannot_lock_out_the_user_signing_in_from_elsewhere(dut):
    for _ in range(10):
        assert sign_in(dut, "nurse.kim", WRONG, peer=ATTACKER).status_code == 401
    # The attacker's address is locked out of the account, even with the right password ...
    locked = sign_in(dut, "nurse.kim", peer=ATTACKER)
    assert locked.status_code == 429 and locked.get_json()["code"] == "too_many_attempts"
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    # ... while the nurse, at her own workstation, signs in as usual.
    assert sign_in(dut, "nurse.kim", peer=NURSE_AT_WORK).status_code == 200
    [lock] = of_kind(dut, "account_locked")
    assert (lock.target_id, lock.agency_id, lock.source) == ("stf_riverbend_kim", "agy_riverbend", ATTACKER)


def test_brute_force_from_one_address_is_stopped_before_any_password_check(dut, monkeypatch):
    for _ in range(10):
        sign_in(dut, "dr.reyes", WRONG, peer=ATTACKER)
    monkeypatch.setattr(dut.directory.hasher, "verify", lambda *args: pytest.fail("no password check expected"))
    for password in (WRONG, DEMO_PASSWORD):
        assert sign_in(dut, "dr.reyes", password, peer=ATTACKER).status_code == 429


def test_a_forged_client_address_does_not_give_the_attacker_a_fresh_one(dut):
    # Straight to the service's port: the header of an untrusted peer is ignored altogether.
    for n in range(10):
        reply = sign_in(dut, "nurse.kim", WRONG, peer=ATTACKER, real_ip=f"192.0.2.{n}")
        assert reply.status_code == 401
    assert sign_in(dut, "nurse.kim", peer=ATTACKER, real_ip="192.0.2.200").status_code == 429
    # Through a trusted hop (the gateway on loopback), which states the address it was connected from.
    assert sign_in(dut, "nurse.kim", peer="127.0.0.1", real_ip=ATTACKER).status_code == 429
    assert sign_in(dut, "nurse.kim", peer="127.0.0.1", real_ip=NURSE_AT_WORK).status_code == 200
    assert {e.source for e in of_kind(dut, "sign_in_failed")} == {ATTACKER}


@pytest.mark.parametrize("directory_overrides", [{"LOGIN_SOURCE_MAX_FAILURES": "5"}])
def test_guessing_across_many_accounts_from_one_address_throttles_that_address(dut):
    for n in range(5):
        assert sign_in(dut, f"guess.{n}", WRONG, peer=ATTACKER).status_code == 401
    assert sign_in(dut, "admin", peer=ATTACKER).status_code == 429
    assert sign_in(dut, "admin", peer=NURSE_AT_WORK).status_code == 200
    throttled = of_kind(dut, "sign_in_throttled")
    assert throttled and {(e.reason, e.source) for e in throttled} == {("source_failure_limit", ATTACKER)}


def test_every_replica_spends_one_budget(mongo_uri, db_name, tmp_path):
    """Two directory replicas on one database: the per-address budget is the database's, not a process's."""
    first = start_directory(mongo_uri, db_name, tmp_path, LOGIN_SOURCE_ATTEMPTS_PER_MINUTE="4")
    second = start_directory(mongo_uri, db_name, tmp_path, seed=False, LOGIN_SOURCE_ATTEMPTS_PER_MINUTE="4")
    minute_start = now_ms() // 60_000 * 60_000 + 1_000  # one minute for every attempt
    for replica in (first, second):
        replica.directory.sessions.clock = lambda: minute_start
    answers = [sign_in(replica, "nurse.kim", peer=ATTACKER).status_code for replica in (first, second) * 3]
    assert answers == [200, 200, 200, 200, 429, 429]
    refused = sign_in(first, "nurse.kim", peer=ATTACKER)
    assert 55 <= int(refused.headers["Retry-After"]) <= 60
    assert sign_in(second, "nurse.kim", peer=NURSE_AT_WORK).status_code == 200
    [throttled] = of_kind(first, "sign_in_throttled")  # once a minute, not once per refused request
    assert (throttled.reason, throttled.source) == ("source_rate_limit", ATTACKER)


def test_sign_ins_are_recorded_with_the_address_and_never_what_was_typed(dut):
    typed_username, typed_password = "My-Secret-Passphrase-9", "Typed-Wrong-Password-1"
    granted = sign_in(dut, "dr.reyes", peer=NURSE_AT_WORK).get_json()
    assert sign_in(dut, "dr.reyes", typed_password, peer=NURSE_AT_WORK).status_code == 401
    assert sign_in(dut, typed_username, typed_password, peer=ATTACKER).status_code == 401
    assert sign_in(dut, "former.young", peer=NURSE_AT_WORK).status_code == 401

    [succeeded] = of_kind(dut, "sign_in_succeeded")
    assert succeeded.actor_id == "stf_riverbend_reyes" and succeeded.actor_kind == "staff"
    assert succeeded.agency_id == "agy_riverbend" and succeeded.outcome == "succeeded"
    assert succeeded.target_type == "session" and succeeded.target_id.startswith("ses_")
    assert succeeded.source == NURSE_AT_WORK and succeeded.service == "directory"
    assert granted["staff"]["id"] == succeeded.actor_id
    failed = {e.reason: e for e in of_kind(dut, "sign_in_failed")}
    assert set(failed) == {"bad_password", "unknown_account", "account_inactive"}
    assert failed["bad_password"].actor_id == "stf_riverbend_reyes" and failed["bad_password"].outcome == "refused"
    unknown = failed["unknown_account"]
    assert (unknown.actor_id, unknown.actor_kind, unknown.agency_id, unknown.source) == ("", "anonymous", "", ATTACKER)
    stored = json.dumps(list(dut.store.db[COLLECTION].find({})), default=str).lower()
    text = " ".join(str(e) for e in security_events(dut)).lower()
    for secret in (typed_username.lower(), typed_password.lower(), DEMO_PASSWORD.lower()):
        assert secret not in stored and secret not in text


def test_sign_out_and_a_replayed_refresh_token_are_recorded(dut):
    first = sign_in(dut, "nurse.kim", peer=NURSE_AT_WORK).get_json()
    reply = dut.client.post(
        "/api/v1/auth/logout", json={"refresh_token": first["refresh_token"]}, environ_base={"REMOTE_ADDR": ATTACKER}
    )
    assert reply.status_code == 204
    [signed_out] = of_kind(dut, "signed_out")
    assert (signed_out.actor_id, signed_out.reason, signed_out.source) == ("stf_riverbend_kim", "logout", ATTACKER)
    second = sign_in(dut, "nurse.kim", peer=NURSE_AT_WORK).get_json()
    refresh = {"refresh_token": second["refresh_token"]}
    assert dut.client.post("/api/v1/auth/refresh", json=refresh).status_code == 200
    assert dut.client.post("/api/v1/auth/refresh", json=refresh).status_code == 401  # a replay
    [revoked] = of_kind(dut, "session_revoked")
    assert (revoked.reason, revoked.target_type) == ("refresh_token_reuse", "session")
    assert revoked.target_id == jwt.decode(second["access_token"], options={"verify_signature": False})["sid"]
