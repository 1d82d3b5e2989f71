"""HSTS on the Message Board page: sent when the browser reached the system over HTTPS (as a
trusted hop states it), never on plain HTTP and never on a client's own claim."""

from __future__ import annotations

import pytest

from services.web import config
from services.web.http_api import STRICT_TRANSPORT_SECURITY, build_app
from services.web.live import Hub
from services.web.sessions import DirectorySessions

GATEWAY = "10.1.2.3"  # in TRUSTED_PROXIES below
STRANGER = "203.0.113.9"


@pytest.fixture
def client(tmp_path):
    settings = config.load(
        {
            "WEB_ALLOWED_ORIGINS": "https://clinic.example",
            "CLINIC_RUN_DIR": str(tmp_path),
            "TRUSTED_PROXIES": "10.0.0.0/8",
        }
    )
    app = build_app(DirectorySessions("http://127.0.0.1:9", 300), Hub(4, 2), verifier=None, settings=settings)
    return app.test_client()


def get(client, peer: str, **headers):
    return client.get("/", headers=headers, environ_base={"REMOTE_ADDR": peer})


def test_hsts_when_the_gateway_says_the_browser_used_https(client):
    reply = get(client, GATEWAY, **{"X-Forwarded-Proto": "https"})
    assert reply.headers["Strict-Transport-Security"] == STRICT_TRANSPORT_SECURITY
    assert STRICT_TRANSPORT_SECURITY == "max-age=31536000; includeSubDomains"
    # On every answer of the service, its API and errors included.
    assert get(client, GATEWAY, **{"X-Forwarded-Proto": "https"}).headers.get("Strict-Transport-Security")
    missing = client.get("/no/such/page", headers={"X-Forwarded-Proto": "https"}, environ_base={"REMOTE_ADDR": GATEWAY})
    assert missing.headers["Strict-Transport-Security"] == STRICT_TRANSPORT_SECURITY


def test_no_hsts_over_plain_http(client):
    assert "Strict-Transport-Security" not in get(client, GATEWAY).headers
    assert "Strict-Transport-Security" not in get(client, GATEWAY, **{"X-Forwarded-Proto": "http"}).headers


def test_a_clients_own_claim_of_https_is_ignored(client):
    assert "Strict-Transport-Security" not in get(client, STRANGER, **{"X-Forwarded-Proto": "https"}).headers
    # A value the client put before the gateway's own is not the gateway's statement.
    spoofed = get(client, GATEWAY, **{"X-Forwarded-Proto": "https, http"})
    assert "Strict-Transport-Security" not in spoofed.headers


def test_hsts_when_the_service_itself_is_served_over_https(client):
    reply = client.get("/", base_url="https://clinic.example", environ_base={"REMOTE_ADDR": STRANGER})
    assert reply.headers["Strict-Transport-Security"] == STRICT_TRANSPORT_SECURITY
