"""decK's environment templating, rendered the way decK renders it.

decK runs the raw file text through Go's text/template with the delimiters
`${{` and `}}` before it parses any YAML, so a value lands in the document
verbatim: `minute: ${{ env "DECK_RATE_LIMIT_MINUTE" }}` becomes a YAML integer.
Whole-line comments are dropped first (current decK does not render them).
The functions decK offers are reproduced: `env` (only DECK_-prefixed names),
`toBool`, `toInt`, `toFloat` and `indent N`, which pads every line after the
first so a multi-line value (a PEM) fits a YAML block scalar:

    rsa_public_key: |
      ${{ env "DECK_DIRECTORY_JWT_PUBLIC_KEY" | indent 6 }}

One check goes beyond decK: a value containing a line break must go through
`indent`, because pasted anywhere else it silently changes meaning (YAML folds
it into spaces, or ends the block early).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ENV_PREFIX = "DECK_"
OPEN, CLOSE = "${{", "}}"


class TemplateError(ValueError):
    """A template that decK would refuse to render (or that would render to something broken)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident", "string", "number", "pipe"
    text: str
    value: object = None


_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_NUMBER = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F]+|\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?)"
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def render(text: str, environ: Mapping[str, str]) -> str:
    """Render decK's `${{ ... }}` actions in `text`; raises TemplateError naming the line and variable."""
    kept = [line for line in text.split("\n") if not line.strip().startswith("#")]
    source = "\n".join(kept)
    if text.endswith("\n") and not source.endswith("\n"):
        source += "\n"
    # Line numbers in messages refer to the original file, so map kept lines back.
    original_line = [n + 1 for n, line in enumerate(text.split("\n")) if not line.strip().startswith("#")]

    out: list[str] = []
    pos = 0
    while True:
        start = source.find(OPEN, pos)
        if start < 0:
            out.append(source[pos:])
            break
        line_no = original_line[min(source.count("\n", 0, start), len(original_line) - 1)]
        body_start = start + len(OPEN)
        trim_left = source.startswith("- ", body_start) or source.startswith("-\t", body_start)
        if trim_left:
            body_start += 1
        tokens, end, trim_right = _lex_action(source, body_start, line_no)
        preceding = source[pos:start]
        out.append(preceding.rstrip() if trim_left else preceding)
        out.append(_evaluate(tokens, environ, line_no))
        pos = end
        if trim_right:
            while pos < len(source) and source[pos] in " \t\r\n":
                pos += 1
    return "".join(out)


def _lex_action(source: str, i: int, line: int) -> tuple[list[_Token], int, bool]:
    tokens: list[_Token] = []
    n = len(source)
    while i < n:
        ch = source[i]
        if source.startswith(CLOSE, i):
            return tokens, i + len(CLOSE), False
        if ch in " \t\r\n":
            if source.startswith(" -" + CLOSE, i) or source.startswith("\t-" + CLOSE, i):
                return tokens, i + 2 + len(CLOSE), True
            i += 1
            continue
        if source.startswith("/*", i):
            end = source.find("*/", i + 2)
            if end < 0:
                raise TemplateError(line, "unclosed comment in template action")
            i = end + 2
            continue
        if ch == "|":
            tokens.append(_Token("pipe", "|"))
            i += 1
            continue
        if ch == '"':
            value, i = _lex_string(source, i + 1, line)
            tokens.append(_Token("string", repr(value), value))
            continue
        if ch == "`":
            end = source.find("`", i + 1)
            if end < 0:
                raise TemplateError(line, "unterminated raw string in template action")
            value = source[i + 1 : end]
            tokens.append(_Token("string", repr(value), value))
            i = end + 1
            continue
        m = _NUMBER.match(source, i)
        if m and (ch.isdigit() or ch in "+-."):
            literal = m.group(0)
            number: object
            if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|\d+)", literal):
                number = int(literal, 0) if not re.fullmatch(r"[+-]?0\d+", literal) else int(literal, 8)
            else:
                number = float(literal)
            tokens.append(_Token("number", literal, number))
            i = m.end()
            continue
        m = _IDENT.match(source, i)
        if m:
            tokens.append(_Token("ident", m.group(0)))
            i = m.end()
            continue
        raise TemplateError(line, f"unsupported template syntax {source[i:i + 12]!r} (only env, toBool, toInt, "
                                  "toFloat and indent are available)")
    raise TemplateError(line, f"unclosed action: missing {CLOSE!r}")


def _lex_string(source: str, i: int, line: int) -> tuple[str, int]:
    chars: list[str] = []
    while i < len(source):
        ch = source[i]
        if ch == '"':
            return "".join(chars), i + 1
        if ch == "\n":
            break
        if ch == "\\":
            esc = source[i + 1 : i + 2]
            if esc in _GO_ESCAPES:
                chars.append(_GO_ESCAPES[esc])
                i += 2
                continue
            width = {"x": 2, "u": 4, "U": 8}.get(esc)
            if width:
                digits = source[i + 2 : i + 2 + width]
                if len(digits) == width and all(c in "0123456789abcdefABCDEF" for c in digits):
                    chars.append(chr(int(digits, 16)))
                    i += 2 + width
                    continue
            octal = source[i + 1 : i + 4]
            if len(octal) == 3 and all(c in "01234567" for c in octal):
                chars.append(chr(int(octal, 8)))
                i += 4
                continue
            raise TemplateError(line, "invalid escape sequence in template string")
        chars.append(ch)
        i += 1
    raise TemplateError(line, "unterminated string in template action")


