"""The correlation-id plugin (Kong 3.9): keep or mint a request's correlation id, pass it on, echo it."""

from __future__ import annotations

import itertools
import os
import time
import uuid

from services.gateway.context import RequestContext
from services.gateway.declarative.schema import Boolean, Record, String
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit

GENERATORS = ("uuid", "uuid#counter", "tracker")

_WORKER_UUID = str(uuid.uuid4())
_COUNTER = itertools.count(1)


def generate(kind: str, ctx: RequestContext) -> str:
    if kind == "uuid":
        return str(uuid.uuid4())
    if kind == "uuid#counter":
        return f"{_WORKER_UUID}#{next(_COUNTER)}"
    # tracker: server address and port, worker pid, connection serial, requests on it, time
    return (f"127.0.0.1-{ctx.server_port}-{os.getpid()}-{ctx.connection_serial}-{ctx.connection_requests}-"
            f"{time.time():.3f}")


class CorrelationIdPlugin(Plugin):
    has_access = True
    has_header_filter = True

    def access(self, ctx: RequestContext) -> Exit | None:
        name = self.conf["header_name"]
        value = ctx.request.header(name.lower())
        if not value:
            value = generate(self.conf["generator"], ctx)
            ctx.set_upstream_header(name, value)
        ctx.plugin_state[id(self)] = value
        return None

    def header_filter(self, ctx: RequestContext) -> None:
        if not self.conf["echo_downstream"]:
            return
        name = self.conf["header_name"]
        value = ctx.plugin_state.get(id(self)) or ctx.request.header(name.lower())
        if not value:
            value = generate(self.conf["generator"], ctx)
        ctx.set_response_header(name, value)


CONFIG = Record(
    fields={
        "header_name": String(default="Kong-Request-ID"),
        "generator": String(required=True, default="uuid#counter", one_of=GENERATORS),
        "echo_downstream": Boolean(required=True, default=False),
    }
)

SPEC = PluginSpec(name="correlation-id", priority=100001, config=CONFIG, handler=CorrelationIdPlugin)
