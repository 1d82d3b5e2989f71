"""Plugin logic without a network: jwt parsing and claims, rate-limit windows, Kong's error bodies."""

from __future__ import annotations

import calendar
import json
import time

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.gateway.context import IncomingRequest, RequestContext
from services.gateway.declarative.loader import load_text
from services.gateway.plugins.jwt import BadToken, decode, verify_registered_claims, verify_signature
from services.gateway.plugins.rate_limiting import LocalCounters, RateLimitingPlugin, window_starts
from services.gateway.responses import error, exit_json, response_type


def test_decode_reports_kongs_reasons():
    with pytest.raises(BadToken, match="invalid JSON"):
        decode("only.two")
    with pytest.raises(BadToken, match="invalid alg"):
        decode(pyjwt.encode({"a": 1}, None, algorithm="none"))
    header, claims, signing_input, _ = decode(pyjwt.encode({"iss": "x"}, "s" * 32, algorithm="HS256"))
    assert header["alg"] == "HS256" and claims == {"iss": "x"} and signing_input.count(b".") == 1


@pytest.mark.parametrize("alg", ["RS256", "RS512", "PS256", "ES256", "ES384"])
def test_signatures_verify_with_the_right_key_only(alg):
    key = ec.generate_private_key(ec.SECP256R1() if alg == "ES256" else ec.SECP384R1()) if alg.startswith("ES") \
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    token = pyjwt.encode({"iss": "x"}, pem, algorithm=alg)
    _, _, signing_input, signature = decode(token)
    assert verify_signature(alg, key.public_key(), signing_input, signature)
    assert not verify_signature(alg, key.public_key(), signing_input + b"x", signature)


def test_hmac_signatures():
    token = pyjwt.encode({"iss": "x"}, "s" * 48, algorithm="HS384")
    _, _, signing_input, signature = decode(token)
    assert verify_signature("HS384", b"s" * 48, signing_input, signature)
    assert not verify_signature("HS384", b"t" * 48, signing_input, signature)


def test_registered_claims():
    now = 1_000
    assert verify_registered_claims({"exp": 1_001}, ["exp"], now) == {}
    assert verify_registered_claims({"exp": 1_000}, ["exp"], now) == {"exp": "token expired"}
    assert verify_registered_claims({"exp": True}, ["exp"], now) == {"exp": "must be a number"}
    assert verify_registered_claims({"nbf": 1_001, "exp": 2_000}, ["exp", "nbf"], now) == {"nbf": "token not valid yet"}


def test_window_starts_are_calendar_aligned_in_utc():
    now = calendar.timegm((2024, 3, 15, 13, 45, 30)) * 1000 + 250
    starts = window_starts(now)
    assert starts["second"] == now - 250
    assert starts["minute"] == calendar.timegm((2024, 3, 15, 13, 45, 0)) * 1000
    assert starts["hour"] == calendar.timegm((2024, 3, 15, 13, 0, 0)) * 1000
    assert starts["day"] == calendar.timegm((2024, 3, 15, 0, 0, 0)) * 1000
    assert starts["month"] == calendar.timegm((2024, 3, 1, 0, 0, 0)) * 1000
    assert starts["year"] == calendar.timegm((2024, 1, 1, 0, 0, 0)) * 1000


def _limiter(config: str) -> tuple[RateLimitingPlugin, LocalCounters]:
    text = ('_format_version: "3.0"\nservices:\n  - {name: s, url: "http://h", routes: [{name: r, paths: [/]}]}\n'
            f"plugins:\n  - name: rate-limiting\n    config: {config}\n")
    model = load_text(text, {})
    counters = LocalCounters()
    return RateLimitingPlugin(model.plugins[0], model, counters), counters


def _ctx(ip: str = "10.0.0.1") -> RequestContext:
    return RequestContext(IncomingRequest("GET", "/", []), "rid", ip)


def _headers(ctx: RequestContext) -> dict[str, str]:
    return {name: value for op, name, value in ctx.response_header_ops if op == "set"}


def test_rate_limit_counts_per_identifier_and_resets_with_the_window():
    plugin, _ = _limiter("{minute: 2, limit_by: ip}")
    t0 = calendar.timegm((2024, 3, 15, 13, 45, 50)) * 1000
    assert plugin.access(_ctx(), now_ms=t0) is None
    assert plugin.access(_ctx(), now_ms=t0) is None
    refused = _ctx()
    exit_ = plugin.access(refused, now_ms=t0)
    assert exit_ is not None and exit_.status == 429
    assert _headers(refused)["Retry-After"] == "10"
    assert plugin.access(_ctx("10.0.0.2"), now_ms=t0) is None  # another client has its own count
    assert plugin.access(_ctx(), now_ms=t0 + 10_000) is None  # next minute


def test_the_most_constrained_period_drives_the_ratelimit_headers():
    plugin, _ = _limiter("{second: 5, minute: 6}")
    t0 = calendar.timegm((2024, 3, 15, 13, 45, 10)) * 1000
    for _ in range(3):
        plugin.access(_ctx(), now_ms=t0 + 1500)
    ctx = _ctx()
    plugin.access(ctx, now_ms=t0 + 1500)
    headers = _headers(ctx)
    assert headers["X-RateLimit-Remaining-Second"] == "1"
    assert headers["X-RateLimit-Remaining-Minute"] == "2"
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"], headers["RateLimit-Reset"]) == ("5", "1", "1")


def test_hidden_client_headers():
    plugin, _ = _limiter("{minute: 1, hide_client_headers: true}")
    ctx = _ctx()
    plugin.access(ctx)
    assert _headers(ctx) == {}


def test_error_bodies_follow_kongs_templates():
    exit_ = error(404, "abc", None, "no Route matched with those values")
    assert json.loads(exit_.body) == {"message": "no Route matched with those values", "request_id": "abc"}
    assert ("Content-Type", "application/json; charset=utf-8") in exit_.headers
    assert b"<p>request_id: abc</p>" in error(500, "abc", "text/html").body
    assert exit_json(401, {"message": "Unauthorized"}).body == b'{"message":"Unauthorized"}'


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [(None, "application/json"), ("*/*", "application/json"), ("text/html,application/json;q=0.9", "text/html"),
     ("application/json, text/plain;q=0.5", "application/json"), ("text/plain", "text/plain")],
)
def test_error_format_follows_the_accept_header(accept, content_type):
    assert response_type(accept).startswith(content_type)


def test_window_start_uses_current_time_by_default():
    plugin, counters = _limiter("{minute: 100}")
    before = window_starts(int(time.time() * 1000))["minute"]
    plugin.access(_ctx())
    after = window_starts(int(time.time() * 1000))["minute"]
    counted = {counters.usage(plugin.instance.id, "10.0.0.1", "minute", start) for start in (before, after)}
    assert 1 in counted
