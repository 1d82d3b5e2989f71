"""Transport in deploy/: every link inside compose and Kubernetes runs over TLS, and nothing declares the
network trusted.

Production refuses a plaintext link unless CLINIC_TRUSTED_NETWORK=1 (services.kit.settings); deploy/ never
sets it, so each service's own environment configures TLS on every link it uses: MongoDB (tls=true and the
CA), RabbitMQ (amqps on 5671 and the CA), gRPC (mutual TLS with its own certificate), notifications' MLLP
listener and cloud-comms' Direct SMTP listener. Each service's config.load() then names no plaintext link,
and takes each one away to show that it is what production needs. The certificates make-secrets.sh issues are
checked the way the clients check them (chain, name, purpose): real TLS handshakes under the names the
services dial, and gRPC mutual TLS between the deployed services' own certificates.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import socket
import threading
import urllib.parse
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cloud_comms.direct.smtp_tls import PLAINTEXT_RELAY
from services.kit import transport
from services.kit.transport import GrpcTls, development_grpc_tls, open_channel, use_grpc_tls
from tests.docker import deploy_files as d

SERVICES = d.deployed_services()
GRPC_SERVERS = [s for s in SERVICES if s not in d.HTTP_ONLY]
DATABASE_USERS = [s for s in SERVICES if s not in d.HTTP_ONLY]
TRUSTED_NETWORK = "CLINIC_TRUSTED_NETWORK"
COMPOSE_CA = "/run/secrets/clinic_ca"


# --- nothing is declared trusted ------------------------------------------------------------------
def test_nothing_in_deploy_declares_the_network_trusted(compose):
    mentions = [p for p in d.DEPLOY.rglob("*") if p.is_file() and TRUSTED_NETWORK in p.read_text(errors="replace")]
    assert mentions == []
    for name, service in compose["services"].items():
        assert TRUSTED_NETWORK not in d.environment_of(service), name
    assert TRUSTED_NETWORK not in compose["x-clinic-environment"]
    assert TRUSTED_NETWORK not in d.k8s_objects("ConfigMap")["clinic-config"]["data"]


# --- what each service's settings make of the deployed environment ---------------------------------
def loaded_settings(service: str, environ: dict[str, str]):
    module = importlib.import_module(f"services.{d.package(service)}.config")
    return module.load({"CLINIC_MODE": "production", **environ})


def transport_of(settings):
    """The TransportPolicy a service's settings carry (CommonSettings' or the service's own)."""
    common = getattr(settings, "common", None)
    return common.transport if common is not None else settings.transport


def assert_every_link_is_tls(service: str, environ: dict[str, str]) -> None:
    """Production accepts `environ` for `service` without the trusted-network override, its settings name no
    plaintext link, and gRPC runs on the certificates the environment names."""
    assert d.production_problems(service, environ) == []
    settings = loaded_settings(service, environ)
    policy = transport_of(settings)
    assert policy.trusted_network is False
    # A configured Direct relay is listed as a link that could be plaintext; production then refuses to send
    # unless the relay offers STARTTLS (required=True), so nothing goes out in the clear.
    assert [link for link in policy.plaintext if link != PLAINTEXT_RELAY] == [], policy.plaintext
    if PLAINTEXT_RELAY in policy.plaintext:
        assert settings.smtp_tls.relay.required is True
    assert policy.grpc_tls == GrpcTls(
        Path(environ["GRPC_TLS_CERT_FILE"]), Path(environ["GRPC_TLS_KEY_FILE"]), Path(environ["GRPC_TLS_CA_FILE"])
    )


def without_tls(service: str, environ: dict[str, str]) -> dict[str, dict[str, str]]:
    """`environ` with one link's TLS taken away at a time, by the link production then names."""
    stripped = {}
    if "MONGO_URI" in environ:
        uri = re.sub(r"&tls=true|&tlsCAFile=[^&]*", "", environ["MONGO_URI"])
        stripped["MongoDB"] = {**environ, "MONGO_URI": uri}
    amqp = urllib.parse.urlsplit(environ["AMQP_URL"])
    stripped["RabbitMQ"] = {**environ, "AMQP_URL": amqp._replace(scheme="amqp").geturl()}
    stripped["gRPC"] = {k: v for k, v in environ.items() if not k.startswith("GRPC_TLS_")}
    if service == "notifications":
        stripped["MLLP listener"] = {k: v for k, v in environ.items() if not k.startswith("NOTIFICATIONS_MLLP_TLS_")}
    if service == "cloud-comms":
        smtp = ("CLOUD_SMTP_TLS_", "CLOUD_SMTP_REQUIRE_STARTTLS")
        stripped["the Direct SMTP listener"] = {k: v for k, v in environ.items() if not k.startswith(smtp)}
    return stripped


