"""Signing keys, key ids, JWKS and access tokens, checked with the verifier every service uses."""

from __future__ import annotations

import base64
import functools
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.directory import tokens
from services.kit.auth import AuthError, StaticKeySource, TokenVerifier


@functools.cache
def pem(n: int = 0) -> str:
    """A few 2048-bit keys, generated once per test run."""
    return tokens.generate_private_key_pem()


def public_pem(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def issue(keys: tokens.KeySet, **overrides) -> str:
    args = dict(
        staff_id="stf_riverbend_kim",
        agency_id="agy_riverbend",
        roles=["staff"],
        name="Jordan Kim, RN",
        session_id="ses_1",
        ttl_s=900,
    )
    args.update(overrides)
    return tokens.issue_access_token(keys, **args).token


def verifier(keys: tokens.KeySet) -> TokenVerifier:
    return TokenVerifier(StaticKeySource(keys.verification_keys))


def test_key_id_is_the_rfc7638_thumbprint():
    # The example key and thumbprint of RFC 7638, section 3.1.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgd"
        "AZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur"
        "-kEgU8awapJzKnqDKgw"
    )
    modulus = int.from_bytes(base64.urlsafe_b64decode(n + "=" * (-len(n) % 4)), "big")
    key = rsa.RSAPublicNumbers(65537, modulus).public_key()
    assert tokens.jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_access_token_claims_verify_with_the_kit_verifier():
    keys = tokens.KeySet.from_pem(pem())
    before = int(time.time())
    token = issue(keys, roles=["staff", "admin"])
    identity = verifier(keys).verify(token)
    assert identity.staff_id == "stf_riverbend_kim"
    assert identity.agency_id == "agy_riverbend"
    assert identity.roles == {"staff", "admin"}
    assert identity.kind == "staff" and identity.session_id == "ses_1" and identity.name == "Jordan Kim, RN"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "clinic-directory" and claims["aud"] == "clinic-message-board"
    assert claims["typ"] == "access" and claims["kind"] == "staff"
    assert before <= claims["iat"] == claims["nbf"] and claims["exp"] == claims["iat"] + 900
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": keys.active.kid, "typ": "JWT"}


def test_tampered_claims_fail_verification():
    keys = tokens.KeySet.from_pem(pem())
    header, payload, signature = issue(keys).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["agency_id"] = "agy_lakeside"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthError) as caught:
        verifier(keys).verify(f"{header}.{forged}.{signature}")
    assert caught.value.code == "invalid_token"


def test_a_token_signed_by_a_stranger_key_under_our_key_id_fails():
    ours = tokens.KeySet.from_pem(pem())
    stranger = tokens.KeySet.from_pem(pem(1))
    claims = jwt.decode(issue(ours), options={"verify_signature": False})
    forged = jwt.encode(claims, stranger.active.private_key, algorithm="RS256", headers={"kid": ours.active.kid})
    with pytest.raises(AuthError):
        verifier(ours).verify(forged)


def test_expired_tokens_are_refused():
    keys = tokens.KeySet.from_pem(pem())
    token = issue(keys, now=int(time.time()) - 2000)
    with pytest.raises(AuthError) as caught:
        verifier(keys).verify(token)
    assert caught.value.code == "token_expired"


def test_rotation_the_first_key_signs_and_earlier_keys_still_verify():
    old = tokens.KeySet.from_pem(pem())
    old_token = issue(old)
    rotated = tokens.KeySet.from_pem(pem(1) + "\n" + public_pem(pem()))
    assert rotated.active.kid != old.active.kid
    assert [k.kid for k in rotated.keys] == [rotated.active.kid, old.active.kid]
    assert verifier(rotated).verify(old_token).staff_id == "stf_riverbend_kim"
    assert jwt.get_unverified_header(issue(rotated))["kid"] == rotated.active.kid
    jwks = rotated.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [rotated.active.kid, old.active.kid]
    assert all(k["kty"] == "RSA" and k["use"] == "sig" and k["alg"] == "RS256" for k in jwks["keys"])


def test_jwks_keys_verify_tokens():
    keys = tokens.KeySet.from_pem(pem())
    jwk = keys.jwks()["keys"][0]
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwk))
    assert jwt.decode(issue(keys), public, algorithms=["RS256"], audience="clinic-message-board")["sub"]


def test_the_same_key_always_has_the_same_id_and_duplicates_collapse():
    assert tokens.KeySet.from_pem(pem()).active.kid == tokens.KeySet.from_pem(pem()).active.kid
    assert len(tokens.KeySet.from_pem(pem() + pem()).keys) == 1


def test_a_pem_squeezed_onto_one_line_is_accepted():
    assert tokens.KeySet.from_pem(pem().replace("\n", "\\n")).active.kid == tokens.KeySet.from_pem(pem()).active.kid


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no PEM key"),
        ("not a key", "no PEM key"),
        (None, "first key must be an RSA private key"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "not a readable"),
    ],
)
def test_unusable_key_material_is_refused(text, message):
    text = public_pem(pem()) if text is None else text
    with pytest.raises(ValueError, match=message):
        tokens.KeySet.from_pem(text)


def test_short_rsa_keys_are_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    text = small.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with pytest.raises(ValueError, match="at least 2048"):
        tokens.KeySet.from_pem(text)


def test_refresh_tokens_are_long_random_and_stored_as_sha256():
    token = tokens.new_refresh_token()
    assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) >= 32
    assert token != tokens.new_refresh_token()
    digest = tokens.refresh_token_hash(token)
    assert len(digest) == 64 and token not in digest
