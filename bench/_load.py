"""An asyncio load generator for the benchmarks: HTTP/1.1 keep-alive requests, pages' event streams and
MLLP lab results, all on one event loop, each timed.

    pool = HttpPool("127.0.0.1", 8000)
    status, body, ms = await pool.request("GET", "/api/v1/board", token=token)
    page = Page(staff_id, token)                  # a page's `GET /app/events`, kept open
    task = asyncio.create_task(page.run("127.0.0.1", 8000, on_event))
    ack, ms = await MllpSender("127.0.0.1", 2575).send(message)

Plain asyncio streams (no HTTP client library): one connection carries one request at a time; an idle
connection goes back to the pool, so the pool grows to the concurrency the load needs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REQUEST_TIMEOUT_S = 30.0
IDLE_REUSE_S = 20.0  # an idle connection older than this is closed, not reused (servers time them out)
MLLP_START, MLLP_END = b"\x0b", b"\x1c\r"


class HttpError(Exception):
    """The connection failed or the answer could not be read."""


@dataclass
class Answer:
    status: int
    body: bytes
    ms: float  # from the request's start (a connection taken or opened) to its last byte

    def json(self):
        return json.loads(self.body) if self.body else None


class HttpPool:
    """Keep-alive connections to one host:port, reused one request at a time."""

    def __init__(self, host: str, port: int, timeout_s: float = REQUEST_TIMEOUT_S):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        started = time.perf_counter()
        payload = json.dumps(body).encode() if body is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Accept: application/json"]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more on a new one
            conn = self._take() if attempt == 0 else None
            reused = conn is not None
            try:
                reader, writer = conn if conn is not None else await self._open()
            except OSError as exc:
                raise HttpError(f"connect: {exc}") from exc
            try:
                writer.write(head + payload)
                status, answer, keep = await asyncio.wait_for(self._read(reader), self.timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                writer.close()
                if reused and attempt == 0:
                    continue
                raise HttpError(f"{type(exc).__name__}: {exc}") from exc
            except TimeoutError as exc:
                writer.close()
                raise HttpError("timed out") from exc
            if keep:
                self._idle.append((reader, writer, time.monotonic()))
            else:
                writer.close()
            return Answer(status, answer, (time.perf_counter() - started) * 1000)
        raise HttpError("unreachable")

    def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection still fit for reuse; older ones are closed."""
        while self._idle:
            reader, writer, since = self._idle.pop()
            if time.monotonic() - since < IDLE_REUSE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    async def _open(self):
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port, limit=2**20)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, body, headers.get("connection", "").lower() != "close"

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


@dataclass
class Page:
    """One staff member's open page: its event stream, reopened (with the member's current token) when
    the server ends it, until `stop()`."""

    staff_id: str
    token: str
    status: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    opened: int = 0  # how often the stream was opened (1 = never reopened)
    refused: int = 0
    board_events: int = 0
    heartbeats: int = 0
    _stopping: bool = False
    _writer: asyncio.StreamWriter | None = None

    def stop(self) -> None:
        self._stopping = True
        if self._writer is not None:
            self._writer.close()

    async def run(self, host: str, port: int, on_board: Callable[[Page, str, float], None]) -> None:
        while not self._stopping:
            try:
                await self._once(host, port, on_board)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                pass
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            if not self._stopping:
                await asyncio.sleep(0.5)  # as the page does before it reconnects

    async def _once(self, host: str, port: int, on_board) -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        self._writer = writer
        self.opened += 1
        writer.write(
            f"GET /app/events HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {self.token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode("latin-1")
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.status = int(head.split(" ", 2)[1])
        if self.status != 200:
            self.refused += 1
            await asyncio.sleep(5)  # a refusal (503 too_many_streams): the page retries later
            return
        buffer = ""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            buffer += data[:-2].decode("utf-8")
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                name, payload = "message", ""
                for line in block.split("\n"):
                    if line == ": connected":
                        self.connected.set()
                    elif line == ": heartbeat":
                        self.heartbeats += 1
                    elif line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        payload += line[5:].strip()
                if name == "board":
                    self.board_events += 1
                    on_board(self, payload, time.monotonic())


class MllpSender:
    """One MLLP connection sending messages one at a time, each answered by its ACK."""

    def __init__(self, host: str, port: int, timeout_s: float = REQUEST_TIMEOUT_S):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def send(self, message: str) -> tuple[bytes, float]:
        async with self._lock:
            started = time.perf_counter()
            if self._conn is None:
                self._conn = await asyncio.open_connection(self.host, self.port, limit=2**20)
            reader, writer = self._conn
            try:
                writer.write(MLLP_START + message.encode("utf-8") + MLLP_END)
                ack = await asyncio.wait_for(reader.readuntil(MLLP_END), self.timeout_s)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                writer.close()
                self._conn = None
                raise HttpError(f"mllp: {type(exc).__name__}") from exc
            return ack, (time.perf_counter() - started) * 1000

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None