def _evaluate(tokens: list[_Token], environ: Mapping[str, str], line: int) -> str:
    if not tokens:
        return ""  # a comment-only action renders nothing
    commands: list[list[_Token]] = [[]]
    for token in tokens:
        if token.kind == "pipe":
            commands.append([])
        else:
            commands[-1].append(token)
    if any(not command for command in commands):
        raise TemplateError(line, "missing command in pipeline")

    funcs = _functions(environ, line)
    value: object = _NO_VALUE
    used_indent = False
    for command in commands:
        head, args = command[0], [t.value for t in command[1:]]
        if any(t.kind == "ident" for t in command[1:]):
            raise TemplateError(line, f"unsupported argument {command[1].text!r}: only literals may be arguments")
        if head.kind != "ident":
            if len(command) > 1 or value is not _NO_VALUE:
                raise TemplateError(line, f"can't give argument to non-function {head.text}")
            value = head.value
            continue
        if head.text not in funcs:
            raise TemplateError(line, f'function "{head.text}" not defined')
        if value is not _NO_VALUE:
            args.append(value)
        used_indent = used_indent or head.text == "indent"
        value = funcs[head.text](*args)
    text = _format(value)
    if ("\n" in text or "\r" in text) and not used_indent:
        names = [t.value for c in commands if c[0].text == "env" for t in c[1:]]
        name = names[0] if names else "the value"
        raise TemplateError(
            line,
            f"{name} contains line breaks; decK pastes values verbatim, so put it in a block scalar "
            f'and pipe it through indent, e.g. ${{{{ env "{name}" | indent 8 }}}}',
        )
    return text


class _NoValue:
    pass


_NO_VALUE = _NoValue()


def _functions(environ: Mapping[str, str], line: int) -> dict[str, Callable[..., object]]:
    def want(name: str, args: tuple, *types: type) -> None:
        if len(args) != len(types):
            raise TemplateError(line, f"wrong number of args for {name}: want {len(types)} got {len(args)}")
        for arg, expected in zip(args, types, strict=True):
            if not isinstance(arg, expected) or (expected is int and isinstance(arg, bool)):
                raise TemplateError(
                    line, f"wrong type for value in {name}; expected {expected.__name__}; got {type(arg).__name__}"
                )

    def env(*args: object) -> str:
        want("env", args, str)
        key = str(args[0])
        if not key.startswith(ENV_PREFIX):
            raise TemplateError(
                line, f"environment variables in the state file must be prefixed with '{ENV_PREFIX}', found: '{key}'"
            )
        if key not in environ:
            raise TemplateError(line, f"environment variable '{key}' present in state file but not set")
        return environ[key]

    def to_bool(*args: object) -> bool:
        want("toBool", args, str)
        raw = str(args[0])
        if raw in ("1", "t", "T", "TRUE", "true", "True"):
            return True
        if raw in ("0", "f", "F", "FALSE", "false", "False"):
            return False
        raise TemplateError(line, f'error calling toBool: strconv.ParseBool: parsing "{raw}": invalid syntax')

    def to_int(*args: object) -> int:
        want("toInt", args, str)
        raw = str(args[0])
        if not re.fullmatch(r"[+-]?\d+", raw):
            raise TemplateError(line, f'error calling toInt: strconv.Atoi: parsing "{raw}": invalid syntax')
        return int(raw)

    def to_float(*args: object) -> float:
        want("toFloat", args, str)
        raw = str(args[0])
        if raw != raw.strip() or "_" in raw:
            raise TemplateError(line, f'error calling toFloat: strconv.ParseFloat: parsing "{raw}": invalid syntax')
        try:
            return float(raw)
        except ValueError:
            raise TemplateError(
                line, f'error calling toFloat: strconv.ParseFloat: parsing "{raw}": invalid syntax'
            ) from None

    def indent(*args: object) -> str:
        want("indent", args, int, str)
        return str(args[1]).replace("\n", "\n" + " " * int(args[0]))  # type: ignore[call-overload]

    return {"env": env, "toBool": to_bool, "toInt": to_int, "toFloat": to_float, "indent": indent}


def _format(value: object) -> str:
    """Print a value the way Go's text/template prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    return str(value)


def _go_float(value: float) -> str:
    """Go's %v for float64: shortest digits, exponent form when the exponent is < -4 or >= 6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    digits, exponent = _shortest_digits(abs(value))
    sign = "-" if value < 0 else ""
    exp = exponent - 1  # position of the decimal point relative to the first digit
    if exp < -4 or exp >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exponent <= 0:
        return f"{sign}0.{'0' * -exponent}{digits}"
    if exponent >= len(digits):
        return f"{sign}{digits}{'0' * (exponent - len(digits))}"
    return f"{sign}{digits[:exponent]}.{digits[exponent:]}"


def _shortest_digits(value: float) -> tuple[str, int]:
    """Significant digits of repr(value) and the decimal exponent such that value = 0.DIGITS * 10**exponent."""
    mantissa, _, exp_part = f"{value!r}".partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    exponent = len(whole) + (int(exp_part) if exp_part else 0)
    leading_zeros = len(whole + frac) - len((whole + frac).lstrip("0"))
    exponent -= leading_zeros
    return digits.rstrip("0") or "0", exponent
