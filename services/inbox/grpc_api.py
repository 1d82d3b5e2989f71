"""Inbox gRPC servicer: protobuf <-> mailbox for other services."""

from __future__ import annotations

from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.inbox.mailbox import Mailbox
from services.inbox.schemas import IDEMPOTENCY_KEY, PRIORITY_TO_PB, draft_from, send_spec
from services.kit.auth import agency_caller
from services.kit.errors import InvalidInput, Unavailable
from services.kit.validation import validate

PRIORITY_NAMES = {pb: name for name, pb in PRIORITY_TO_PB.items()} | {inbox_pb2.PRIORITY_UNSPECIFIED: "normal"}


class InboxServicer(inbox_pb2_grpc.InboxServiceServicer):
    def __init__(self, mailbox: Mailbox, max_subject: int, max_body: int, delivery=None):
        self.mailbox = mailbox
        self.delivery = delivery
        self.spec = send_spec(max_subject, max_body)

    def SendMessage(self, request: inbox_pb2.SendMessageRequest, context) -> inbox_pb2.SendMessageResponse:  # noqa: N802
        if request.priority not in PRIORITY_NAMES:
            raise InvalidInput("invalid_value", "priority is not a known value")
        fields = validate(
            {
                "to_staff_ids": list(request.to_staff_ids),
                "to_team_ids": list(request.to_team_ids),
                "to_whole_agency": request.to_whole_agency,
                "subject": request.subject,
                "body": request.body,
                "priority": PRIORITY_NAMES[request.priority],
                "links": list(request.links),
            },
            self.spec,
        )
        draft = draft_from(fields)
        key = IDEMPOTENCY_KEY.clean("idempotency_key", request.idempotency_key) if request.idempotency_key else None
        result = self.mailbox.send(agency_caller(), draft, key)
        return inbox_pb2.SendMessageResponse(message_id=result.message_id, recipient_staff_ids=result.recipient_ids)

    def DeliverItem(self, request: inbox_pb2.DeliverItemRequest, context) -> inbox_pb2.DeliverItemResponse:  # noqa: N802
        if self.delivery is None or not hasattr(self.delivery, "deliver_grpc"):
            raise Unavailable("delivery_unavailable", "item delivery is not available")
        return self.delivery.deliver_grpc(request)
