import base64

import pytest

from services.kit.settings import Env, SettingsError, common_settings


def test_production_refuses_to_start_without_secrets(tmp_path):
    env = Env("inbox", {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)})
    common_settings(env)
    with pytest.raises(SettingsError) as caught:
        env.done()
    text = str(caught.value)
    assert "PHI_MASTER_KEYS" in text and "MONGO_URI is required" in text
    assert not (tmp_path / "secrets").exists()


def test_development_generates_secrets_once_into_the_run_folder(tmp_path):
    first = common_settings(Env("inbox", {"CLINIC_RUN_DIR": str(tmp_path)}))
    second = common_settings(Env("directory", {"CLINIC_RUN_DIR": str(tmp_path)}))
    assert first.phi_master_keys == second.phi_master_keys
    assert (tmp_path / "secrets" / "phi-master-keys").stat().st_mode & 0o077 == 0


def test_every_problem_is_reported_together(tmp_path):
    env = Env(
        "inbox",
        {
            "CLINIC_RUN_DIR": str(tmp_path),
            "CLINIC_MODE": "staging",
            "AMQP_URL": "http://broker",
            "PHI_MASTER_KEYS": "k1:" + base64.b64encode(b"short").decode(),
        },
    )
    common_settings(env)
    env.int("INBOX_HTTP_PORT", 1, minimum=0, maximum=65535)
    with pytest.raises(SettingsError) as caught:
        env.done()
    assert len(caught.value.problems) == 3
    assert caught.value.code == 2


def test_urls_with_passwords_are_redacted_in_errors(tmp_path):
    env = Env("inbox", {"CLINIC_RUN_DIR": str(tmp_path), "MONGO_URI": "http://user:secret@db/"})
    common_settings(env)
    with pytest.raises(SettingsError) as caught:
        env.done()
    assert "secret" not in str(caught.value)


def test_a_development_listener_stays_on_loopback_and_out_of_production():
    from services.kit.settings import Env, development_listener

    env = Env("sim", {"SIM_PORT": "9000"})
    assert development_listener(env, "SIM", 8000, "simulator") == ("127.0.0.1", 9000) and not env.problems
    remote = Env("sim", {"SIM_HOST": "0.0.0.0"})
    development_listener(remote, "SIM", 8000, "simulator")
    assert any("SIM_HOST must be a loopback address" in p for p in remote.problems)
    allowed = Env("sim", {"SIM_HOST": "0.0.0.0", "SIM_ALLOW_REMOTE": "1"})
    assert development_listener(allowed, "SIM", 8000, "simulator") == ("0.0.0.0", 8000) and not allowed.problems
    production = Env("sim", {"CLINIC_MODE": "production"})
    development_listener(production, "SIM", 8000, "simulator")
    assert any("development and tests only" in p for p in production.problems)