def assert_each_link_needs_its_tls(service: str, environ: dict[str, str]) -> None:
    for link, environment in without_tls(service, environ).items():
        problems = d.production_problems(service, environment)
        refused = [p for p in problems if link in p and "plaintext, which production refuses" in p]
        assert refused, f"{service} without TLS on {link} starts in production: {problems}"


# --- Docker Compose -----------------------------------------------------------------------------------
def compose_env(compose, generated_secrets, service: str, scratch: Path) -> dict[str, str]:
    workdir, variables = generated_secrets
    return d.compose_environment_on_host(compose, service, workdir, variables, scratch)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_configures_tls_on_each_link_of_each_service(compose, generated_secrets, service):
    spec = compose["services"][service]
    env = d.interpolate(d.environment_of(spec), generated_secrets[1])
    mounted = d.compose_secret_names(spec)
    assert "clinic_ca" in mounted
    if service in DATABASE_USERS:
        uri = urllib.parse.urlsplit(env["MONGO_URI"])
        options = dict(urllib.parse.parse_qsl(uri.query))
        assert uri.hostname == "mongo" and options.get("tls") == "true", env["MONGO_URI"]
        assert options.get("tlsCAFile") == COMPOSE_CA, env["MONGO_URI"]
    amqp = urllib.parse.urlsplit(env["AMQP_URL"])
    assert (amqp.scheme, amqp.hostname, amqp.port) == ("amqps", "rabbitmq", 5671)
    assert env["AMQP_CA_FILE"] == env["GRPC_TLS_CA_FILE"] == COMPOSE_CA
    # Its own gRPC certificate, and no other service's.
    own = f"grpc_tls_{d.package(service)}"
    assert env["GRPC_TLS_CERT_FILE"] == f"/run/secrets/{own}_cert"
    assert env["GRPC_TLS_KEY_FILE"] == f"/run/secrets/{own}_key"
    assert sorted(s for s in mounted if s.startswith("grpc_tls_")) == [f"{own}_cert", f"{own}_key"]
    assert compose["secrets"][f"{own}_cert"]["file"] == f"./secrets/tls_grpc_{service}.pem"
    assert compose["secrets"][f"{own}_key"]["file"] == f"./secrets/tls_grpc_{service}.key"


@pytest.mark.parametrize("service", SERVICES)
def test_compose_environment_runs_every_link_over_tls_in_production(compose, generated_secrets, service, tmp_path):
    env = compose_env(compose, generated_secrets, service, tmp_path)
    assert_every_link_is_tls(service, env)
    assert_each_link_needs_its_tls(service, env)


def test_compose_edge_listeners_speak_tls(compose):
    notifications = d.environment_of(compose["services"]["notifications"])
    assert notifications["NOTIFICATIONS_MLLP_TLS_CERT_FILE"] == "/run/secrets/mllp_tls_cert"
    assert notifications["NOTIFICATIONS_MLLP_TLS_KEY_FILE"] == "/run/secrets/mllp_tls_key"
    cloud_comms = d.environment_of(compose["services"]["cloud-comms"])
    assert cloud_comms["CLOUD_SMTP_TLS_CERT_FILE"] == "/run/secrets/smtp_tls_cert"
    assert cloud_comms["CLOUD_SMTP_TLS_KEY_FILE"] == "/run/secrets/smtp_tls_key"
    assert cloud_comms["CLOUD_SMTP_REQUIRE_STARTTLS"] == "1"


