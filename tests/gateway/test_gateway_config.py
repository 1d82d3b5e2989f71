"""Start-up validation of decK files: the real gateway/kong.yml, and broken files that must be refused."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid

import jwt
import pytest
import requests

from tests.gateway.conftest import REPO_ROOT, gateway_env, run_check, start_gateway
from tests.waits import wait_until

PRODUCT_FILE = REPO_ROOT / "gateway" / "kong.yml"
PORTAL_KEY = "portal-test-key-0123456789"

GOOD = """\
_format_version: "3.0"
services:
  - name: echo
    url: ${{ env "DECK_ECHO_URL" }}
    routes:
      - name: open
        paths: [/open]
        plugins:
          - name: rate-limiting
            config: {minute: 10}
consumers:
  - username: portal
    acls: [{group: partners}]
"""


def product_env(upstream, keys) -> dict[str, str]:
    return gateway_env({
        "DECK_DIRECTORY_URL": upstream.url,
        "DECK_INBOX_URL": upstream.url,
        "DECK_NOTIFICATIONS_URL": upstream.url,
        "DECK_AUTO_REPLY_URL": upstream.url,
        "DECK_WEB_URL": upstream.url,
        "DECK_WEB_EVENTS_URL": upstream.url,
        "DECK_ERX_BRIDGE_URL": upstream.url,
        "DECK_CLOUD_COMMS_URL": upstream.url,
        "DECK_AUDIT_URL": upstream.url,
        "DECK_DIRECTORY_JWT_PUBLIC_KEY": keys.public_pem,
        "DECK_PATIENT_PORTAL_API_KEY": PORTAL_KEY,
        "DECK_LAB_INTERFACE_API_KEY": "lab-interface-test-key",
        "DECK_PRACTICE_MANAGEMENT_API_KEY": "practice-management-test-key",
        "DECK_COMPLIANCE_TRACKER_API_KEY": "compliance-tracker-test-key",
        "DECK_DASHBOARDS_API_KEY": "dashboards-test-key",
        "DECK_RATE_LIMIT_MINUTE": "600",
        "DECK_AUTH_RATE_LIMIT_MINUTE": "30",
        "DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE": "500",
        "DECK_LAB_INTERFACE_RATE_LIMIT_MINUTE": "500",
        "DECK_PRACTICE_MANAGEMENT_RATE_LIMIT_MINUTE": "500",
        "DECK_COMPLIANCE_TRACKER_RATE_LIMIT_MINUTE": "500",
        "DECK_CORS_ORIGIN": "http://127.0.0.1:8000",
    })


def test_the_product_kong_yml_validates(upstream, keys):
    result = run_check(REPO_ROOT / "gateway" / "kong.yml", product_env(upstream, keys))
    assert result.returncode == 0, result.stderr
    assert "OK (10 services, 25 routes, 6 consumers" in result.stdout


def test_the_product_kong_yml_serves_the_clinic_routes(upstream, keys, tmp_path):
    gateway = start_gateway(PRODUCT_FILE, product_env(upstream, keys), tmp_path)
    try:
        with requests.Session() as http:
            login = http.post(f"{gateway.url}/api/v1/auth/token", json={"username": "u"})
            assert login.status_code == 200
            assert login.json()["path"] == "/api/v1/auth/token"
            assert login.headers["X-RateLimit-Limit-Minute"] == "30"  # the stricter auth limit
            for path in ("/api/v1/messages", "/api/v1/directory/staff", "/api/v1/auto-replies/me"):
                refused = http.get(f"{gateway.url}{path}")
                assert refused.status_code == 401
                assert refused.json() == {"message": "Unauthorized"}
                assert refused.headers["WWW-Authenticate"] == "Bearer"
                assert refused.headers["Content-Type"] == "application/json; charset=utf-8"
                assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["X-Kong-Request-Id"])
            partner = http.get(f"{gateway.url}/api/v1/partner/x", headers={"apikey": PORTAL_KEY})
            assert partner.status_code == 200
            assert partner.headers["X-RateLimit-Limit-Minute"] == "500"  # the partner's own quota
            assert "X-Correlation-ID" in partner.headers
            assert "apikey" not in {k.lower() for k, _ in partner.json()["headers"]}  # hide_credentials
    finally:
        assert gateway.stop() == 0


def test_the_product_kong_yml_verifies_staff_tokens_and_partner_keys(upstream, keys, tmp_path):
    gateway = start_gateway(PRODUCT_FILE, product_env(upstream, keys), tmp_path)
    try:
        with requests.Session() as http:
            # An RS256 token checked against the PEM that `indent 10` placed in the block scalar.
            access = jwt.encode({"iss": "clinic-directory", "sub": "staff-1", "exp": int(time.time()) + 900},
                                keys.private_pem, algorithm="RS256")
            for path in ("/api/v1/messages/board", "/api/v1/directory/me", "/api/v1/auto-replies/me"):
                response = http.get(f"{gateway.url}{path}", headers={"Authorization": f"Bearer {access}"})
                assert response.status_code == 200
                assert response.json()["path"] == path
                seen = {k.lower(): v for k, v in response.json()["headers"]}
                assert seen["x-consumer-username"] == "clinic-staff"
                assert seen["x-credential-identifier"] == "clinic-directory"
            forged = jwt.encode({"iss": "clinic-directory", "exp": int(time.time()) + 900}, keys.other_private_pem,
                                algorithm="RS256")
            refused = http.get(f"{gateway.url}/api/v1/messages", headers={"Authorization": f"Bearer {forged}"})
            assert refused.status_code == 401 and refused.json() == {"message": "Invalid signature"}

            wrong = http.get(f"{gateway.url}/api/v1/partner/x", headers={"apikey": "not-the-portal-key"})
            assert wrong.status_code == 401
            assert wrong.json() == {"message": "Unauthorized", "request_id": wrong.headers["X-Kong-Request-Id"]}
            assert wrong.headers["WWW-Authenticate"] == "Key"
            # key_in_query is off: a key in the URL is not looked at (and so is not worth leaking into logs).
            in_query = http.get(f"{gateway.url}/api/v1/partner/x?apikey={PORTAL_KEY}")
            assert in_query.status_code == 401
            assert in_query.json()["message"] == "No API key found in request"
    finally:
        assert gateway.stop() == 0


def test_the_product_kong_yml_limits_bodies_to_one_megabyte(upstream, keys, tmp_path):
    gateway = start_gateway(PRODUCT_FILE, product_env(upstream, keys), tmp_path)
    try:
        with requests.Session() as http:
            url = f"{gateway.url}/api/v1/auth/token"
            assert http.post(url, data=b"x" * 2**20).json()["body_length"] == 2**20
            too_big = http.post(url, data=b"x" * (2**20 + 1))
            assert too_big.status_code == 413
            assert too_big.json() == {"message": "Request size limit exceeded",
                                      "request_id": too_big.headers["X-Kong-Request-Id"]}
    finally:
        assert gateway.stop() == 0


def test_the_product_kong_yml_lets_only_the_two_send_routes_carry_attachments(upstream, keys, tmp_path):
    gateway = start_gateway(PRODUCT_FILE, product_env(upstream, keys), tmp_path)
    access = jwt.encode({"iss": "clinic-directory", "sub": "staff-1", "exp": int(time.time()) + 900},
                        keys.private_pem, algorithm="RS256")
    staff = {"Authorization": f"Bearer {access}"}
    body = b"x" * (5 * 2**20)
    try:
        with requests.Session() as http:
            for path in ("/api/v1/cloud/direct/outbound", "/api/v1/cloud/faxes/outbound"):
                assert http.post(f"{gateway.url}{path}", data=body, headers=staff).json()["body_length"] == len(body)
                # Still staff only: the larger limit is no way around the token.
                assert http.post(f"{gateway.url}{path}", data=b"{}").status_code == 401
                assert http.post(f"{gateway.url}{path}", data=b"x" * (29 * 2**20), headers=staff).status_code == 413
            # Every other cloud path keeps the one-megabyte limit.
            other = http.post(f"{gateway.url}/api/v1/cloud/direct/dm_1", data=body, headers=staff)
            assert other.status_code == 413
    finally:
        assert gateway.stop() == 0


def test_the_product_partner_route_refuses_consumers_outside_the_partners_group(upstream, keys, tmp_path):
    # The product file plus one more key-auth consumer that is not in `partners`.
    text = PRODUCT_FILE.read_text().replace(
        "consumers:\n", "consumers:\n  - username: outsider\n    keyauth_credentials: [{key: outsider-key-1}]\n", 1)
    config = tmp_path / "kong.yml"
    config.write_text(text)
    gateway = start_gateway(config, product_env(upstream, keys), tmp_path)
    try:
        response = requests.get(f"{gateway.url}/api/v1/partner/x", headers={"apikey": "outsider-key-1"}, timeout=5)
        assert response.status_code == 403
        assert response.json() == {"message": "You cannot consume this service",
                                   "request_id": response.headers["X-Kong-Request-Id"]}
        assert requests.get(f"{gateway.url}/api/v1/partner/x", headers={"apikey": PORTAL_KEY},
                            timeout=5).status_code == 200
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (GOOD.replace("name: rate-limiting", "name: rate-limitting"),
         "services[0].routes[0].plugins[0].name: plugin 'rate-limitting' not enabled"),
        (GOOD.replace("paths: [/open]", "paths: [/open]\n        colour: blue"),
         "services[0].routes[0].colour: unknown field"),
        (GOOD.replace("minute: 10", "minute: ten"),
         "services[0].routes[0].plugins[0].config.minute: expected a number"),
        (GOOD.replace("minute: 10", "minute: -1"),
         "services[0].routes[0].plugins[0].config.minute: value must be greater than 0"),
        (GOOD.replace("minute: 10", "minute: 10, policy: cluster"),
         "services[0].routes[0].plugins[0].config.policy: expected one of: local, redis"),
        (GOOD.replace("{group: partners}", "{grup: partners}"),
         "consumers[0].acls[0].group: required field missing"),
        (GOOD.replace("url: ${{ env \"DECK_ECHO_URL\" }}", "port: 80"),
         "services[0].host: required field missing"),
        (GOOD.replace("DECK_ECHO_URL", "DECK_NOT_SET"),
         "line 4: environment variable 'DECK_NOT_SET' present in state file but not set"),
        (GOOD.replace("DECK_ECHO_URL", "ECHO_URL"),
         "environment variables in the state file must be prefixed with 'DECK_', found: 'ECHO_URL'"),
        (GOOD.replace("{minute: 10}", "{minute: 10, hour: 5}"),
         "The limit for hour(5.0) cannot be lower than the limit for minute(10.0)"),
        (GOOD.replace("paths: [/open]", "paths: [/open]\n        headers: {x-tenant: [a]}"),
         "services[0].routes[0].headers: unsupported by the local gateway"),
        (GOOD.replace('_format_version: "3.0"\n', ""), "_format_version: required field missing"),
    ],
    ids=["unknown-plugin", "unknown-field", "wrong-type", "out-of-range", "enum", "missing-required",
         "missing-host", "missing-env", "unprefixed-env", "period-order", "unsupported-field", "no-version"],
)
def test_broken_files_are_refused_naming_the_field(tmp_path, upstream, broken, expected):
    config = tmp_path / "kong.yml"
    config.write_text(broken)
    result = run_check(config, gateway_env({"DECK_ECHO_URL": upstream.url}))
    assert result.returncode == 1
    assert expected in result.stderr


def test_a_good_file_passes_the_check(tmp_path, upstream):
    config = tmp_path / "kong.yml"
    config.write_text(GOOD)
    result = run_check(config, gateway_env({"DECK_ECHO_URL": upstream.url}))
    assert result.returncode == 0, result.stderr


def test_invalid_gateway_settings_are_listed_with_exit_status_2(tmp_path, upstream):
    config = tmp_path / "kong.yml"
    config.write_text(GOOD)
    env = gateway_env({"DECK_ECHO_URL": upstream.url, "GATEWAY_PORT": "eighty", "GATEWAY_ACCESS_LOG": "maybe"})
    result = run_check(config, env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "GATEWAY_PORT" in result.stderr and "GATEWAY_ACCESS_LOG" in result.stderr


def test_the_server_itself_refuses_to_start_on_a_broken_file(tmp_path):
    config = tmp_path / "kong.yml"
    config.write_text(GOOD)  # DECK_ECHO_URL deliberately not set
    result = subprocess.run([sys.executable, "-m", "services.gateway", "--config", str(config)],
                            cwd=REPO_ROOT, env=gateway_env(), capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 1
    assert "environment variable 'DECK_ECHO_URL' present in state file but not set" in result.stderr


def test_sigterm_lets_the_request_in_flight_finish(tmp_path, upstream):
    config = tmp_path / "kong.yml"
    config.write_text(GOOD)
    gateway = start_gateway(config, gateway_env({"DECK_ECHO_URL": upstream.url}), tmp_path)
    outcome: dict = {}
    marker = ("X-Test-Marker", uuid.uuid4().hex)

    def slow_request():
        response = requests.get(f"{gateway.url}/open", headers={"X-Test-Sleep": "0.8", marker[0]: marker[1]},
                                timeout=10)
        outcome["status"] = response.status_code
        outcome["connection"] = response.headers.get("Connection")

    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_until(
        lambda: any(marker in seen["headers"] for seen in upstream.seen), message="the request to reach the upstream"
    )
    assert gateway.stop() == 0
    worker.join(timeout=10)
    assert outcome == {"status": 200, "connection": "close"}
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{gateway.url}/open", timeout=2)
