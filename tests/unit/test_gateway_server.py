"""The client connection without a network: when reading pauses and resumes, head limits, Upgrade."""

from __future__ import annotations

import asyncio

from services.gateway.server import BODY_HIGH_WATER, MAX_HEADER_BYTES, MAX_PIPELINED, ClientConnection, GatewayServer


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written = bytearray()
        self.eof_written = False
        self.closing = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


def connect(handler) -> tuple[ClientConnection, FakeTransport]:
    server = GatewayServer(asyncio.get_running_loop(), handler, lambda: "0" * 32)
    conn = ClientConnection(server)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


def test_taking_or_reading_a_body_does_not_undo_the_pipelining_pause():
    async def scenario():
        release = asyncio.Event()

        async def handler(request, conn):
            await release.wait()
            return True

        conn, transport = connect(handler)
        conn.data_received(b"".join(post(f"/r{i}", b"hi") for i in range(MAX_PIPELINED + 4)))
        assert len(conn.queue) == MAX_PIPELINED + 4
        assert not transport.reading
        assert conn.queue[0].body.take_complete() == b"hi"
        assert not transport.reading  # more than MAX_PIPELINED requests still wait
        assert await conn.queue[1].body.read() == b"hi"
        assert not transport.reading
        conn.queue[2].body.discard()
        assert not transport.reading
        release.set()
        while conn.queue:
            await asyncio.sleep(0)
        assert transport.reading  # caught up: reading again
        conn.connection_lost(None)

    asyncio.run(scenario())


def test_reading_a_finished_body_does_not_resume_while_the_next_one_is_backed_up():
    async def scenario():
        async def handler(request, conn):
            await asyncio.Event().wait()
            return True

        conn, transport = connect(handler)
        conn.data_received(post("/a", b"hi"))
        head = b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n"
        conn.data_received(head + b"x" * (BODY_HIGH_WATER + 1))
        assert not transport.reading  # /b's body is over its high-water mark
        assert await conn.queue[0].body.read() == b"hi"  # /a's body, read by the proxy
        assert not transport.reading
        conn.connection_lost(None)

    asyncio.run(scenario())


def test_a_huge_header_is_refused_before_its_end_arrives():
    async def scenario():
        conn, transport = connect(None)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: ")
        for _ in range(2):
            conn.data_received(b"a" * (MAX_HEADER_BYTES // 2 + 1))  # never a line end
        answer = bytes(transport.written)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b'"message":"Request header or cookie too large"' in answer
        assert b"Connection: close" in answer
        assert transport.eof_written  # the answer is out; what the client still sends is read and dropped
        conn.data_received(b"a" * 1_000_000)
        assert bytes(transport.written) == answer
        conn.connection_lost(None)

    asyncio.run(scenario())


def test_bodies_and_pipelined_requests_do_not_count_as_header_bytes():
    async def scenario():
        async def handler(request, conn):
            await asyncio.Event().wait()
            return True

        conn, transport = connect(handler)
        conn.data_received(post("/big", b"x" * (2 * MAX_HEADER_BYTES)))  # head and a large body in one read
        assert not transport.written and len(conn.queue) == 1
        small = b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n"
        conn.data_received(small * (2 * MAX_HEADER_BYTES // len(small)))  # many whole heads in one read
        assert not transport.written
        assert len(conn.queue) > MAX_PIPELINED
        conn.connection_lost(None)

    asyncio.run(scenario())


def test_a_request_line_too_long_is_414():
    async def scenario():
        conn, transport = connect(None)
        conn.data_received(b"GET /" + b"a" * (MAX_HEADER_BYTES + 1))
        assert bytes(transport.written).startswith(b"HTTP/1.1 414 ")
        assert b'"message":"URI too long"' in transport.written
        conn.connection_lost(None)

    asyncio.run(scenario())


def test_an_upgrade_request_is_the_last_one_answered_on_its_connection():
    async def scenario():
        async def handler(request, conn):
            await asyncio.Event().wait()
            return True

        conn, _ = connect(handler)
        conn.data_received(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
                           b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                           b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        assert [r.target for r in conn.queue] == ["/a", "/ws"]
        assert conn.queue[0].keep_alive  # answered normally
        assert not conn.queue[1].keep_alive  # answered with Connection: close, then the connection closes
        conn.connection_lost(None)

    asyncio.run(scenario())
