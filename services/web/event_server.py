"""The page's event stream, `GET /app/events`, served on a port of its own (WEB_EVENTS_PORT) by one
asyncio loop in a thread of the web process.

An open page costs a connection and a few small objects here, not a worker thread: the loop
holds thousands of streams, while the page, sign-in and the documents stay on the Flask app. The
loop shares the process's Hub with the bus consumer, which hands each delivery to the loop in one
call (`Hub.deliver_with`), so an announcement to every open page of an agency is one pass over
them. HTTP/1.1 is read with httptools, as the gateway reads it.

What a stream does is what it did on the Flask app: the staff bearer token is verified when it
opens (401/403/503 as the kit's `require_auth` answers, in the kit's JSON error shape), then
`retry: 2000` and `: connected`; `event: board` with `{"folder": ...}` for each change (nothing
else about it: no ids, no content); `: heartbeat` after WEB_EVENTS_HEARTBEAT_S without one. Before
every line it sends, it checks that the token has not expired and its session was not revoked
(both known in memory), and it looks again every second (SWEEP_S) whatever it sends, so a
signed-out session's streams end within about a second; at every heartbeat it verifies the token
again in full, off the loop (that may fetch directory's keys). Once the token stops working it
sends `event: reauthenticate` and ends; the page refreshes its token and reconnects. Caps are the
hub's (per staff member: the oldest page is replaced; per process: 503 `too_many_streams` with
`Retry-After`). A stream's answer says `Connection: close`; other answers keep the connection for
the next request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import formatdate
from http import HTTPStatus

import httptools
import jwt

from services.kit.auth import KIND_STAFF, AuthError, Identity, TokenVerifier, bearer_token
from services.kit.errors import RETRY_AFTER_S, Unavailable, dependency_outage
from services.kit.http import AUTH_UNAVAILABLE
from services.kit.logs import accept_correlation_id
from services.kit.runtime import raise_open_files_limit
from services.web.http_api import PAGE_HEADERS, STRICT_TRANSPORT_SECURITY, forwarded_https
from services.web.live import BoardChange, Hub, Subscription, TooManyStreams

log = logging.getLogger("http")

EVENTS_PATH = "/app/events"
# (path, method) of every route this server answers, as the OpenAPI document lists them.
ROUTES = frozenset({(EVENTS_PATH, "get")})
ALLOW = "GET, HEAD, OPTIONS"
MAX_HEAD_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 60.0  # a connection without a request in flight (as waitress's channel_timeout)
# Bytes a page has not read yet beyond which changes are dropped (it refetches on those it gets) and,
# at its next heartbeat, the stream is cut: the page is not reading.
MAX_UNREAD_BYTES = 64 * 1024
TOO_MANY_STREAMS_RETRY_AFTER_S = 30
TOKEN_CHECK_THREADS = 4
# Every open stream's token is looked at this often too (expiry, revocation: both in memory, about a
# microsecond a stream), so a signed-out page's stream ends within about a second, not a heartbeat.
SWEEP_S = 1.0
CONNECTED = b"retry: 2000\n: connected\n\n"
HEARTBEAT = b": heartbeat\n\n"
REAUTHENTICATE = b"event: reauthenticate\ndata: {}\n\n"
LAST_CHUNK = b"0\r\n\r\n"


@functools.lru_cache(maxsize=128)
def board_event(folder: str) -> bytes:
    return f"event: board\ndata: {json.dumps({'folder': folder})}\n\n".encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Caller:
    """A stream's verified token: who, and until when it works without being checked in full again."""

    __slots__ = ("identity", "expires_at")

    def __init__(self, identity: Identity, expires_at: float):
        self.identity = identity
        self.expires_at = expires_at


def verify(verifier: TokenVerifier, token: str) -> Caller:
    """The whole verification (signature, claims, revocation; may fetch directory's keys); off the loop."""
    identity = verifier.verify(token)
    # Read again only for its expiry, now that the verification above has passed.
    claims = jwt.decode(token, options={"verify_signature": False})
    return Caller(identity, float(claims["exp"]))


