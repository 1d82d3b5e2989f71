"""The page's sign-in through the web service spends the budget of the real client's address: the
web service passes on the address the gateway stated, and only the gateway's; a caller reaching
web's port directly cannot claim another address. Real directory over HTTP, real web app."""

from __future__ import annotations

import threading

import pytest
from werkzeug.serving import make_server

from clinic.audit.v1 import security_pb2
from services.directory.http_api import create_directory_app
from services.kit.events import decode_envelope, unpack
from services.kit.outbox import OUTBOX
from services.kit.security_events import COLLECTION
from services.web import config as web_config
from services.web.http_api import build_app
from services.web.live import Hub
from services.web.sessions import DirectorySessions

ORIGIN = "http://127.0.0.1:8000"
SAME_ORIGIN = {"X-Clinic-CSRF": "1", "Origin": ORIGIN}


@pytest.fixture
def directory_url(dut):
    """The directory under test served over HTTP on loopback (where web calls it from)."""
    server = make_server("127.0.0.1", 0, create_directory_app(dut.directory), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def web(directory_url):
    settings = web_config.load({"CLINIC_MODE": "development"})
    sessions = DirectorySessions(directory_url, 3600, trusted_proxies=settings.trusted_proxies)
    return build_app(sessions, Hub(4, 2), None, settings).test_client()


def failed_sources(dut) -> list[str]:
    sources = []
    for doc in dut.store.db[COLLECTION].find({"kind": {"$eq": "sign_in_failed"}}).sort("at", 1):
        for entry in (doc.get(OUTBOX) or {}).values():
            sources.append(unpack(decode_envelope(bytes(entry["env"])), security_pb2.SecurityEvent).source)
    return sources


def page_sign_in(web, *, peer: str, real_ip: str | None = None):
    headers = {**SAME_ORIGIN, **({"X-Real-IP": real_ip} if real_ip else {})}
    return web.post(
        "/app/session",
        json={"username": "nurse.kim", "password": "not-the-password!"},
        headers=headers,
        environ_base={"REMOTE_ADDR": peer},
    )


def test_the_address_the_gateway_states_is_the_one_directory_counts(dut, web):
    assert page_sign_in(web, peer="127.0.0.1", real_ip="203.0.113.78").status_code == 401
    assert failed_sources(dut) == ["203.0.113.78"]


def test_a_caller_reaching_webs_port_directly_cannot_claim_another_address(dut, web):
    for n in range(10):
        assert page_sign_in(web, peer="203.0.113.77", real_ip=f"198.51.100.{n}").status_code == 401
    assert set(failed_sources(dut)) == {"203.0.113.77"}
    # Locked out for that address only, as directory counted it.
    reply = page_sign_in(web, peer="203.0.113.77", real_ip="198.51.100.200")
    assert reply.status_code == 429 and reply.get_json()["code"] == "too_many_attempts"
    assert "Retry-After" in reply.headers
    assert page_sign_in(web, peer="127.0.0.1", real_ip="198.51.100.200").status_code == 401
