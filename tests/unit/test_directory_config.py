"""Directory settings and password hashing profiles."""

from __future__ import annotations

import base64
import functools

import pytest

from services.directory import config, tokens
from services.directory.passwords import PasswordHasher
from services.kit.settings import SettingsError

PHI_KEYS = "k1:" + base64.b64encode(b"p" * 32).decode()


@functools.cache
def pem() -> str:
    return tokens.generate_private_key_pem()


def environ(tmp_path, **values: str) -> dict[str, str]:
    return {"CLINIC_RUN_DIR": str(tmp_path), "PHI_MASTER_KEYS": PHI_KEYS, **values}


def test_defaults(tmp_path):
    settings = config.load(environ(tmp_path, JWT_SIGNING_KEYS=pem()))
    assert settings.http_port == 8101
    assert settings.grpc_port == 50051
    assert settings.access_token_ttl_s == 900
    assert settings.refresh_token_ttl_s == 8 * 3600
    assert settings.password_hash_profile == "standard"
    assert settings.login_policy == config.LoginPolicy(max_failures=10, window_s=900, lockout_s=900)
    assert settings.common.mongo_db == "clinic_directory"
    assert tokens.public_key_pem(settings).startswith("-----BEGIN PUBLIC KEY-----")


def test_development_generates_one_signing_key_into_the_run_folder(tmp_path):
    first = config.load(environ(tmp_path))
    second = config.load(environ(tmp_path))
    assert first.signing_keys.active.kid == second.signing_keys.active.kid
    key_file = tmp_path / "secrets" / "jwt-signing-key.pem"
    assert key_file.stat().st_mode & 0o077 == 0
    assert "PRIVATE KEY" in key_file.read_text()


def test_production_requires_signing_keys_and_refuses_fast_hashing(tmp_path):
    with pytest.raises(SettingsError) as caught:
        config.load(
            environ(
                tmp_path,
                CLINIC_MODE="production",
                MONGO_URI="mongodb://db.internal:27017/",
                PASSWORD_HASH_PROFILE="fast",
            )
        )
    problems = "\n".join(caught.value.problems)
    assert "JWT_SIGNING_KEYS" in problems
    assert "PASSWORD_HASH_PROFILE" in problems
    assert caught.value.code == 2
    assert not (tmp_path / "secrets" / "jwt-signing-key.pem").exists()


def test_production_starts_with_its_keys(tmp_path):
    settings = config.load(
        environ(
            tmp_path,
            CLINIC_MODE="production",
            MONGO_URI="mongodb://db.internal:27017/",
            JWT_SIGNING_KEYS=pem(),
            SERVICE_CLIENTS="inbox:" + "0" * 64,
            GATEWAY_IDENTITY_KEY="k" * 40,
            CLINIC_TRUSTED_NETWORK="1",  # plaintext links accepted (test_transport_settings.py covers them)
        )
    )
    assert settings.production and settings.password_hash_profile == "standard"


def test_signing_keys_can_come_from_a_file(tmp_path):
    key_file = tmp_path / "signing.pem"
    key_file.write_text(pem())
    settings = config.load(environ(tmp_path, JWT_SIGNING_KEYS_FILE=str(key_file)))
    assert settings.signing_keys.active.kid == tokens.KeySet.from_pem(pem()).active.kid


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ACCESS_TOKEN_TTL_S", "901"),
        ("ACCESS_TOKEN_TTL_S", "soon"),
        ("REFRESH_TOKEN_TTL_S", "10"),
        ("DIRECTORY_HTTP_PORT", "70000"),
        ("PASSWORD_HASH_PROFILE", "none"),
        ("LOGIN_MAX_FAILURES", "0"),
        ("JWT_SIGNING_KEYS", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"),
    ],
)
def test_invalid_values_are_reported(tmp_path, name, value):
    values = {"JWT_SIGNING_KEYS": pem(), name: value}
    with pytest.raises(SettingsError) as caught:
        config.load(environ(tmp_path, **values))
    assert any(name in problem for problem in caught.value.problems)


def test_passwords_verify_and_hashes_from_other_parameters_need_a_rehash():
    fast = PasswordHasher("fast")
    stored = fast.hash("a-long-passphrase")
    assert stored.startswith("$argon2id$")
    assert fast.verify(stored, "a-long-passphrase")
    assert not fast.verify(stored, "a-long-passphrasE")
    assert not fast.verify("not a hash", "a-long-passphrase")
    assert not fast.verify(None, "a-long-passphrase")
    assert not fast.needs_rehash(stored)
    assert PasswordHasher("standard").needs_rehash(stored)


def test_the_login_attempt_key_is_derived_from_the_signing_key_unless_given(tmp_path):
    derived = config.load(environ(tmp_path, JWT_SIGNING_KEYS=pem())).login_attempt_key
    assert len(derived) == 32
    assert derived == config.load(environ(tmp_path, JWT_SIGNING_KEYS=pem())).login_attempt_key  # every replica
    other_key = tokens.generate_private_key_pem()
    assert config.load(environ(tmp_path, JWT_SIGNING_KEYS=other_key)).login_attempt_key != derived
    given = "g" * 40
    settings = config.load(environ(tmp_path, JWT_SIGNING_KEYS=pem(), LOGIN_ATTEMPT_KEY=given))
    assert settings.login_attempt_key == given.encode()
    assert given not in repr(settings)


def test_a_short_login_attempt_key_is_refused(tmp_path):
    with pytest.raises(SettingsError) as caught:
        config.load(environ(tmp_path, JWT_SIGNING_KEYS=pem(), LOGIN_ATTEMPT_KEY="short"))
    assert any("LOGIN_ATTEMPT_KEY" in problem for problem in caught.value.problems)
