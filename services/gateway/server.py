"""The client side: an asyncio HTTP/1.1 server (httptools parser) with keep-alive and pipelining.

Requests on one connection are answered in order by one task; a request body
is handed to the proxy as it arrives. Reading from the client pauses while a
body has too much waiting, while more than MAX_PIPELINED requests are queued,
and (through the handler awaiting `drain`) while the client is not reading its
answers. A request head is counted as its bytes arrive, so an oversized one is
refused before the parser has buffered it. Shutdown stops accepting, lets
in-flight requests finish (their responses say `Connection: close`) and closes
idle connections.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httptools

from services.gateway.context import IncomingRequest
from services.gateway.responses import DEFAULT_MESSAGES, SERVER, error, reason

if TYPE_CHECKING:
    from services.gateway.upstream import UpstreamConnection

log = logging.getLogger("services.gateway")

MAX_HEADER_BYTES = 64 * 1024
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
MAX_PIPELINED = 16  # requests queued on one connection before reading from it pauses
KEEPALIVE_TIMEOUT_S = 60.0  # nginx's keepalive_timeout in Kong
LINGER_S = 2.0

_serials = itertools.count(1)


class ClientGone(Exception):
    pass


class RequestBody:
    """The body of one request, in the chunks the client sent (chunked encoding already removed)."""

    def __init__(self, conn: ClientConnection):
        self.conn = conn
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = 0
        self.eof = False
        self.error: Exception | None = None
        self.discarding = False
        self._waiter: asyncio.Future | None = None

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.discarding:
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def feed_error(self, exc: Exception) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk, b'' at the end; raises ClientGone if the client went away first."""
        while not self.chunks and not self.eof and self.error is None:
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.chunks:
            data = self.chunks.popleft()
            self.buffered -= len(data)
            if self.buffered < BODY_LOW_WATER:
                self.conn.resume_reading()
            return data
        if self.error is not None:
            raise self.error
        return b""

    def take_complete(self) -> bytes | None:
        """The whole body, if it has already arrived in full (then it can be re-sent on a retry)."""
        if not self.eof or self.error is not None:
            return None
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        self.conn.resume_reading()  # only if nothing else holds reading paused
        return data

    def discard(self) -> None:
        self.discarding = True
        self.chunks.clear()
        self.buffered = 0
        self.conn.resume_reading()

    async def wait_eof(self, timeout_s: float) -> bool:
        self.discard()
        deadline = self.conn.loop.time() + timeout_s
        while not self.eof and self.error is None:
            remaining = deadline - self.conn.loop.time()
            if remaining <= 0:
                return False
            self._waiter = self.conn.loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, remaining)
            except TimeoutError:
                return False
            finally:
                self._waiter = None
        return self.error is None


