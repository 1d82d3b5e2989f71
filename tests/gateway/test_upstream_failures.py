"""The local gateway in front of a service that fails: the answers a client can retry.

With clinic-identity-signer's `upstream_retry_after` (kong.yml sets it globally), a service that
gave no answer at all (nothing listens, the connection is reset, or it is closed before a byte of
an answer: the process died) is answered 503 "The upstream server is currently unavailable" with
`Retry-After`, and the gateway's own 504 gains `Retry-After`. An answer the service did begin is
never turned into something else: a broken head stays Kong's 502, a body cut short cuts the
client's connection, and the service's own statuses pass through as they are."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import uuid

import pytest
import requests

from tests.gateway.conftest import closed_port, gateway_env, start_gateway
from tests.waits import wait_until

KEY = "gateway-identity-test-key-0123456789abcdef"
UNAVAILABLE = "The upstream server is currently unavailable"
INVALID = "An invalid response was received from the upstream server"
TIMING_OUT = "The upstream server is timing out"
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")

CONFIG = """\
_format_version: "3.0"
services:
  - name: dying
    url: ${{ env "DECK_DYING_URL" }}
    read_timeout: 400
    retries: 2
    routes:
      - {name: dying, paths: [/dying], strip_path: false}
  - name: down
    url: http://127.0.0.1:${{ env "DECK_CLOSED_PORT" }}
    retries: 2
    routes:
      - {name: down, paths: [/down]}
      - name: locked
        paths: [/locked]
        plugins:
          - {name: key-auth, config: {key_names: [apikey], hide_credentials: true}}
  - name: plain
    url: http://127.0.0.1:${{ env "DECK_CLOSED_PORT" }}
    retries: 0
    routes:
      - {name: plain, paths: [/plain]}
    plugins:
      # Kong's own answers where the setting is not given.
      - name: clinic-identity-signer
        config: {key: "{vault://env/gateway-identity-key}"}
plugins:
  - name: clinic-identity-signer
    config:
      key: "{vault://env/gateway-identity-key}"
      skip_consumers: [clinic-staff]
      upstream_retry_after: 1
