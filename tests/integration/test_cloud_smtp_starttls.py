"""STARTTLS on the Direct SMTP edge over real sockets: the cloud-comms listener (aiosmtpd) with a
certificate from a CA generated here, reached with smtplib; the relay side against a real aiosmtpd
relay with and without STARTTLS. Settings are read by config.load as the process reads them."""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
import threading
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from services.cloud_comms import config, devcerts
from services.cloud_comms.direct import outgoing, smtp_tls
from services.cloud_comms.direct.feature import DIRECT_MESSAGES, DirectMessaging
from services.cloud_comms.direct.smtp import DirectHandler, SmtpListener
from services.cloud_comms.direct.smtp_tls import PLAINTEXT_LISTENER, ListenerTls, PlaintextRelayRefused, RelayTls
from services.cloud_comms.service import build
from services.kit.embedded_mongo import free_port
from services.kit.settings import Env, SettingsError
from services.kit.transport import development_grpc_tls
from tests.cloud_direct_helpers import PARTNER, RIVERBEND_INTAKE, direct_message, send
from tests.integration.test_cloud_direct_inbound import Directory, ServiceIdentities

MUST = b"5.7.0 Must issue a STARTTLS command first"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("direct-certs")
    devcerts.ensure(directory)
    return directory


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA and a server certificate for localhost / 127.0.0.1 (cert, key, CA)."""
    return development_grpc_tls(tmp_path_factory.mktemp("smtp-tls") / "tls")


@pytest.fixture(scope="module")
def rogue_tls(tmp_path_factory):
    """A certificate for 127.0.0.1 from a CA nobody trusts."""
    return development_grpc_tls(tmp_path_factory.mktemp("rogue-tls") / "tls")


def base_env(certs: Path, **env: str) -> dict[str, str]:
    master = base64.b64encode(os.urandom(32)).decode()
    return {
        "MONGO_URI": "mongodb://unused:1",
        "PHI_MASTER_KEYS": f"m:{master}",
        "AMQP_URL": "amqp://unused/",
        "CLOUD_DIRECT_CERTS_DIR": str(certs),
        "CLOUD_DIRECT_MAX_MESSAGE_BYTES": str(200 * 1024),
        "CLINIC_RUN_DIR": str(certs.parent),
        **env,
    }


def tls_env(tls_files, require: str) -> dict[str, str]:
    return {
        "CLOUD_SMTP_TLS_CERT_FILE": str(tls_files.cert_file),
        "CLOUD_SMTP_TLS_KEY_FILE": str(tls_files.key_file),
        "CLOUD_SMTP_REQUIRE_STARTTLS": require,
    }


@pytest.fixture
def listener(mongo_client, db_name, certs):
    """cloud-comms (Direct) over the test database and its SMTP listener with the TLS settings
    config.load read from `env`: (port, db)."""
    started = []

    def make(**env: str):
        port = free_port()
        settings = config.load(base_env(certs, CLOUD_SMTP_PORT=str(port), **env))
        db = mongo_client[db_name]
        comms = build(
            settings, db, directory=Directory(), service_tokens=ServiceIdentities(), features=(DirectMessaging,)
        )
        feature = comms.features[0]
        smtp = SmtpListener(
            DirectHandler(feature.resolve_recipient, feature.receive),
            "127.0.0.1",
            port,
            max_message_bytes=settings.direct.max_message_bytes,
            hostname=feature.hostname,
            tls=settings.smtp_tls,
        )
        stop = threading.Event()
        thread = threading.Thread(target=smtp.run, args=(stop,), daemon=True)
        thread.start()
        assert smtp.ready(10)
        started.append((stop, thread))
        return port, db

    yield make
    for stop, thread in started:
        stop.set()
        thread.join(10)


def client_context(tls_files) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files.ca_file))


def stored(db) -> list[dict]:
    return list(db[DIRECT_MESSAGES].find({}, projection={"_id": 1}))


# --- the listener ------------------------------------------------------------------------------------
def test_ehlo_offers_starttls_and_a_direct_message_over_tls_is_accepted(listener, tls_files, certs):
    port, db = listener(**tls_env(tls_files, "1"))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.starttls(context=client_context(tls_files))[0] == 220
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        assert not client.has_extn("starttls")  # offered once, before the upgrade only
        assert client.sendmail(PARTNER, [RIVERBEND_INTAKE], direct_message(certs)) == {}
    assert len(stored(db)) == 1


def test_required_starttls_refuses_mail_in_plaintext_and_stores_nothing(listener, tls_files, certs):
    port, db = listener(**tls_env(tls_files, "1"))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        assert client.mail(PARTNER) == (530, MUST)
        assert client.rcpt(RIVERBEND_INTAKE) == (530, MUST)
        assert client.docmd("DATA") == (530, MUST)
        # the same connection, upgraded, is served
        client.starttls(context=client_context(tls_files))
        client.ehlo()
        assert client.mail(PARTNER)[0] == 250
    assert send(port, direct_message(certs)) == (530, MUST)  # a whole plaintext transaction
    assert stored(db) == []


def test_tls_offered_but_not_required_still_takes_plaintext(listener, tls_files, certs):
    port, db = listener(**tls_env(tls_files, "0"))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        assert client.has_extn("starttls")
    assert send(port, direct_message(certs)) == (250, b"ok")
    assert len(stored(db)) == 1


def test_without_tls_settings_the_listener_is_unchanged(listener, certs):
    port, db = listener()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
    assert send(port, direct_message(certs)) == (250, b"ok")
    assert len(stored(db)) == 1


def test_the_listener_context_refuses_tls_below_1_2(tls_files):
    context = ListenerTls(tls_files.cert_file, tls_files.key_file).context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


# --- settings ----------------------------------------------------------------------------------------
def problems(env: dict[str, str]) -> list[str]:
    try:
        config.load(env)
    except SettingsError as exc:
        return exc.problems
    return []


def test_development_defaults_to_plaintext_and_to_not_requiring_starttls(certs, tls_files):
    assert config.load(base_env(certs)).smtp_tls.listener is None
    settings = config.load(
        base_env(
            certs, CLOUD_SMTP_TLS_CERT_FILE=str(tls_files.cert_file), CLOUD_SMTP_TLS_KEY_FILE=str(tls_files.key_file)
        )
    )
    assert settings.smtp_tls.listener is not None and settings.smtp_tls.require_starttls is False
    assert settings.smtp_tls.relay.required is False


def test_settings_take_both_files_or_neither_and_files_that_load(certs, tls_files, tmp_path):
    found = problems(base_env(certs, CLOUD_SMTP_TLS_CERT_FILE=str(tls_files.cert_file)))
    assert any("set together" in p for p in found)
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not a certificate")
    found = problems(base_env(certs, CLOUD_SMTP_TLS_CERT_FILE=str(bad), CLOUD_SMTP_TLS_KEY_FILE=str(bad)))
    assert any("do not load" in p for p in found)
    found = problems(base_env(certs, CLOUD_SMTP_REQUIRE_STARTTLS="1"))
    assert any("CLOUD_SMTP_REQUIRE_STARTTLS=1 needs" in p for p in found)
    found = problems(base_env(certs, CLOUD_SMTP_RELAY_CA_FILE=str(bad)))
    assert any("CLOUD_SMTP_RELAY_CA_FILE" in p for p in found)


def test_production_refuses_a_plaintext_listener_unless_the_network_is_trusted(certs, tls_files):
    production = base_env(certs, CLINIC_MODE="production")
    assert any(p.startswith(PLAINTEXT_LISTENER) for p in problems(production))
    trusted = {**production, "CLINIC_TRUSTED_NETWORK": "1"}
    assert not any(p.startswith(PLAINTEXT_LISTENER) for p in problems(trusted))
    with_tls = {**production, **tls_env(tls_files, "")}
    assert not any(PLAINTEXT_LISTENER in p or "STARTTLS" in p for p in problems(with_tls))


def test_production_requires_starttls_by_default_and_starttls_from_the_relay(certs, tls_files):
    env = Env("cloud-comms", base_env(certs, CLINIC_MODE="production", **tls_env(tls_files, "")))
    loaded = smtp_tls.load(env, trusted_network=False, relay_configured=True)
    assert loaded.require_starttls is True and loaded.relay.required is True and env.problems == []
    loaded = smtp_tls.load(env, trusted_network=True, relay_configured=True)
    assert loaded.relay.required is False and smtp_tls.PLAINTEXT_RELAY in loaded.plaintext
    # a relay refusal is retried later, not taken as the relay refusing the message
    assert not issubclass(PlaintextRelayRefused, smtplib.SMTPResponseException)


# --- the relay ---------------------------------------------------------------------------------------
class Relay:
    """The next hop (a real aiosmtpd server), with STARTTLS when given a certificate; it records
    each message and whether it came over TLS."""

    def __init__(self, tls=None):
        self.port = free_port()
        self.received: list[tuple[bytes, bool]] = []
        context = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert_file, tls.key_file)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, tls_context=context)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.received.append((envelope.original_content, session.ssl is not None))
        return "250 OK"

    def __enter__(self) -> Relay:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()


def relay_send(relay: Relay, tls: RelayTls) -> dict:
    return outgoing.send(
        "127.0.0.1",
        relay.port,
        envelope_from=RIVERBEND_INTAKE,
        to=[PARTNER],
        message=b"Subject: x\r\n\r\nhi\r\n",
        tls=tls,
    )


def test_the_relay_is_used_over_starttls_when_it_offers_it(tls_files):
    with Relay(tls_files) as relay:
        assert relay_send(relay, RelayTls(ca_file=str(tls_files.ca_file), required=True)) == {}
    ((raw, over_tls),) = relay.received
    assert over_tls is True and b"hi" in raw


def test_a_relay_whose_certificate_does_not_verify_gets_nothing(tls_files, rogue_tls):
    with Relay(rogue_tls) as relay:
        with pytest.raises(ssl.SSLCertVerificationError):
            relay_send(relay, RelayTls(ca_file=str(tls_files.ca_file)))
        with pytest.raises(ssl.SSLCertVerificationError):
            relay_send(relay, RelayTls())  # the system trust store does not know the rogue CA
    assert relay.received == []


def test_production_sends_nothing_to_a_relay_without_starttls(tls_files):
    with Relay() as relay:
        with pytest.raises(PlaintextRelayRefused):
            relay_send(relay, RelayTls(ca_file=str(tls_files.ca_file), required=True))
        assert relay.received == []
        # development (or a trusted network): plaintext as before
        assert relay_send(relay, RelayTls()) == {}
    ((_, over_tls),) = relay.received
    assert over_tls is False
