"""JSON logs to stdout: one object per line with service, correlation id and event id.

Never pass message text or patient data to a logger: log ids, counts, codes and
timings only. The formatter copies only the whitelisted `extra` keys below, so
an accidental `extra={"body": ...}` is dropped rather than written.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import traceback

correlation_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)
event_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)

SAFE_EXTRA_KEYS = frozenset(
    {
        "event_id",
        "event_type",
        "security_kind",
        "correlation_id",
        "agency_id",
        "staff_id",
        "message_id",
        "item_id",
        "folder",
        "route",
        "method",
        "status",
        "duration_ms",
        "code",
        "grpc_method",
        "grpc_code",
        "queue",
        "count",
        "attempt",
        "port",
        "address",
        "delay_s",
        "error_type",
        "batch",
        "recipients",
        "collection",
        "request_id",
        "upstream_ms",
        # HL7 v2 interface tracing: MSH-4, MSH-6, MSH-10, MSH-9 and the ACK code (never content).
        "sending_facility",
        "receiving_facility",
        "control_id",
        "message_type",
        "ack_code",
    }
)


MAX_CORRELATION_ID = 128


def accept_correlation_id(value: str | None) -> str | None:
    """An incoming correlation id we can carry everywhere (logs, gRPC metadata, AMQP's 255-byte
    correlation_id): printable ASCII, at most 128 characters; anything else is None."""
    if value and len(value) <= MAX_CORRELATION_ID and value.isascii() and value.isprintable():
        return value
    return None


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        correlation_id = getattr(record, "correlation_id", None) or correlation_id_var.get()
        event_id = getattr(record, "event_id", None) or event_id_var.get()
        if correlation_id:
            entry["correlation_id"] = correlation_id
        if event_id:
            entry["event_id"] = event_id
        for key in SAFE_EXTRA_KEYS:
            if key not in entry and key in record.__dict__:
                entry[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            # The type and the frames, never the exception message: it may quote data.
            exc_type = record.exc_info[0]
            entry["error_type"] = exc_type.__name__
            frames = traceback.extract_tb(record.exc_info[2])
            entry["frames"] = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in frames][-8:]
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON logs for `service`; also turns tracing on when the environment asks for it
    (services.kit.tracing: while it is on, correlation ids are trace ids)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pika", "waitress", "werkzeug", "pymongo"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)  # an exporter retrying is not our log
    from services.kit import tracing

    tracing.configure(service)