"""


class DyingService:
    """A service that fails as its path asks, after reading the whole request:

    /dying/reset       resets the connection (RST), no answer
    /dying/close       closes the connection (FIN), no answer
    /dying/half-head   sends part of a status line, then closes
    /dying/half-body   sends a head promising 100 bytes and 10 of them, then closes
    /dying/slow        answers after 2 s (the route's read timeout is 0.4 s)
    /dying/own-503     answers 503 itself (a service's own refusal)
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request that reached it
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def times_seen(self, path: str) -> int:
        return sum(1 for _, seen in self.seen if seen == path)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                method, path = self._read_request(conn)
            except (OSError, ValueError):
                return
            self.seen.append((method, path))
            behaviour = path.split("?")[0].rsplit("/", 1)[-1]
            if behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif behaviour == "half-head":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
            elif behaviour == "half-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n0123456789")
            elif behaviour == "slow":
                time.sleep(2)
                self._answer(conn, 200, b'{"late": true}')
            elif behaviour == "own-503":
                self._answer(conn, 503, b'{"code": "database_unavailable", "message": "the database is away"}')
            # "close", and after every other behaviour: the connection closes here.

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[str, str]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ValueError("closed before a whole head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return method, path

    @staticmethod
    def _answer(conn: socket.socket, status: int, body: bytes) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def dying():
    service = DyingService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def gateway(dying, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("upstream-failures")
    config = workdir / "kong.yml"
    config.write_text(CONFIG)
    env = gateway_env(
        {"DECK_DYING_URL": dying.url, "DECK_CLOSED_PORT": str(closed_port()), "GATEWAY_IDENTITY_KEY": KEY}
    )
    process = start_gateway(config, env, workdir)
    yield process
    assert process.stop() == 0


def assert_retryable(response: requests.Response, status: int, message: str) -> None:
    """The gateway's own answer, Kong-shaped, with the status and Retry-After a client retries on."""
    assert response.status_code == status, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.json() == {"message": message, "request_id": response.headers["X-Kong-Request-Id"]}
    assert REQUEST_ID.match(response.headers["X-Kong-Request-Id"])
    assert response.headers["Server"] == "kong/3.9.1"


def marked(path: str) -> str:
    return f"{path}?m={uuid.uuid4().hex}"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_refused_connection_is_503_with_retry_after(gateway, method):
    response = requests.request(method, f"{gateway.url}/down/x", data=b"{}" if method == "POST" else None, timeout=10)
    assert_retryable(response, 503, UNAVAILABLE)


@pytest.mark.parametrize("behaviour", ["reset", "close"])
def test_a_post_the_service_died_on_is_503_with_retry_after_and_sent_once(gateway, dying, behaviour):
    path = marked(f"/dying/{behaviour}")
    response = requests.post(f"{gateway.url}{path}", json={"subject": "s"}, timeout=10)
    assert_retryable(response, 503, UNAVAILABLE)
    # The service may have stored it before dying: a POST is never sent again by the gateway; the
    # client retries it, with its Idempotency-Key.
    assert dying.times_seen(path) == 1


def test_a_get_the_service_died_on_is_tried_again_then_answered_503(gateway, dying):
    path = marked("/dying/close")
    response = requests.get(f"{gateway.url}{path}", timeout=10)
    assert_retryable(response, 503, UNAVAILABLE)
    assert dying.times_seen(path) == 3  # the first try and the service's `retries: 2`


def test_a_timeout_stays_504_and_gains_retry_after(gateway, dying):
    response = requests.get(f"{gateway.url}{marked('/dying/slow')}", timeout=20)
    assert_retryable(response, 504, TIMING_OUT)


def test_an_answer_begun_then_broken_off_is_kongs_502_without_retry_after(gateway, dying):
    path = marked("/dying/half-head")
    response = requests.post(f"{gateway.url}{path}", data=b"{}", timeout=10)
    assert response.status_code == 502
    assert "Retry-After" not in response.headers
    assert response.json()["message"] == INVALID
    assert dying.times_seen(path) == 1


def test_a_body_cut_short_cuts_the_clients_connection(gateway):
    """The head is already on its way: closing the connection early is the only signal left."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /dying/half-body HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 100" in head.split(b"\r\n")
    assert body == b"0123456789"


def test_the_services_own_503_passes_through_untouched(gateway):
    response = requests.get(f"{gateway.url}/dying/own-503", timeout=10)
    assert response.status_code == 503
    assert response.json() == {"code": "database_unavailable", "message": "the database is away"}
    assert "Retry-After" not in response.headers  # the gateway adds nothing to a service's answer
    assert "Via" in response.headers


def test_other_formats_say_the_same(gateway):
    html = requests.get(f"{gateway.url}/down/x", headers={"Accept": "text/html"}, timeout=10)
    assert html.status_code == 503 and html.headers["Retry-After"] == "1"
    assert html.headers["Content-Type"] == "text/html; charset=utf-8"
    assert f"<p>{UNAVAILABLE}.</p>" in html.text and INVALID not in html.text
    head = requests.head(f"{gateway.url}/down/x", timeout=10)
    assert head.status_code == 503 and head.headers["Retry-After"] == "1" and head.content == b""


def test_a_plugins_own_refusal_is_left_alone(gateway):
    refused = requests.get(f"{gateway.url}/locked/x", timeout=10)
    assert refused.status_code == 401 and "Retry-After" not in refused.headers


def test_without_the_setting_kong_answers_as_it_does_by_default(gateway):
    response = requests.post(f"{gateway.url}/plain/x", data=b"{}", timeout=10)
    assert response.status_code == 502 and "Retry-After" not in response.headers
    assert response.json()["message"] == INVALID


def test_the_access_log_has_the_status_the_client_got(gateway):
    response = requests.get(f"{gateway.url}/down/logged", timeout=10)
    assert response.status_code == 503
    request_id = response.headers["X-Kong-Request-Id"]
    line = wait_until(
        lambda: next((e for e in gateway.log_lines() if e.get("request_id") == request_id), None),
        message="the request's access log line",
    )
    assert line["status"] == 503


# --- the Kong plugin's Lua (gateway/kong-plugins/clinic-identity-signer) against the local plugin --------

lupa = pytest.importorskip("lupa", reason="lupa (LuaJIT for Python) runs the Kong plugin's Lua")

# Kong's PDK in the header_filter and body_filter phases of one answer; the body arrives in `chunks`.
RESPONSE_PRELUDE = r"""
function run_filters(conf, spec)
  if spec.null_setting then
    conf.upstream_retry_after = setmetatable({}, { __tostring = function() return "null" end })  -- ngx.null
  end
  local state = { status = spec.status, headers = { ["Content-Length"] = "0" }, sent = {} }
  local plugin_ctx = {}
  local buffered = ""
  local chunk, eof
  ngx = { var = { upstream_bytes_received = spec.received }, ctx = {} }
  kong = {
    ctx = { plugin = plugin_ctx },
    response = {
      get_source = function() return spec.source end,
      get_status = function() return state.status end,
      set_status = function(status) state.status = status end,
      set_header = function(name, value)
        assert(type(value) == "string", "a header value as text")
        state.headers[name] = value
      end,
      clear_header = function(name) state.headers[name] = nil end,
      get_raw_body = function()  -- kong/pdk/response.lua: held until the last chunk
        buffered = buffered .. chunk
        chunk = nil
        if eof then return buffered end
        return nil
      end,
      set_raw_body = function(body) chunk = body end,
    },
  }
  local handler = load_plugin("handler")
  handler.header_filter(handler, conf)
  for i, piece in ipairs(spec.chunks) do
    chunk, eof = piece, i == #spec.chunks
    handler.body_filter(handler, conf)
    if chunk then table.insert(state.sent, chunk) end
  end
  state.body = table.concat(state.sent)
  return state
end
"""


@pytest.fixture(scope="module")
def lua():
    from tests.unit.test_gateway_identity_lua import _runtime

    runtime = _runtime()
    runtime.execute(RESPONSE_PRELUDE)
    return runtime


def through_lua(lua, retry_after, source, status, received, body: bytes) -> tuple[int, str | None, bytes]:
    # Kong hands a plugin an unset optional field as ngx.null, not nil.
    conf = lua.table_from({b"key": KEY.encode(), b"upstream_retry_after": retry_after})
    middle = len(body) // 2
    spec = lua.table_from(
        {
            b"source": source.encode(),
            b"status": status,
            b"received": received.encode() if received is not None else None,
            b"chunks": lua.table_from([body[:middle], body[middle:]]),
            b"null_setting": retry_after is None,
        }
    )
    state = lua.globals().run_filters(conf, spec)
    retry = state.headers[b"Retry-After"]
    return state.status, retry.decode() if retry is not None else None, bytes(state.body)


def through_python(retry_after, source, status, received, body: bytes) -> tuple[int, str | None, bytes]:
    from types import SimpleNamespace

    from services.gateway.context import IncomingRequest, RequestContext, apply_header_ops
    from services.gateway.plugins.identity_signer import IdentitySignerPlugin

    conf = {"key": KEY, "header_name": "X-Gateway-Identity", "skip_consumers": []}
    if retry_after is not None:
        conf["upstream_retry_after"] = retry_after
    plugin = IdentitySignerPlugin(SimpleNamespace(config=conf), None)
    ctx = RequestContext(IncomingRequest("POST", "/x", []), "0" * 32, "127.0.0.1")
    ctx.source, ctx.status = source, status
    ctx.upstream_bytes_received = int(received.replace(":", ",").split(",")[-1]) if received else 0
    plugin.header_filter(ctx)
    body = plugin.body_filter(ctx, body)
    headers = dict(apply_header_ops([], ctx.response_header_ops))
    return ctx.status, headers.get("Retry-After"), body


@pytest.mark.parametrize(
    ("retry_after", "source", "status", "received", "expected_status", "expected_retry_after"),
    [
        (1, "error", 502, "0", 503, "1"),  # refused, reset or closed before an answer
        (1, "error", 502, "0, 0 : 0", 503, "1"),  # every retry and the error page's redirect
        (1, "error", 502, None, 503, "1"),
        (5, "error", 504, "0", 504, "5"),
        (1, "error", 503, "0", 503, "1"),  # Kong's own: no healthy target
        (1, "error", 502, "0, 17", 502, None),  # the last try got an invalid answer
        (1, "error", 500, "0", 500, None),
        (1, "service", 502, "120", 502, None),  # the service's own 502
        (1, "exit", 503, "0", 503, None),  # a plugin's refusal
        (None, "error", 502, "0", 502, None),  # the setting unset: Kong's own answer
    ],
)
@pytest.mark.parametrize("accept", ["application/json", "text/html", "text/plain"])
def test_the_kong_plugin_answers_as_the_local_gateway_does(
    lua, retry_after, source, status, received, expected_status, expected_retry_after, accept
):
    from services.gateway.responses import error

    body = error(status, "0" * 32, accept).body
    python = through_python(retry_after, source, status, received, body)
    kong = through_lua(lua, retry_after, source, status, received, body)
    assert kong == python
    assert kong[:2] == (expected_status, expected_retry_after)
    if expected_status == 503 and status == 502:
        assert UNAVAILABLE.encode() in kong[2] and INVALID.encode() not in kong[2]
    else:
        assert kong[2] == body
