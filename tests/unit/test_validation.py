import pytest
from flask import Flask

from services.kit.errors import InvalidInput, UnsupportedMediaType
from services.kit.validation import (
    Bool,
    Choice,
    Id,
    Int,
    Link,
    ListOf,
    Str,
    idempotency_key_header,
    json_body,
    query_int,
    validate,
)

SPEC = {
    "to": ListOf(Id(), max_items=3),
    "subject": Str(max_len=10),
    "urgent": Bool(),
    "priority": Choice(choices=("normal", "urgent")),
    "links": ListOf(Link()),
}


def code_of(body) -> str:
    with pytest.raises(InvalidInput) as caught:
        validate(body, SPEC)
    return caught.value.code


def test_valid_body_is_cleaned():
    cleaned = validate({"to": ["a", "a", "b"], "subject": "  hi  ", "links": ["https://x.org/a"]}, SPEC)
    assert cleaned == {"to": ["a", "b"], "subject": "hi", "links": ["https://x.org/a"]}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"subject": {"$gt": ""}}, "invalid_type"),
        ({"subject": "s", "to": [{"$ne": 1}]}, "invalid_type"),
        ({"subject": "s", "$where": "x"}, "unknown_field"),
        ({"subject": "s", "urgent": 1}, "invalid_type"),
        ({"subject": "s", "priority": "high"}, "invalid_value"),
        ({"subject": "s", "links": ["javascript:alert(1)"]}, "invalid_link"),
        ({"subject": "s", "links": ["data:text/html,x"]}, "invalid_link"),
        ({"subject": "s", "to": ["../etc"]}, "invalid_value"),
        ({"subject": "s", "to": ["a", "b", "c", "d"]}, "too_many"),
        ({"subject": "x" * 11}, "too_long"),
        ({}, "missing_field"),
        ({"subject": "a\x00b"}, "invalid_value"),
    ],
)
def test_bad_fields_have_stable_codes(body, code):
    assert code_of(body) == code


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (True, "invalid_type"),
        (1.0, "invalid_type"),
        ("5", "invalid_type"),
        ({"$gt": 0}, "invalid_type"),
        (0, "out_of_range"),
        (61, "out_of_range"),
    ],
)
def test_whole_numbers_are_typed_and_bounded(value, code):
    with pytest.raises(InvalidInput) as caught:
        validate({"minutes": value}, {"minutes": Int(minimum=1, maximum=60)})
    assert caught.value.code == code


def test_a_whole_number_in_range_is_kept():
    assert validate({"minutes": 60}, {"minutes": Int(minimum=1, maximum=60)}) == {"minutes": 60}


def test_json_body_rejects_malformed_and_non_objects():
    app = Flask("t")
    with app.test_request_context(data=b"{nope", content_type="application/json"):
        with pytest.raises(InvalidInput) as caught:
            json_body()
        assert caught.value.code == "malformed_json"
    with app.test_request_context(data=b"[1]", content_type="application/json"):
        with pytest.raises(InvalidInput) as caught:
            json_body()
        assert caught.value.code == "invalid_body"
    with app.test_request_context(data=b"a=b", content_type="application/x-www-form-urlencoded"):
        with pytest.raises(UnsupportedMediaType) as caught:
            json_body()
        assert caught.value.code == "unsupported_media_type"


def test_query_numbers_must_be_ascii_digits():
    app = Flask("t")
    with app.test_request_context("/?limit=%C2%B2"):  # "²" is a digit to str.isdigit, not to int()
        with pytest.raises(InvalidInput) as caught:
            query_int("limit", 20, 1, 100)
        assert caught.value.code == "invalid_query"
    with app.test_request_context("/?limit=7"):
        assert query_int("limit", 20, 1, 100) == 7


@pytest.mark.parametrize("key", ["a", "order-2026-03-04/17 #1", "~" * 128, "550e8400-e29b-41d4-a716-446655440000"])
def test_idempotency_keys_are_printable_ascii(key):
    with Flask(__name__).test_request_context(headers={"Idempotency-Key": key}):
        assert idempotency_key_header() == key
    with Flask(__name__).test_request_context():
        assert idempotency_key_header() is None


@pytest.mark.parametrize("key", ["", "x" * 129, "caf\u00e9", "tab\there"])
def test_bad_idempotency_keys_are_refused(key):
    with Flask(__name__).test_request_context(headers={"Idempotency-Key": key}):
        with pytest.raises(InvalidInput) as refused:
            idempotency_key_header()
    assert refused.value.code == "invalid_idempotency_key"
