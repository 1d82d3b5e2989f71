"""What the interface team counts: HL7 v2 messages by sending facility, message type and the
acknowledgement code sent, and how long each took until its ACK (Prometheus, served at /metrics on
the service's HTTP port).

Label values are bounded: message types and codes come from fixed sets, and sending facilities
past `MAX_FACILITIES` distinct ones are counted as "other" (a sender cannot grow the series).
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Histogram

MAX_FACILITIES = 200
KNOWN_TYPES = frozenset({"ORU^R01", "SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15", "SIU^S17", "SIU^S26"})

HL7_MESSAGES = Counter(
    "hl7_messages",
    "HL7 v2 messages received over MLLP, by sending facility (MSH-4), message type and the ACK code sent",
    ["sending_facility", "message_type", "ack_code"],
)

HL7_HANDLING = Histogram(
    "hl7_message_handling_seconds",
    "From an HL7 v2 message read off its MLLP connection until its ACK is ready, by message type",
    ["message_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

_facilities: set[str] = set()
_lock = threading.Lock()


def _facility_label(facility: str) -> str:
    if not facility:
        return "unknown"
    with _lock:
        if facility in _facilities:
            return facility
        if len(_facilities) < MAX_FACILITIES:
            _facilities.add(facility)
            return facility
    return "other"


def count_message(sending_facility: str, message_type: str, ack_code: str, seconds: float | None = None) -> None:
    kind = message_type if message_type in KNOWN_TYPES else ("other" if message_type else "unknown")
    HL7_MESSAGES.labels(_facility_label(sending_facility), kind, ack_code or "none").inc()
    if seconds is not None:
        HL7_HANDLING.labels(kind).observe(seconds)
