"""The gateway's per-request identity token (services.kit.gateway_identity): the documented test
vector, every way a forged or stale token is refused, and where the key comes from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.kit import gateway_identity as gi
from services.kit.settings import Env

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway-identity.md"
KEY = "k" * 40
OTHER_KEY = "o" * 40
TARGET = "/api/v1/partner/lab/agy_riverbend/DiagnosticReport?_format=json"
BODY = b'{"resourceType":"DiagnosticReport"}'
HEADERS = {
    "X-Consumer-ID": "c0a8e7e2-0000-5000-8000-000000000001",
    "X-Consumer-Custom-ID": "lab-interface",
    "X-Consumer-Username": "lab-interface",
    "X-Credential-Identifier": "cred-1",
}
NOW = 1_767_225_600


def documented_vector() -> dict:
    """The JSON block under "## Test vector" in docs/gateway-identity.md."""
    text = DOC.read_text()
    section = text.split("## Test vector", 1)[1]
    match = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert match, "docs/gateway-identity.md has no JSON test vector"
    return json.loads(match.group(1))


def test_the_python_implementation_matches_the_documented_test_vector():
    vector = documented_vector()
    body = vector["body"].encode()
    assert gi.hashlib.sha256(body).hexdigest() == vector["body_sha256"]
    token = gi.sign(vector["key"], vector["method"], vector["target"], body, vector["headers"],
                    ts=vector["timestamp"], nonce=vector["nonce"])
    assert token == vector["token"]
    gi.verify([vector["key"]], token, method=vector["method"], target=vector["target"], body=body,
              headers=vector["headers"], now=vector["timestamp"] + 30)


def test_the_canonical_text_is_eleven_fields_with_absent_headers_empty():
    text = gi.canonical("post", "/p?q=1", b"", {"x-consumer-username": "portal"}, ts=7, nonce="ab" * 16)
    fields = text.split(b"\n")
    assert len(fields) == 11
    assert fields[:5] == [b"v1", b"7", b"ab" * 16, b"POST", b"/p?q=1"]
    assert fields[5] == gi.hashlib.sha256(b"").hexdigest().encode()
    assert fields[6:] == [b"", b"", b"portal", b"", b""]


def signed(**changes) -> str:
    args = {"key": KEY, "method": "POST", "target": TARGET, "body": BODY, "headers": HEADERS, "ts": NOW,
            "nonce": "0f" * 16, **changes}
    return gi.sign(args["key"], args["method"], args["target"], args["body"], args["headers"], ts=args["ts"],
                   nonce=args["nonce"])


def check(token: str, **changes) -> None:
    args = {"method": "POST", "target": TARGET, "body": BODY, "headers": HEADERS, "now": NOW + 1, **changes}
    gi.verify([KEY], token, **args)


def test_a_token_verifies_for_exactly_its_request_within_the_minute():
    check(signed())
    check(signed(), now=NOW + gi.MAX_SKEW_S)
    check(signed(), now=NOW - gi.MAX_SKEW_S)  # a gateway clock slightly ahead


@pytest.mark.parametrize(
    ("token_changes", "request_changes", "reason"),
    [
        ({"key": OTHER_KEY}, {}, "gateway_identity_bad_signature"),
        ({}, {"now": NOW + gi.MAX_SKEW_S + 1}, "gateway_identity_expired"),
        ({}, {"now": NOW - gi.MAX_SKEW_S - 1}, "gateway_identity_expired"),
        ({}, {"method": "PUT"}, "gateway_identity_bad_signature"),
        ({}, {"target": "/api/v1/partner/lab/agy_lakeside/DiagnosticReport?_format=json"},
         "gateway_identity_bad_signature"),
        ({}, {"target": "/api/v1/partner/lab/agy_riverbend/DiagnosticReport"}, "gateway_identity_bad_signature"),
        ({}, {"body": BODY + b" "}, "gateway_identity_bad_signature"),
        ({}, {"headers": {**HEADERS, "X-Consumer-Username": "patient-portal"}}, "gateway_identity_bad_signature"),
        ({}, {"headers": {**HEADERS, "X-Anonymous-Consumer": "true"}}, "gateway_identity_bad_signature"),
        ({}, {"headers": {k: v for k, v in HEADERS.items() if k != "X-Credential-Identifier"}},
         "gateway_identity_bad_signature"),
    ],
    ids=["wrong-key", "expired", "from-the-future", "other-method", "other-agency", "other-query", "other-body",
         "other-consumer", "marked-anonymous", "credential-dropped"],
)
def test_a_token_for_anything_else_is_refused(token_changes, request_changes, reason):
    with pytest.raises(gi.Refused) as refused:
        check(signed(**token_changes), **request_changes)
    assert refused.value.reason == reason


@pytest.mark.parametrize("token", [
    "", "v1", "v2.1767225600." + "0f" * 16 + "." + "A" * 43, "v1.abc." + "0f" * 16 + "." + "A" * 43,
    "v1.1767225600.short." + "A" * 43, "v1.1767225600." + "0f" * 16 + ".not+base64url/" + "A" * 28,
])
def test_a_malformed_token_is_refused_before_any_signature_work(token):
    with pytest.raises(gi.Refused) as refused:
        check(token)
    assert refused.value.reason == "gateway_identity_malformed"


def test_the_previous_key_is_accepted_during_a_rotation_and_only_listed_keys_are():
    token = signed(key=OTHER_KEY)
    gi.verify([KEY, OTHER_KEY], token, method="POST", target=TARGET, body=BODY, headers=HEADERS, now=NOW)
    with pytest.raises(gi.Refused):
        gi.verify([KEY, ""], token, method="POST", target=TARGET, body=BODY, headers=HEADERS, now=NOW)


def test_partner_headers_sign_what_they_send():
    headers = gi.partner_headers(KEY, "GET", "/api/v1/partner/whoami", username="patient-portal", credential="c1")
    assert headers["X-Consumer-Username"] == "patient-portal" and "X-Anonymous-Consumer" not in headers
    gi.verify([KEY], headers[gi.HEADER], method="GET", target="/api/v1/partner/whoami", body=b"",
              headers=gi.signed_headers(headers.get))


def test_the_development_key_is_generated_once_and_shared_through_the_run_folder(tmp_path):
    environ = {"CLINIC_RUN_DIR": str(tmp_path)}
    gateway, service = Env("gateway", environ), Env("inbox", environ)
    first, second = gi.read_keys(gateway), gi.read_keys(service)
    assert first == second and len(first) == 1 and len(first[0]) >= gi.MIN_KEY_CHARS
    assert (tmp_path / "secrets" / gi.DEV_KEY_FILE).read_text().strip() == first[0]
    assert not gateway.problems and not service.problems


def test_production_requires_a_long_enough_key(tmp_path):
    missing = Env("inbox", {"CLINIC_MODE": "production", "CLINIC_RUN_DIR": str(tmp_path)})
    assert gi.read_keys(missing) == ()
    assert missing.problems == ["GATEWAY_IDENTITY_KEY (or GATEWAY_IDENTITY_KEY_FILE) is required in production"]
    short = Env("inbox", {"CLINIC_MODE": "production", "GATEWAY_IDENTITY_KEY": "too-short"})
    gi.read_keys(short)
    assert short.problems == ["GATEWAY_IDENTITY_KEY must be at least 32 characters"]
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    rotating = Env("inbox", {"CLINIC_MODE": "production", "GATEWAY_IDENTITY_KEY_FILE": str(key_file),
                             "GATEWAY_IDENTITY_KEY_PREVIOUS": OTHER_KEY})
    assert gi.read_keys(rotating) == (KEY, OTHER_KEY) and not rotating.problems
