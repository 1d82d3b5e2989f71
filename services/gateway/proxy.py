"""One request through the gateway: route, run the plugins, proxy, answer — as Kong 3.9 does.

Phases follow Kong's: the router picks the route; the plugins that apply to it
(one instance per plugin name, the most specific scope winning) run their
access phase in priority order until one answers; otherwise the request goes
to the service with Kong's upstream headers, retried on connection failures
as nginx retries; every response, proxied or not, passes the plugins'
header_filter phase and gets Kong's response headers. Every answer is written
with `await conn.drain()`, so a client that stops reading stops being served.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from email.utils import formatdate

from services.gateway.context import IncomingRequest, RequestContext, apply_header_ops
from services.gateway.model import GatewayModel, PluginInstance, Route
from services.gateway.plugins import REGISTRY
from services.gateway.plugins.base import Plugin
from services.gateway.responses import SERVER, VIA, Exit, error, reason
from services.gateway.router import Router, strip_port
from services.gateway.server import ClientConnection, ClientGone
from services.gateway.upstream import UpstreamConnection, UpstreamError, UpstreamPool, UpstreamTimeout
from services.kit import tracing

log = logging.getLogger("services.gateway")
access_log = logging.getLogger("services.gateway.access")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade"})
# Request headers the gateway writes itself (or must not forward as they came).
REPLACED = HOP_BY_HOP | {"host", "content-length", "expect", "x-real-ip", "x-forwarded-for", "x-forwarded-proto",
                         "x-forwarded-host", "x-forwarded-port", "x-forwarded-path", "x-forwarded-prefix",
                         "x-kong-request-id"}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
SMALL_BODY_DRAIN = 64 * 1024


def new_request_id() -> str:
    return os.urandom(16).hex()  # Kong's request id: 32 hex characters


_date_cache = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return _date_cache[1]


def strip_query_args(query: str, names: set[str]) -> str:
    kept = [part for part in query.split("&")
            if part and urllib.parse.unquote_plus(part.partition("=")[0]) not in names]
    return "&".join(kept)


def plugins_for_route(route: Route, instances: list[PluginInstance], scheme: str = "http") -> list[PluginInstance]:
    """Kong's precedence: for each plugin name, the instance of the most specific scope applies; only
    instances whose `protocols` include the listener's scheme run."""
    best: dict[str, tuple[int, PluginInstance]] = {}
    for instance in instances:
        if not instance.enabled or scheme not in instance.protocols:
            continue
        if instance.route is not None and instance.route is not route:
            continue
        if instance.service is not None and instance.service is not route.service:
            continue
        level = (0 if instance.route and instance.service else 1 if instance.route else 2 if instance.service else 3)
        if instance.name not in best or level < best[instance.name][0]:
            best[instance.name] = (level, instance)
    chosen = [instance for _, instance in best.values()]
    chosen.sort(key=lambda i: (-REGISTRY[i.name].priority, i.name))
    return chosen


