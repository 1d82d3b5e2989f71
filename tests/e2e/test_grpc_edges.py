"""The internal gRPC faces: health, reflection, caller identity, deadlines and bad protobuf."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from tests.e2e.conftest import error_code, stack_channel


@pytest.fixture(scope="module")
def targets(stack):
    p = stack.config.ports
    return {"directory": f"127.0.0.1:{p.directory_grpc}", "inbox": f"127.0.0.1:{p.inbox_grpc}"}


@pytest.fixture(scope="module")
def connect(stack):
    return lambda target: stack_channel(stack, target)


@pytest.mark.parametrize("service", ["directory", "inbox"])
def test_the_stacks_grpc_refuses_plaintext_and_a_client_without_a_certificate(stack, targets, service):
    """The services talk mutual TLS: neither a plaintext client nor a TLS one without a client
    certificate from the service CA gets as far as health checking."""
    assert stack.grpc_tls is not None
    no_certificate = grpc.ssl_channel_credentials(root_certificates=stack.grpc_tls.ca_file.read_bytes())
    for channel in (grpc.insecure_channel(targets[service]), grpc.secure_channel(targets[service], no_certificate)):
        with channel, pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["directory", "inbox"])
def test_health_and_reflection_answer_without_a_token(targets, connect, service):
    with connect(targets[service]) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        expected = "clinic.directory.v1.DirectoryService" if service == "directory" else "clinic.inbox.v1.InboxService"
        assert expected in names and "grpc.health.v1.Health" in names


def test_send_over_grpc_with_the_callers_token(targets, connect, login):
    admin, reyes = login("admin"), login("dr.reyes")
    with connect(targets["inbox"]) as channel:
        stub = inbox_pb2_grpc.InboxServiceStub(channel)
        reply = stub.SendMessage(
            inbox_pb2.SendMessageRequest(to_staff_ids=[reyes.staff_id], subject="From a service", body="Body"),
            metadata=[("authorization", f"Bearer {admin.token}")],
            timeout=5,
        )
    assert reply.recipient_staff_ids == [reyes.staff_id]
    assert reyes.get(f"/api/v1/messages/{reply.message_id}").json()["body"] == "Body"


def test_grpc_without_token_is_unauthenticated(targets, connect):
    with connect(targets["inbox"]) as channel:
        stub = inbox_pb2_grpc.InboxServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SendMessage(inbox_pb2.SendMessageRequest(subject="s", body="b"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_bad_input_is_invalid_argument(targets, connect, login):
    admin = login("admin")
    metadata = [("authorization", f"Bearer {admin.token}")]
    with connect(targets["inbox"]) as channel:
        raw = channel.unary_unary("/clinic.inbox.v1.InboxService/SendMessage")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff\xff not protobuf", metadata=metadata, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = inbox_pb2_grpc.InboxServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SendMessage(
                inbox_pb2.SendMessageRequest(to_staff_ids=["stf_nobody"], subject="s", body="b"),
                metadata=metadata,
                timeout=5,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_code(caught.value) == "unknown_recipients"
        with pytest.raises(grpc.RpcError) as caught:
            stub.SendMessage(
                inbox_pb2.SendMessageRequest(
                    to_staff_ids=[admin.staff_id], subject="s", body="b", links=["javascript:x"]
                ),
                metadata=metadata,
                timeout=5,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Still serving.
    assert admin.board()["items"] is not None
