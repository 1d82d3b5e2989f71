"""HTTP/1.1 connections to the services behind the gateway, kept alive in a pool per host and port.

A response body is not read into memory: once the response head is in, every
chunk the upstream sends is handed to a sink (the client connection) as it
arrives, and reading from the upstream pauses while the client is not keeping up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httptools

# Kong keeps idle upstream connections 60 s; the services' own servers drop idle ones at 60 s too,
# so the gateway lets go first and never reuses a connection in the instant the other side closes it.
KEEPALIVE_IDLE_S = 50.0
KEEPALIVE_POOL_SIZE = 512  # Kong's upstream_keepalive_pool_size
KEEPALIVE_MAX_REQUESTS = 10_000


class UpstreamError(Exception):
    """The upstream failed before a complete response; `sent` says whether it may have seen the request."""

    status = 502

    def __init__(self, reason: str, sent: bool = True):
        super().__init__(reason)
        self.sent = sent


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        self.parser: httptools.HttpResponseParser | None = None
        self._write_waiter: asyncio.Future | None = None
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timeout_s = 0.0
        self.last_activity = 0.0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_future: asyncio.Future | None = None
        self.done_future: asyncio.Future | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.pending: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.until_close = False
        self.got_bytes = False
        self.bytes_received = 0
        self.is_head = False
        self._name = b""

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.parser is None or self.complete:
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        self.got_bytes = True
        self.bytes_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: the gateway never asks for an upgrade and cannot relay one.
            self._fail(UpstreamError("upstream switched protocols"))
            self.close()
        except httptools.HttpParserError:
            self._fail(UpstreamError("invalid response from upstream"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._cancel_timer()
        if self.headers_future is not None and not self.headers_future.done():
            self.headers_future.set_exception(UpstreamError("upstream closed the connection"))
        elif self.done_future is not None and not self.done_future.done():
            if self.until_close and exc is None:
                self._finish()
            else:
                self.done_future.set_exception(UpstreamError("upstream closed the connection mid-response"))
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(UpstreamError("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): wait for the real one. A 101 is not
            # relayed either: the parser stops right after it and data_received answers 502.
            self.headers = []
            return
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        no_body = self.is_head or status in (204, 304)
        self.until_close = not framed and not no_body
        if self.until_close:
            self.keep_alive = False
        if self.headers_future is not None and not self.headers_future.done():
            self.headers_future.set_result(None)
        if no_body:
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if self.sink is not None:
            self.sink(body)
        else:
            self.pending.append(body)

    def on_message_complete(self) -> None:
        if self.status:
            self._finish()

    # --- exchange -----------------------------------------------------------------------------------
    def begin(self, is_head: bool) -> None:
        self._reset_exchange()
        self.is_head = is_head
        self.requests += 1
        self.parser = httptools.HttpResponseParser(self)
        self.headers_future = self.loop.create_future()
        self.done_future = self.loop.create_future()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self, timeout_s: float) -> None:
        if not self._write_paused or self.closed:
            return
        self._write_waiter = self.loop.create_future()
        try:
            await asyncio.wait_for(self._write_waiter, timeout_s)
        except TimeoutError:
            raise UpstreamTimeout("timed out sending the request to upstream") from None
        finally:
            self._write_waiter = None

    def start_sink(self, sink: Callable[[bytes], None]) -> None:
        """From now on, pass body chunks straight to `sink`; first the ones already received."""
        for chunk in self.pending:
            sink(chunk)
        self.pending = []
        self.sink = sink

    def pause_reading(self) -> None:
        """The client is not keeping up: stop reading (and stop the read timeout, nothing is being read)."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self._cancel_timer()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if not self.complete and self._timeout_s:
                self.arm_read_timeout(self._timeout_s)

    def arm_read_timeout(self, timeout_s: float) -> None:
        """nginx's proxy_read_timeout: fail when nothing arrives for `timeout_s` between two reads."""
        self._timeout_s = timeout_s
        self.last_activity = self.loop.time()
        self._cancel_timer()
        self._timer = self.loop.call_later(timeout_s, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.complete or self.closed:
            return
        idle = self.loop.time() - self.last_activity
        if idle >= self._timeout_s - 0.001:
            self._fail(UpstreamTimeout("upstream read timed out", sent=True))
            self.close()
        else:
            self._timer = self.loop.call_later(self._timeout_s - idle, self._check_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._cancel_timer()
        if self.done_future is not None and not self.done_future.done():
            self.done_future.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        for future in (self.headers_future, self.done_future):
            if future is not None and not future.done():
                future.set_exception(error)
                return  # a failure before the head is reported once, through headers_future

    @property
    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.closed and self.requests < KEEPALIVE_MAX_REQUESTS
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self._cancel_timer()


class UpstreamPool:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def idle_connection(self, host: str, port: int) -> UpstreamConnection | None:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self, host: str, port: int, timeout_s: float) -> UpstreamConnection:
        key = (host, port)
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self, key), host, port), timeout_s
            )
        except TimeoutError:
            raise UpstreamTimeout("connecting to upstream timed out", sent=False) from None
        except OSError as exc:
            raise UpstreamError(f"connecting to upstream failed ({type(exc).__name__})", sent=False) from None
        return conn  # type: ignore[return-value]

    def release(self, conn: UpstreamConnection) -> None:
        if not conn.reusable:
            conn.close()
            return
        conn.parser = None
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= KEEPALIVE_POOL_SIZE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(KEEPALIVE_IDLE_S / 4, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - KEEPALIVE_IDLE_S
        remaining = 0
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since < cutoff]:
                idle.remove(conn)
                conn.close()
            remaining += len(idle)
        if remaining:
            self._sweeper = self.loop.call_later(KEEPALIVE_IDLE_S / 4, self._sweep)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
