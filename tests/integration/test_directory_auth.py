"""Sign-in, tokens, refresh rotation and sign-out over the directory's real HTTP app and database."""

from __future__ import annotations

import base64
import hashlib
import json

import jwt
import pytest

from services.directory import tokens
from services.kit.auth import AUDIENCE, ISSUER, AuthError, StaticKeySource, TokenVerifier
from services.kit.outbox import OUTBOX
from tests.helpers import DEMO_PASSWORD, bearer
from tests.integration.directory_fixtures import start_directory

NEW_PASSWORD = "a-brand-new-passphrase"
KIM = "/api/v1/directory/staff/stf_riverbend_kim"


def during_the_password_check(dut, monkeypatch, action) -> None:
    """Run `action` once, right after the next password verification and before sign-in goes on."""
    hasher = dut.directory.hasher
    verify = hasher.verify
    done = []

    def verify_then_act(password_hash, password):
        verified = verify(password_hash, password)
        if not done:
            done.append(True)
            action()
        return verified

    monkeypatch.setattr(hasher, "verify", verify_then_act)


class Recorder:
    """Stands in for a pymongo collection: delegates everything and records the calls and what reads returned."""

    def __init__(self, collection):
        self._collection = collection
        self.calls: list[str] = []
        self.read: list[dict] = []

    def __getattr__(self, name):
        attribute = getattr(self._collection, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            self.calls.append(name)
            result = attribute(*args, **kwargs)
            if isinstance(result, dict):
                self.read.append(result)
            return result

        return call


def _jwks_verifier(jwks: dict) -> TokenVerifier:
    keys = {k["kid"]: jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(k)) for k in jwks["keys"]}
    return TokenVerifier(StaticKeySource(lambda: keys))


def test_sign_in_returns_a_bearer_token_a_refresh_token_and_the_staff_member(dut):
    response = dut.sign_in("dr.reyes")
    assert response.status_code == 200
    body = response.get_json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert len(body["refresh_token"]) >= 43
    assert body["staff"] == {
        "id": "stf_riverbend_reyes",
        "agency_id": "agy_riverbend",
        "display_name": "Dr. Elena Reyes",
        "roles": ["staff", "prescriber"],
    }


def test_access_token_carries_the_agreed_claims_and_verifies_with_the_kit_verifier(dut):
    token = dut.sign_in("admin").get_json()["access_token"]
    identity = dut.directory.verifier.verify(token)
    assert identity.staff_id == "stf_riverbend_admin"
    assert identity.agency_id == "agy_riverbend"
    assert identity.roles == {"staff", "admin"}
    assert identity.kind == "staff"
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == dut.directory.settings.signing_keys.active.kid
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER == "clinic-directory"
    assert claims["aud"] == AUDIENCE == "clinic-message-board"
    assert claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == 900
    assert claims["nbf"] == claims["iat"]
    assert claims["name"] == "Alex Morgan"
    assert claims["sid"] == identity.session_id and claims["sid"].startswith("ses_")
    assert claims["jti"]


def test_jwks_holds_the_active_key_and_verifies_issued_tokens(dut):
    jwks = dut.client.get("/api/v1/auth/jwks").get_json()
    assert dut.client.get("/.well-known/jwks.json").get_json() == jwks
    active = dut.directory.settings.signing_keys.active.kid
    [key] = [k for k in jwks["keys"] if k["kid"] == active]
    assert key["kty"] == "RSA" and key["use"] == "sig" and key["alg"] == "RS256"
    assert set(key) == {"kty", "kid", "use", "alg", "n", "e"}
    token = dut.token("nurse.kim")
    assert _jwks_verifier(jwks).verify(token).staff_id == "stf_riverbend_kim"


