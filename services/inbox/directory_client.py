"""Inbox's view of directory: recipient resolution over gRPC with the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.inbox.domain import Addressing
from services.kit import grpc_client
from services.kit.errors import from_grpc_error


@dataclass(frozen=True)
class Resolution:
    staff_ids: list[str]
    missing_staff_ids: list[str]
    missing_team_ids: list[str]


class DirectoryClient:
    def __init__(self, target: str, deadline_s: float = 3.0):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)

    def resolve(self, addressing: Addressing) -> Resolution:
        request = directory_pb2.ResolveRecipientsRequest(
            staff_ids=list(addressing.staff_ids),
            team_ids=list(addressing.team_ids),
            whole_agency=addressing.whole_agency,
        )
        try:
            reply = self._stub.ResolveRecipients(request)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc
        return Resolution(list(reply.staff_ids), list(reply.missing_staff_ids), list(reply.missing_team_ids))

    def close(self) -> None:
        self._channel.close()
