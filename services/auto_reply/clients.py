"""auto-reply's view of other services over gRPC: inbox (send the answer) and directory (the
agency's time zone). Every call carries the current identity (a staff token while serving a
request, the service's own token for an agency while handling an event) and a deadline."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.kit import grpc_client
from services.kit.cache import TtlCache
from services.kit.errors import from_grpc_error

SETTINGS_TTL_S = 60.0


@dataclass(frozen=True)
class Sent:
    message_id: str
    created: bool  # False: inbox answered an earlier send under the same idempotency key


class InboxClient:
    def __init__(self, target: str, deadline_s: float = 5.0):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = inbox_pb2_grpc.InboxServiceStub(self._channel)

    def send_auto_reply(self, *, replier_id: str, in_reply_to: str, body: str, idempotency_key: str) -> Sent:
        """Answer `in_reply_to` as the away staff member, in its thread, marked automatic.
        Raises grpc.RpcError (the caller tells transient from permanent refusals)."""
        reply = self._stub.SendMessage(
            inbox_pb2.SendMessageRequest(
                sender_staff_id=replier_id,
                in_reply_to_message_id=in_reply_to,
                body=body,
                auto_reply=True,
                idempotency_key=idempotency_key,
            )
        )
        return Sent(reply.message_id, reply.created)

    def close(self) -> None:
        self._channel.close()


class DirectoryClient:
    def __init__(self, target: str, deadline_s: float = 3.0):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._zones: TtlCache[str, str] = TtlCache(SETTINGS_TTL_S)

    def agency_time_zone(self, agency_id: str) -> str:
        """The caller's agency's IANA time zone, cached for a minute."""
        return self._zones.get_or_load(agency_id, self._fetch_time_zone)

    def _fetch_time_zone(self) -> str:
        try:
            reply = self._stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest())
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc
        return reply.time_zone or "UTC"

    def close(self) -> None:
        self._channel.close()
