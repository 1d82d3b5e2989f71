"""JSON logs to stdout, the project's format plus the gateway's request fields.

Only the method, route name, status, timings and request id of a request are
logged: never its path or query string (they can name a patient), headers,
tokens or bodies.
"""

from __future__ import annotations

import json
import logging
import sys

from services.kit.logs import JsonFormatter

GATEWAY_EXTRA_KEYS = ("request_id", "upstream_ms")


class GatewayJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: record.__dict__[k] for k in GATEWAY_EXTRA_KEYS if k in record.__dict__}
        if not extra:
            return line
        return line[:-1] + ", " + json.dumps(extra, default=str)[1:]  # splice into the object


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(GatewayJsonFormatter("gateway"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