def test_compose_mongod_requires_tls_and_its_clients_verify_it(compose):
    services = compose["services"]
    mongo = services["mongo"]
    command = " ".join(mongo["entrypoint"]).split()
    assert command[command.index("--tlsMode") + 1] == "requireTLS"
    assert command[command.index("--tlsCAFile") + 1] == COMPOSE_CA
    # Clients authenticate with their users' passwords; they need the CA only.
    assert "--tlsAllowConnectionsWithoutCertificates" in command
    pem = command[command.index("--tlsCertificateKeyFile") + 1]
    assert f"/run/secrets/mongo_tls_cert /run/secrets/mongo_tls_key > {pem}" in " ".join(mongo["entrypoint"])
    assert {"clinic_ca", "mongo_tls_cert", "mongo_tls_key"} <= set(d.compose_secret_names(mongo))
    for name, shell in (("mongo", mongo["healthcheck"]["test"]), ("mongo-init", services["mongo-init"]["command"])):
        assert "--tls" in shell and shell[shell.index("--tlsCAFile") + 1] == COMPOSE_CA, name
        assert "clinic_ca" in d.compose_secret_names(services[name]), name
    health = mongo["healthcheck"]["test"]
    assert health[health.index("--host") + 1] == "localhost"  # a name in mongo's certificate (below)


def rabbitmq_conf() -> dict[str, str]:
    lines = (d.COMPOSE_DIR / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_compose_rabbitmq_listens_on_amqps_only(compose):
    rabbitmq = compose["services"]["rabbitmq"]
    assert any(v.startswith("./rabbitmq/rabbitmq.conf:/etc/rabbitmq/conf.d/") for v in rabbitmq["volumes"])
    conf = rabbitmq_conf()
    assert conf["listeners.tcp"] == "none"
    assert conf["listeners.ssl.default"] == "5671"
    mounted = d.compose_secret_names(rabbitmq)
    for key, secret in (
        ("cacertfile", "clinic_ca"),
        ("certfile", "rabbitmq_tls_cert"),
        ("keyfile", "rabbitmq_tls_key"),
    ):
        assert conf[f"ssl_options.{key}"] == f"/run/secrets/{secret}" and secret in mounted, key
    assert "tlsv1" not in conf.values() and "tlsv1.1" not in conf.values()
    # Nothing in the stack dials the plaintext port any more.
    assert ":5672" not in d.COMPOSE_FILE.read_text()


# --- the certificates make-secrets.sh issues -------------------------------------------------------
def certificate(folder: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "secrets" / name).read_bytes())


def subject_alt_names(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))}


