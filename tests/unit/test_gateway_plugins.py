"""Plugin logic without a network: jwt parsing and claims, rate-limit windows, Kong's error bodies."""

from __future__ import annotations

import calendar
import json
import time
import tracemalloc
import urllib.parse

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.gateway.context import IncomingRequest, RequestContext
from services.gateway.declarative.loader import load_text
from services.gateway.plugins import jwt as jwt_plugin
from services.gateway.plugins.cors import CorsPlugin
from services.gateway.plugins.jwt import BadToken, JwtPlugin, decode, verify_registered_claims, verify_signature
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
    def new_key():
        if alg.startswith("ES"):
            return ec.generate_private_key(ec.SECP256R1() if alg == "ES256" else ec.SECP384R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    key, other = new_key(), new_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    token = pyjwt.encode({"iss": "x"}, pem, algorithm=alg)
    _, _, signing_input, signature = decode(token)
    assert verify_signature(alg, key.public_key(), signing_input, signature)
    assert not verify_signature(alg, key.public_key(), signing_input + b"x", signature)
    assert not verify_signature(alg, other.public_key(), signing_input, signature)  # same type, wrong key


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


# --- cors ------------------------------------------------------------------------------------------


def test_cors_keeps_nothing_per_origin():
    text = ('_format_version: "3.0"\nservices:\n  - {name: s, url: "http://h", routes: [{name: r, paths: [/]}]}\n'
            "plugins:\n  - name: cors\n    config: {origins: [http://a.clinic.test, http://b.clinic.test]}\n")
    model = load_text(text, {})
    plugin = CorsPlugin(model.plugins[0], model)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(300):
            origin = f"http://{i}.example.test/" + "x" * 60_000
            ctx = RequestContext(IncomingRequest("GET", "/", [("Origin", origin)]), "rid", "10.0.0.1")
            plugin.header_filter(ctx)
            assert ("clear", "Access-Control-Allow-Origin", None) in ctx.response_header_ops
        urllib.parse.clear_cache()  # the standard library's own (128-entry) cache of urlsplit
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 1_000_000  # 300 origins of 60 kB each would be 18 MB


# --- jwt: one bounded cache of verified tokens for every plugin instance ----------------------------

JWT_CONFIG = """\
_format_version: "3.0"
services:
  - name: s
    url: http://h
    routes:
      - {name: one, paths: [/one], plugins: [{name: jwt, config: {claims_to_verify: [exp]}}]}
      - {name: two, paths: [/two], plugins: [{name: jwt, config: {claims_to_verify: [exp]}}]}
consumers:
  - username: staff
    jwt_secrets: [{key: issuer, algorithm: HS256, secret: SECRET}]
"""


def _jwt_plugins(secret: str = "a-secret-of-at-least-32-bytes-long!") -> list[JwtPlugin]:
    model = load_text(JWT_CONFIG.replace("SECRET", secret), {})
    return [JwtPlugin(instance, model) for instance in model.plugins]


def _bearer(token: str) -> RequestContext:
    return RequestContext(IncomingRequest("GET", "/one", [("Authorization", f"Bearer {token}")]), "rid", "10.0.0.1")


@pytest.fixture
def counted(monkeypatch):
    jwt_plugin.VERIFIED.clear()
    calls = {"decode": 0, "verify": 0}
    decode_, verify_ = jwt_plugin.decode, jwt_plugin.verify_signature

    def counting_decode(token):
        calls["decode"] += 1
        return decode_(token)

    def counting_verify(*args):
        calls["verify"] += 1
        return verify_(*args)

    monkeypatch.setattr(jwt_plugin, "decode", counting_decode)
    monkeypatch.setattr(jwt_plugin, "verify_signature", counting_verify)
    yield calls
    jwt_plugin.VERIFIED.clear()


def test_a_verified_token_is_looked_up_before_decoding_by_every_plugin_instance(counted):
    one, two = _jwt_plugins()
    token = pyjwt.encode({"iss": "issuer", "exp": int(time.time()) + 300}, "a-secret-of-at-least-32-bytes-long!")
    for plugin in (one, one, two):
        ctx = _bearer(token)
        assert plugin.access(ctx) is None
        assert ctx.consumer is not None and ctx.consumer.username == "staff"
    assert counted == {"decode": 1, "verify": 1}


def test_claims_are_still_checked_for_a_remembered_token(counted, monkeypatch):
    (one, _) = _jwt_plugins()
    token = pyjwt.encode({"iss": "issuer", "exp": int(time.time()) + 300}, "a-secret-of-at-least-32-bytes-long!")
    assert one.access(_bearer(token)) is None
    later = time.time() + 3600
    monkeypatch.setattr(jwt_plugin.time, "time", lambda: later)
    refused = one.access(_bearer(token))
    assert refused is not None and refused.status == 401
    assert json.loads(refused.body) == {"exp": "token expired"}
    assert counted["verify"] == 1


def test_a_token_remembered_for_one_credential_is_not_accepted_for_another(counted):
    (mine, _) = _jwt_plugins()
    token = pyjwt.encode({"iss": "issuer", "exp": int(time.time()) + 300}, "a-secret-of-at-least-32-bytes-long!")
    assert mine.access(_bearer(token)) is None
    (theirs, _) = _jwt_plugins("another-secret-of-at-least-32-bytes!")  # same key name, another model
    refused = theirs.access(_bearer(token))
    assert refused is not None and json.loads(refused.body) == {"message": "Invalid signature"}


def test_the_verified_token_cache_is_bounded():
    cache = jwt_plugin.VerifiedTokens(size=2)
    (plugin, _) = _jwt_plugins()
    secret = plugin.model.jwt_secrets["issuer"]
    for token in ("t1", "t2", "t3"):
        cache.put(jwt_plugin.Verified(token, secret, False, {"alg": "HS256"}, {"iss": "issuer"}))
    assert len(cache) == 2
    assert cache.get("t1") is None and cache.get("t3") is not None