class EventStreamServer:
    """The listener of the web process that serves the event streams: `run(stop_event)` in a thread
    of its own (services.kit.bootstrap `listener`), `wait_listening(timeout)` its readiness."""

    def __init__(self, hub: Hub, verifier: TokenVerifier, settings):
        self.hub = hub
        self.verifier = verifier
        self.heartbeat_s = float(settings.events_heartbeat_s)
        self.trusted_proxies = tuple(settings.trusted_proxies)
        self.host = settings.http_host
        self.requested_port = settings.events_port
        self.port = 0  # bound (WEB_EVENTS_PORT, or any free one when that is 0)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[StreamConnection] = set()
        self.token_checks = ThreadPoolExecutor(TOKEN_CHECK_THREADS, thread_name_prefix="web-token-checks")
        self._listening = threading.Event()
        self._sweeping: asyncio.TimerHandle | None = None

    def wait_listening(self, timeout_s: float) -> bool:
        return self._listening.wait(timeout_s)

    def run(self, stop_event: threading.Event) -> None:
        asyncio.run(self._serve(stop_event))

    async def _serve(self, stop_event: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        open_files = raise_open_files_limit()
        if open_files < self.hub.max_streams + 256:
            log.warning("open files limit below WEB_MAX_EVENT_STREAMS", extra={"count": open_files})
        server = await loop.create_server(
            lambda: StreamConnection(self), self.host, self.requested_port, reuse_address=True, backlog=4096
        )
        self.port = server.sockets[0].getsockname()[1]
        self.hub.deliver_with(functools.partial(_call_in, loop))
        self._sweeping = loop.call_later(SWEEP_S, self._sweep)
        self._listening.set()
        log.info("event stream server listening", extra={"port": self.port, "count": open_files})
        try:
            await loop.run_in_executor(None, stop_event.wait)
        finally:
            self._listening.clear()
            if self._sweeping is not None:
                self._sweeping.cancel()
            server.close()
            for connection in list(self.connections):
                connection.end()
            # The hub keeps delivering here: once the loop is closed that is a no-op (`_call_in`), never
            # a push run in the publisher's thread on a connection of this loop.
            self.token_checks.shutdown(wait=False, cancel_futures=True)
            await asyncio.sleep(0.1)  # the last bytes of the streams just ended go out

    def _sweep(self) -> None:
        for connection in list(self.connections):
            connection.end_unless_signed_in()
        assert self.loop is not None
        self._sweeping = self.loop.call_later(SWEEP_S, self._sweep)

    # --- what every answer carries -----------------------------------------------------------------
    def common_headers(self, correlation_id: str, peer: str, forwarded_proto: str) -> list[tuple[str, str]]:
        headers = [
            ("Date", formatdate(usegmt=True)),
            ("X-Correlation-ID", correlation_id),
            ("Cache-Control", "no-store"),
            *PAGE_HEADERS.items(),
        ]
        if forwarded_https(peer, forwarded_proto, self.trusted_proxies):
            headers.append(("Strict-Transport-Security", STRICT_TRANSPORT_SECURITY))
        return headers


def _call_in(loop: asyncio.AbstractEventLoop, push) -> None:
    try:
        loop.call_soon_threadsafe(push)
    except RuntimeError:
        pass  # the loop has stopped: no stream is left to tell


class _Head:
    """One request's head, as far as this server reads it."""

    __slots__ = ("method", "url", "headers", "keep_alive", "started")

    def __init__(self, method: str, url: bytes, headers: dict[str, str], keep_alive: bool):
        self.method = method
        self.url = url
        self.headers = headers
        self.keep_alive = keep_alive
        self.started = time.perf_counter()


class StreamConnection(asyncio.Protocol):
    """One connection: requests answered one at a time until one becomes a stream, which then holds
    the connection until it ends (nothing more is read from it but its end)."""

    __slots__ = (
        "server",
        "loop",
        "transport",
        "peer",
        "parser",
        "_url",
        "_headers",
        "_head_bytes",
        "_in_head",
        "_next",
        "answering",
        "busy",
        "closed",
        "close_after",
        "idle_timer",
        "subscription",
        "caller",
        "finished",
        "last_sent",
        "heartbeat",
    )

    def __init__(self, server: EventStreamServer):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._in_head = True
        self._next: _Head | None = None  # the head just read
        self.answering: asyncio.Task | None = None
        self.busy = False  # a request is being answered (or is the stream)
        self.closed = False
        self.close_after = False  # a request came while one was being answered: close after it
        self.idle_timer: asyncio.TimerHandle | None = None
        self.subscription: Subscription | None = None
        self.caller: Caller | None = None
        self.finished = False
        self.last_sent = 0.0
        self.heartbeat: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = (transport.get_extra_info("peername") or ("",))[0]
        self.server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.parser is None or self.closed:
            return  # a stream: nothing after its request is read
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_and_close(400, "bad_request", "protocol upgrades are not served here")
            return
        except httptools.HttpParserError:
            self._refuse_and_close(400, "bad_request", "malformed request")
            return
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_and_close(400, "bad_request", "request head too large")

    def eof_received(self) -> bool:
        return False  # the page went away (or its hop closed): close, which ends its stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._disarm_idle()
        self._stop_stream()

    # --- httptools callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._disarm_idle()  # a head trickling in slower than the idle timeout is dropped
        self._in_head = False
        parser = self.parser
        assert parser is not None
        self._next = _Head(
            parser.get_method().decode("ascii", "replace"), self._url, self._headers, parser.should_keep_alive()
        )

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        head = self._next
        if head is None:
            return
        if self.busy:  # pipelined behind a request still being answered: not served
            self.close_after = True
            return
        self.busy = True
        self.answering = self.loop.create_task(self._answer(head))

    # --- answering ---------------------------------------------------------------------------------
    async def _answer(self, head: _Head) -> None:
        correlation_id = accept_correlation_id(head.headers.get("x-correlation-id")) or uuid.uuid4().hex
        common = self.server.common_headers(correlation_id, self.peer, head.headers.get("x-forwarded-proto", ""))
        route = EVENTS_PATH
        try:
            status, route = await self._route(head, common)
        except Exception:
            log.exception("event stream request failed", extra={"correlation_id": correlation_id})
            status = 500
            self._send_error(head, common, 500, "internal_error", "internal error; the request was not completed")
        duration_ms = round((time.perf_counter() - head.started) * 1000, 2)
        log.info(
            "request",
            extra={
                "method": head.method,
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
                "correlation_id": correlation_id,
            },
        )

    async def _route(self, head: _Head, common: list[tuple[str, str]]) -> tuple[int, str]:
        """Answer `head`; (status, route template) for the request's log line. The path and query are
        checked as the kit's apps check them (services.kit.http.check_address_text) before routing."""
        try:
            url = httptools.parse_url(head.url)
            path = urllib.parse.unquote_to_bytes(url.path or b"/").decode("utf-8")
            query = urllib.parse.unquote_to_bytes(url.query or b"").decode("utf-8")
        except (httptools.HttpParserInvalidURLError, UnicodeError):
            path, query = "", "not UTF-8 text"
        if not path or "\x00" in path or "\x00" in query:
            problem = "is not UTF-8 text" if not path else "holds a NUL character"
            message = f"the request's path or query string {problem}"
            return self._send_error(head, common, 400, "invalid_text", message), "unmatched"
        if path != EVENTS_PATH:
            return self._send_error(head, common, 404, "not_found", "no such resource"), "unmatched"
        if head.method == "OPTIONS":
            return self._send(head, 200, [*common, ("Allow", ALLOW)], b""), EVENTS_PATH
        if head.method not in ("GET", "HEAD"):
            message = "method not allowed on this resource"
            allow = [("Allow", ALLOW)]
            return self._send_error(head, common, 405, "method_not_allowed", message, extra=allow), EVENTS_PATH
        return await self._open(head, common), EVENTS_PATH

    async def _open(self, head: _Head, common: list[tuple[str, str]]) -> int:
        token = bearer_token(head.headers.get("authorization"))
        if token is None:
            return self._send_error(head, common, 401, "unauthenticated", "a bearer access token is required")
        try:
            caller = await asyncio.wrap_future(self._verify(token))
        except AuthError as exc:
            if exc.code == AUTH_UNAVAILABLE:  # the check itself could not be made
                unavailable = dependency_outage(exc) or Unavailable(AUTH_UNAVAILABLE, exc.message)
                return self._send_error(head, common, 503, unavailable.code, unavailable.message)
            return self._send_error(head, common, 401, exc.code, exc.message)
        identity = caller.identity
        if not identity.agency_id:
            return self._send_error(
                head, common, 403, "agency_scope_required", "a platform-scope token cannot read agency data"
            )
        if identity.kind != KIND_STAFF:
            return self._send_error(head, common, 403, "forbidden", "the event stream is for staff")
        stream_headers = [
            *common,
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("X-Accel-Buffering", "no"),
        ]
        if head.method == "HEAD":
            return self._send(head, 200, stream_headers, b"", length=False)
        if self.closed:
            return 499  # the page left while its token was checked
        try:
            subscription = self.server.hub.subscribe(identity.agency_id, identity.staff_id)
        except TooManyStreams:
            return self._send_error(
                head,
                common,
                503,
                "too_many_streams",
                "too many open pages; close one and reload",
                extra=[("Retry-After", str(TOO_MANY_STREAMS_RETRY_AFTER_S))],
            )
        self._start_stream(subscription, caller, stream_headers)
        return 200

    def _verify(self, token: str) -> Future:
        return self.server.token_checks.submit(verify, self.server.verifier, token)

    # --- plain answers -----------------------------------------------------------------------------
    def _send_error(
        self,
        head: _Head | None,
        common: list[tuple[str, str]],
        status: int,
        code: str,
        message: str,
        *,
        extra: list[tuple[str, str]] | None = None,
    ) -> int:
        """The kit's error body (services.kit.http.error_response): a 401 says how to authenticate, a
        503 when to try again."""
        body = json.dumps({"code": code, "message": message}).encode() + b"\n"
        headers = [*common, ("Content-Type", "application/json")]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="clinic"'))
        extra = list(extra or [])
        if status == 503 and not any(name == "Retry-After" for name, _ in extra):
            extra.append(("Retry-After", str(RETRY_AFTER_S)))
        return self._send(head, status, headers + extra, body)

    def _send(
        self, head: _Head | None, status: int, headers: list[tuple[str, str]], body: bytes, *, length: bool = True
    ) -> int:
        keep_alive = head is not None and head.keep_alive and not self.close_after
        lines = [f"HTTP/1.1 {status} {_reason(status)}", *(f"{name}: {value}" for name, value in headers)]
        if length:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head is None or head.method != "HEAD":
            data += body
        if self.transport is None or self.closed:
            return status
        self.transport.write(data)
        if keep_alive:
            self.busy = False
            self._arm_idle()
        else:
            self.closed = True
            self.transport.close()
        return status

    def _refuse_and_close(self, status: int, code: str, message: str) -> None:
        """A request that cannot be read: answered at once (unless one is in flight), then closed."""
        self.parser = None
        self.close_after = True
        if self.busy:
            return
        common = self.server.common_headers(uuid.uuid4().hex, self.peer, "")
        self._send_error(None, common, status, code, message)

    # --- the stream --------------------------------------------------------------------------------
    def _start_stream(self, subscription: Subscription, caller: Caller, headers: list[tuple[str, str]]) -> None:
        assert self.transport is not None
        self.parser = None  # nothing more is read but the end of the connection
        self._headers = {}
        self._next = None
        self.subscription = subscription
        self.caller = caller
        lines = [
            f"HTTP/1.1 200 {_reason(200)}",
            *(f"{name}: {value}" for name, value in headers),
            "Transfer-Encoding: chunked",
            "Connection: close",
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + chunk(CONNECTED))
        self.last_sent = self.loop.time()
        subscription.listener = self._changed
        self.heartbeat = self.loop.call_later(self.server.heartbeat_s, self._beat)
        if subscription.ended or subscription.pending:
            self._changed()

    def _changed(self) -> None:
        """The hub pushed to this stream (or ended it); runs in the loop."""
        subscription = self.subscription
        if self.finished or subscription is None:
            return
        if subscription.ended:
            self._finish(b"")  # replaced by a newer page of the same person, or the process is stopping
            return
        changes: list[BoardChange] = subscription.take()
        if not changes:
            return
        if not self._still_signed_in():
            self._finish(REAUTHENTICATE)
            return
        if self.transport is None or self.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            return  # not reading: dropped, the page refetches on what it does read
        self._write(b"".join(board_event(change.folder) for change in changes))

    def _still_signed_in(self) -> bool:
        """The token has not expired (with the verifier's leeway) and its session was not revoked."""
        caller, verifier = self.caller, self.server.verifier
        assert caller is not None
        if time.time() > caller.expires_at + getattr(verifier, "leeway_s", 0):
            return False
        revoked = getattr(verifier, "revoked", None)
        session_id = caller.identity.session_id
        return not (session_id and revoked is not None and revoked.is_revoked(session_id))

    def end_unless_signed_in(self) -> None:
        if self.subscription is not None and not self.finished and not self._still_signed_in():
            self._finish(REAUTHENTICATE)

    def _beat(self) -> None:
        self.heartbeat = None
        if self.finished:
            return
        quiet = self.loop.time() - self.last_sent
        if quiet < self.server.heartbeat_s:
            self.heartbeat = self.loop.call_later(self.server.heartbeat_s - quiet, self._beat)
            return
        if not self._still_signed_in():
            self._finish(REAUTHENTICATE)
            return
        if self.transport is None or self.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            self._abort()  # the page has not read a heartbeat's worth of lines: it is gone
            return
        assert self.caller is not None
        try:
            checked = self._verify(self.caller.identity.token)
        except RuntimeError:  # stopping: no more checks are taken
            return
        asyncio.wrap_future(checked, loop=self.loop).add_done_callback(self._checked)

    def _checked(self, checked: asyncio.Future) -> None:
        if self.finished:
            return
        if checked.cancelled():
            return
        error = checked.exception()
        if error is not None:
            if not isinstance(error, AuthError):
                log.error("token check failed", extra={"error_type": type(error).__name__})
            self._finish(REAUTHENTICATE)  # the page refreshes its token, or signs in again
            return
        self._write(HEARTBEAT)
        self.heartbeat = self.loop.call_later(self.server.heartbeat_s, self._beat)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(chunk(data))
            self.last_sent = self.loop.time()

    def _finish(self, last: bytes) -> None:
        """End the stream: `last` (if any), the answer's end, then the connection (once sent)."""
        if self.finished:
            return
        self._stop_stream()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write((chunk(last) if last else b"") + LAST_CHUNK)
            self.transport.close()

    def _abort(self) -> None:
        self._stop_stream()
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def _stop_stream(self) -> None:
        self.finished = True
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.heartbeat = None
        if self.subscription is not None:
            self.subscription.listener = None
            self.subscription.close()
            self.subscription = None

    def end(self) -> None:
        """The server is stopping: a stream ends as it does when the hub closes; others close."""
        if self.subscription is not None:
            self._finish(b"")
        elif self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # --- idle connections ----------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        self._disarm_idle()
        self.idle_timer = self.loop.call_later(IDLE_TIMEOUT_S, self._idle)

    def _disarm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.busy and self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