class Gateway:
    def __init__(self, model: GatewayModel, server_port: int, pool: UpstreamPool, access_log_enabled: bool = True,
                 scheme: str = "http"):
        self.model = model
        self.server_port = server_port
        self.scheme = scheme  # the listener's: "https" with GATEWAY_TLS_*, as Kong's `ssl` listener
        self.pool = pool
        self.router = Router(model.routes)
        self.access_log_enabled = access_log_enabled
        self.draining = False
        handlers: dict[str, Plugin] = {}
        for instance in model.plugins:
            handlers[instance.id] = REGISTRY[instance.name].handler(instance, model)
        self.handlers = handlers
        self.by_route: dict[str, tuple[list[Plugin], list[Plugin]]] = {}
        for route in model.routes:
            plugins = [handlers[i.id] for i in plugins_for_route(route, model.plugins, scheme)]
            self.by_route[route.id] = ([p for p in plugins if p.has_access],
                                       [p for p in plugins if p.has_header_filter or p.has_body_filter])

    def startup_notes(self) -> list[tuple[int, str]]:
        """What to tell the operator at start: (log level, text)."""
        notes = [(logging.INFO, note) for h in self.handlers.values() if (note := h.describe())]
        for instance in self.model.plugins:
            if instance.enabled and self.scheme not in instance.protocols:
                notes.append((logging.WARNING, f"{instance.path} ({instance.name}): protocols {instance.protocols} "
                                               f"exclude {self.scheme}, so it never runs on this listener"))
        return notes

    # --- the phases of one request, apart from the wire -------------------------------------------
    def begin(self, ctx: RequestContext) -> tuple[Exit | None, list[Plugin]]:
        """Route and run the access phase: (an answer of the gateway's own or None to proxy, header filters)."""
        request = ctx.request
        match = self.router.match(request.method, request.raw_path)
        if match is None:
            return error(404, ctx.request_id, request.header("accept"), "no Route matched with those values"), []
        route = match.route
        ctx.match, ctx.route, ctx.service = match, route, route.service
        access, filters = self.by_route[route.id]
        try:
            for plugin in access:
                result = plugin.access(ctx)
                if result is not None:
                    return result, filters
        except Exception:
            log.exception("plugin access phase failed", extra={"request_id": ctx.request_id})
            ctx.source = "error"
            return error(500, ctx.request_id, request.header("accept")), filters
        return None, filters

    def run_header_filters(self, ctx: RequestContext, filters: list[Plugin]) -> None:
        for plugin in filters:
            if not plugin.has_header_filter:
                continue
            try:
                plugin.header_filter(ctx)
            except Exception:
                log.exception("plugin header_filter failed", extra={"request_id": ctx.request_id})

    def run_body_filters(self, ctx: RequestContext, body: bytes, filters: list[Plugin]) -> bytes:
        """The body of an answer of the gateway's own after the plugins' body_filter phase."""
        for plugin in filters:
            if not plugin.has_body_filter:
                continue
            try:
                body = plugin.body_filter(ctx, body)
            except Exception:
                log.exception("plugin body_filter failed", extra={"request_id": ctx.request_id})
        return body

    def exit_headers(self, ctx: RequestContext, exit_: Exit, filters: list[Plugin]) -> list[tuple[str, str]]:
        """The headers of an answer of the gateway's own (framing aside), after the header filters
        (which may change `ctx.status`, the status sent)."""
        ctx.status = exit_.status
        self.run_header_filters(ctx, filters)
        latency = int((time.perf_counter() - ctx.started) * 1000)
        headers = apply_header_ops([("Date", http_date()), *exit_.headers], ctx.response_header_ops)
        if not any(n.lower() == "via" for n, _ in headers):
            headers.append(("Server", SERVER))
        headers += [("X-Kong-Response-Latency", str(latency)), ("X-Kong-Request-Id", ctx.request_id)]
        return headers

    def upstream_uri(self, ctx: RequestContext) -> str:
        request, match = ctx.request, ctx.match
        assert match is not None
        query = strip_query_args(request.query, ctx.cleared_query_args) if ctx.cleared_query_args else request.query
        return match.upstream_path + ("?" + query if query else "")

    def upstream_headers(self, ctx: RequestContext) -> list[tuple[str, str]]:
        """The request headers sent upstream (framing aside), `Host` first, as Kong sends them."""
        request, route, service = ctx.request, ctx.route, ctx.service
        assert route is not None and service is not None and ctx.match is not None
        skip = REPLACED | ctx.upstream_headers.keys()
        for value in request.header_values("connection"):
            skip = skip | {token.strip().lower() for token in value.split(",")}
        client_host = request.header("host")
        host = client_host if route.preserve_host and client_host else service.host_header
        headers = [("Host", host)]
        headers += [(name, value) for name, value in request.headers if name.lower() not in skip]
        forwarded_for = request.header_values("x-forwarded-for")
        headers += [
            ("X-Forwarded-For", ", ".join([*forwarded_for, ctx.client_ip])),
            ("X-Forwarded-Proto", self.scheme),
            ("X-Forwarded-Host", strip_port((client_host or "kong").lower())),
            ("X-Forwarded-Port", str(self.server_port)),
            ("X-Forwarded-Path", request.raw_path),
        ]
        if ctx.match.prefix:
            headers.append(("X-Forwarded-Prefix", ctx.match.prefix))
        headers += [("X-Real-IP", ctx.client_ip), ("X-Kong-Request-Id", ctx.request_id)]
        headers += [(name, value) for name, value in ctx.upstream_headers.values() if value is not None]
        return headers

    def response_headers(self, ctx: RequestContext, status: int, raw_headers, filters: list[Plugin]
                         ) -> tuple[list[tuple[str, str]], bool]:
        """The upstream's response headers as Kong passes them on (hop-by-hop ones dropped, Via and the
        X-Kong-* latencies added, the header filters applied), framing aside; and whether it had a length.
        The status sent is then `ctx.status` (a header filter may have changed it)."""
        ctx.source, ctx.status = "service", status
        self.run_header_filters(ctx, filters)
        drop = set(HOP_BY_HOP)
        headers: list[tuple[str, str]] = []
        has_length = has_date = False
        via = None
        for raw_name, raw_value in raw_headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            lower = name.lower()
            if lower == "connection":
                drop |= {token.strip().lower() for token in value.split(",")}
                continue
            if lower == "via":
                via = value if via is None else f"{via}, {value}"
                continue
            has_length = has_length or lower == "content-length"
            has_date = has_date or lower == "date"
            headers.append((name, value))
        headers = [(n, v) for n, v in headers if n.lower() not in drop]
        if not has_date:
            headers.insert(0, ("Date", http_date()))
        proxy_latency = int((ctx.proxy_started - ctx.started) * 1000)
        headers += [
            ("X-Kong-Upstream-Latency", str(ctx.upstream_ms)),
            ("X-Kong-Proxy-Latency", str(proxy_latency)),
            ("Via", f"{via}, {VIA}" if via else VIA),
            ("X-Kong-Request-Id", ctx.request_id),
        ]
        return apply_header_ops(headers, ctx.response_header_ops), has_length

    def log_request(self, ctx: RequestContext) -> None:
        if self.access_log_enabled:
            access_log.info("request", extra={
                "request_id": ctx.request_id,
                "method": ctx.request.method,
                "route": ctx.route.name or ctx.route.id if ctx.route else None,
                "status": ctx.status or None,
                "duration_ms": round((time.perf_counter() - ctx.started) * 1000, 3),
                "upstream_ms": ctx.upstream_ms,
            })

    # --- one request on the hand-written server ---------------------------------------------------
    async def handle(self, request: IncomingRequest, conn: ClientConnection) -> bool:
        ctx = RequestContext(request, new_request_id(), conn.client_ip, server_port=self.server_port,
                             connection_serial=conn.serial, connection_requests=conn.requests_seen)
        traced = self._start_span(ctx) if tracing.enabled() else None
        try:
            return await self._handle(ctx, conn)
        finally:
            self.log_request(ctx)
            if traced is not None:
                self._finish_span(ctx, traced)

    def _start_span(self, ctx: RequestContext) -> tracing.Activation | None:
        """The request's SERVER span (services.kit.tracing), continuing a client's `traceparent`;
        the service is sent this span's `traceparent` in place of the client's."""
        request = ctx.request
        carrier = {name: request.header(name) for name in (tracing.TRACEPARENT, tracing.TRACESTATE)}
        carrier = {name: value for name, value in carrier.items() if value}
        attributes = {"http.request.method": request.method, "kong.request_id": ctx.request_id}
        traced = tracing.start(f"gateway {request.method}", "SERVER", carrier=carrier, activate=False,
                               attributes=attributes)
        if traced is not None:
            outgoing: dict[str, str] = {}
            tracing.inject(outgoing, traced)
            for name in (tracing.TRACEPARENT, tracing.TRACESTATE):
                ctx.upstream_headers[name] = (name, outgoing.get(name))
        return traced

    @staticmethod
    def _finish_span(ctx: RequestContext, traced: tracing.Activation) -> None:
        route = ctx.route.name or ctx.route.id if ctx.route else None
        if route:
            traced.span.update_name(f"gateway {ctx.request.method} {route}")
        attributes = {"http.response.status_code": ctx.status or 0, "kong.route": route or "",
                      "kong.source": ctx.source}
        traced.finish(error=f"HTTP {ctx.status}" if ctx.status >= 500 else None, attributes=attributes)

    async def _handle(self, ctx: RequestContext, conn: ClientConnection) -> bool:
        request = ctx.request
        exit_, filters = self.begin(ctx)
        if exit_ is not None:
            return await self.send_exit(ctx, conn, exit_, filters)
        body = None
        if ctx.buffer_body_limit is not None and request.has_body and (request.chunked or ctx.body_signers):
            assert request.body is not None
            if request.body.received == 0 and request.expects_continue:
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await read_limited(request.body, ctx.buffer_body_limit)
            if body is None:
                exit_ = error(ctx.size_limit_status, ctx.request_id, request.header("accept"),
                              "Request size limit exceeded")
                return await self.send_exit(ctx, conn, exit_, filters)
        if ctx.body_signers:
            try:
                target = self.upstream_uri(ctx)
                for signer in ctx.body_signers:
                    signer(ctx, target, body or b"")
            except Exception:
                log.exception("plugin body phase failed", extra={"request_id": ctx.request_id})
                ctx.source = "error"
                return await self.send_exit(ctx, conn, error(500, ctx.request_id, request.header("accept")), filters)
        return await self._proxy(ctx, conn, filters, body)

    def _keep_alive(self, request: IncomingRequest) -> bool:
        if not request.keep_alive or self.draining:
            return False
        body = request.body
        if body is None or body.eof:
            return True
        if request.expects_continue and body.received == 0:
            return False
        remaining = (request.content_length or 0) - body.received
        return request.content_length is not None and remaining <= SMALL_BODY_DRAIN

    async def send_exit(self, ctx: RequestContext, conn: ClientConnection, exit_: Exit, filters: list[Plugin]) -> bool:
        request = ctx.request
        keep_alive = self._keep_alive(request)
        own_headers = self.exit_headers(ctx, exit_, filters)
        body = self.run_body_filters(ctx, exit_.body, filters) if filters else exit_.body
        headers = [("Content-Length", str(len(body))), ("Connection", "keep-alive" if keep_alive else "close"),
                   *own_headers]
        head = _head(ctx.status, headers)
        conn.write(head if request.method == "HEAD" else head + body)
        if not keep_alive and request.body is not None and not request.body.eof:
            request.body.discard()
        try:
            await conn.drain()
        except ClientGone:
            return False
        return keep_alive

    async def _proxy(self, ctx: RequestContext, conn: ClientConnection, filters: list[Plugin],
                     buffered: bytes | None) -> bool:
        request, service = ctx.request, ctx.service
        assert service is not None and request.body is not None
        uri = self.upstream_uri(ctx)

        streaming = False
        body = buffered
        if body is None and request.has_body:
            body = request.body.take_complete()
            streaming = body is None
        if streaming and request.body.received == 0 and request.expects_continue:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = self.upstream_headers(ctx)
        if streaming:
            if request.content_length is not None:
                headers.append(("Content-Length", str(request.content_length)))
            else:
                headers.append(("Transfer-Encoding", "chunked"))
        elif body is not None:
            headers.append(("Content-Length", str(len(body))))
        lines = [f"{request.method} {uri} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        tries_left = service.retries
        idempotent = request.method in IDEMPOTENT
        ctx.proxy_started = time.perf_counter()
        up: UpstreamConnection | None = None
        released = False
        try:
            while True:
                up = self.pool.idle_connection(service.host, service.port)
                reused = up is not None
                try:
                    if up is None:
                        up = await self.pool.connect(service.host, service.port, service.connect_timeout / 1000)
                    up.begin(request.method == "HEAD")
                    sent_at = time.perf_counter()
                    if streaming:
                        up.write(head)
                        await self._stream_body(request, up, request.content_length is None,
                                                service.write_timeout / 1000)
                    else:
                        up.write(head + body if body else head)
                    up.arm_read_timeout(service.read_timeout / 1000)
                    await up.headers_future  # type: ignore[misc]
                    break
                except UpstreamError as exc:
                    got_bytes = up.got_bytes if up is not None else False
                    ctx.upstream_bytes_received = up.bytes_received if up is not None else 0
                    if up is not None:
                        up.close()
                        up = None
                    if (reused and idempotent and not streaming and not got_bytes
                            and not isinstance(exc, UpstreamTimeout)):
                        # A kept-alive connection the upstream had already closed: resent on another one
                        # without counting a try, as nginx does for a cached connection. Never a POST or
                        # PATCH (the service may have acted on it), nor a timeout (it was being processed).
                        continue
                    if tries_left > 0 and (not exc.sent or (idempotent and not streaming)):
                        tries_left -= 1
                        continue
                    ctx.source = "error"
                    return await self.send_exit(ctx, conn, error(exc.status, ctx.request_id, request.header("accept")),
                                                filters)
            ctx.upstream_ms = int((time.perf_counter() - sent_at) * 1000)
            keep_alive = await self._respond(ctx, conn, up, filters)
            if up.complete:
                self.pool.release(up)
                released = True
            await conn.drain()  # after the release: a slow client does not hold an upstream connection
            return keep_alive
        except ClientGone:
            return False
        finally:
            conn.upstream = None
            if up is not None and not released:
                up.close()

    async def _stream_body(self, request: IncomingRequest, up: UpstreamConnection, chunked: bool,
                           write_timeout_s: float) -> None:
        assert request.body is not None
        while True:
            data = await request.body.read()
            if up.closed:
                raise UpstreamError("upstream closed the connection while receiving the body")
            if not data:
                break
            up.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            await up.drain(write_timeout_s)
        if chunked:
            up.write(b"0\r\n\r\n")

    async def _respond(self, ctx: RequestContext, conn: ClientConnection, up: UpstreamConnection,
                       filters: list[Plugin]) -> bool:
        request = ctx.request
        status = up.status
        headers, has_length = self.response_headers(ctx, status, up.headers, filters)
        no_body = request.method == "HEAD" or status in (204, 304)  # framed as the upstream's status says
        chunked = False
        keep_alive = self._keep_alive(request)
        if not no_body and not has_length:
            if request.http_version == "1.1":
                chunked = True
                headers.append(("Transfer-Encoding", "chunked"))
            else:
                keep_alive = False
        headers.insert(0, ("Connection", "keep-alive" if keep_alive else "close"))
        head = _head(ctx.status, headers)
        if up.complete and not chunked:
            conn.write(head + b"".join(up.pending) if up.pending else head)  # the whole answer in one write
            up.pending = []
            return keep_alive
        conn.write(head)

        if not up.complete or up.pending:
            if chunked:
                def sink(data: bytes) -> None:
                    conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                sink = conn.write
            conn.upstream = up
            up.start_sink(sink)
            if conn.write_paused:
                up.pause_reading()
            try:
                await up.done_future  # type: ignore[misc]
            except UpstreamError:
                conn.close()  # the head is already out: cutting the connection is the only honest signal
                return False
        if chunked:
            conn.write(b"0\r\n\r\n")
        return keep_alive


async def read_limited(body, limit: int) -> bytes | None:
    """The whole body if it is at most `limit` bytes, else None (as soon as it is known to be larger)."""
    parts, size = [], 0
    while True:
        data = await body.read()
        if not data:
            return b"".join(parts)
        size += len(data)
        if size > limit:
            return None
        parts.append(data)


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

