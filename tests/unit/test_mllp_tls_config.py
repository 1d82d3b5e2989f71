"""NOTIFICATIONS_MLLP_TLS_*: certificate and key both or neither, an optional client CA, TLS 1.2
minimum; production refuses plaintext MLLP unless the network is declared trusted, and then the
start-up warning names it."""

from __future__ import annotations

import base64
import logging
import os
import ssl
import types

import pytest

from services.kit import bootstrap
from services.kit.settings import Env, SettingsError, common_settings
from services.kit.transport import development_grpc_tls
from services.notifications import config


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return development_grpc_tls(tmp_path_factory.mktemp("pki"))


def production(tmp_path, **extra) -> dict[str, str]:
    return {
        "CLINIC_MODE": "production",
        "CLINIC_RUN_DIR": str(tmp_path),
        "PHI_MASTER_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode(),
        "MONGO_URI": "mongodb://db/",
        "AMQP_URL": "amqp://mq/",
        **extra,
    }


def development(tmp_path, **extra) -> dict[str, str]:
    return {
        "CLINIC_RUN_DIR": str(tmp_path),
        "PHI_MASTER_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode(),
        **extra,
    }


def mllp_problems(environ: dict[str, str]):
    """(tls, common, the problems naming MLLP) of one environment."""
    env = Env("notifications", environ)
    common = common_settings(env)
    tls, common = config.read_mllp_tls(env, common)
    return tls, common, [p for p in env.problems if "MLLP" in p]


def test_development_is_plaintext_by_default(tmp_path):
    settings = config.load(development(tmp_path))
    assert settings.mllp_tls is None
    assert config.MLLP_PLAINTEXT in settings.common.transport.plaintext


def test_production_refuses_plaintext_mllp(tmp_path):
    _tls, _common, found = mllp_problems(production(tmp_path))
    assert len(found) == 1
    assert found[0].startswith("MLLP listener") and "plaintext" in found[0] and "CLINIC_TRUSTED_NETWORK=1" in found[0]


def test_a_trusted_network_accepts_plaintext_mllp_and_the_warning_names_it(tmp_path, caplog):
    tls, common, found = mllp_problems(production(tmp_path, CLINIC_TRUSTED_NETWORK="1"))
    assert tls is None and found == []
    service = types.SimpleNamespace(common=common, settings=None)
    with caplog.at_level(logging.WARNING):
        bootstrap._warn_plaintext(service)
    (record,) = [r for r in caplog.records if "CLINIC_TRUSTED_NETWORK" in r.getMessage()]
    assert "MLLP listener" in record.getMessage()


def test_production_accepts_mllp_over_tls(tmp_path, pki):
    tls, common, found = mllp_problems(
        production(
            tmp_path,
            NOTIFICATIONS_MLLP_TLS_CERT_FILE=str(pki.cert_file),
            NOTIFICATIONS_MLLP_TLS_KEY_FILE=str(pki.key_file),
        )
    )
    assert found == []
    assert tls is not None and tls.client_ca_file is None
    assert not any(link.startswith("MLLP") for link in common.transport.plaintext)


def test_the_listener_context_is_tls_1_2_minimum_and_mutual_with_a_client_ca(tmp_path, pki):
    settings = config.load(
        development(
            tmp_path,
            NOTIFICATIONS_MLLP_TLS_CERT_FILE=str(pki.cert_file),
            NOTIFICATIONS_MLLP_TLS_KEY_FILE=str(pki.key_file),
            NOTIFICATIONS_MLLP_TLS_CLIENT_CA_FILE=str(pki.ca_file),
        )
    )
    context = settings.mllp_tls.server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    without_ca = config.MllpTls(pki.cert_file, pki.key_file).server_context()
    assert without_ca.minimum_version == ssl.TLSVersion.TLSv1_2
    assert without_ca.verify_mode == ssl.CERT_NONE


def refused(tmp_path, **environ) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        config.load(development(tmp_path, **environ))
    return caught.value.problems


def test_a_certificate_without_its_key_is_refused(tmp_path, pki):
    found = refused(tmp_path, NOTIFICATIONS_MLLP_TLS_CERT_FILE=str(pki.cert_file))
    assert any(p.startswith("NOTIFICATIONS_MLLP_TLS_KEY_FILE must be set with") for p in found), found
    found = refused(tmp_path, NOTIFICATIONS_MLLP_TLS_KEY_FILE=str(pki.key_file))
    assert any(p.startswith("NOTIFICATIONS_MLLP_TLS_CERT_FILE must be set with") for p in found), found


def test_a_client_ca_without_the_listener_certificate_is_refused(tmp_path, pki):
    found = refused(tmp_path, NOTIFICATIONS_MLLP_TLS_CLIENT_CA_FILE=str(pki.ca_file))
    assert any(p.startswith("NOTIFICATIONS_MLLP_TLS_CLIENT_CA_FILE needs") for p in found), found


def test_unreadable_or_mismatched_files_are_refused(tmp_path, pki):
    pair = {
        "NOTIFICATIONS_MLLP_TLS_CERT_FILE": str(pki.cert_file),
        "NOTIFICATIONS_MLLP_TLS_KEY_FILE": str(pki.key_file),
    }
    found = refused(tmp_path, **pair, NOTIFICATIONS_MLLP_TLS_CLIENT_CA_FILE=str(tmp_path / "absent.pem"))
    assert any(p.startswith("NOTIFICATIONS_MLLP_TLS_CLIENT_CA_FILE cannot be read") for p in found), found
    other = development_grpc_tls(tmp_path / "other")
    found = refused(tmp_path, **{**pair, "NOTIFICATIONS_MLLP_TLS_KEY_FILE": str(other.key_file)})
    assert any("must hold a PEM certificate, its private key" in p for p in found), found
