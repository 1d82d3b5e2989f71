"""The request-size-limiting plugin (Kong 3.9): refuse bodies larger than allowed.

A declared Content-Length is checked before any byte of the body is read. A
chunked body (no Content-Length) is counted as it arrives and held until it is
complete or over the limit, so the upstream never sees a body that will be
refused; Kong buffers such a body whole before deciding, with the same result.
"""

from __future__ import annotations

from services.gateway.context import RequestContext
from services.gateway.declarative.schema import Boolean, Integer, Record, String
from services.gateway.model import GatewayModel, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit, error

SIZE_UNITS = ("megabytes", "kilobytes", "bytes")
MULTIPLIER = {"bytes": 1, "kilobytes": 1024, "megabytes": 2**20}
MESSAGE = "Request size limit exceeded"


class RequestSizeLimitingPlugin(Plugin):
    has_access = True

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        super().__init__(instance, model)
        self.allowed_bytes = self.conf["allowed_payload_size"] * MULTIPLIER[self.conf["size_unit"]]

    def access(self, ctx: RequestContext) -> Exit | None:
        request = ctx.request
        status = 417 if request.expects_continue else 413
        if request.content_length is not None:
            if request.content_length > self.allowed_bytes:
                return error(status, ctx.request_id, request.header("accept"), MESSAGE)
            return None
        if self.conf["require_content_length"]:
            return error(411, ctx.request_id, request.header("accept"), "A valid Content-Length header is required")
        if request.chunked:
            limit = self.allowed_bytes
            ctx.buffer_body_limit = limit if ctx.buffer_body_limit is None else min(limit, ctx.buffer_body_limit)
            ctx.size_limit_status = status
        return None


CONFIG = Record(
    fields={
        "allowed_payload_size": Integer(default=128),
        "size_unit": String(required=True, default="megabytes", one_of=SIZE_UNITS),
        "require_content_length": Boolean(required=True, default=False),
    }
)

SPEC = PluginSpec(name="request-size-limiting", priority=951, config=CONFIG, handler=RequestSizeLimitingPlugin)
