"""Sign-in, tokens, refresh rotation and sign-out over the directory's real HTTP app and database."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from services.kit.auth import AUDIENCE, ISSUER, AuthError, StaticKeySource, TokenVerifier
from tests.integration.directory_fixtures import DEMO_PASSWORD, start_directory


@pytest.fixture
def dut(mongo_uri, db_name, tmp_path):
    return start_directory(mongo_uri, db_name, tmp_path)


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
    admin = dut.as_user("admin")
    patched = dut.client.patch("/api/v1/directory/staff/stf_riverbend_kim", json={"active": False}, headers=admin)
    assert patched.status_code == 200 and patched.get_json()["active"] is False
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
    dut.store.set_password_hash("stf_riverbend_kim", old)
    assert dut.sign_in("nurse.kim").status_code == 200
    stored = dut.store.staff.find_one({"_id": {"$eq": "stf_riverbend_kim"}})["password_hash"]
    assert stored != old and stored.startswith("$argon2id$")
    assert dut.sign_in("nurse.kim").status_code == 200
