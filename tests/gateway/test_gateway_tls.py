"""HTTPS on the local gateway (GATEWAY_TLS_CERT_FILE, GATEWAY_TLS_KEY_FILE): a real gateway process
with a certificate made for the test, in front of the echo upstream. Over HTTPS a request is proxied
and the service learns it came over HTTPS; plain HTTP to the TLS port is never proxied; without the
settings the listener stays plain HTTP; production refuses a plain listener unless told why it is safe."""

from __future__ import annotations

import socket
import ssl

import pytest
import requests

from services.gateway.tls import ListenerTls
from services.kit.transport import development_grpc_tls
from tests.gateway.conftest import gateway_env, run_check, start_gateway

CONFIG = """\
_format_version: "3.0"
services:
  - name: echo
    url: ${{ env "DECK_ECHO_URL" }}
    routes:
      - name: open
        paths: [/open]
"""


def config_in(folder, text: str = CONFIG):
    path = folder / "kong.yml"
    path.write_text(text)
    return path


def header(answer: dict, name: str) -> str | None:
    return next((v for k, v in answer["headers"] if k.lower() == name.lower()), None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return development_grpc_tls(tmp_path_factory.mktemp("gateway-tls") / "certs")


@pytest.fixture(scope="module")
def tls_gateway(upstream, certs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tls-gateway")
    env = gateway_env({"DECK_ECHO_URL": upstream.url, "GATEWAY_TLS_CERT_FILE": str(certs.cert_file),
                       "GATEWAY_TLS_KEY_FILE": str(certs.key_file)})
    process = start_gateway(config_in(workdir), env, workdir)
    yield process
    assert process.stop() == 0


def test_https_request_is_proxied_and_the_service_sees_https(tls_gateway, certs):
    answer = requests.get(f"https://127.0.0.1:{tls_gateway.port}/open/hello", verify=str(certs.ca_file), timeout=10)
    assert answer.status_code == 200
    seen = answer.json()
    assert seen["path"] == "/hello"
    assert header(seen, "X-Forwarded-Proto") == "https"
    assert header(seen, "X-Forwarded-Port") == str(tls_gateway.port)
    assert answer.headers["Via"] == "1.1 kong/3.9.1"
    # The same name as a DNS name (SAN localhost) verifies too.
    assert requests.get(f"https://localhost:{tls_gateway.port}/open/x", verify=str(certs.ca_file),
                        timeout=10).status_code == 200


def test_plain_http_to_the_tls_port_is_never_proxied(tls_gateway, upstream):
    before = len(upstream.seen)
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /open/plaintext-attempt HTTP/1.1\r\nHost: clinic\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert b"HTTP/1.1" not in received  # no HTTP answer, and above all no proxied one
    assert not [s for s in upstream.seen[before:] if "plaintext-attempt" in s["path"]]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_gateway.port}/open/plaintext-attempt", timeout=10)
    assert not [s for s in upstream.seen[before:] if "plaintext-attempt" in s["path"]]


def test_the_listener_context_requires_tls_1_2(certs):
    # This machine's OpenSSL already refuses older versions by default, so the floor is checked on the context.
    context = ListenerTls(certs.cert_file, certs.key_file).server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_without_the_settings_the_listener_stays_plain_http(upstream, tmp_path):
    process = start_gateway(config_in(tmp_path), gateway_env({"DECK_ECHO_URL": upstream.url}), tmp_path)
    try:
        answer = requests.get(f"{process.url}/open/plain", timeout=10)
        assert answer.status_code == 200
        assert header(answer.json(), "X-Forwarded-Proto") == "http"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{process.port}/open/plain", verify=False, timeout=10)
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize("given", ["GATEWAY_TLS_CERT_FILE", "GATEWAY_TLS_KEY_FILE"])
def test_certificate_and_key_go_together(upstream, certs, tmp_path, given):
    path = certs.cert_file if given == "GATEWAY_TLS_CERT_FILE" else certs.key_file
    result = run_check(config_in(tmp_path), gateway_env({"DECK_ECHO_URL": upstream.url, given: str(path)}))
    assert result.returncode == 2
    assert "(the listener's TLS takes both or neither)" in result.stderr


def test_a_key_that_is_not_the_certificates_is_refused(upstream, certs, tmp_path):
    env = gateway_env({"DECK_ECHO_URL": upstream.url, "GATEWAY_TLS_CERT_FILE": str(certs.ca_file),
                       "GATEWAY_TLS_KEY_FILE": str(certs.key_file)})
    result = run_check(config_in(tmp_path), env)
    assert result.returncode == 2
    assert "must hold a PEM certificate (chain) and its private key" in result.stderr


def test_a_route_without_https_is_refused_on_the_tls_listener(upstream, certs, tmp_path):
    text = CONFIG.replace("paths: [/open]", "paths: [/open]\n        protocols: [http]")
    tls = {"GATEWAY_TLS_CERT_FILE": str(certs.cert_file), "GATEWAY_TLS_KEY_FILE": str(certs.key_file)}
    refused = run_check(config_in(tmp_path, text), gateway_env({"DECK_ECHO_URL": upstream.url, **tls}))
    assert refused.returncode == 1
    assert "route open: unsupported by the local gateway" in refused.stderr
    accepted = run_check(config_in(tmp_path, text), gateway_env({"DECK_ECHO_URL": upstream.url}))
    assert accepted.returncode == 0, accepted.stderr


PRODUCTION = {"CLINIC_MODE": "production", "GATEWAY_IDENTITY_KEY": "gateway-identity-test-key-0123456789abcdef"}


@pytest.mark.parametrize("override", [None, "GATEWAY_BEHIND_TLS_PROXY", "CLINIC_TRUSTED_NETWORK", "tls"])
def test_production_refuses_a_plain_listener_unless_protected(upstream, certs, tmp_path, override):
    env = gateway_env({"DECK_ECHO_URL": upstream.url, "CLINIC_RUN_DIR": str(tmp_path), **PRODUCTION})
    env.pop("CLINIC_TRUSTED_NETWORK", None)
    if override == "tls":
        env.update({"GATEWAY_TLS_CERT_FILE": str(certs.cert_file), "GATEWAY_TLS_KEY_FILE": str(certs.key_file)})
    elif override:
        env[override] = "1"
    result = run_check(config_in(tmp_path), env)
    if override is None:
        assert result.returncode == 2
        assert "the gateway listener would carry PHI in plain HTTP, which production refuses" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
