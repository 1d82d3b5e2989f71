"""auto-reply's view of other services over gRPC: inbox (send the answer) and directory (the
agency's time zone). Every call carries the current identity (a staff token while serving a
request, the service's own token for an agency while handling an event) and a deadline."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.kit import grpc_client
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
        self._zones: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def agency_time_zone(self, agency_id: str) -> str:
        """The caller's agency's IANA time zone, cached for a minute."""
        now = time.monotonic()
        with self._lock:
            cached = self._zones.get(agency_id)
        if cached is not None and now - cached[0] < SETTINGS_TTL_S:
            return cached[1]
        try:
            reply = self._stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest())
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc
        zone = reply.time_zone or "UTC"
        with self._lock:
            self._zones[agency_id] = (now, zone)
        return zone

    def close(self) -> None:
        self._channel.close()