def test_a_tampered_token_fails_verification_and_is_refused(dut):
    token = dut.token("nurse.kim")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["staff", "admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    tampered = f"{header}.{forged}.{signature}"
    with pytest.raises(AuthError):
        dut.directory.verifier.verify(tampered)
    response = dut.client.get("/api/v1/directory/me", headers={"Authorization": f"Bearer {tampered}"})
    assert response.status_code == 401
    assert response.get_json()["code"] == "invalid_token"


def test_unknown_username_and_wrong_password_get_the_same_answer(dut):
    unknown = dut.sign_in("nobody.here", "whatever-password-1")
    wrong = dut.sign_in("dr.reyes", "not-the-password")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.get_json() == wrong.get_json()
    assert unknown.get_json()["code"] == "invalid_credentials"


def test_deactivated_staff_cannot_sign_in(dut):
    response = dut.sign_in("former.young")
    assert response.status_code == 401
    assert response.get_json()["code"] == "invalid_credentials"


def test_username_is_case_insensitive(dut):
    assert dut.sign_in("  Dr.Reyes ").status_code == 200


def test_repeated_failures_lock_the_username_for_a_while(dut):
    for _ in range(10):
        assert dut.sign_in("nurse.kim", "wrong-password!").status_code == 401
    locked = dut.sign_in("nurse.kim", DEMO_PASSWORD)
    assert locked.status_code == 429
    assert locked.get_json()["code"] == "too_many_attempts"
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    assert dut.sign_in("NURSE.KIM", DEMO_PASSWORD).status_code == 429
    assert dut.sign_in("dr.reyes").status_code == 200


def test_unknown_usernames_are_locked_like_real_ones(dut):
    for _ in range(10):
        dut.sign_in("ghost.user", "wrong-password!")
    assert dut.sign_in("ghost.user", "wrong-password!").status_code == 429


def test_a_successful_sign_in_clears_earlier_failures(dut):
    for _ in range(9):
        dut.sign_in("nurse.kim", "wrong-password!")
    assert dut.sign_in("nurse.kim").status_code == 200
    for _ in range(9):
        dut.sign_in("nurse.kim", "wrong-password!")
    assert dut.sign_in("nurse.kim").status_code == 200


def test_the_lock_ends_after_the_lockout_period(mongo_uri, db_name, tmp_path):
    dut = start_directory(mongo_uri, db_name, tmp_path, LOGIN_MAX_FAILURES="2", LOGIN_LOCKOUT_S="1")
    clock = {"now": 1_000_000}
    dut.directory.sessions.clock = lambda: clock["now"]
    dut.sign_in("nurse.kim", "wrong-password!")
    dut.sign_in("nurse.kim", "wrong-password!")
    assert dut.sign_in("nurse.kim").status_code == 429
    clock["now"] += 1_001
    assert dut.sign_in("nurse.kim").status_code == 200


def test_refresh_rotates_the_refresh_token(dut):
    first = dut.sign_in("dr.reyes").get_json()
    response = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert response.status_code == 200
    second = response.get_json()
    assert second["refresh_token"] != first["refresh_token"]
    claims = jwt.decode(second["access_token"], options={"verify_signature": False})
    assert claims["sid"] == jwt.decode(first["access_token"], options={"verify_signature": False})["sid"]
    assert dut.directory.verifier.verify(second["access_token"]).staff_id == "stf_riverbend_reyes"
    third = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert third.status_code == 200


def test_reusing_a_rotated_refresh_token_revokes_the_whole_session(dut):
    first = dut.sign_in("dr.reyes").get_json()
    second = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}).get_json()
    replay = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replay.status_code == 401
    assert replay.get_json()["code"] == "invalid_refresh_token"
    # The legitimate holder's newer token dies with the session.
    after = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert after.status_code == 401
    # Other sessions of the same person are untouched.
    other = dut.sign_in("dr.reyes").get_json()
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]}).status_code == 200


def test_an_unknown_refresh_token_is_refused(dut):
    response = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 43})
    assert response.status_code == 401
    assert response.get_json()["code"] == "invalid_refresh_token"


def test_refresh_tokens_are_stored_only_as_hashes(dut):
    refresh_token = dut.sign_in("dr.reyes").get_json()["refresh_token"]
    stored = list(dut.store.refresh_tokens.find({}))
    assert stored and all(refresh_token not in json.dumps(doc, default=str) for doc in stored)


def test_logout_ends_the_session(dut):
    grant = dut.sign_in("dr.reyes").get_json()
    response = dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
    assert response.status_code == 204
    refreshed = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert refreshed.status_code == 401
    again = dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
    assert again.status_code == 204


