"""What one request carries through the gateway: the client's request and the plugins' decisions."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.gateway.model import Consumer, Credential, Route, Service
    from services.gateway.router import Match


def wire(value: str) -> str:
    """A header value as the gateway keeps header text: UTF-8 bytes seen through latin-1."""
    return value if value.isascii() else value.encode("utf-8").decode("latin-1")


class IncomingRequest:
    """A parsed request head. Header names keep the client's spelling; lookups ignore case."""

    __slots__ = ("method", "target", "raw_path", "query", "headers", "_index", "http_version", "keep_alive",
                 "body", "has_body", "chunked", "content_length", "expects_continue")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]], *, http_version: str = "1.1",
                 keep_alive: bool = True, body: Any = None):
        self.method = method
        self.target = target
        raw_path, _, query = target.partition("?")
        self.raw_path = raw_path or "/"
        self.query = query
        self.headers = headers
        index: dict[str, list[str]] = {}
        for name, value in headers:
            index.setdefault(name.lower(), []).append(value)
        self._index = index
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.body = body
        te = index.get("transfer-encoding")
        self.chunked = bool(te) and "chunked" in te[-1].lower()
        cl = index.get("content-length")
        self.content_length = int(cl[0]) if cl and cl[0].strip().isdigit() else None
        self.has_body = self.chunked or bool(self.content_length)
        expect = index.get("expect")
        self.expects_continue = bool(expect) and expect[0].strip().lower() == "100-continue"

    def header(self, name: str) -> str | None:
        values = self._index.get(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return self._index.get(name, [])

    def query_args(self) -> dict[str, list[str | bool]]:
        """Query arguments as Kong sees them: a name without '=' is `true`."""
        args: dict[str, list[str | bool]] = {}
        if not self.query:
            return args
        for part in self.query.split("&"):
            if not part:
                continue
            name, eq, value = part.partition("=")
            key = urllib.parse.unquote_plus(name)
            args.setdefault(key, []).append(urllib.parse.unquote_plus(value) if eq else True)
        return args

    def cookie(self, name: str) -> str | None:
        for header in self.header_values("cookie"):
            for pair in header.split(";"):
                key, _, value = pair.strip().partition("=")
                if key == name:
                    return value
        return None


class RequestContext:
    """Kong's ngx.ctx for one request: matched route, authenticated consumer, pending header changes."""

    __slots__ = ("request", "request_id", "client_ip", "server_port", "started", "match",
                 "route", "service", "consumer", "credential", "upstream_headers",
                 "cleared_query_args", "response_header_ops", "plugin_state", "buffer_body_limit",
                 "size_limit_status", "proxy_started", "connection_serial", "connection_requests", "status",
                 "upstream_ms", "body_signers", "source", "upstream_bytes_received")

    def __init__(self, request: IncomingRequest, request_id: str, client_ip: str, *, server_port: int = 0,
                 connection_serial: int = 0, connection_requests: int = 0):
        self.request = request
        self.request_id = request_id
        self.client_ip = client_ip
        self.server_port = server_port
        self.started = time.perf_counter()
        self.match: Match | None = None
        self.route: Route | None = None
        self.service: Service | None = None
        self.consumer: Consumer | None = None
        self.credential: Credential | None = None
        # lower-case name -> (name, value); a value of None removes the client's header
        self.upstream_headers: dict[str, tuple[str, str | None]] = {}
        self.cleared_query_args: set[str] = set()
        self.response_header_ops: list[tuple[str, str, str | None]] = []
        self.plugin_state: dict[int, Any] = {}
        self.buffer_body_limit: int | None = None
        self.size_limit_status = 413
        self.proxy_started = 0.0
        self.connection_serial = connection_serial
        self.connection_requests = connection_requests
        self.status = 0
        self.upstream_ms: int | None = None
        # Plugins that must see the whole body and the final upstream target before the request is
        # sent (Kong: kong.request.get_raw_body() in the access phase): called as f(ctx, target, body).
        self.body_signers: list[Callable[[RequestContext, str, bytes], None]] = []
        # kong.response.get_source(): "service" (the upstream answered), "exit" (a plugin or the router
        # answered) or "error" (the gateway failed: the upstream gave no usable answer, a plugin broke).
        self.source = "exit"
        # nginx's $upstream_bytes_received for the last try: 0 when no byte of an answer came back.
        self.upstream_bytes_received = 0

    # kong.service.request.*
    def set_upstream_header(self, name: str, value: str) -> None:
        self.upstream_headers[name.lower()] = (name, wire(value))

    def clear_upstream_header(self, name: str) -> None:
        self.upstream_headers[name.lower()] = (name, None)

    def upstream_header(self, name: str) -> str | None:
        """The value the service will get for `name`: a plugin's, else the client's (wire text)."""
        lower = name.lower()
        if lower in self.upstream_headers:
            return self.upstream_headers[lower][1]
        return self.request.header(lower)

    def keep_upstream_header(self, name: str, value: str | None) -> None:
        """Send exactly `value` (already wire text, as upstream_header returns it), or nothing."""
        self.upstream_headers[name.lower()] = (name, value or None)

    def clear_query_arg(self, name: str) -> None:
        self.cleared_query_args.add(name)

    # kong.response.*
    def set_status(self, status: int) -> None:
        """kong.response.set_status in the header_filter phase: the status the client gets."""
        self.status = status

    def set_response_header(self, name: str, value: str) -> None:
        self.response_header_ops.append(("set", name, wire(value)))

    def add_response_header(self, name: str, value: str) -> None:
        self.response_header_ops.append(("add", name, wire(value)))

    def clear_response_header(self, name: str) -> None:
        self.response_header_ops.append(("clear", name, None))

    def authenticate(self, consumer: Consumer | None, credential: Credential | None) -> None:
        self.consumer = consumer
        self.credential = credential

    def set_consumer_headers(self, consumer: Consumer | None, credential_identifier: str | None,
                             anonymous: bool) -> None:
        """The X-Consumer-* headers every Kong auth plugin sets (or clears) for the upstream."""
        for header, value in (
            ("X-Consumer-ID", consumer.id if consumer else None),
            ("X-Consumer-Custom-ID", consumer.custom_id if consumer else None),
            ("X-Consumer-Username", consumer.username if consumer else None),
            ("X-Credential-Identifier", credential_identifier),
        ):
            if value:
                self.set_upstream_header(header, value)
            else:
                self.clear_upstream_header(header)
        if anonymous:
            self.set_upstream_header("X-Anonymous-Consumer", "true")
        else:
            self.clear_upstream_header("X-Anonymous-Consumer")


def apply_header_ops(headers: list[tuple[str, str]], ops: list[tuple[str, str, str | None]]) -> list[tuple[str, str]]:
    """kong.response.set_header / add_header / clear_header, in the order the plugins called them."""
    if not ops:
        return headers
    present = {n.lower() for n, _ in headers}
    for op, name, value in ops:
        lower = name.lower()
        if op != "add" and lower in present:
            headers = [(n, v) for n, v in headers if n.lower() != lower]
            present.discard(lower)
        if op != "clear" and value is not None:
            headers.append((name, value))
            present.add(lower)
    return headers
