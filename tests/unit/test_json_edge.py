"""The kit's JSON and address edge: what JSON may carry but nothing after the edge can handle (lone
surrogates, NUL, deep nesting) is refused with a stable 400 code on every route, never a 500; the
client address is believed from X-Forwarded-For only as far as trusted hops vouch for it."""

from __future__ import annotations

import time

import pytest
from flask import request

from services.kit.errors import InvalidInput, TooManyRequests
from services.kit.http import client_address, create_app, parse_networks
from services.kit.validation import MAX_JSON_DEPTH, Str, json_body, parse_json, validate

LOOPBACK = parse_networks("127.0.0.1, ::1")
SOMEWHERE = "somewhere"  # the refusal names a field, its path deep inside the body


@pytest.fixture
def client():
    app = create_app("test", verifier=None, max_body_bytes=4 * 1024 * 1024)

    @app.post("/notes")
    def notes():
        body = validate(json_body(), {"text": Str(max_len=2_000_000), "tags": Str(required=False)})
        # What the services do next: encode the text (storage, encryption, protobuf).
        return {"bytes": len(body["text"].encode("utf-8"))}

    @app.post("/deep")
    def deep():
        json_body(max_depth=40)
        return {"ok": True}

    @app.get("/things/<thing>")
    def thing(thing: str):
        return {"thing": thing, "q": request.args.get("q", "")}

    @app.get("/busy")
    def busy():
        raise TooManyRequests("too_many_attempts", "slow down", 42)

    @app.get("/whoami")
    def whoami():
        return {"client": client_address(LOOPBACK)}

    return app.test_client()


def post(client, raw: bytes, path: str = "/notes"):
    return client.post(path, data=raw, content_type="application/json")


def nested(depth: int) -> bytes:
    return b'{"text": "x", "tags": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (rb'{"text": "lone \ud800 high"}', "invalid_text", "text"),
        (rb'{"text": "lone \udfff low"}', "invalid_text", "text"),
        (rb'{"text": "reversed \ude00\ud83d pair"}', "invalid_text", "text"),
        (b'{"text": "raw \xed\xa0\x80 bytes"}', "invalid_text", "text"),  # a surrogate encoded as UTF-8
        (rb'{"text": "nul \u0000 inside"}', "invalid_text", "text"),
        (rb'{"te\u0000xt": "a"}', "invalid_text", None),
        (rb'{"\ud800": "a"}', "invalid_text", None),
        (rb'{"text": "a", "tags": [{"deep": ["ok", "\ud800"]}]}', "invalid_text", "tags[0].deep[1]"),
        (nested(MAX_JSON_DEPTH), "too_deep", SOMEWHERE),
        (nested(100_000), "too_deep", None),  # deep enough to exhaust the parser itself
        (b'{"text": "a"', "malformed_json", None),
        (b"\xff\xfe not utf-8", "malformed_json", None),
    ],
)
def test_hostile_json_is_a_400_with_a_stable_code(client, raw, code, field):
    reply = post(client, raw)
    assert reply.status_code == 400, reply.get_data(as_text=True)
    body = reply.get_json()
    assert body["code"] == code and body["message"]
    named = body.get("details", {}).get("field")
    assert named.startswith("tags[0]") if field is SOMEWHERE else named == field
    assert "\\ud800" not in reply.get_data(as_text=True)  # the offending text is never echoed


def test_text_that_is_fine_passes_the_edge(client):
    assert post(client, rb'{"text": "caf\u00e9 \ud83d\ude00 \u4e2d"}').get_json() == {"bytes": 14}
    # As deep as allowed: past the edge, the route's own validation answers (tags is a string).
    assert post(client, nested(MAX_JSON_DEPTH - 1)).get_json()["code"] == "invalid_type"


def test_a_route_may_allow_deeper_json_than_the_default():
    app = create_app("test", verifier=None)

    @app.post("/fhir")
    def fhir():
        json_body(max_depth=40)
        return {"ok": True}

    client = app.test_client()

    def levels(depth: int) -> dict:
        body: dict = {}
        for _ in range(depth - 1):
            body = {"a": body}
        return body

    assert client.post("/fhir", json=levels(MAX_JSON_DEPTH + 1)).status_code == 200
    assert client.post("/fhir", json=levels(40)).status_code == 200
    reply = client.post("/fhir", json=levels(41))
    assert reply.status_code == 400 and reply.get_json()["code"] == "too_deep"


