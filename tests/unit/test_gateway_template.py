"""decK's env templating as the local gateway renders it."""

from __future__ import annotations

import pytest

from services.gateway.declarative.template import TemplateError, render

PEM = "-----BEGIN PUBLIC KEY-----\nMIIBIjAN\nAQAB\n-----END PUBLIC KEY-----\n"


def test_values_are_pasted_before_yaml_so_numbers_stay_numbers():
    assert render('minute: ${{ env "DECK_N" }}\n', {"DECK_N": "60"}) == "minute: 60\n"


def test_whitespace_inside_the_action_is_free():
    assert render('a: ${{env "DECK_A"}}', {"DECK_A": "x"}) == "a: x"


def test_missing_variable_is_named_with_its_line():
    with pytest.raises(TemplateError) as err:
        render('a: 1\nb: ${{ env "DECK_MISSING" }}\n', {})
    assert err.value.line == 2
    assert "environment variable 'DECK_MISSING' present in state file but not set" in str(err.value)


def test_only_deck_prefixed_variables_are_readable():
    with pytest.raises(TemplateError, match="must be prefixed with 'DECK_', found: 'HOME'"):
        render('a: ${{ env "HOME" }}', {"HOME": "/root"})


def test_whole_line_comments_are_not_rendered():
    text = '# uses ${{ env "DECK_NOT_SET" }}\na: 1\n'
    assert render(text, {}) == "a: 1\n"


def test_indent_fits_a_pem_into_a_block_scalar():
    text = 'key: |\n    ${{ env "DECK_PEM" | indent 4 }}\n'
    rendered = render(text, {"DECK_PEM": PEM})
    lines = ["-----BEGIN PUBLIC KEY-----", "MIIBIjAN", "AQAB", "-----END PUBLIC KEY-----", ""]
    assert rendered == "key: |\n" + "".join(f"    {line}\n" for line in lines)


def test_a_multi_line_value_without_indent_is_refused():
    with pytest.raises(TemplateError, match="DECK_PEM contains line breaks"):
        render('key: "${{ env "DECK_PEM" }}"', {"DECK_PEM": PEM})


def test_unknown_functions_and_unclosed_actions_are_errors():
    with pytest.raises(TemplateError, match='function "upper" not defined'):
        render('v: ${{ env "DECK_V" | upper }}', {"DECK_V": "x"})
    with pytest.raises(TemplateError, match="unclosed action"):
        render('v: ${{ env "DECK_V"', {"DECK_V": "x"})


@pytest.mark.parametrize(
    "template",
    ['v: ${{ env "DECK_V" | toInt }}', 'v: ${{- env "DECK_V" }}', 'v: ${{ env `DECK_V` }}',
     'v: ${{ env "DECK_\\x56" }}', 'v: ${{ /* c */ env "DECK_V" }}', 'v: ${{ env\n"DECK_V" }}'],
    ids=["other-function", "trim-marker", "raw-string", "escape", "comment", "multi-line"],
)
def test_what_kong_yml_does_not_use_is_refused_not_rendered(template):
    with pytest.raises(TemplateError, match="not rendered by the local gateway|unsupported template syntax|unclosed"):
        render(template, {"DECK_V": "1"})


def test_arguments_are_checked():
    with pytest.raises(TemplateError, match="wrong number of args for env: want 1 got 2"):
        render('v: ${{ env "DECK_A" "DECK_B" }}', {"DECK_A": "a", "DECK_B": "b"})
    with pytest.raises(TemplateError, match="wrong type for value in indent; expected int; got str"):
        render('v: ${{ env "DECK_A" | indent "4" }}', {"DECK_A": "a"})
