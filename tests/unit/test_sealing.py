"""Sealed event payloads (services.kit.sealing): what a producer seals opens only for the same
envelope, agency and a configured master key."""

import os

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.kit.events import new_envelope
from services.kit.sealing import PayloadSealer, SealError

KEYS = {"m1": os.urandom(32), "m2": os.urandom(32)}


def _event(agency="agency-a", title="Potassium 6.9 critical: call patient"):
    request = inbox_pb2.DeliverItemRequest(title=title, summary="MRN 12345")
    return new_envelope("board_item.delivery_requested.v1", request, agency_id=agency, producer="notifications")


def test_sealed_payload_holds_no_clear_text_and_opens_back():
    envelope = _event()
    clear = envelope.payload
    PayloadSealer(KEYS, "m1").seal(envelope)
    assert envelope.payload_key_id == "m1"
    assert b"Potassium" not in envelope.SerializeToString()
    assert b"MRN" not in envelope.SerializeToString()
    assert PayloadSealer(KEYS, "m2").open(envelope) == clear  # another process, another active key


def test_sealing_twice_keeps_one_layer():
    sealer = PayloadSealer(KEYS, "m1")
    envelope = sealer.seal(_event())
    once = envelope.payload
    assert sealer.seal(envelope).payload == once


@pytest.mark.parametrize("field", ["event_id", "agency_id", "producer", "event_type", "payload_type"])
def test_a_sealed_payload_moved_to_another_envelope_does_not_open(field):
    sealer = PayloadSealer(KEYS, "m1")
    envelope = sealer.seal(_event())
    setattr(envelope, field, getattr(envelope, field) + "x")
    with pytest.raises(SealError):
        sealer.open(envelope)


def test_unknown_master_key_and_damage_are_refused():
    envelope = PayloadSealer(KEYS, "m1").seal(_event())
    with pytest.raises(SealError):
        PayloadSealer({"m2": KEYS["m2"]}, "m2").open(envelope)
    envelope.payload = envelope.payload[:-1] + bytes([envelope.payload[-1] ^ 1])
    with pytest.raises(SealError):
        PayloadSealer(KEYS, "m1").open(envelope)
    envelope.payload = b"short"
    with pytest.raises(SealError):
        PayloadSealer(KEYS, "m1").open(envelope)


def test_agencies_have_different_keys():
    sealer = PayloadSealer(KEYS, "m1")
    a, b = sealer.seal(_event("agency-a")), _event("agency-b")
    b.event_id = a.event_id
    b.occurred_at.CopyFrom(a.occurred_at)
    b.correlation_id = a.correlation_id
    b.payload, b.payload_key_id = a.payload, a.payload_key_id
    with pytest.raises(SealError):
        sealer.open(b)
