"""The `message.delivered.v1` handler: one delivered message in, at most one automatic answer out.

Exactly once, however often the event arrives and however many copies of the service run:

1. the pure rules (domain.decide) pick the slot (replier, kind, sender, activation, day), judged at
   the moment the message was sent (its `sent_at`), against the setting as it is now;
2. the slot is claimed by inserting its document (the primary key is the unique index), holding
   the answer exactly as it will be sent: the text, the message answered, inbox's idempotency key;
3. the answer is sent through inbox's SendMessage with that key, and the slot is marked sent.

Crash windows: before the claim, the redelivered event claims afresh; between the claim and the send,
or between the send and the mark, the redelivered event (or any later message of the same sender
that day) finds the slot unsent and sends again with the same key and text, and inbox answers with
the earlier send instead of a second message; after the mark, the slot is sent and nothing happens.
Two instances racing on one slot both find it unsent at worst, and both send with the same key: one
message. A permanent refusal by inbox (the message is gone, the replier left the agency) releases
the claim so a later message of that sender can be answered.
"""

from __future__ import annotations

import logging

import grpc

from clinic.inbox.v1 import inbox_pb2
from services.auto_reply import domain
from services.auto_reply.clients import InboxClient
from services.auto_reply.store import AutoReplyStore
from services.kit.errors import DomainError
from services.kit.events import Envelope, PermanentError, occurred_at_ms, unpack
from services.kit.service_identity import acting_as

log = logging.getLogger(__name__)

EVENT_TYPE = "message.delivered.v1"
# inbox's refusals that no retry can change: the answer is given up and the slot released.
PERMANENT_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


# _answer's outcome when inbox refused the answer to another message than the one in hand.
REFUSED_OTHER = "refused_other_message"


class InboxUnavailable(Exception):
    """inbox (or directory, for the service token) did not answer: the event is retried."""


def delivered(envelope: Envelope) -> tuple[domain.Delivered, int]:
    """The event as the rules see it, and when the message was sent (epoch ms)."""
    if envelope.event_type != EVENT_TYPE:
        raise PermanentError("unexpected_event_type")
    payload = unpack(envelope, inbox_pb2.MessageDelivered)
    if not payload.agency_id or payload.agency_id != envelope.agency_id:
        raise PermanentError("agency_mismatch")
    if not payload.message_id or not payload.recipient_staff_id:
        raise PermanentError("incomplete_event")
    sent_at = payload.sent_at.ToMilliseconds() if payload.HasField("sent_at") else occurred_at_ms(envelope)
    event = domain.Delivered(
        agency_id=payload.agency_id,
        message_id=payload.message_id,
        recipient_id=payload.recipient_staff_id,
        sender_id=payload.sender_staff_id,
        sender_kind=payload.sender_kind or "staff",
        board_kind=payload.board_kind,
        to_whole_agency=payload.to_whole_agency,
        auto_reply=payload.auto_reply,
    )
    return event, sent_at


class AutoReplier:
    def __init__(self, store: AutoReplyStore, inbox: InboxClient, service_tokens):
        self.store = store
        self.inbox = inbox
        self.service_tokens = service_tokens  # services.kit.service_identity.ServiceTokens

    def handle(self, envelope: Envelope) -> str:
        """Handle one event; returns what happened ("answered", "already_answered", or a skip
        reason), for logs and tests."""
        event, sent_at = delivered(envelope)
        kind, reason = domain.kind_to_answer(event)
        if kind is None:
            return self._skipped(envelope, reason)
        setting = self.store.setting(event.agency_id, event.recipient_id, kind)
        decision = domain.decide(event, setting, sent_at)
        if not decision.answer:
            return self._skipped(envelope, decision.reason)
        assert setting is not None
        outcome = self._answer(envelope, event, setting, decision.slot)
        if outcome == REFUSED_OTHER:
            # inbox refused for good the answer to an earlier message of this sender, whose claim a
            # crashed instance had left unsent; the claim is released, so this message may be answered.
            outcome = self._answer(envelope, event, setting, decision.slot)
        return "refused" if outcome == REFUSED_OTHER else outcome

    def _answer(self, envelope: Envelope, event: domain.Delivered, setting: domain.Setting, slot_key: str) -> str:
        slot, claimed = self.store.claim(
            slot_key,
            event.agency_id,
            {
                "event_id": envelope.event_id,
                "replier_id": setting.staff_id,
                "kind": setting.kind,
                "sender_id": event.sender_id,
                "activation_id": setting.activation_id,
                "in_reply_to": event.message_id,
                "idempotency_key": domain.idempotency_key(slot_key),
            },
            setting.message,
        )
        if slot["sent_at"]:
            # Info, not debug: a sender answered earlier that day, or a repeated event.
            log.info("already answered", extra={"event_id": envelope.event_id, "code": "already_answered"})
            return "already_answered"
        outcome = self.send(slot, envelope.event_id, claimed)
        if outcome == "refused" and slot["in_reply_to"] != event.message_id:
            return REFUSED_OTHER
        return outcome

    def send(self, slot: dict, event_id: str, claimed: bool = True) -> str:
        """Send a claimed slot's answer (again, after a crash: same key, same text)."""
        body = self.store.slot_message(slot)
        try:
            with acting_as(self.service_tokens.identity(slot["agency_id"])):
                sent = self.inbox.send_auto_reply(
                    replier_id=slot["replier_id"],
                    in_reply_to=slot["in_reply_to"],
                    body=body,
                    idempotency_key=slot["idempotency_key"],
                )
        except DomainError as exc:  # no service token: directory refused or is away
            raise InboxUnavailable(f"service token: {exc.code}") from exc
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                self.service_tokens.forget(slot["agency_id"])
            if code in PERMANENT_REFUSALS:
                released = self.store.release(slot["_id"], slot["event_id"])
                log.warning(
                    "inbox refused the automatic answer; given up",
                    extra={"event_id": event_id, "error_type": code.name, "code": "released" if released else "kept"},
                )
                return "refused"
            raise InboxUnavailable(f"inbox: {code.name if code else 'unknown'}") from exc
        self.store.mark_sent(slot["_id"], sent.message_id)
        log.info(
            "automatic answer sent",
            extra={
                "event_id": event_id,
                "message_id": sent.message_id,
                "staff_id": slot["replier_id"],
                "agency_id": slot["agency_id"],
                "code": ("created" if sent.created else "replayed") + ("" if claimed else "_after_retry"),
            },
        )
        return "answered"

    @staticmethod
    def _skipped(envelope: Envelope, reason: str) -> str:
        log.debug("not answered", extra={"event_id": envelope.event_id, "code": reason})
        return reason
