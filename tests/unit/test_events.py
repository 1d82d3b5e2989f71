"""Envelope helpers: building, decoding and unpacking events."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.events import (
    MalformedEvent,
    PermanentError,
    decode_envelope,
    new_envelope,
    occurred_at_ms,
    unpack,
)


def delivered_envelope(**options) -> Envelope:
    payload = MessageDelivered(message_id="m-1", agency_id="agency-1")
    return new_envelope("message.delivered.v1", payload, agency_id="agency-1", producer="inbox", **options)


def test_new_envelope_stamps_ids_type_and_time():
    envelope = delivered_envelope()
    assert len(envelope.event_id) == 32
    assert envelope.event_type == "message.delivered.v1"
    assert envelope.payload_type == "clinic.inbox.v1.MessageDelivered"
    assert envelope.producer == "inbox"
    assert envelope.agency_id == "agency-1"
    assert envelope.correlation_id == envelope.event_id  # a new chain starts at its first event
    assert envelope.occurred_at.seconds > 1_700_000_000


def test_new_envelope_keeps_given_ids():
    envelope = delivered_envelope(event_id="evt-1", correlation_id="req-7")
    assert (envelope.event_id, envelope.correlation_id) == ("evt-1", "req-7")


def test_each_envelope_gets_its_own_id():
    assert delivered_envelope().event_id != delivered_envelope().event_id


@pytest.mark.parametrize("event_type", ["MessageDelivered", "message.delivered", "message.delivered.V1", "message..v1"])
def test_event_type_must_be_aggregate_verb_version(event_type):
    with pytest.raises(ValueError):
        new_envelope(event_type, MessageDelivered(), agency_id="a", producer="inbox")


def test_event_id_must_be_safe_as_a_field_name():
    with pytest.raises(ValueError):
        delivered_envelope(event_id="a.b")


def test_envelope_round_trips_through_bytes():
    envelope = delivered_envelope()
    assert decode_envelope(envelope.SerializeToString()) == envelope


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"hello", b"\n\x05abc"])
def test_garbage_bytes_are_malformed(data):
    with pytest.raises(MalformedEvent) as caught:
        decode_envelope(data)
    assert caught.value.reason == "body is not a protobuf envelope"


def test_envelope_without_event_id_or_type_is_malformed():
    with pytest.raises(MalformedEvent, match="event_id"):
        decode_envelope(b"")
    with pytest.raises(MalformedEvent, match="event_type"):
        decode_envelope(Envelope(event_id="e1").SerializeToString())
    with pytest.raises(MalformedEvent, match="event_id"):
        decode_envelope(Envelope(event_id="e.1", event_type="a.b.v1").SerializeToString())


def test_unpack_returns_the_payload():
    assert unpack(delivered_envelope(), MessageDelivered).message_id == "m-1"


def test_unpack_refuses_another_payload_type():
    with pytest.raises(MalformedEvent, match="expected google.protobuf.Timestamp"):
        unpack(delivered_envelope(), Timestamp)


def test_unpack_refuses_garbage_payload():
    envelope = delivered_envelope()
    envelope.payload = b"\xff\xff\xff"
    with pytest.raises(MalformedEvent, match="does not parse"):
        unpack(envelope, MessageDelivered)


def test_malformed_event_is_a_permanent_error_with_a_reason():
    error = MalformedEvent("envelope has no event_id")
    assert isinstance(error, PermanentError)
    assert error.reason == "envelope has no event_id"


def test_occurred_at_in_epoch_milliseconds():
    envelope = delivered_envelope()
    envelope.occurred_at.FromMilliseconds(1_767_225_600_123)
    assert occurred_at_ms(envelope) == 1_767_225_600_123


def test_a_correlation_id_the_broker_cannot_carry_is_refused():
    for bad in ("\xe9" * 128, "x" * 129, "a\nb"):
        with pytest.raises(ValueError, match="correlation id"):
            new_envelope("message.delivered.v1", MessageDelivered(), agency_id="a", producer="p", correlation_id=bad)
