"""Production refuses plaintext links (MongoDB, RabbitMQ, gRPC) unless the network is declared
trusted, and says so; amqps verifies the broker."""

from __future__ import annotations

import base64
import logging
import os
import ssl
import types

import pytest

from services.kit import bootstrap
from services.kit.bus.topology import connection_parameters
from services.kit.settings import Env, SettingsError, common_settings, mongo_uses_tls
from services.kit.transport import GRPC_TLS_VARIABLES, development_grpc_tls, grpc_tls_from


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return development_grpc_tls(tmp_path_factory.mktemp("pki"))


def production(tmp_path, **extra) -> dict[str, str]:
    return {
        "CLINIC_MODE": "production",
        "CLINIC_RUN_DIR": str(tmp_path),
        "PHI_MASTER_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode(),
        **extra,
    }


def problems(environ: dict[str, str]) -> list[str]:
    env = Env("inbox", environ)
    common_settings(env)
    with pytest.raises(SettingsError) as caught:
        env.done()
    return caught.value.problems


def test_production_refuses_each_plaintext_link(tmp_path):
    found = problems(production(tmp_path, MONGO_URI="mongodb://db:27017/", AMQP_URL="amqp://u:p@mq:5672/"))
    assert len(found) == 3
    assert any(p.startswith("MongoDB") for p in found)
    assert any(p.startswith("RabbitMQ") for p in found)
    assert any(p.startswith("gRPC") for p in found)
    assert all("CLINIC_TRUSTED_NETWORK=1" in p and "plaintext" in p for p in found)
    assert not any("u:p" in p for p in found)


def test_production_starts_with_tls_everywhere(tmp_path, pki):
    environ = production(
        tmp_path,
        MONGO_URI="mongodb://db1,db2/?replicaSet=rs0&tls=true",
        AMQP_URL="amqps://u:p@mq:5671/",
        **pki.environ(),
    )
    env = Env("inbox", environ)
    settings = common_settings(env)
    env.done()
    assert settings.transport.plaintext == () and settings.transport.grpc_tls == pki


def test_a_trusted_network_is_accepted_and_names_what_runs_in_plaintext(tmp_path, caplog):
    environ = production(
        tmp_path, MONGO_URI="mongodb://db/", AMQP_URL="amqp://mq/", CLINIC_TRUSTED_NETWORK="1"
    )
    env = Env("inbox", environ)
    settings = common_settings(env)
    env.done()
    assert settings.transport.trusted_network
    assert [p.split(" ")[0] for p in settings.transport.plaintext] == ["MongoDB", "RabbitMQ", "gRPC"]
    service = types.SimpleNamespace(common=settings, settings=settings)
    with caplog.at_level(logging.WARNING):
        bootstrap._warn_plaintext(service)
    (record,) = [r for r in caplog.records if "CLINIC_TRUSTED_NETWORK" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert all(link in record.getMessage() for link in ("MongoDB", "RabbitMQ", "gRPC"))


def test_development_accepts_plaintext_but_not_half_a_grpc_tls_configuration(tmp_path, pki):
    env = Env("inbox", {"CLINIC_RUN_DIR": str(tmp_path)})
    assert len(common_settings(env).transport.plaintext) == 3
    env.done()
    half = {"CLINIC_RUN_DIR": str(tmp_path), "GRPC_TLS_CERT_FILE": str(pki.cert_file)}
    found = problems(half)
    assert found == [
        "GRPC_TLS_KEY_FILE, GRPC_TLS_CA_FILE must be set with GRPC_TLS_CERT_FILE (gRPC TLS takes all three or none)"
    ]
    missing = {**pki.environ(), "GRPC_TLS_CA_FILE": str(tmp_path / "nope.pem")}
    with pytest.raises(ValueError, match="GRPC_TLS_CA_FILE cannot be read"):
        grpc_tls_from(missing)
    assert set(pki.environ()) == set(GRPC_TLS_VARIABLES)


@pytest.mark.parametrize(
    ("uri", "tls"),
    [
        ("mongodb://db/", False),
        ("mongodb://db/?tls=true", True),
        ("mongodb://db/?ssl=true&replicaSet=rs0", True),
        ("mongodb://db/?tls=false", False),
        ("mongodb+srv://cluster.example.org/", True),
        ("mongodb+srv://cluster.example.org/?tls=false", False),
    ],
)
def test_which_mongo_uris_use_tls(uri, tls):
    assert mongo_uses_tls(uri) is tls


def test_amqps_verifies_the_broker_against_the_given_ca(pki):
    params = connection_parameters("amqps://u:p@mq.internal:5671/clinic", "test", {"AMQP_CA_FILE": str(pki.ca_file)})
    context = params.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert params.ssl_options.server_hostname == "mq.internal" and params.port == 5671
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "Clinic development service CA"),),)
    ]
    assert connection_parameters("amqp://u:p@mq/", "test", {}).ssl_options is None
