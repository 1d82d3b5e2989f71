"""Many pages' event streams (`GET /app/events`) held open by one client: one asyncio loop in a
thread of its own, one connection per stream, every event recorded with the moment it arrived.

    with LiveStreams(stack.gateway_url) as live:
        pages = live.open([token_a, token_b, ...])     # once every one has answered
        ... send something ...
        wait_until(lambda: all(page.saw("board", "announcements") for page in pages))

What a stream keeps is what the page reads: its status (and error body), then `board` and
`reauthenticate` events with their data, heartbeats counted, and whether the server ended it. Used
by the tests of the stream and by bench/bench_streams.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Event:
    at: float  # time.monotonic() when it was read
    name: str
    data: str


@dataclass
class Stream:
    """One page's stream, as the page sees it."""

    token: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # a refusal's JSON
    connected: bool = False
    ended: bool = False  # the server ended it (its last chunk, or the connection closed)
    heartbeats: int = 0
    events: list[Event] = field(default_factory=list)
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)

    def saw(self, name: str, data_contains: str = "", since: float = 0.0) -> bool:
        return self.first(name, data_contains, since) is not None

    def first(self, name: str, data_contains: str = "", since: float = 0.0) -> Event | None:
        for event in list(self.events):
            if event.at >= since and event.name == name and data_contains in event.data:
                return event
        return None

    @property
    def code(self) -> str:
        try:
            return json.loads(self.body).get("code", "")
        except ValueError:
            return ""


class LiveStreams:
    """The client of many streams; a context manager (the loop stops and every stream closes on exit)."""

    def __init__(self, base_url: str, source_address: str | None = None):
        parts = urllib.parse.urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.source_address = source_address
        self.loop = asyncio.new_event_loop()
        self.streams: list[Stream] = []
        self._tasks: set[asyncio.Task] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-streams", daemon=True)

    def __enter__(self) -> LiveStreams:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def open(self, tokens: Sequence[str], *, at_once: int = 200, timeout_s: float = 120.0) -> list[Stream]:
        """Open a stream per token (at most `at_once` opening at the same time); returns them once each
        has answered (its status, and for a 200 its first line) or failed to connect."""
        future = asyncio.run_coroutine_threadsafe(self._open_all(list(tokens), at_once), self.loop)
        return future.result(timeout_s)

    def close(self, streams: Sequence[Stream]) -> None:
        """Close these streams' connections (the pages went away)."""
        asyncio.run_coroutine_threadsafe(self._close(list(streams)), self.loop).result(30)

    def close_all(self) -> None:
        if self._thread.is_alive():
            self.close(self.streams)

    async def _close(self, streams: list[Stream]) -> None:
        for stream in streams:
            if stream.writer is not None:
                stream.writer.close()
                stream.writer = None

    async def _open_all(self, tokens: list[str], at_once: int) -> list[Stream]:
        gate = asyncio.Semaphore(at_once)
        streams = [Stream(token) for token in tokens]
        self.streams += streams

        async def one(stream: Stream) -> None:
            answered = asyncio.Event()
            async with gate:  # held until the stream has answered, not while it stays open
                task = self.loop.create_task(self._run(stream, answered))
                self._tasks.add(task)
                task.add_done_callback(lambda t: (answered.set(), self._tasks.discard(t)))
                await answered.wait()

        await asyncio.gather(*(one(stream) for stream in streams))
        return streams

    async def _run(self, stream: Stream, answered: asyncio.Event) -> None:
        local = (self.source_address, 0) if self.source_address else None
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=local, limit=2**20)
        except OSError:
            stream.ended = True
            return
        stream.writer = writer
        request = (
            f"GET /app/events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {stream.token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        try:
            writer.write(request.encode("latin-1"))
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            stream.status = int(status_line.split(" ")[1])
            for line in lines:
                if ":" in line:
                    name, _, value = line.partition(":")
                    stream.headers[name.strip().lower()] = value.strip()
            if stream.status != 200:
                stream.body = await reader.readexactly(int(stream.headers.get("content-length", "0")))
                stream.ended = True
                return
            await self._read_events(stream, reader, answered)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            stream.ended = True
            if stream.writer is not None:
                stream.writer.close()
                stream.writer = None

    @staticmethod
    async def _read_events(stream: Stream, reader: asyncio.StreamReader, answered: asyncio.Event) -> None:
        buffer = ""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return  # the answer's last chunk: the server ended the stream
            data = await reader.readexactly(size + 2)
            buffer += data[:-2].decode("utf-8")
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                name, payload = "message", ""
                for line in block.split("\n"):
                    if line == ": connected":
                        stream.connected = True
                        answered.set()
                    elif line == ": heartbeat":
                        stream.heartbeats += 1
                    elif line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        payload += line[5:].strip()
                if payload or name != "message":
                    stream.events.append(Event(time.monotonic(), name, payload))
