"""A client that pipelines requests and never reads the answers: the gateway stops taking new ones.

The gateway runs in this process (its event loop on a thread) so the test can look at the client
connection's own counters; the sockets are real, with small kernel buffers so that little hides there.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from services.gateway.declarative.loader import load_text
from services.gateway.proxy import Gateway, new_request_id
from services.gateway.server import ClientConnection, GatewayServer
from services.gateway.upstream import UpstreamPool

CONFIG = """\
_format_version: "3.0"
services:
  - {name: s, url: "http://127.0.0.1:9", routes: [{name: r, paths: [/routed]}]}
"""
REQUEST = b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"  # answered by the gateway itself: 404
SENT = 20_000
# Answers the kernel and the transport can hold, plus the requests one read can bring: a few hundred.
BOUND = 2_000
SMALL_BUFFER = 4096


@pytest.fixture
def served():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        pool = UpstreamPool(loop)
        server = GatewayServer(loop, Gateway(load_text(CONFIG, {}), 0, pool, access_log_enabled=False).handle,
                               new_request_id)
        port = await server.start("127.0.0.1", 0)
        listener = server._server.sockets[0]  # accepted sockets inherit these
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        return server, pool, port

    server, pool, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield server, port

    async def stop():
        await server.shutdown(0)
        pool.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def stalled(conn: ClientConnection) -> bool:
    """Waiting for the client to read (drain) and no longer reading from it."""
    return conn.reading_paused and conn._drain_waiter is not None


def test_a_client_that_never_reads_stops_being_read(served):
    server, port = served
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    client.connect(("127.0.0.1", port))
    client.setblocking(False)
    payload = memoryview(REQUEST * SENT)
    sent = 0
    conn = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if sent < len(payload):
                try:
                    sent += client.send(payload[sent:sent + 65536])
                except BlockingIOError:
                    time.sleep(0.005)
            else:
                time.sleep(0.005)
            conn = conn or next(iter(server.connections), None)
            if conn is not None and (stalled(conn) or conn.requests_seen >= SENT):
                break
        assert conn is not None
        assert conn.requests_seen < BOUND, f"{conn.requests_seen} of {SENT} requests taken from a client not reading"
        assert stalled(conn)
        assert conn.transport.get_write_buffer_size() <= 128 * 1024  # answers waiting in the gateway itself
    finally:
        client.close()
