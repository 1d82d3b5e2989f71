"""Inbox gRPC servicer: protobuf <-> mailbox for other services."""

from __future__ import annotations

from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.inbox import domain
from services.inbox.mailbox import Mailbox
from services.kit.auth import current_identity
from services.kit.errors import InvalidInput
from services.kit.validation import Bool, Choice, Id, Link, ListOf, Str, validate

PRIORITY_NAMES = {
    inbox_pb2.PRIORITY_UNSPECIFIED: "normal",
    inbox_pb2.PRIORITY_NORMAL: "normal",
    inbox_pb2.PRIORITY_URGENT: "urgent",
}


class InboxServicer(inbox_pb2_grpc.InboxServiceServicer):
    def __init__(self, mailbox: Mailbox, max_subject: int, max_body: int):
        self.mailbox = mailbox
        self.spec = {
            "to_staff_ids": ListOf(Id(), max_items=500),
            "to_team_ids": ListOf(Id(), max_items=100),
            "to_whole_agency": Bool(),
            "subject": Str(max_len=max_subject),
            "body": Str(max_len=max_body, strip=False),
            "priority": Choice(choices=domain.PRIORITIES),
            "links": ListOf(Link(), max_items=10),
        }

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
        draft = domain.Draft(
            addressing=domain.Addressing(
                tuple(fields.get("to_staff_ids", ())), tuple(fields.get("to_team_ids", ())), fields["to_whole_agency"]
            ),
            subject=fields["subject"],
            body=fields["body"],
            priority=fields["priority"],
            links=tuple(fields.get("links", ())),
        )
        key = request.idempotency_key or None
        result = self.mailbox.send(current_identity.get(), draft, key)
        return inbox_pb2.SendMessageResponse(message_id=result.message_id, recipient_staff_ids=result.recipient_ids)
