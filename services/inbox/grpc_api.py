"""Inbox gRPC servicer: protobuf <-> mailbox for other services.

The same role rules as the HTTP twins (docs/audit-coverage.md lists them):
- SendMessage (twin: POST /api/v1/messages and its reply route) sends as the caller, a staff member
  whose roles allow composing a message; a service token sends only as a named staff member of the
  token's agency, and only the services allowed to (auto-reply), which may also mark the message
  automatic. With `in_reply_to_message_id` it is a Reply to that message, in its thread.
- DeliverItem is the delivery API (services/inbox/delivery.py): service tokens only.
Every refusal answers PERMISSION_DENIED with a stable `error-code` and leaves an `access_refused`
security event; a message the caller may not reply to is the audited 404 of the HTTP edge.
"""

from __future__ import annotations

from clinic.directory.v1 import directory_pb2
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.inbox import domain
from services.inbox.mailbox import Mailbox
from services.inbox.schemas import IDEMPOTENCY_KEY, PRIORITY_TO_PB, draft_from, reply_spec, require_body, send_spec
from services.kit.auth import (
    KIND_SERVICE,
    KIND_STAFF,
    ROLES,
    SERVICE_SUBJECT_PREFIX,
    Identity,
    agency_caller,
)
from services.kit.errors import Forbidden, InvalidInput
from services.kit.security_events import SecurityLog, grpc_refusals_recorded
from services.kit.validation import Id, validate

SERVICE_NAME = inbox_pb2.DESCRIPTOR.services_by_name["InboxService"].full_name
PRIORITY_NAMES = {pb: name for name, pb in PRIORITY_TO_PB.items()} | {inbox_pb2.PRIORITY_UNSPECIFIED: "normal"}
# Services that may send as a staff member of their token's agency, and mark messages automatic.
SEND_AS_SERVICES = frozenset({"auto-reply"})
# directory's Role enum (ROLE_STAFF, ...) -> the role names tokens carry.
ROLE_NAMES = {directory_pb2.Role.Value(f"ROLE_{role.upper()}"): role for role in ROLES}


def may_send_as_staff(caller: Identity) -> bool:
    return caller.kind == KIND_SERVICE and caller.subject.removeprefix(SERVICE_SUBJECT_PREFIX) in SEND_AS_SERVICES


refusals_recorded = grpc_refusals_recorded(SERVICE_NAME)


class InboxServicer(inbox_pb2_grpc.InboxServiceServicer):
    def __init__(  # noqa: PLR0913 - the parts the two methods use
        self,
        mailbox: Mailbox,
        max_subject: int,
        max_body: int,
        delivery,
        directory,
        *,
        security: SecurityLog | None = None,
    ):
        self.mailbox = mailbox
        self.delivery = delivery
        self.directory = directory
        self.security = security
        self.spec = send_spec(max_subject, max_body)
        self.replies = reply_spec(max_body)

    @refusals_recorded
    def SendMessage(self, request: inbox_pb2.SendMessageRequest, context) -> inbox_pb2.SendMessageResponse:  # noqa: N802
        if request.priority not in PRIORITY_NAMES:
            raise InvalidInput("invalid_value", "priority is not a known value")
        caller = agency_caller()
        sender = self._sender(caller, request)
        key = IDEMPOTENCY_KEY.clean("idempotency_key", request.idempotency_key) if request.idempotency_key else None
        if sender.kind == KIND_STAFF and not domain.may_compose(sender.roles, domain.COMPOSE_MESSAGE):
            raise Forbidden("compose_not_allowed", "the sender's roles do not allow composing a message")
        if request.in_reply_to_message_id:
            result = self._reply(sender, request, key)
        else:
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
            result = self.mailbox.send(sender, draft_from(fields), key, auto_reply=request.auto_reply)
        return inbox_pb2.SendMessageResponse(
            message_id=result.message_id,
            recipient_staff_ids=result.recipient_ids,
            thread_id=result.thread_id,
            created=result.created,
        )

    def _sender(self, caller: Identity, request: inbox_pb2.SendMessageRequest) -> Identity:
        """Who the message is from: the caller (a staff member), or the named staff member for a
        service allowed to. A service never sends as itself: the HTTP twin serves staff only."""
        named = request.sender_staff_id
        if (named and named != caller.subject) or request.auto_reply:
            if not may_send_as_staff(caller):
                raise Forbidden("send_as_not_allowed", "this caller may not send as someone else or automatically")
        if caller.kind != KIND_STAFF and (not named or named == caller.subject):
            raise Forbidden("staff_only", "a service sends only as a named staff member")
        if not named or named == caller.subject:
            return caller
        Id().clean("sender_staff_id", named)
        found, _missing = self.directory.staff([named])
        member = next((m for m in found if m.staff_id == named and m.active), None)
        if member is None:
            raise InvalidInput("unknown_sender", "the sender is not an active staff member of this agency")
        return Identity(
            subject=member.staff_id,
            agency_id=caller.agency_id,
            roles=frozenset(ROLE_NAMES[r] for r in member.roles if r in ROLE_NAMES),
            kind=KIND_STAFF,
            name=member.display_name,
        )

    def _reply(self, sender: Identity, request: inbox_pb2.SendMessageRequest, key: str | None):
        if request.to_staff_ids or request.to_team_ids or request.to_whole_agency or request.subject:
            raise InvalidInput("invalid_value", "a reply takes its recipients and subject from the message it answers")
        message_id = Id().clean("in_reply_to_message_id", request.in_reply_to_message_id)
        fields = validate(
            {"body": request.body, "priority": PRIORITY_NAMES[request.priority], "links": list(request.links)},
            self.replies,
        )
        require_body(fields)
        return self.mailbox.reply(
            sender,
            message_id,
            body=fields["body"],
            links=tuple(fields.get("links", ())),
            priority=fields.get("priority", "normal"),
            idempotency_key=key,
            auto_reply=request.auto_reply,
        )

    @refusals_recorded
    def DeliverItem(self, request: inbox_pb2.DeliverItemRequest, context) -> inbox_pb2.DeliverItemResponse:  # noqa: N802
        return self.delivery.deliver_grpc(request)
