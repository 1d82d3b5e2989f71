"""The local gateway in front of a real upstream: Kong's answers, headers and plugin behaviour."""

from __future__ import annotations

import base64
import json
import re
import select
import socket
import threading
import time
import uuid

import jwt
import pytest
import requests

from tests.gateway.conftest import closed_port, gateway_env, start_gateway
from tests.waits import wait_until

TEST_CONFIG = """\
_format_version: "3.0"
services:
  - name: echo
    url: ${{ env "DECK_ECHO_URL" }}
    retries: 0
    routes:
      - {name: open-nostrip, paths: [/open], strip_path: false}
      - {name: open-strip, paths: [/strip]}
      - {name: open-strip-deeper, paths: [/strip/deeper]}
      - {name: get-only, paths: [/methods], methods: [GET]}
      - name: staff
        paths: [/staff]
        strip_path: false
        plugins:
          - name: jwt
            config:
              claims_to_verify: [exp]
              maximum_expiration: 900
              key_claim_name: iss
              header_names: [authorization]
              uri_param_names: []
              run_on_preflight: false
      - name: partner
        paths: [/partner]
        strip_path: false
        plugins:
          - {name: key-auth, config: {key_names: [apikey], hide_credentials: true}}
          - {name: acl, config: {allow: [partners], hide_groups_header: true}}
      - name: admins-only
        paths: [/admins]
        plugins:
          - {name: key-auth, config: {hide_credentials: true}}
          - {name: acl, config: {allow: [admins]}}
      - name: limited
        paths: [/limited]
        plugins:
          - {name: rate-limiting, config: {minute: 3, limit_by: header, header_name: X-Test-Client, policy: local}}
      - name: upload
        paths: [/upload]
        plugins:
          - {name: request-size-limiting, config: {allowed_payload_size: 1, size_unit: kilobytes}}
  - name: with-base-path
    url: ${{ env "DECK_ECHO_URL" }}/base
    routes:
      - {name: based, paths: [/based]}
  - name: down
    url: http://127.0.0.1:${{ env "DECK_CLOSED_PORT" }}
    retries: 1
    routes:
      - {name: down, paths: [/down]}
  - name: slow
    url: ${{ env "DECK_ECHO_URL" }}
    read_timeout: 300
    retries: 0
    routes:
      - {name: slow, paths: [/slow]}
  - name: switching
    url: ${{ env "DECK_SWITCHING_URL" }}
    retries: 0
    routes:
      - {name: switching, paths: [/switch]}
consumers:
  - username: clinic-staff
    custom_id: staff
    jwt_secrets:
      - key: clinic-directory
        algorithm: RS256
        rsa_public_key: |
          ${{ env "DECK_PUBLIC_KEY" | indent 10 }}
  - username: patient-portal
    custom_id: patient-portal
    keyauth_credentials: [{key: portal-key-123}]
    acls: [{group: partners}]
plugins:
  - name: correlation-id
    config: {header_name: X-Correlation-ID, generator: uuid#counter, echo_downstream: true}
  - name: rate-limiting
    config: {minute: 100000, limit_by: ip, policy: local}
  - name: cors
    config:
      origins: [http://web.clinic.test]
      headers: [Authorization, Content-Type]
      credentials: true
      max_age: 600
"""

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def switching_upstream():
    """An upstream that answers every request with 101 Switching Protocols."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                             b"frames")
                try:
                    conn.recv(1)  # until the gateway hangs up
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture(scope="module")
def gateway(upstream, keys, switching_upstream, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gateway")
    config = workdir / "kong.yml"
    config.write_text(TEST_CONFIG)
    env = gateway_env({
        "DECK_ECHO_URL": upstream.url,
        "DECK_CLOSED_PORT": str(closed_port()),
        "DECK_PUBLIC_KEY": keys.public_pem,
        "DECK_SWITCHING_URL": switching_upstream,
    })
    process = start_gateway(config, env, workdir)
    yield process
    assert process.stop() == 0


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


def token(private_pem: bytes, alg: str = "RS256", **claims) -> str:
    body = {"iss": "clinic-directory", "sub": "staff-1", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private_pem, algorithm=alg)


def upstream_headers(response: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.json()["headers"]}


def assert_kong_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body == {"message": message, "request_id": response.headers["X-Kong-Request-Id"]}
    assert REQUEST_ID.match(body["request_id"])
    assert response.headers["Server"] == "kong/3.9.1"


def assert_jwt_refusal(response: requests.Response, body: dict, challenge: str) -> None:
    """The jwt plugin's kong.response.exit: its own body (no request_id), Kong's headers all the same."""
    assert response.status_code == 401
    assert response.json() == body
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["WWW-Authenticate"] == challenge
    assert REQUEST_ID.match(response.headers["X-Kong-Request-Id"])
    assert response.headers["Server"] == "kong/3.9.1"


def exchange(gateway, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read until the gateway closes the connection (a timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


# --- routing ----------------------------------------------------------------------------------


def test_unknown_path_gets_kongs_404_body(gateway, http):
    response = http.get(f"{gateway.url}/no/such/thing")
    assert_kong_error(response, 404, "no Route matched with those values")
    assert "X-Kong-Response-Latency" in response.headers


def test_strip_path_false_sends_the_public_path_with_kong_forwarding_headers(gateway, upstream, http):
    response = http.get(f"{gateway.url}/open/items/7?page=2&sort=asc")
    assert response.status_code == 200
    sent = response.json()
    assert sent["path"] == "/open/items/7?page=2&sort=asc"
    headers = upstream_headers(response)
    assert headers["host"] == upstream.url.removeprefix("http://")
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "127.0.0.1"
    assert headers["x-forwarded-port"] == str(gateway.port)
    assert headers["x-forwarded-path"] == "/open/items/7"
    assert "x-forwarded-prefix" not in headers
    assert headers["x-kong-request-id"] == response.headers["X-Kong-Request-Id"]
    assert response.headers["Via"] == "1.1 kong/3.9.1"
    assert response.headers["Server"] == "echo-upstream"
    assert int(response.headers["X-Kong-Upstream-Latency"]) >= 0
    assert int(response.headers["X-Kong-Proxy-Latency"]) >= 0


def test_strip_path_true_removes_the_matched_prefix(gateway, http):
    response = http.get(f"{gateway.url}/strip/a/b?x=1")
    assert response.json()["path"] == "/a/b?x=1"
    assert upstream_headers(response)["x-forwarded-prefix"] == "/strip"
    assert http.get(f"{gateway.url}/strip").json()["path"] == "/"


def test_longest_path_prefix_wins(gateway, http):
    response = http.get(f"{gateway.url}/strip/deeper/z")
    assert response.json()["path"] == "/z"
    assert upstream_headers(response)["x-forwarded-prefix"] == "/strip/deeper"


def test_service_path_is_joined_with_the_stripped_path(gateway, http):
    assert http.get(f"{gateway.url}/based/x/y").json()["path"] == "/base/x/y"


def test_route_methods_restrict_matching(gateway, http):
    assert http.get(f"{gateway.url}/methods").status_code == 200
    assert_kong_error(http.post(f"{gateway.url}/methods"), 404, "no Route matched with those values")


def test_forwarded_for_appends_the_client_address(gateway, http):
    response = http.get(f"{gateway.url}/open", headers={"X-Forwarded-For": "203.0.113.9"})
    assert upstream_headers(response)["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


def test_forwarded_host_drops_the_port_of_an_ipv6_host(gateway, http):
    response = http.get(f"{gateway.url}/open", headers={"Host": "[::1]:8000"})
    assert upstream_headers(response)["x-forwarded-host"] == "[::1]"


# --- correlation id ------------------------------------------------------------------------------


def test_correlation_id_is_generated_passed_upstream_and_echoed(gateway, http):
    response = http.get(f"{gateway.url}/open")
    generated = response.headers["X-Correlation-ID"]
    assert re.match(r"^[0-9a-f-]{36}#\d+$", generated)
    assert upstream_headers(response)["x-correlation-id"] == generated


def test_a_client_correlation_id_is_kept(gateway, http):
    response = http.get(f"{gateway.url}/open", headers={"X-Correlation-ID": "req-42"})
    assert response.headers["X-Correlation-ID"] == "req-42"
    assert upstream_headers(response)["x-correlation-id"] == "req-42"


def test_correlation_id_is_echoed_on_gateway_errors_too(gateway, http):
    response = http.get(f"{gateway.url}/staff", headers={"X-Correlation-ID": "req-43"})
    assert response.status_code == 401
    assert response.headers["X-Correlation-ID"] == "req-43"


# --- jwt -------------------------------------------------------------------------------------------


def test_no_token_is_401_with_kongs_body_and_bearer_challenge(gateway, http):
    response = http.get(f"{gateway.url}/staff")
    assert_jwt_refusal(response, {"message": "Unauthorized"}, "Bearer")


@pytest.mark.parametrize(
    ("make_token", "expected"),
    [
        (lambda k: token(k.other_private_pem), {"message": "Invalid signature"}),
        (lambda k: token(b"a-shared-secret-of-32-bytes-long!", alg="HS256"), {"message": "Invalid algorithm"}),
        (lambda k: token(k.private_pem, iss="somebody-else"), {"message": "No credentials found for given 'iss'"}),
        (lambda k: token(k.private_pem, iss=None), {"message": "No mandatory 'iss' in claims"}),
        (lambda k: token(k.private_pem, exp=int(time.time()) - 5), {"exp": "token expired"}),
        (lambda k: token(k.private_pem, exp=int(time.time()) + 3600), {"exp": "exceeds maximum allowed expiration"}),
        (lambda k: token(k.private_pem, exp="soon"), {"exp": "must be a number"}),
        (lambda k: "not-a-jwt", {"message": "Bad token; invalid JSON"}),
    ],
    ids=["bad-signature", "hs256", "unknown-iss", "no-iss", "expired", "too-long-lived", "exp-not-number", "garbage"],
)
def test_rejected_tokens_get_401_with_kongs_message(gateway, http, keys, make_token, expected):
    response = http.get(f"{gateway.url}/staff", headers={"Authorization": f"Bearer {make_token(keys)}"})
    assert_jwt_refusal(response, expected, 'Bearer error="invalid_token"')


def test_alg_none_token_is_refused(gateway, http):
    def segment(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    unsigned = f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment({'iss': 'clinic-directory', 'exp': 9e9})}."
    response = http.get(f"{gateway.url}/staff", headers={"Authorization": f"Bearer {unsigned}"})
    assert_jwt_refusal(response, {"message": "Bad token; invalid alg"}, 'Bearer error="invalid_token"')


def test_valid_token_is_proxied_with_consumer_headers_and_the_token_intact(gateway, http, keys):
    access = token(keys.private_pem)
    response = http.get(
        f"{gateway.url}/staff/me",
        headers={"Authorization": f"Bearer {access}", "X-Consumer-ID": "spoofed", "X-Consumer-Username": "spoofed"},
    )
    assert response.status_code == 200
    headers = upstream_headers(response)
    assert headers["authorization"] == f"Bearer {access}"
    assert headers["x-consumer-custom-id"] == "staff"
    assert headers["x-consumer-username"] == "clinic-staff"
    assert re.match(r"^[0-9a-f-]{36}$", headers["x-consumer-id"])
    assert headers["x-credential-identifier"] == "clinic-directory"
    assert "x-anonymous-consumer" not in headers
    assert response.json()["path"] == "/staff/me"


def test_preflight_skips_jwt_when_run_on_preflight_is_off(gateway, http):
    response = http.options(f"{gateway.url}/staff", headers={
        "Origin": "http://web.clinic.test", "Access-Control-Request-Method": "GET"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "http://web.clinic.test"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Allow-Headers"] == "Authorization,Content-Type"
    assert response.headers["Access-Control-Max-Age"] == "600"


# --- key-auth and acl ---------------------------------------------------------------------------


def test_missing_api_key_is_401(gateway, http):
    response = http.get(f"{gateway.url}/partner/patients")
    assert_kong_error(response, 401, "No API key found in request")
    assert response.headers["WWW-Authenticate"] == "Key"


def test_unknown_api_key_is_401(gateway, http):
    response = http.get(f"{gateway.url}/partner/patients", headers={"apikey": "wrong"})
    assert_kong_error(response, 401, "Unauthorized")
    assert response.headers["WWW-Authenticate"] == "Key"


def test_known_key_outside_the_allowed_group_is_403(gateway, http):
    response = http.get(f"{gateway.url}/admins/x", headers={"apikey": "portal-key-123"})
    assert_kong_error(response, 403, "You cannot consume this service")


def test_partner_key_in_allowed_group_is_proxied_with_the_key_hidden(gateway, http):
    response = http.get(f"{gateway.url}/partner/patients", headers={"apikey": "portal-key-123"})
    assert response.status_code == 200
    headers = upstream_headers(response)
    assert "apikey" not in headers
    assert headers["x-consumer-username"] == "patient-portal"
    assert headers["x-consumer-custom-id"] == "patient-portal"
    assert "x-consumer-groups" not in headers  # hide_groups_header
    assert headers["x-credential-identifier"] != "portal-key-123"


def test_api_key_in_the_query_is_removed_before_proxying(gateway, http):
    response = http.get(f"{gateway.url}/partner/patients?apikey=portal-key-123&page=2")
    assert response.status_code == 200
    assert response.json()["path"] == "/partner/patients?page=2"


# --- rate limiting --------------------------------------------------------------------------------


def test_over_the_limit_is_429_with_ratelimit_headers(gateway):
    # Each attempt counts under an identifier of its own; one whose requests straddle two minute windows
    # (the counts start again at the turn of the minute) is made again rather than waited out.
    for _ in range(3):
        client = {"X-Test-Client": uuid.uuid4().hex}
        minute = time.gmtime().tm_min
        with requests.Session() as http:
            passed = [http.get(f"{gateway.url}/limited", headers=client) for _ in range(3)]
            refused = http.get(f"{gateway.url}/limited", headers=client)
        if time.gmtime().tm_min == minute:
            break
    for ok, remaining in zip(passed, (2, 1, 0), strict=True):
        assert ok.status_code == 200
        assert ok.headers["X-RateLimit-Limit-Minute"] == "3"
        assert ok.headers["X-RateLimit-Remaining-Minute"] == str(remaining)
        assert ok.headers["RateLimit-Limit"] == "3"
        assert ok.headers["RateLimit-Remaining"] == str(remaining)
        assert 1 <= int(ok.headers["RateLimit-Reset"]) <= 60
    assert_kong_error(refused, 429, "API rate limit exceeded")
    assert refused.headers["X-RateLimit-Remaining-Minute"] == "0"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_route_limit_replaces_the_global_one_and_global_headers_show_elsewhere(gateway, http):
    response = http.get(f"{gateway.url}/open")
    assert response.headers["X-RateLimit-Limit-Minute"] == "100000"


# --- request size ----------------------------------------------------------------------------------


def test_declared_oversize_body_is_413(gateway, http):
    response = http.post(f"{gateway.url}/upload", data=b"x" * 2048)
    assert_kong_error(response, 413, "Request size limit exceeded")


def test_chunked_oversize_body_is_413(gateway, http, upstream):
    before = len(upstream.seen)
    response = http.post(f"{gateway.url}/upload", data=iter([b"x" * 512] * 4))
    assert_kong_error(response, 413, "Request size limit exceeded")
    assert len(upstream.seen) == before  # the upstream never saw it


def test_declared_oversize_body_expecting_100_continue_is_417_before_the_body_is_sent(gateway):
    answer = exchange(gateway, b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n"
                               b"Expect: 100-continue\r\nAccept: application/json\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417 Expectation Failed\r\n")  # no 100 Continue first
    assert b"Connection: close" in head.split(b"\r\n")  # the body was never sent: nothing to read after it
    assert json.loads(body)["message"] == "Request size limit exceeded"


def test_chunked_oversize_body_expecting_100_continue_is_417(gateway, upstream):
    before = len(upstream.seen)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
        answer = b""
        while b"request_id" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417 Expectation Failed\r\n")
    assert json.loads(body)["message"] == "Request size limit exceeded"
    assert len(upstream.seen) == before


def test_bodies_within_the_limit_reach_the_upstream(gateway, http):
    assert http.post(f"{gateway.url}/upload", data=b"y" * 1000).json()["body_length"] == 1000
    assert http.post(f"{gateway.url}/upload", data=iter([b"z" * 100] * 3)).json()["body_length"] == 300


# --- bodies and connections ------------------------------------------------------------------------


def test_large_bodies_stream_both_ways(gateway, http):
    response = http.post(f"{gateway.url}/open", data=b"q" * 3_000_000)
    assert response.json()["body_length"] == 3_000_000
    streamed = http.post(f"{gateway.url}/open", data=iter([b"r" * 65536] * 20))
    assert streamed.json()["body_length"] == 65536 * 20
    chunked = http.get(f"{gateway.url}/open", headers={"X-Test-Chunks": "200"})
    assert chunked.text == "".join(f"part-{i};" for i in range(200))


def test_head_requests_get_headers_only(gateway, http):
    response = http.head(f"{gateway.url}/open")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["Content-Length"]) > 0


def test_upstream_status_codes_pass_through(gateway, http):
    assert http.get(f"{gateway.url}/open", headers={"X-Test-Status": "418"}).status_code == 418


def test_keep_alive_and_pipelined_requests_are_answered_in_order(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /open/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /open/2 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.index(b'"/open/1"') < data.index(b'"/open/2"') < data.index(b"HTTP/1.1 404")


def test_requests_pipelined_after_an_upgrade_are_not_left_waiting(gateway):
    # The Upgrade is not relayed and nothing after it is read: the answer closes the connection.
    answer = exchange(gateway, b"GET /open/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                               b"GET /open/after HTTP/1.1\r\nHost: a\r\n\r\n")
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in head.split(b"\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1 and b'"/open/ws"' in answer


def test_a_header_too_large_is_refused_before_it_has_all_been_sent(gateway):
    limit = 16 * 2**20
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET /open HTTP/1.1\r\nHost: a\r\nX-Huge: ")
        while sent < limit and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"a" * 65536)  # the value never ends
            sent += 65536
        try:
            while b"request_id" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        except TimeoutError:
            pass
    assert sent < limit, "no answer while 16 MB of one header value were sent"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in head.split(b"\r\n")
    assert json.loads(body)["message"] == "Request header or cookie too large"


# --- upstream failures -------------------------------------------------------------------------------


def test_upstream_down_is_502(gateway, http):
    assert_kong_error(http.get(f"{gateway.url}/down"), 502,
                      "An invalid response was received from the upstream server")


def test_upstream_too_slow_is_504(gateway, http):
    response = http.get(f"{gateway.url}/slow", headers={"X-Test-Sleep": "1"})
    assert_kong_error(response, 504, "The upstream server is timing out")


def test_a_post_that_times_out_on_a_kept_alive_connection_is_sent_once(gateway, upstream, http):
    assert http.get(f"{gateway.url}/slow").status_code == 200  # leaves a kept-alive connection in the pool
    marker = uuid.uuid4().hex
    response = http.post(f"{gateway.url}/slow", data=b'{"a": 1}',
                         headers={"X-Test-Sleep": "1", "X-Test-Marker": marker})
    assert_kong_error(response, 504, "The upstream server is timing out")
    received = [seen for seen in upstream.seen if ("X-Test-Marker", marker) in seen["headers"]]
    assert len(received) == 1  # retries: 0, and nginx never re-sends a POST


def test_an_upstream_switching_protocols_is_502(gateway, http):
    response = http.get(f"{gateway.url}/switch", timeout=5)
    assert_kong_error(response, 502, "An invalid response was received from the upstream server")


def test_request_log_has_no_paths_or_tokens(gateway, http, keys):
    access = token(keys.private_pem)
    staff = http.get(f"{gateway.url}/staff/patient-jane-doe?name=jane", headers={"Authorization": f"Bearer {access}"})
    partner = http.get(f"{gateway.url}/partner/patient-jane-doe?apikey=portal-key-123&name=jane")
    assert staff.status_code == partner.status_code == 200
    logged = {staff.headers["X-Kong-Request-Id"], partner.headers["X-Kong-Request-Id"]}
    wait_until(lambda: logged <= {e.get("request_id") for e in gateway.log_lines()}, message="both requests' log lines")
    text = gateway.stdout_path.read_text()
    assert "jane" not in text
    assert access not in text
    assert "portal-key-123" not in text
    entries = [e for e in gateway.log_lines() if e.get("msg") == "request" and e.get("route") == "staff"]
    assert entries and {"request_id", "method", "status", "duration_ms", "upstream_ms"} <= set(entries[-1])
    assert entries[-1]["service"] == "gateway" and entries[-1]["status"] == 200
    partner = [e for e in gateway.log_lines() if e.get("msg") == "request" and e.get("route") == "partner"]
    assert partner and partner[-1]["status"] == 200


def test_a_token_in_the_query_string_is_not_accepted_when_uri_param_names_is_empty(gateway, http, keys):
    response = http.get(f"{gateway.url}/staff?jwt={token(keys.private_pem)}")
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized"}


def test_cors_headers_on_ordinary_responses(gateway, http):
    allowed = http.get(f"{gateway.url}/open", headers={"Origin": "http://web.clinic.test"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://web.clinic.test"
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in allowed.headers["Vary"]


def test_expect_continue_is_answered_before_the_body_is_read(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"5\r\nhello\r\n0\r\n\r\n")
        data = b""
        while b'"body_length": 5' not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