Handler = Callable[[IncomingRequest, "ClientConnection"], Awaitable[bool]]


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: GatewayServer):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.serial = next(_serials)
        self.requests_seen = 0
        self.queue: deque[IncomingRequest] = deque()  # heads parsed, answers not yet sent
        self.current: IncomingRequest | None = None
        self.task: asyncio.Task | None = None
        self.closed = False
        self.upgraded = False
        self.reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self.upstream: UpstreamConnection | None = None  # whose reading follows our write pressure
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0  # request line and header fields, as the parser reports them
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # bytes received while a head was incomplete
        self._refusal: int | None = None  # why a callback stopped the parser (414 or 494)
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client_ip = (transport.get_extra_info("peername") or ("",))[0]
        self.server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.upgraded or self.closed:
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request is proxied without its Upgrade; nothing after it is read, so the connection
            # closes once it is answered rather than leaving pipelined requests waiting for ever.
            self.upgraded = True
            self._close_after_last_request()
            return
        except httptools.HttpParserError:
            if self.current is not None and self.current.body is not None:
                self.current.body.feed_error(ClientGone("malformed request body"))
            self._refuse(self._refusal or 400)
            return
        # httptools holds an unfinished header value until its end arrives: count the head's bytes here
        # so a huge one is refused after MAX_HEADER_BYTES (plus one read), not after it has all been buffered.
        if self._in_head and self._head_bytes > MAX_HEADER_BYTES:
            self._refuse(494)

    def _refuse(self, status: int) -> None:
        """Stop reading requests: answer `status` now if nothing is in flight, else close after the last answer."""
        self.upgraded = True  # whatever else arrives is read and dropped
        if self.task is None and not self.queue:
            self.send_simple_error(status)
        else:
            self._close_after_last_request()

    def _close_after_last_request(self) -> None:
        if self.queue:
            self.queue[-1].keep_alive = False  # answered with `Connection: close`, then the connection closes
        else:
            self.close(linger=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._disarm_idle()
        for request in self.queue:
            if request.body is not None:
                request.body.feed_error(ClientGone("client closed the connection"))
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ClientGone("client closed the connection"))
        self.server.check_drained()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.resume_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # --- httptools callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refusal = 414  # nginx: "client sent too long URI"
            raise httptools.HttpParserError("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refusal = 494
            raise httptools.HttpParserError("request headers too large")
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._disarm_idle()  # a request head trickling in slower than the keep-alive timeout is dropped
        self._in_head = False
        parser = self.parser
        request = IncomingRequest(
            method=parser.get_method().decode("ascii", "replace"),
            target=self._url.decode("latin-1"),
            headers=self._headers,
            http_version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
        )
        request.body = RequestBody(self)
        if not request.has_body:
            request.body.eof = True
        self.current = request
        self.requests_seen += 1
        self.queue.append(request)
        if len(self.queue) > MAX_PIPELINED:
            self.pause_reading()  # a client pipelining far ahead waits until we catch up
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self.current is not None and self.current.body is not None:
            self.current.body.feed(body)

    def on_message_complete(self) -> None:
        if self.current is not None and self.current.body is not None:
            self.current.body.feed_eof()
        self.current = None
        self._in_head = True
        self._head_bytes = 0

    # --- serving ------------------------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while self.queue and not self.closed:
                request = self.queue[0]
                keep_alive = await self.server.handler(request, self)
                self.queue.popleft()
                self.resume_reading()
                if not keep_alive or not request.keep_alive or self.server.draining:
                    # linger when the client may still be sending: unread bytes at close would reset the connection
                    self.close(linger=self.upgraded or (request.body is not None and not request.body.eof))
                    return
                if request.body is not None and not request.body.eof:
                    if not await request.body.wait_eof(10.0):
                        self.close()
                        return
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection handler failed")
            self.close()
        finally:
            self.task = None
            if not self.closed:
                self._arm_idle()
                self.server.connection_idle(self)

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self.closed:
            raise ClientGone("client closed the connection")
        self._drain_waiter = self.loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again, unless more than MAX_PIPELINED requests wait or the body arriving is still backed up."""
        if len(self.queue) > MAX_PIPELINED:
            return
        body = self.current.body if self.current is not None else None
        if body is not None and body.buffered >= BODY_LOW_WATER:
            return
        self._resume_transport()

    def _resume_transport(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def send_simple_error(self, status: int) -> None:
        """Answer a request that never got a complete head, then close."""
        message = None
        if status == 494:
            # nginx's internal "Request Header Or Cookie Too Large"; Kong's error handler answers it as a 400.
            status, message = 400, DEFAULT_MESSAGES[494]
        response = error(status, self.server.new_request_id(), None, message)
        head = [f"HTTP/1.1 {status} {reason(status)}", *(f"{n}: {v}" for n, v in response.headers),
                f"Content-Length: {len(response.body)}", "Connection: close", f"Server: {SERVER}"]
        self.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        self.close(linger=True)  # keep reading (and dropping) briefly, so the client sees the answer

    def close(self, linger: bool = False) -> None:
        """Close; with `linger`, stop writing first and keep reading briefly so the client sees the response."""
        if self.transport is None or self.closed:
            return
        if linger and self.transport.can_write_eof():
            self._resume_transport()
            self.upgraded = True  # ignore anything else the client sends
            try:
                self.transport.write_eof()
            except OSError:
                self.transport.close()
                return
            self.loop.call_later(LINGER_S, self.transport.close)
            return
        self.transport.close()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle_timer = self.loop.call_later(KEEPALIVE_TIMEOUT_S, self._idle_timeout)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.idle:
            self.close()


class GatewayServer:
    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler, new_request_id: Callable[[], str]):
        self.loop = loop
        self.handler = handler
        self.new_request_id = new_request_id
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._all_idle: asyncio.Event | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; with `ssl_context`, HTTPS only (a client that does not complete a TLS handshake is
        dropped before any of its bytes are parsed as a request)."""
        self._server = await self.loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024, ssl=ssl_context
        )
        return self._server.sockets[0].getsockname()[1]

    def connection_idle(self, conn: ClientConnection) -> None:
        if self.draining:
            conn.close()
            self.check_drained()

    def check_drained(self) -> None:
        if self._all_idle is not None and all(c.idle for c in self.connections):
            self._all_idle.set()

    async def shutdown(self, grace_s: float) -> bool:
        """Stop accepting, finish in-flight requests (up to grace_s), close every connection."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        self._all_idle = asyncio.Event()
        self.check_drained()
        try:
            await asyncio.wait_for(self._all_idle.wait(), grace_s)
            finished = True
        except TimeoutError:
            finished = False
        for conn in list(self.connections):
            conn.close()
        return finished
