"""The gateway streams an answer as the upstream writes it (server-sent events), never buffering it
whole, and a stream that keeps sending (heartbeats) outlives the service's read_timeout."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.gateway.conftest import gateway_env, start_gateway

CONFIG = """\
_format_version: "3.0"
services:
  - name: events
    url: ${{ env "DECK_EVENTS_URL" }}
    read_timeout: 1000
    retries: 0
    routes:
      - {name: events, paths: [/events], strip_path: false}
"""


class StreamingHandler(BaseHTTPRequestHandler):
    """Sends one event, waits until the test says the client saw it, then heartbeats every 0.3 s for
    longer than the gateway's read_timeout, then a last event."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk("event: board\ndata: {\"folder\": \"messages\"}\n\n")
        if not self.server.first_seen.wait(10):
            self.server.held_back = True  # the client never got the first event while the stream was open
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # twice the gateway's read_timeout
            time.sleep(0.3)
            self._chunk(": heartbeat\n\n")
        self._chunk("event: board\ndata: {\"folder\": \"lab\"}\n\n")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def streaming_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StreamingHandler)
    server.daemon_threads = True
    server.first_seen = threading.Event()
    server.held_back = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_an_event_stream_reaches_the_client_as_it_is_written_and_outlives_read_timeout(streaming_upstream, tmp_path):
    config = tmp_path / "kong.yml"
    config.write_text(CONFIG)
    port = streaming_upstream.server_address[1]
    gateway = start_gateway(config, gateway_env({"DECK_EVENTS_URL": f"http://127.0.0.1:{port}"}), tmp_path)
    try:
        with requests.get(f"{gateway.url}/events", stream=True, timeout=10) as response:
            assert response.status_code == 200
            assert response.headers["Content-Type"] == "text/event-stream"
            lines = response.iter_lines(chunk_size=1, decode_unicode=True)
            assert next(lines) == "event: board"
            assert next(lines) == 'data: {"folder": "messages"}'
            # The upstream is still holding the stream open: the first event was not buffered.
            streaming_upstream.first_seen.set()
            rest = [line for line in lines if line]
        assert rest.count(": heartbeat") >= 5
        assert rest[-2:] == ["event: board", 'data: {"folder": "lab"}']
        assert not streaming_upstream.held_back
    finally:
        assert gateway.stop() == 0
