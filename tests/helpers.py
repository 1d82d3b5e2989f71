"""Small helpers every suite shares, defined once: the demo password, bearer tokens for HTTP and gRPC,
a settable clock, and reading an HL7 ACK's MSA segment."""

from __future__ import annotations

from typing import NamedTuple

import hl7

from services.directory.demo import DEMO_PASSWORD

__all__ = ["DEMO_PASSWORD", "Ack", "Clock", "auth", "bearer", "msa"]

MLLP_FRAME = b"\x0b\x1c\r"


def bearer(token: str) -> dict[str, str]:
    """HTTP headers carrying a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def auth(token: str) -> list[tuple[str, str]]:
    """gRPC metadata carrying a bearer token."""
    return [("authorization", f"Bearer {token}")]


class Clock:
    """A clock a test sets, for code that takes `clock=`: calling it gives `now` (seconds)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


class Ack(NamedTuple):
    """An ACK's MSA segment: MSA-1 acknowledgment code, MSA-2 control id, MSA-3 text ("" when absent)."""

    code: str
    control_id: str
    text: str = ""


def msa(ack: bytes | str | hl7.Message) -> Ack:
    """The MSA segment of an ACK: as received (MLLP frame or not) or as python-hl7 parsed it."""
    if isinstance(ack, bytes):
        ack = ack.strip(MLLP_FRAME).decode("ascii")
    if isinstance(ack, str):
        ack = hl7.parse(ack)
    segment = ack.segment("MSA")
    return Ack(str(segment(1)), str(segment(2)), str(segment(3)) if len(segment) > 3 else "")


def staged_accesses(db):
    """Every phi.accessed.v1 event staged in `db.access_records` (kit audit's outbox documents), as
    (envelope, PhiAccessed) pairs."""
    from clinic.audit.v1 import audit_pb2
    from clinic.events.v1.envelope_pb2 import Envelope

    found = []
    for record in db["access_records"].find():
        for entry in record["_outbox"].values():
            envelope = Envelope()
            envelope.ParseFromString(entry["env"])
            accessed = audit_pb2.PhiAccessed()
            accessed.ParseFromString(envelope.payload)
            found.append((envelope, accessed))
    return found
