"""clinic-identity-signer on the local gateway: a real gateway process in front of an echo upstream.
The gateway signs what it sends for an authenticated partner, drops a client's own token, leaves
staff and anonymous requests unsigned, and refuses to start without a usable key."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from services.kit import gateway_identity as gi
from tests.gateway.conftest import gateway_env, run_check, start_gateway

KEY = "gateway-identity-test-key-0123456789abcdef"

CONFIG = """\
_format_version: "3.0"
services:
  - name: echo
    url: ${{ env "DECK_ECHO_URL" }}
    routes:
      - name: partner
        paths: [/api/v1/partner]
        strip_path: false
        plugins:
          - name: key-auth
            config: {key_names: [apikey], key_in_query: false, hide_credentials: true}
      - name: open
        paths: [/open]
consumers:
  - username: patient-portal
    custom_id: portal-custom
    keyauth_credentials: [{key: portal-key}]
  - username: clinic-staff
    keyauth_credentials: [{key: staff-key}]
plugins:
  - name: request-size-limiting
    config: {allowed_payload_size: 1, size_unit: megabytes}
  - name: clinic-identity-signer
    config:
      key: "KEY_VALUE"
      skip_consumers: [clinic-staff]
"""


def config_with(tmp_path, key_value: str = "{vault://env/gateway-identity-key}"):
    path = tmp_path / "kong.yml"
    path.write_text(CONFIG.replace("KEY_VALUE", key_value))
    return path


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("signer")
    env = gateway_env({"DECK_ECHO_URL": upstream.url, "GATEWAY_IDENTITY_KEY": KEY})
    process = start_gateway(config_with(workdir), env, workdir)
    yield process
    assert process.stop() == 0


def echoed(response: requests.Response) -> tuple[str, list[tuple[str, str]]]:
    assert response.status_code == 200, response.text
    body = response.json()
    return body["path"], [(name, value) for name, value in body["headers"]]


def one(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in headers if key.lower() == name.lower()]
    assert len(values) <= 1, f"{name} sent {len(values)} times"
    return values[0] if values else None


def verify(path: str, headers, body: bytes, method: str = "POST") -> None:
    gi.verify([KEY], one(headers, gi.HEADER), method=method, target=path, body=body,
              headers=gi.signed_headers(lambda name: one(headers, name)))


def test_a_partner_request_reaches_the_service_signed_for_exactly_what_it_carries(gateway):
    body = b'{"subject": "Refill question"}'
    reply = requests.post(
        f"{gateway.url}/api/v1/partner/portal/agencies/agy_1/patients/p1/messages?lang=en", data=body,
        headers={"apikey": "portal-key", "Content-Type": "application/json",
                 # what an attacker adds: another consumer, an anonymous mark, a token of their own
                 "X-Consumer-Username": "lab-interface", "X-Anonymous-Consumer": "true",
                 gi.HEADER: "v1.1.00000000000000000000000000000000." + "A" * 43},
        timeout=10,
    )
    path, headers = echoed(reply)
    assert path == "/api/v1/partner/portal/agencies/agy_1/patients/p1/messages?lang=en"
    assert one(headers, "X-Consumer-Username") == "patient-portal"
    assert one(headers, "X-Consumer-Custom-ID") == "portal-custom"
    assert one(headers, "X-Anonymous-Consumer") is None
    assert not one(headers, gi.HEADER).startswith("v1.1.")
    verify(path, headers, body)
    with pytest.raises(gi.Refused):  # the same token for another body: refused
        verify(path, headers, body + b" ")


def test_a_chunked_partner_body_is_read_whole_and_signed(gateway):
    parts = [b'{"a": "', b"x" * 70_000, b'"}']
    reply = requests.put(f"{gateway.url}/api/v1/partner/schedule/agy_1/Appointment/a1", data=iter(parts),
                         headers={"apikey": "portal-key"}, timeout=10)
    path, headers = echoed(reply)
    assert reply.json()["body_length"] == sum(map(len, parts))
    verify(path, headers, b"".join(parts), method="PUT")


def test_a_chunked_body_over_the_limit_is_refused_before_the_service(gateway, upstream):
    before = len(upstream.seen)
    reply = requests.post(f"{gateway.url}/api/v1/partner/lab/agy_1/DiagnosticReport",
                          data=iter([b"x" * 600_000, b"y" * 600_000]), headers={"apikey": "portal-key"}, timeout=10)
    assert reply.status_code == 413 and len(upstream.seen) == before


def test_staff_and_anonymous_requests_are_not_signed_and_a_client_token_never_passes(gateway):
    _, staff = echoed(requests.get(f"{gateway.url}/api/v1/partner/x", headers={"apikey": "staff-key",
                                                                                 gi.HEADER: "v1.forged"}, timeout=10))
    assert one(staff, "X-Consumer-Username") == "clinic-staff" and one(staff, gi.HEADER) is None
    _, open_route = echoed(requests.get(f"{gateway.url}/open", headers={gi.HEADER: "v1.forged",
                                                                      "X-Consumer-Username": "patient-portal"},
                                        timeout=10))
    assert one(open_route, gi.HEADER) is None
    # The header passes unsigned here, and a service believes no unsigned header.
    assert one(open_route, "X-Consumer-Username") == "patient-portal"


def test_the_token_is_fresh_for_every_request(gateway):
    tokens = set()
    for _ in range(3):
        _, headers = echoed(requests.get(f"{gateway.url}/api/v1/partner/whoami", headers={"apikey": "portal-key"},
                                         timeout=10))
        tokens.add(one(headers, gi.HEADER))
        ts = int(one(headers, gi.HEADER).split(".")[1])
        assert abs(ts - time.time()) < 5
    assert len(tokens) == 3


def test_a_request_when_the_service_is_down_still_answers_as_kong_does(upstream, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = gateway_env({"DECK_ECHO_URL": f"http://127.0.0.1:{closed}", "GATEWAY_IDENTITY_KEY": KEY})
    process = start_gateway(config_with(tmp_path), env, tmp_path)
    try:
        reply = requests.post(f"{process.url}/api/v1/partner/x", data=b"{}", headers={"apikey": "portal-key"},
                              timeout=10)
        assert reply.status_code == 502
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize(
    ("key_value", "extra", "problem"),
    [
        ("{vault://env/gateway-identity-missing}", {},
         "config.key: could not resolve reference {vault://env/gateway-identity-missing}: "
         "environment variable GATEWAY_IDENTITY_MISSING is not set"),
        ("{vault://env/gateway-identity-key}", {"GATEWAY_IDENTITY_KEY": "short"}, None),
        ("too-short-a-literal", {}, "config.key: length must be at least 32"),
        ("{vault://aws/clinic/key}", {}, "config.key: unsupported by the local gateway: vault 'aws'"),
        ("{vault://env/gateway-identity-key/field}", {}, "config.key: unsupported by the local gateway"),
    ],
    ids=["unresolvable", "short-key", "short-literal", "other-vault", "env-vault-key-form"],
)
def test_the_gateway_refuses_to_start_without_a_usable_key(upstream, tmp_path, key_value, extra, problem):
    env = gateway_env({"DECK_ECHO_URL": upstream.url, "CLINIC_RUN_DIR": str(tmp_path), **extra})
    result = run_check(config_with(tmp_path, key_value), env)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    if problem is None:
        assert "GATEWAY_IDENTITY_KEY must be at least 32 characters" in output
    else:
        assert problem in output
    assert "short\n" not in output and "too-short-a-literal" not in output  # a key is never echoed


def test_production_requires_the_key_and_development_generates_it(upstream, tmp_path):
    production = gateway_env({"DECK_ECHO_URL": upstream.url, "CLINIC_MODE": "production",
                              "CLINIC_RUN_DIR": str(tmp_path)})
    refused = run_check(config_with(tmp_path), production)
    assert refused.returncode == 2
    assert "GATEWAY_IDENTITY_KEY (or GATEWAY_IDENTITY_KEY_FILE) is required in production" in refused.stderr
    development = gateway_env({"DECK_ECHO_URL": upstream.url, "CLINIC_RUN_DIR": str(tmp_path)})
    accepted = run_check(config_with(tmp_path), development)
    assert accepted.returncode == 0, accepted.stderr
    assert len((tmp_path / "secrets" / gi.DEV_KEY_FILE).read_text().strip()) >= gi.MIN_KEY_CHARS
