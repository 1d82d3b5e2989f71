"""The kit's gRPC edge on a real server and port: open methods, token refusals and their codes."""

from __future__ import annotations

import functools

import grpc
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import tokens
from services.kit.auth import RevokedSessions, StaticKeySource, TokenVerifier, current_identity
from services.kit.errors import Unauthenticated
from services.kit.grpc_server import GrpcServer, ServiceBinding
from services.kit.logs import correlation_id_var

SERVICE = "clinic.directory.v1.DirectoryService"
ISSUE = f"/{SERVICE}/IssueServiceToken"


@functools.cache
def keys() -> tokens.KeySet:
    return tokens.KeySet.from_pem(tokens.generate_private_key_pem())


def staff_token(session_id: str) -> str:
    return tokens.issue_access_token(
        keys(), staff_id="stf_a", agency_id="agy_a", roles=["staff"], name="A", session_id=session_id, ttl_s=900
    ).token


class Servicer(directory_pb2_grpc.DirectoryServiceServicer):
    """Echoes what the edge gave the handler: the correlation id and whether a caller was set."""

    def IssueServiceToken(self, request, context):
        if request.client_secret == "wrong":
            raise Unauthenticated("invalid_client", "no")
        caller = current_identity.get()
        return directory_pb2.IssueServiceTokenResponse(
            access_token=f"{correlation_id_var.get()}|{caller.subject if caller else '-'}", expires_in=1
        )

    def GetAgencySettings(self, request, context):
        return directory_pb2.GetAgencySettingsResponse(agency_id=current_identity.get().agency_id)


@pytest.fixture(scope="module")
def revoked():
    return RevokedSessions()


@pytest.fixture(scope="module")
def stub(revoked):
    server = GrpcServer(
        [ServiceBinding(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Servicer(), SERVICE)],
        TokenVerifier(StaticKeySource(keys().verification_keys), revoked=revoked),
        port=0,
        open_methods=[ISSUE],
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


def test_an_open_method_needs_no_token_and_keeps_the_correlation_id(stub):
    reply = stub.IssueServiceToken(
        directory_pb2.IssueServiceTokenRequest(client_id="c", client_secret="s"),
        metadata=[("x-correlation-id", "corr-1")],
        timeout=5,
    )
    assert reply.access_token == "corr-1|-"
    assert stub.IssueServiceToken(directory_pb2.IssueServiceTokenRequest(), timeout=5).access_token.endswith("|-")


def test_an_open_method_ignores_a_token_and_sets_no_caller(stub):
    reply = stub.IssueServiceToken(
        directory_pb2.IssueServiceTokenRequest(),
        metadata=[("authorization", f"Bearer {staff_token('ses_open')}")],
        timeout=5,
    )
    assert reply.access_token.endswith("|-")


def test_an_open_method_still_maps_domain_errors(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.IssueServiceToken(directory_pb2.IssueServiceTokenRequest(client_secret="wrong"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(caught.value.trailing_metadata())["error-code"] == "invalid_client"


def test_malformed_protobuf_to_an_open_method_is_invalid_argument(revoked):
    server = GrpcServer(
        [ServiceBinding(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Servicer(), SERVICE)],
        TokenVerifier(StaticKeySource(keys().verification_keys), revoked=revoked),
        open_methods=[ISSUE],
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(ISSUE)(b"\xff\xff\xff\xff not protobuf", timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)


def test_other_methods_still_need_a_valid_unrevoked_token(stub, revoked):
    request = directory_pb2.GetAgencySettingsRequest()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetAgencySettings(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metadata = [("authorization", f"Bearer {staff_token('ses_live')}")]
    assert stub.GetAgencySettings(request, metadata=metadata, timeout=5).agency_id == "agy_a"
    revoked.revoke("ses_live", 2**50)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetAgencySettings(request, metadata=metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(caught.value.trailing_metadata())["error-code"] == "session_revoked"


def test_open_methods_must_be_full_method_names():
    with pytest.raises(ValueError, match="full method name"):
        GrpcServer([], TokenVerifier(StaticKeySource(dict)), open_methods=["IssueServiceToken"])
