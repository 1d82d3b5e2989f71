"""The event envelope: building, decoding and unpacking the protobuf that every bus message carries.

An event's routing key is its `event_type`, shaped `<aggregate>.<past_tense_verb>.v<N>`
(e.g. `message.delivered.v1`). The payload is a protobuf message from `protos/`, serialized
into `Envelope.payload` and named by `Envelope.payload_type`.

Errors raised here carry a `reason` that is safe to log and to put in message headers: it
names what is wrong with the event, never what the event says.
"""

from __future__ import annotations

import re
import traceback
import uuid
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import sealing
from services.kit.logs import accept_correlation_id
from services.kit.sealing import PayloadSealer, SealError

__all__ = [
    "Envelope",
    "MalformedEvent",
    "PermanentError",
    "decode_envelope",
    "failure_summary",
    "is_valid_event_id",
    "new_envelope",
    "occurred_at_ms",
    "unpack",
]

M = TypeVar("M", bound=Message)

# `<aggregate>.<past_tense_verb>.v<N>`; extra dotted segments allowed (`lab.result.received.v1`).
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\.v[1-9][0-9]*$")
# Event ids become Mongo field names (`_outbox.<id>`) and key parts (`<consumer>:<id>`).
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class PermanentError(Exception):
    """A handler failure that retrying cannot fix: the event goes straight to the parking queue.

    `reason` is recorded in the parking queue's headers and in logs, so it must be a short code
    or phrase chosen by the developer (`"unknown_recipient"`), never text taken from the event.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MalformedEvent(PermanentError):
    """Bytes that are not a valid envelope, or a payload that is not the expected message."""


def is_valid_event_id(event_id: str) -> bool:
    return bool(EVENT_ID_RE.match(event_id))


def new_envelope(
    event_type: str,
    payload: Message,
    *,
    agency_id: str,
    producer: str,
    correlation_id: str | None = None,
    event_id: str | None = None,
) -> Envelope:
    """Wrap `payload` in a new envelope stamped now (UTC).

    `event_id` defaults to a fresh uuid4 hex; `correlation_id` defaults to the event id (the
    event starts its own chain). Raises ValueError for a badly shaped type or id.
    """
    if not EVENT_TYPE_RE.match(event_type):
        raise ValueError(f"event type {event_type!r} is not '<aggregate>.<past_tense_verb>.v<N>'")
    if correlation_id is not None and accept_correlation_id(correlation_id) is None:
        raise ValueError("correlation id must be printable ASCII of at most 128 characters")
    event_id = event_id or uuid.uuid4().hex
    if not is_valid_event_id(event_id):
        raise ValueError("event id must be 1-128 characters of [A-Za-z0-9_-]")
    envelope = Envelope(
        event_id=event_id,
        event_type=event_type,
        producer=producer,
        agency_id=agency_id,
        correlation_id=correlation_id or event_id,
        payload_type=payload.DESCRIPTOR.full_name,
        payload=payload.SerializeToString(),
    )
    envelope.occurred_at.GetCurrentTime()
    return envelope


def decode_envelope(data: bytes) -> Envelope:
    """Parse bus bytes into an Envelope; MalformedEvent when they are not a usable one."""
    envelope = Envelope()
    try:
        envelope.ParseFromString(data)
    except (DecodeError, TypeError, ValueError) as exc:
        raise MalformedEvent("body is not a protobuf envelope") from exc
    if not envelope.event_id:
        raise MalformedEvent("envelope has no event_id")
    if not is_valid_event_id(envelope.event_id):
        raise MalformedEvent("envelope event_id is not a valid id")
    if not envelope.event_type:
        raise MalformedEvent("envelope has no event_type")
    return envelope


def unpack(envelope: Envelope, message_cls: type[M], sealer: PayloadSealer | None = None) -> M:
    """The envelope's payload as `message_cls`, opened first when it is sealed (with `sealer`, by
    default the process's, services.kit.sealing); MalformedEvent on a type mismatch, bad bytes or a
    sealed payload that does not open."""
    expected = message_cls.DESCRIPTOR.full_name
    if envelope.payload_type != expected:
        found = envelope.payload_type[:120] or "nothing"
        raise MalformedEvent(f"payload type is {found}, expected {expected}")
    payload = envelope.payload
    if envelope.payload_key_id:
        try:
            payload = (sealer or sealing.sealer()).open(envelope)
        except SealError as exc:
            raise MalformedEvent("sealed payload does not open") from exc
    message = message_cls()
    try:
        message.ParseFromString(payload)
    except (DecodeError, TypeError, ValueError) as exc:
        raise MalformedEvent(f"payload does not parse as {expected}") from exc
    return message


def occurred_at_ms(envelope: Envelope) -> int:
    return envelope.occurred_at.ToMilliseconds()


def failure_summary(exc: BaseException) -> str:
    """`TypeName at file.py:123 in function`: where a failure happened, without its message.

    Exception messages may quote the data being handled, so logs get this instead of a traceback.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(exc).__name__}{where}"