def test_session_ends_after_its_lifetime(mongo_uri, db_name, tmp_path):
    dut = start_directory(mongo_uri, db_name, tmp_path, REFRESH_TOKEN_TTL_S="300")
    clock = {"now": 1_000_000}
    dut.directory.sessions.clock = lambda: clock["now"]
    grant = dut.sign_in("dr.reyes").get_json()
    clock["now"] += 300_000
    response = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert response.status_code == 401


def test_deactivating_staff_ends_their_sessions(dut):
    grant = dut.sign_in("nurse.kim").get_json()
    assert dut.client.get("/api/v1/directory/me", headers=bearer(grant["access_token"])).status_code == 200
    admin = dut.as_user("admin")
    patched = dut.client.patch("/api/v1/directory/staff/stf_riverbend_kim", json={"active": False}, headers=admin)
    assert patched.status_code == 200 and patched.get_json()["active"] is False
    refused = dut.client.get("/api/v1/directory/me", headers=bearer(grant["access_token"]))
    assert refused.status_code == 401 and refused.get_json()["code"] == "session_revoked"
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]}).status_code == 401
    assert dut.sign_in("nurse.kim").status_code == 401


def test_a_password_reset_ends_sessions_and_the_new_password_works(dut):
    grant = dut.sign_in("nurse.kim").get_json()
    admin = dut.as_user("admin")
    new_password = "a-brand-new-passphrase"
    patched = dut.client.patch(
        "/api/v1/directory/staff/stf_riverbend_kim", json={"password": new_password}, headers=admin
    )
    assert patched.status_code == 200
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]}).status_code == 401
    assert dut.sign_in("nurse.kim").status_code == 401
    assert dut.sign_in("nurse.kim", new_password).status_code == 200


def test_operator_objects_are_rejected_before_any_lookup(dut):
    response = dut.client.post("/api/v1/auth/token", json={"username": {"$gt": ""}, "password": {"$gt": ""}})
    assert response.status_code == 400
    body = response.get_json()
    assert body["code"] == "invalid_type"
    assert "access_token" not in body
    assert dut.store.login_attempts.find_one({}) is None
    refresh = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": {"$ne": None}})
    assert refresh.status_code == 400