def test_the_check_costs_little_on_a_large_body(client):
    text = "x" * 2_000_000
    started = time.perf_counter()
    reply = client.post("/notes", json={"text": text})
    assert reply.status_code == 200 and reply.get_json() == {"bytes": 2_000_000}
    assert time.perf_counter() - started < 2.0


def test_json_a_route_reads_itself_is_checked_the_same_way():
    assert parse_json('{"a": [1, "b"]}') == {"a": [1, "b"]}
    for text, code in [
        ('{"a": "\\ud800"}', "invalid_text"),
        ('{"a": "\\u0000"}', "invalid_text"),
        ("[" * 100_000 + "]" * 100_000, "too_deep"),
        ("[" * 40 + "]" * 40, "too_deep"),
        ("{", "malformed_json"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            parse_json(text)
        assert caught.value.code == code


def test_a_string_field_refuses_a_surrogate_even_without_the_edge():
    with pytest.raises(InvalidInput) as caught:
        validate({"text": "a\ud800"}, {"text": Str()})
    assert caught.value.code == "invalid_text"


@pytest.mark.parametrize(
    ("path", "query"),
    [
        # PATH_INFO as a WSGI server hands it over: the raw bytes, percent-decoded, as Latin-1 text.
        ("/things/a\x00b", ""),
        ("/things/\xed\xa0\x80", ""),  # a surrogate, encoded as UTF-8
        ("/things/\xff", ""),  # not UTF-8 at all
        ("/things/ok", "q=%00"),
        ("/things/ok", "q=%ED%A0%80"),
        ("/things/ok", "q%00=x"),
        ("/nowhere/\x00", ""),  # no route: refused the same way
    ],
)
def test_paths_and_query_strings_that_are_not_clean_text_are_a_400(client, path, query):
    reply = client.get("/", environ_overrides={"PATH_INFO": path, "QUERY_STRING": query})
    assert reply.status_code == 400
    assert reply.get_json()["code"] == "invalid_text"


def test_clean_paths_and_query_strings_pass(client):
    reply = client.get("/things/caf%C3%A9?q=%E4%B8%AD+x")
    assert reply.status_code == 200 and reply.get_json() == {"thing": "café", "q": "中 x"}


def test_too_many_requests_says_when_to_come_back(client):
    reply = client.get("/busy")
    assert reply.status_code == 429 and reply.headers["Retry-After"] == "42"
    assert reply.get_json()["code"] == "too_many_attempts"


@pytest.mark.parametrize(
    ("peer", "real_ip", "client_is"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # an untrusted peer's header is its own claim
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # the gateway on loopback states the client
        ("127.0.0.1", None, "127.0.0.1"),  # a trusted hop that states nothing is the client
        ("127.0.0.1", "not-an-address", "127.0.0.1"),  # garbage is never the answer
        ("127.0.0.2", "198.51.100.1", "127.0.0.2"),  # another loopback address is not the gateway
        ("::ffff:203.0.113.9", None, "203.0.113.9"),
        ("::1", "2001:db8::7", "2001:db8::7"),
        ("::1", "::ffff:198.51.100.1", "198.51.100.1"),
    ],
)
def test_the_client_address_is_believed_only_from_trusted_hops(client, peer, real_ip, client_is):
    headers = {"X-Real-IP": real_ip} if real_ip else {}
    headers["X-Forwarded-For"] = "192.0.2.66"  # never read: waitress drops it, and a client writes it
    reply = client.get("/whoami", headers=headers, environ_base={"REMOTE_ADDR": peer})
    assert reply.get_json() == {"client": client_is}


def test_trusted_networks_are_parsed_and_bad_ones_named():
    assert [str(n) for n in parse_networks(" 10.0.0.0/8, 127.0.0.1 ,::1,")] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
    with pytest.raises(ValueError, match="gateway"):
        parse_networks("10.0.0.0/8, gateway")
