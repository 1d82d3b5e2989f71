"""decK's environment templating, for the two functions kong.yml uses: `env` and `indent`.

decK runs the raw file text through Go's text/template with the delimiters
`${{` and `}}` before it parses any YAML, so a value lands in the document
verbatim: `minute: ${{ env "DECK_RATE_LIMIT_MINUTE" }}` becomes a YAML integer.
Whole-line comments are dropped first (current decK does not render them).
`env "DECK_NAME"` reads a DECK_-prefixed variable; `| indent N` pads every line
of the value after the first, so a multi-line value (a PEM) fits a YAML block scalar:

    rsa_public_key: |
      ${{ env "DECK_DIRECTORY_JWT_PUBLIC_KEY" | indent 6 }}

Anything else decK's templates allow (its other functions, trim markers,
comments, multi-line actions, escapes in strings) is refused naming the line,
never rendered differently. One check goes beyond decK: a value containing a
line break must go through `indent`, because pasted anywhere else it silently
changes meaning (YAML folds it into spaces, or ends the block early).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ENV_PREFIX = "DECK_"
OPEN, CLOSE = "${{", "}}"
# decK functions the local gateway does not render (kong.yml uses none of them).
OTHER_DECK_FUNCTIONS = frozenset({"toBool", "toInt", "toFloat"})

_COMMAND = re.compile(r'\s*([A-Za-z_]\w*)((?:\s+(?:"[^"\\\n]*"|[+-]?\d+))*)\s*')
_ARGUMENT = re.compile(r'"([^"\\\n]*)"|([+-]?\d+)')


class TemplateError(ValueError):
    """A template that decK would refuse to render, that would render to something broken, or that
    uses what the local gateway does not render."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def render(text: str, environ: Mapping[str, str]) -> str:
    """Render decK's `${{ ... }}` actions in `text`; raises TemplateError naming the line and variable."""
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip().startswith("#"):
            continue
        parts, pos = [], 0
        while (start := line.find(OPEN, pos)) >= 0:
            end = line.find(CLOSE, start + len(OPEN))
            if end < 0:
                raise TemplateError(number, f"unclosed action: missing {CLOSE!r} on the same line")
            parts += [line[pos:start], _evaluate(line[start + len(OPEN):end], environ, number)]
            pos = end + len(CLOSE)
        parts.append(line[pos:])
        out.append("".join(parts))
    return "\n".join(out)


def _evaluate(action: str, environ: Mapping[str, str], line: int) -> str:
    value: str | None = None
    names: list[str] = []
    piped = False
    for command in action.split("|"):
        m = _COMMAND.fullmatch(command)
        if m is None:
            raise TemplateError(line, f"unsupported template syntax {action.strip()!r} (the local gateway renders "
                                      'env "DECK_..." and | indent N)')
        name = m.group(1)
        args: list[str | int] = [int(number) if number else string
                                 for string, number in _ARGUMENT.findall(m.group(2))]
        if value is not None:
            args.append(value)
        if name == "env":
            _want(name, args, (str,), line)
            names.append(str(args[0]))
            value = _env(str(args[0]), environ, line)
        elif name == "indent":
            _want(name, args, (int, str), line)
            value = str(args[1]).replace("\n", "\n" + " " * int(args[0]))
            piped = True
        elif name in OTHER_DECK_FUNCTIONS:
            raise TemplateError(line, f'function "{name}" is not rendered by the local gateway (only env and indent)')
        else:
            raise TemplateError(line, f'function "{name}" not defined')
    assert value is not None
    if ("\n" in value or "\r" in value) and not piped:
        name = names[0] if names else "the value"
        raise TemplateError(
            line,
            f"{name} contains line breaks; decK pastes values verbatim, so put it in a block scalar "
            f'and pipe it through indent, e.g. ${{{{ env "{name}" | indent 8 }}}}',
        )
    return value


def _want(name: str, args: list[str | int], types: tuple[type, ...], line: int) -> None:
    if len(args) != len(types):
        raise TemplateError(line, f"wrong number of args for {name}: want {len(types)} got {len(args)}")
    for arg, expected in zip(args, types, strict=True):
        if not isinstance(arg, expected):
            raise TemplateError(
                line, f"wrong type for value in {name}; expected {expected.__name__}; got {type(arg).__name__}"
            )


def _env(key: str, environ: Mapping[str, str], line: int) -> str:
    if not key.startswith(ENV_PREFIX):
        raise TemplateError(
            line, f"environment variables in the state file must be prefixed with '{ENV_PREFIX}', found: '{key}'"
        )
    if key not in environ:
        raise TemplateError(line, f"environment variable '{key}' present in state file but not set")
    return environ[key]
