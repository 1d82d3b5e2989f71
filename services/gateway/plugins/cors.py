"""The cors plugin (Kong 3.9): answer preflights and add Access-Control-* headers to responses."""

from __future__ import annotations

import re
import urllib.parse

from services.gateway.context import RequestContext
from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import Array, Boolean, Number, Record, String, num
from services.gateway.model import GatewayModel, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit

_PLAIN_ORIGIN = re.compile(r"^[A-Za-z0-9.:/-]+$")
_MAYBE_REGEX = re.compile(r"[^A-Za-z0-9.:/-]")


def normalize_origin(origin: str) -> tuple[str, str]:
    """(domain, host) of an origin, dropping a default port, as Kong's normalize_origin does.

    Not cached: the Origin header is whatever the client sends, and parsing one is cheap.
    """
    parts = urllib.parse.urlsplit(origin)
    if not parts.hostname:
        return origin, origin
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme == "http" and port == 80) or (parts.scheme == "https" and port == 443):
        port = None
    domain = (f"{parts.scheme}://" if parts.scheme else "") + parts.hostname + (f":{port}" if port else "")
    return domain, parts.hostname


class CorsPlugin(Plugin):
    has_access = True
    has_header_filter = True

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        super().__init__(instance, model)
        self.origins: list[str] = self.conf.get("origins") or []
        self.allowed: list[tuple[str, object, bool]] = []  # (kind, pattern-or-domain, by_host)
        for entry in self.origins:
            if entry == "*":
                continue
            by_host = ":" not in entry
            if _MAYBE_REGEX.search(entry):
                pattern = entry if entry.endswith("$") else entry + "$"
                pattern = pattern[1:] if pattern.startswith("^") else pattern
                self.allowed.append(("regex", re.compile(pattern), by_host))
            else:
                self.allowed.append(("domain", normalize_origin(entry)[0], by_host))

    def _configure_origin(self, ctx: RequestContext, header_filter: bool, origin: str | None) -> bool:
        origins = self.origins
        if not origins or (len(origins) == 1 and origins[0] == "*"):
            ctx.set_response_header("Access-Control-Allow-Origin", "*")
            return True
        self._vary(ctx, header_filter)
        if len(origins) == 1 and _PLAIN_ORIGIN.match(origins[0]):
            ctx.set_response_header("Access-Control-Allow-Origin", origins[0])
            return False
        if origin:
            if "*" in origins:
                ctx.set_response_header("Access-Control-Allow-Origin", "*")
                return True
            domain, host = normalize_origin(origin)
            for kind, pattern, by_host in self.allowed:
                if kind == "regex":
                    found = pattern.match(host if by_host else domain) is not None  # type: ignore[union-attr]
                else:
                    found = domain == pattern
                if found:
                    ctx.set_response_header("Access-Control-Allow-Origin", domain)
                    return False
        ctx.clear_response_header("Access-Control-Allow-Origin")
        return False

    @staticmethod
    def _vary(ctx: RequestContext, header_filter: bool) -> None:
        if header_filter:
            ctx.add_response_header("Vary", "Origin")
        else:
            ctx.set_response_header("Vary", "Origin")

    def _configure_credentials(self, ctx: RequestContext, allow_all: bool, header_filter: bool,
                               origin: str | None) -> None:
        if not self.conf["credentials"]:
            return
        if not allow_all:
            ctx.set_response_header("Access-Control-Allow-Credentials", "true")
            return
        if origin:
            self._vary(ctx, header_filter)
            ctx.set_response_header("Access-Control-Allow-Origin", origin)
            ctx.set_response_header("Access-Control-Allow-Credentials", "true")

    def access(self, ctx: RequestContext) -> Exit | None:
        request = ctx.request
        origin = request.header("origin")
        if request.method != "OPTIONS" or not origin or not request.header("access-control-request-method"):
            return None
        ctx.plugin_state[id(self)] = "preflight"  # no response headers from header_filter for a preflight
        if self.conf["preflight_continue"]:
            return None
        allow_all = self._configure_origin(ctx, False, origin)
        self._configure_credentials(ctx, allow_all, False, origin)
        if self.conf.get("headers"):
            ctx.set_response_header("Access-Control-Allow-Headers", ",".join(self.conf["headers"]))
        else:
            requested = request.header("access-control-request-headers")
            if requested:
                ctx.set_response_header("Access-Control-Allow-Headers", requested)
            else:
                ctx.clear_response_header("Access-Control-Allow-Headers")
        methods = self.conf.get("methods")
        ctx.set_response_header("Access-Control-Allow-Methods", ",".join(methods or t.HTTP_METHODS))
        if self.conf.get("max_age") is not None:
            ctx.set_response_header("Access-Control-Max-Age", num(self.conf["max_age"]))
        if self.conf["private_network"] and request.header("access-control-request-private-network") == "true":
            ctx.set_response_header("Access-Control-Allow-Private-Network", "true")
        return Exit(200, b"")

    def header_filter(self, ctx: RequestContext) -> None:
        if ctx.plugin_state.get(id(self)) == "preflight":
            return
        origin = ctx.request.header("origin")
        if not origin and not self.conf["allow_origin_absent"]:
            return
        allow_all = self._configure_origin(ctx, True, origin)
        self._configure_credentials(ctx, allow_all, True, origin)
        if self.conf.get("exposed_headers"):
            ctx.set_response_header("Access-Control-Expose-Headers", ",".join(self.conf["exposed_headers"]))


def _asterisk_or_regex(value: str) -> str | None:
    if value == "*":
        return None
    try:
        re.compile(value)
    except re.error:
        return f"'{value}' is not a valid regex"
    return None


CONFIG = Record(
    fields={
        "origins": Array(elements=String(custom=_asterisk_or_regex)),
        "headers": Array(elements=String()),
        "exposed_headers": Array(elements=String()),
        "methods": Array(elements=String(one_of=t.HTTP_METHODS), default=list(t.HTTP_METHODS)),
        "max_age": Number(),
        "credentials": Boolean(required=True, default=False),
        "private_network": Boolean(required=True, default=False),
        "preflight_continue": Boolean(required=True, default=False),
        "allow_origin_absent": Boolean(required=True, default=True),
    }
)

SPEC = PluginSpec(name="cors", priority=2000, config=CONFIG, handler=CorsPlugin, protocols=("http", "https"))
