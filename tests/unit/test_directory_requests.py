"""The directory's request specs: nested objects and the limits they share with the domain."""

from __future__ import annotations

import pytest

from services.directory import domain, http_api
from services.kit.errors import InvalidInput
from services.kit.validation import Bool, Fields, Str, validate

OPTIONS = {"options": Fields({"notify": Bool(), "label": Str(max_len=5, required=False)})}


def test_nested_objects_are_validated_and_errors_name_the_nested_field():
    assert validate({"options": {"notify": True}}, OPTIONS) == {"options": {"notify": True}}
    assert validate({}, OPTIONS) == {}
    for body, code, field in [
        ({"options": {"other": 1}}, "unknown_field", "options.other"),
        ({"options": {"label": {"$gt": ""}}}, "invalid_type", "options.label"),
        ({"options": {"label": "too long"}}, "too_long", "options.label"),
        ({"options": "yes"}, "invalid_type", "options"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            validate(body, OPTIONS)
        assert (caught.value.code, caught.value.details["field"]) == (code, field)


@pytest.mark.parametrize("spec", [http_api.LOGIN, http_api.NEW_STAFF, http_api.STAFF_CHANGES])
def test_passwords_are_limited_where_the_domain_limits_them(spec):
    longest = "x" * domain.PASSWORD_MAX_LENGTH
    assert spec["password"].clean("password", longest) == longest
    with pytest.raises(InvalidInput) as caught:
        spec["password"].clean("password", longest + "x")
    assert caught.value.code == "too_long"