def test_malformed_json_is_400(dut):
    response = dut.client.post(
        "/api/v1/auth/token", data='{"username": "admin", ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.get_json()["code"] == "malformed_json"


def test_unknown_fields_are_400(dut):
    response = dut.client.post(
        "/api/v1/auth/token", json={"username": "admin", "password": DEMO_PASSWORD, "agency_id": "agy_lakeside"}
    )
    assert response.status_code == 400
    assert response.get_json()["code"] == "unknown_field"


def test_missing_fields_are_400_and_wrong_media_type_is_415(dut):
    assert dut.client.post("/api/v1/auth/token", json={"username": "admin"}).get_json()["code"] == "missing_field"
    response = dut.client.post("/api/v1/auth/token", data="username=admin", content_type="text/plain")
    assert response.status_code == 415
    assert response.get_json()["code"] == "unsupported_media_type"


def test_password_hashes_made_with_old_parameters_are_upgraded_at_sign_in(dut):
    import argon2

    old = argon2.PasswordHasher(time_cost=1, memory_cost=512, parallelism=1).hash(DEMO_PASSWORD)
    assert dut.store.rehash_password("stf_riverbend_kim", dut.store.credentials("nurse.kim").password_hash, old)
    earlier = dut.sign_in("nurse.kim").get_json()  # verified against the old hash, which it upgrades
    stored = dut.store.staff.find_one({"_id": {"$eq": "stf_riverbend_kim"}})["password_hash"]
    assert stored != old and stored.startswith("$argon2id$")
    assert dut.sign_in("nurse.kim").status_code == 200
    # An upgrade is not a password change: the session goes on.
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": earlier["refresh_token"]}).status_code == 200


def test_an_upgrade_never_overwrites_a_password_reset_made_meanwhile(dut):
    checked = dut.store.credentials("nurse.kim").password_hash
    reset = dut.directory.hasher.hash(NEW_PASSWORD)
    member = dut.store.get_staff("agy_riverbend", "stf_riverbend_kim")
    dut.store.save_staff(member, reset)
    assert not dut.store.rehash_password("stf_riverbend_kim", checked, dut.directory.hasher.hash(DEMO_PASSWORD))
    assert dut.store.credentials("nurse.kim").password_hash == reset


# --- a password reset or deactivation while a sign-in checks the password ------------------------


@pytest.mark.parametrize(
    ("change", "reason"), [({"password": NEW_PASSWORD}, "password_reset"), ({"active": False}, "staff_deactivated")]
)
def test_a_change_made_while_the_password_is_checked_ends_the_new_session(dut, monkeypatch, change, reason):
    admin = dut.as_user("admin")
    patched = []
    during_the_password_check(
        dut, monkeypatch, lambda: patched.append(dut.client.patch(KIM, json=change, headers=admin))
    )

    response = dut.sign_in("nurse.kim")  # the password as it was when checked

    assert patched[0].status_code == 200
    assert response.status_code == 401 and response.get_json()["code"] == "invalid_credentials"
    [session] = dut.store.sessions.find({"staff_id": {"$eq": "stf_riverbend_kim"}})
    assert session["revoked_at"] and session["revoked_reason"] == reason
    assert list(session[OUTBOX]) == [f"{session['_id']}-revoked"]  # announced like any revocation
    assert dut.store.refresh_tokens.find_one({"session_id": {"$eq": session["_id"]}}) is None


def test_a_change_made_after_the_new_session_was_checked_is_swept_as_usual(dut):
    admin = dut.as_user("admin")
    grant = dut.sign_in("nurse.kim").get_json()
    dut.client.patch(KIM, json={"password": NEW_PASSWORD}, headers=admin)
    refused = dut.client.get("/api/v1/directory/me", headers=bearer(grant["access_token"]))
    assert refused.get_json()["code"] == "session_revoked"
    assert dut.sign_in("nurse.kim", NEW_PASSWORD).status_code == 200


def test_a_demotion_made_while_the_password_is_checked_is_in_the_new_token(dut, monkeypatch):
    admin = dut.as_user("admin")
    dut.client.patch("/api/v1/directory/staff/stf_riverbend_ortiz", json={"roles": ["staff", "admin"]}, headers=admin)
    during_the_password_check(
        dut,
        monkeypatch,
        lambda: dut.client.patch(
            "/api/v1/directory/staff/stf_riverbend_ortiz", json={"roles": ["staff"]}, headers=admin
        ),
    )
    grant = dut.sign_in("compliance.ortiz").get_json()
    assert grant["staff"]["roles"] == ["staff"]
    assert jwt.decode(grant["access_token"], options={"verify_signature": False})["roles"] == ["staff"]
    refused = dut.client.patch("/api/v1/directory/agency", json={"name": "Mine"}, headers=bearer(grant["access_token"]))
    assert refused.status_code == 403


def test_refresh_refuses_a_session_opened_before_the_password_changed(dut):
    grant = dut.sign_in("nurse.kim").get_json()
    # A password change whose sweep of the member's sessions never ran (say the process stopped in between).
    member = dut.store.get_staff("agy_riverbend", "stf_riverbend_kim")
    dut.store.save_staff(member, dut.directory.hasher.hash(NEW_PASSWORD))

    response = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})

    assert response.status_code == 401 and response.get_json()["code"] == "invalid_refresh_token"
    sid = jwt.decode(grant["access_token"], options={"verify_signature": False})["sid"]
    assert dut.store.get_session(sid)["revoked_reason"] == "password_reset"
    refused = dut.client.get("/api/v1/directory/me", headers=bearer(grant["access_token"]))
    assert refused.get_json()["code"] == "session_revoked"


def test_refresh_still_works_for_a_session_stored_without_a_password_version(dut):
    grant = dut.sign_in("nurse.kim").get_json()
    sid = jwt.decode(grant["access_token"], options={"verify_signature": False})["sid"]
    dut.store.sessions.update_one({"_id": {"$eq": sid}}, {"$unset": {"password_changed_at": ""}})
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]}).status_code == 200


# --- failed sign-ins are kept without what was typed ---------------------------------------------