def extended_key_usage(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def verify_server(ca: x509.Certificate, leaf: x509.Certificate, name: str) -> None:
    """The RFC 5280 path validation a TLS client makes: chain to `ca`, `name` in the SAN, serverAuth."""
    from cryptography.x509.verification import PolicyBuilder, Store

    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    PolicyBuilder().store(Store([ca])).build_server_verifier(subject).verify(leaf, [])


def verify_client(ca: x509.Certificate, leaf: x509.Certificate) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    PolicyBuilder().store(Store([ca])).build_client_verifier().verify(leaf, [])


def test_make_secrets_issues_a_ca_and_a_certificate_for_each_name_the_stack_dials(compose, generated_secrets):
    workdir, variables = generated_secrets
    ca = certificate(workdir, "tls_ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert compose["secrets"]["clinic_ca"]["file"] == "./secrets/tls_ca.pem"
    # The CA's key signs certificates on this machine only: no service mounts it.
    assert all(not spec["file"].endswith("tls_ca.key") for spec in compose["secrets"].values())
    both = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for service in SERVICES:
        leaf = certificate(workdir, f"tls_grpc_{service}.pem")
        assert subject_alt_names(leaf) == {service, "127.0.0.1"}, service
        assert extended_key_usage(leaf) == both, service
        for name in (service, "127.0.0.1"):  # what other services dial, and the container's own health check
            verify_server(ca, leaf, name)
        verify_client(ca, leaf)
    # The servers under every name their clients use: the URIs the services get, and the health checks.
    env = d.interpolate(d.environment_of(compose["services"]["directory"]), variables)
    mongo_host = urllib.parse.urlsplit(env["MONGO_URI"]).hostname
    amqp_host = urllib.parse.urlsplit(env["AMQP_URL"]).hostname
    for file, names in (("tls_mongo.pem", (mongo_host, "localhost")), ("tls_rabbitmq.pem", (amqp_host, "localhost"))):
        for name in names:
            verify_server(ca, certificate(workdir, file), name)
    for file, host in (("tls_mllp.pem", "notifications"), ("tls_smtp.pem", "cloud-comms")):
        verify_server(ca, certificate(workdir, file), host)
        verify_server(ca, certificate(workdir, file), "localhost")  # published on the host's loopback


def tls_handshake(server: tuple[Path, Path], ca: Path, server_hostname: str) -> str:
    """A TLS handshake over a socket pair, the server presenting `server` (cert, key) and the client
    verifying it as pika and pymongo do (ssl.create_default_context(cafile=...), host name checked).
    Returns the protocol version; raises ssl.SSLError when the client refuses."""
    import ssl

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*server)
    client_context = ssl.create_default_context(cafile=str(ca))
    left, right = socket.socketpair()
    left.settimeout(30)
    right.settimeout(30)

    def serve() -> None:
        try:
            with server_context.wrap_socket(left, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client's refusal is what the caller sees

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(right, server_hostname=server_hostname) as client:
            return client.version() or ""
    finally:
        thread.join(timeout=30)
        left.close()
        right.close()


def test_brokers_and_database_certificates_pass_the_clients_tls_checks(compose, generated_secrets):
    import ssl

    workdir, variables = generated_secrets
    secrets = workdir / "secrets"
    env = d.interpolate(d.environment_of(compose["services"]["inbox"]), variables)
    for server, url in (("rabbitmq", env["AMQP_URL"]), ("mongo", env["MONGO_URI"])):
        pair = (secrets / f"tls_{server}.pem", secrets / f"tls_{server}.key")
        host = urllib.parse.urlsplit(url).hostname
        assert tls_handshake(pair, secrets / "tls_ca.pem", host) in ("TLSv1.2", "TLSv1.3")
        # The same certificate under a name it does not carry, or against another CA, is refused.
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_handshake(pair, secrets / "tls_ca.pem", "rabbitmq.example" if server == "rabbitmq" else "db.example")
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_handshake(pair, secrets / "direct_anchors.pem", host)


def health_server(tls: GrpcTls) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port, secure = transport.add_port(server, "127.0.0.1:0", tls=tls)
    assert secure
    server.start()
    return server, port


def grpc_tls_of(folder: Path, service: str) -> GrpcTls:
    secrets = folder / "secrets"
    return GrpcTls(secrets / f"tls_grpc_{service}.pem", secrets / f"tls_grpc_{service}.key", secrets / "tls_ca.pem")


def check(port: int, client: GrpcTls | None, name: str) -> grpc.StatusCode | str:
    """SERVING, or the status code of a refused health check, dialling 127.0.0.1:`port` as `name`."""
    options = [("grpc.ssl_target_name_override", name)]
    with open_channel(f"127.0.0.1:{port}", options, tls=client) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        except grpc.RpcError as exc:
            return exc.code()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_deployed_services_speak_grpc_mutual_tls_with_their_own_certificates(generated_secrets, tmp_path):
    workdir = generated_secrets[0]
    stranger = development_grpc_tls(tmp_path / "another-ca")  # a certificate from some other CA
    for service in GRPC_SERVERS:
        own = grpc_tls_of(workdir, service)
        server, port = health_server(own)
        try:
            # The container's health check: its own certificate, at 127.0.0.1.
            with use_grpc_tls(own):
                assert transport.main(["health", f"127.0.0.1:{port}"]) == 0, service
            # Every other service calls it by its compose (and Kubernetes Service) name.
            for caller in SERVICES:
                assert check(port, grpc_tls_of(workdir, caller), service) == "SERVING", (caller, service)
            # Refused: a name it does not carry, a client from another CA, a plaintext client.
            assert check(port, grpc_tls_of(workdir, "web"), "mongo") == grpc.StatusCode.UNAVAILABLE
            assert check(port, stranger, service) == grpc.StatusCode.UNAVAILABLE
            assert check(port, None, service) == grpc.StatusCode.UNAVAILABLE
        finally:
            server.stop(None)


# --- Kubernetes ---------------------------------------------------------------------------------------
DEPLOYMENTS = d.k8s_objects("Deployment")
CERTIFICATES = d.k8s_objects("Certificate")
ISSUERS = d.k8s_objects("Issuer")
CONFIG = d.k8s_objects("ConfigMap")["clinic-config"]["data"]


def certificate_for_secret(secret: str) -> dict:
    matches = [c for c in CERTIFICATES.values() if c["spec"]["secretName"] == secret]
    assert len(matches) == 1, f"{secret}: {len(matches)} Certificates write it"
    return matches[0]


def test_k8s_certificates_come_from_the_clusters_private_ca():
    ca_certificate = certificate_for_secret(ISSUERS["clinic-internal-ca"]["spec"]["ca"]["secretName"])
    assert ca_certificate["spec"]["isCA"] is True
    # Renewed with the same key, so certificates issued before a renewal keep verifying.
    assert ca_certificate["spec"]["privateKey"]["rotationPolicy"] == "Never"
    assert "selfSigned" in ISSUERS[ca_certificate["spec"]["issuerRef"]["name"]]["spec"]
    for name, cert in CERTIFICATES.items():
        if name != ca_certificate["metadata"]["name"]:
            assert cert["spec"]["issuerRef"] == {"kind": "Issuer", "name": "clinic-internal-ca"}, name
            assert cert["spec"]["privateKey"]["rotationPolicy"] == "Always", name


def grpc_callers_of(service: str) -> set[str]:
    """The host names the ConfigMap gives callers of `service`'s gRPC port (DIRECTORY_GRPC_TARGET, ...)."""
    target = CONFIG.get(f"{d.env_prefix(service)}_GRPC_TARGET")
    return {target.rsplit(":", 1)[0]} if target else set()


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_mounts_each_service_its_own_grpc_certificate(service):
    pod = DEPLOYMENTS[service]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = d.k8s_environment(container)
    own = f"{service}-grpc-tls"
    for setting, key in (
        ("GRPC_TLS_CERT_FILE", "tls.crt"),
        ("GRPC_TLS_KEY_FILE", "tls.key"),
        ("GRPC_TLS_CA_FILE", "ca.crt"),
    ):
        assert d.mounted_secret_file(pod, container, env[setting]) == (own, key), setting
    mounted = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert {secret for secret in mounted if secret.endswith("-grpc-tls")} == {own}
    spec = certificate_for_secret(own)["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert "127.0.0.1" in spec["ipAddresses"]  # the pod's own health probe
    namespace = d.load_kustomization()["namespace"]
    assert {service, f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"} <= set(spec["dnsNames"])
    assert grpc_callers_of(service) <= set(spec["dnsNames"])
    assert grpc_callers_of("directory") == {"directory"} and grpc_callers_of("inbox") == {"inbox"}
    assert service in d.k8s_objects("Service")  # the name is a Service's


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_datastore_urls_are_tls_and_verified_against_the_mounted_ca(service):
    pod = DEPLOYMENTS[service]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = d.k8s_environment(container)
    ca = ("datastores-ca", "ca.crt")
    assert d.mounted_secret_file(pod, container, env["AMQP_CA_FILE"]) == ca
    amqp = urllib.parse.urlsplit(env["AMQP_URL"])
    assert amqp.scheme == "amqps" and amqp.port == 5671
    if service in DATABASE_USERS:
        options = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(env["MONGO_URI"]).query))
        assert options.get("tls") == "true", env["MONGO_URI"]
        assert d.mounted_secret_file(pod, container, options["tlsCAFile"]) == ca


def test_k8s_edge_listeners_speak_tls_with_their_certificates():
    for service, settings, secret in (
        (
            "notifications",
            ("NOTIFICATIONS_MLLP_TLS_CERT_FILE", "NOTIFICATIONS_MLLP_TLS_KEY_FILE"),
            "notifications-mllp-tls",
        ),
        ("cloud-comms", ("CLOUD_SMTP_TLS_CERT_FILE", "CLOUD_SMTP_TLS_KEY_FILE"), "cloud-comms-smtp-tls"),
    ):
        pod = DEPLOYMENTS[service]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = d.k8s_environment(container)
        for setting, key in zip(settings, ("tls.crt", "tls.key"), strict=True):
            assert d.mounted_secret_file(pod, container, env[setting]) == (secret, key), setting
        assert "server auth" in certificate_for_secret(secret)["spec"]["usages"]


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_environment_runs_every_link_over_tls_in_production(service, tmp_path):
    env = d.k8s_environment_on_host(service, tmp_path, d.k8s_file_stand_ins(service, tmp_path))
    assert_every_link_is_tls(service, env)
    assert_each_link_needs_its_tls(service, env)
