"""Per-partner quotas in the product gateway/kong.yml: each partner route counts per consumer, apart from
the per-address limit staff share, and a partner over its quota gets Kong's 429 with Retry-After."""

from __future__ import annotations

import http.client
import json
import re
import time

import jwt
import pytest
import requests

from tests.gateway.conftest import start_gateway
from tests.gateway.test_gateway_config import PORTAL_KEY, PRODUCT_FILE, product_env
from tests.waits import wait_until

LAB_KEY = "lab-interface-test-key"
LAB_QUOTA, PORTAL_QUOTA, STAFF_LIMIT = 3, 5, 100


@pytest.fixture()
def gateway(upstream, keys, tmp_path):
    env = product_env(upstream, keys) | {
        "DECK_LAB_INTERFACE_RATE_LIMIT_MINUTE": str(LAB_QUOTA),
        "DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE": str(PORTAL_QUOTA),
        "DECK_RATE_LIMIT_MINUTE": str(STAFF_LIMIT),
    }
    process = start_gateway(PRODUCT_FILE, env, tmp_path)
    yield process
    assert process.stop() == 0


def from_another_address(gateway, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, dict]:
    """A request whose client address is 127.0.0.2 (all of 127/8 is this host): (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30, source_address=("127.0.0.2", 0))
    try:
        conn.request(method, path, body=b"{}", headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"{}")
    finally:
        conn.close()


def staff_token(keys) -> str:
    claims = {"iss": "clinic-directory", "sub": "staff-1", "exp": int(time.time()) + 900}
    return jwt.encode(claims, keys.private_pem, algorithm="RS256")


def test_a_partner_over_its_quota_gets_429_while_another_partner_and_staff_do_not(gateway, keys):
    # Every request below must fall in one minute window (counts start again at the turn of the minute).
    wait_until(lambda: time.gmtime().tm_sec < 45, timeout=30, message="a minute with room for the test")
    minute = time.gmtime().tm_min
    lab = {"apikey": LAB_KEY}
    with requests.Session() as http:
        unauthenticated = http.post(f"{gateway.url}/api/v1/partner/lab/results", json={})
        passed = [
            http.post(f"{gateway.url}/api/v1/partner/lab/results", json={}, headers=lab) for _ in range(LAB_QUOTA)
        ]
        refused = http.post(f"{gateway.url}/api/v1/partner/lab/results", json={}, headers=lab)
        portal = http.get(f"{gateway.url}/api/v1/partner/portal/threads", headers={"apikey": PORTAL_KEY})
        staff = http.get(f"{gateway.url}/api/v1/messages", headers={"Authorization": f"Bearer {staff_token(keys)}"})
        # The quota is the consumer's, not the address's: the same key from another address is refused too.
        elsewhere = from_another_address(gateway, "POST", "/api/v1/partner/lab/results", lab)
    assert time.gmtime().tm_min == minute, "the requests straddled a minute boundary"

    # A request refused by key-auth (before rate-limiting runs) is not counted.
    assert unauthenticated.status_code == 401
    for ok, remaining in zip(passed, range(LAB_QUOTA - 1, -1, -1), strict=True):
        assert ok.status_code == 200
        assert ok.headers["X-RateLimit-Limit-Minute"] == str(LAB_QUOTA)
        assert ok.headers["X-RateLimit-Remaining-Minute"] == str(remaining)
        assert ok.headers["RateLimit-Limit"] == str(LAB_QUOTA)
        assert ok.headers["RateLimit-Remaining"] == str(remaining)
        assert 1 <= int(ok.headers["RateLimit-Reset"]) <= 60

    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/json; charset=utf-8"
    assert refused.json() == {"message": "API rate limit exceeded", "request_id": refused.headers["X-Kong-Request-Id"]}
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["X-Kong-Request-Id"])
    assert refused.headers["X-RateLimit-Remaining-Minute"] == "0"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60

    status, headers, body = elsewhere
    assert status == 429
    assert body["message"] == "API rate limit exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60

    # Another partner, from the same address, has its own untouched quota.
    assert portal.status_code == 200
    assert portal.headers["X-RateLimit-Limit-Minute"] == str(PORTAL_QUOTA)
    assert portal.headers["X-RateLimit-Remaining-Minute"] == str(PORTAL_QUOTA - 1)
    # Staff share the per-address limit, which none of the partner requests counted towards.
    assert staff.status_code == 200
    assert staff.headers["X-RateLimit-Limit-Minute"] == str(STAFF_LIMIT)
    assert staff.headers["X-RateLimit-Remaining-Minute"] == str(STAFF_LIMIT - 1)


def test_every_partner_route_limits_per_consumer_with_its_partners_own_quota(gateway):
    """The quota follows the consumer the key names, on each partner route the product file declares."""
    routes = {
        "/api/v1/partner/lab/results": (LAB_KEY, LAB_QUOTA),
        "/api/v1/partner/x": (PORTAL_KEY, PORTAL_QUOTA),
        "/api/v1/partner/portal/threads": (PORTAL_KEY, PORTAL_QUOTA),
        "/api/v1/partner/schedule/appointments": ("practice-management-test-key", 500),
        "/api/v1/partner/compliance/items": ("compliance-tracker-test-key", 500),
    }
    with requests.Session() as http:
        for path, (key, quota) in routes.items():
            response = http.get(f"{gateway.url}{path}", headers={"apikey": key})
            assert response.status_code == 200, path
            assert response.headers["RateLimit-Limit"] == str(quota), path