def test_failed_sign_ins_store_neither_the_username_nor_the_typed_password(dut):
    typed = [
        ("Dr.Reyes", "Typed-Password-1"),
        ("My-Secret-Passphrase", "nurse.kim"),  # a password typed into the username field, and the other way round
    ]
    for username, password in typed:
        assert dut.sign_in(username, password).status_code == 401
    stored = list(dut.store.login_attempts.find({}))
    assert len(stored) == 2
    text = json.dumps(stored, default=str).lower()
    for username, password in typed:
        for secret in (username.lower(), password.lower()):
            assert secret not in text
            assert hashlib.sha256(secret.encode()).hexdigest() not in text  # not an unkeyed, guessable hash
    # The keyed ids still lock the username however it is typed.
    for _ in range(9):
        dut.sign_in("DR.REYES ", "Typed-Password-1")
    assert dut.sign_in("dr.reyes").status_code == 429


def test_failed_sign_ins_stored_under_the_typed_username_are_dropped_at_start(dut):
    dut.sign_in("nurse.kim", "wrong-password!")
    dut.store.login_attempts.insert_one({"_id": "dr.reyes", "failures": 3, "window_started_at": 1, "locked_until": 0})
    dut.store.ensure_indexes()
    [kept] = list(dut.store.login_attempts.find({}))
    assert kept["_id"] != "dr.reyes" and kept["failures"] == 1


def test_spent_login_attempt_records_are_ignored_and_removed(mongo_uri, db_name, tmp_path):
    dut = start_directory(
        mongo_uri, db_name, tmp_path, LOGIN_MAX_FAILURES="2", LOGIN_FAILURE_WINDOW_S="60", LOGIN_LOCKOUT_S="120"
    )
    clock = {"now": 1_000_000}
    dut.directory.sessions.clock = lambda: clock["now"]
    for _ in range(2):
        dut.sign_in("ghost.locked", "wrong-password!")
    dut.sign_in("ghost.once", "wrong-password!")
    assert dut.store.login_attempts.count_documents({}) == 2
    clock["now"] += 61_000  # ghost.once's window has passed, ghost.locked's lock has not
    dut.sign_in("ghost.new", "wrong-password!")
    assert dut.store.login_attempts.count_documents({}) == 2
    assert dut.sign_in("ghost.locked", "wrong-password!").status_code == 429
    clock["now"] += 60_000  # and now the lock too
    assert dut.sign_in("ghost.locked", "wrong-password!").status_code == 401  # a new window: the old one is gone
    assert dut.store.login_attempts.count_documents({}) == 1


def test_passwords_longer_than_any_password_can_be_are_refused_before_hashing(dut, monkeypatch):
    monkeypatch.setattr(dut.directory.hasher, "verify", lambda *args: pytest.fail("no password check expected"))
    response = dut.sign_in("nurse.kim", "x" * 257)
    assert response.status_code == 400 and response.get_json()["code"] == "too_long"


# --- fewer reads ------------------------------------------------------------------------------------


def test_refresh_spends_the_token_in_one_read_and_only_a_replay_reads_again(dut):
    grant = dut.sign_in("nurse.kim").get_json()
    recorder = Recorder(dut.store.refresh_tokens)
    dut.store.refresh_tokens = recorder

    fresh = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert fresh.status_code == 200
    assert recorder.calls == ["find_one_and_update", "insert_one"]

    recorder.calls.clear()
    replay = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]})
    assert replay.status_code == 401
    assert recorder.calls == ["find_one_and_update", "find_one"]
    recorder.calls.clear()
    unknown = dut.client.post("/api/v1/auth/refresh", json={"refresh_token": "u" * 43})
    assert unknown.status_code == 401 and recorder.calls == ["find_one_and_update", "find_one"]


def test_the_verification_keys_are_looked_up_once(mongo_uri, db_name, tmp_path, monkeypatch):
    built = []
    verification_keys = tokens.KeySet.verification_keys
    monkeypatch.setattr(tokens.KeySet, "verification_keys", lambda self: built.append(1) or verification_keys(self))
    dut = start_directory(mongo_uri, db_name, tmp_path)
    headers = dut.as_user("nurse.kim")
    for _ in range(3):
        assert dut.client.get("/api/v1/directory/me", headers=headers).status_code == 200
    assert len(built) == 1
