"""Small helpers every suite shares, defined once: the demo password, bearer tokens for HTTP and gRPC,
a settable clock, and reading an HL7 ACK's MSA segment."""

from __future__ import annotations

import uuid
from typing import NamedTuple

import hl7
import requests
from requests.adapters import HTTPAdapter

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


class FromAddress(HTTPAdapter):
    """Connections made from one local address: a client of its own, as a server sees it."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def loopback_address() -> str:
    """A loopback address of its own (none of a stack's hops uses it): a distinct client."""
    return f"127.{uuid.uuid4().int % 200 + 20}.{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 2}"


def client_from(address: str | None = None) -> requests.Session:
    """A requests session whose connections come from `address` (default: a fresh loopback one), so a
    test's requests are a client of their own whatever other tests did from 127.0.0.1."""
    session = requests.Session()
    session.mount("http://", FromAddress(address or loopback_address()))
    return session
