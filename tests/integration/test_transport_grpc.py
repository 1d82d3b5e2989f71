"""gRPC over mutual TLS on a real server and port: the kit's server requires a client certificate
from the service CA, and the kit's channels present one."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.kit.auth import RevokedSessions, StaticKeySource, TokenVerifier
from services.kit.grpc_server import GrpcServer, ServiceBinding
from services.kit.service_identity import ServiceTokens
from services.kit.transport import development_grpc_tls, open_channel, use_grpc_tls

SERVICE = "clinic.directory.v1.DirectoryService"
ISSUE = f"/{SERVICE}/IssueServiceToken"


class Servicer(directory_pb2_grpc.DirectoryServiceServicer):
    def IssueServiceToken(self, request, context):
        return directory_pb2.IssueServiceTokenResponse(access_token=f"issued-to-{request.client_id}", expires_in=600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return development_grpc_tls(tmp_path_factory.mktemp("service-ca"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """Another CA's certificate: valid, but not one of ours."""
    return development_grpc_tls(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture(scope="module")
def target(pki):
    server = GrpcServer(
        [ServiceBinding(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Servicer(), SERVICE)],
        TokenVerifier(StaticKeySource({}), revoked=RevokedSessions()),
        port=0,
        open_methods=[ISSUE],
        tls=pki,
    )
    server.start()
    assert server.secure
    yield f"127.0.0.1:{server.port}"
    server.stop(0)


def issue(channel: grpc.Channel) -> str:
    stub = directory_pb2_grpc.DirectoryServiceStub(channel)
    return stub.IssueServiceToken(directory_pb2.IssueServiceTokenRequest(client_id="inbox"), timeout=5).access_token


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as caught:
        issue(channel)
    return caught.value.code()


def test_a_client_with_the_service_ca_and_a_certificate_is_answered(target, pki):
    with open_channel(target, tls=pki) as channel:
        assert issue(channel) == "issued-to-inbox"
    # The kit's own clients (here the service-token issuer) use the same credentials.
    with use_grpc_tls(pki):
        tokens = ServiceTokens(target, "inbox", "secret")
    try:
        assert tokens.token("agy_a") == "issued-to-inbox"
    finally:
        tokens.close()


def test_a_client_without_a_certificate_is_refused(target, pki):
    no_certificate = grpc.ssl_channel_credentials(root_certificates=pki.ca_file.read_bytes())
    assert refused(grpc.secure_channel(target, no_certificate)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_with_another_cas_certificate_is_refused(target, pki, other_pki):
    foreign = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),  # it even trusts our server
        private_key=other_pki.key_file.read_bytes(),
        certificate_chain=other_pki.cert_file.read_bytes(),
    )
    assert refused(grpc.secure_channel(target, foreign)) == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_refused(target):
    assert refused(grpc.insecure_channel(target)) == grpc.StatusCode.UNAVAILABLE
    with use_grpc_tls(None):
        assert refused(open_channel(target)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_does_not_trust_a_server_outside_its_ca(target, other_pki):
    """A server impersonated with another CA's certificate is refused by the kit's channel."""
    assert refused(open_channel(target, tls=other_pki)) == grpc.StatusCode.UNAVAILABLE


def test_certificates_are_kept_while_valid_and_keys_are_owner_only(pki):
    assert development_grpc_tls(pki.cert_file.parent) == pki
    assert pki.key_file.stat().st_mode & 0o077 == 0
    assert pki.cert_file.parent.stat().st_mode & 0o077 == 0
    assert not (pki.cert_file.parent / "ca.key").exists()


def test_the_health_check_command_speaks_mtls_from_its_environment(target, pki):
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_TLS_")}
    command = [sys.executable, "-m", "services.kit.transport", "health", target]
    mtls = {**base, **pki.environ()}
    with_certificate = subprocess.run(command, env=mtls, capture_output=True, timeout=60, check=False)
    plaintext = subprocess.run(command, env=base, capture_output=True, text=True, timeout=60, check=False)
    assert with_certificate.returncode == 0, with_certificate.stderr
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
