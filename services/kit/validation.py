"""Strict request validation for the HTTP edges.

A body must be a JSON object of known fields with the declared types. Anything
else (malformed JSON, an unknown field, a wrong type, an operator object such
as {"$gt": ""} where a string belongs) is rejected with a stable code before
any code touches the database.

Every JSON body also passes `check_json_text` first, whatever route reads it: JSON may
carry what no later step can handle, so the edge refuses it once, for every service.
Nesting deeper than MAX_JSON_DEPTH is 400 `too_deep` (parsers and validators recurse);
a lone UTF-16 surrogate ("\ud800", which UTF-8, BSON and protobuf cannot encode) or a
NUL character in any string or name is 400 `invalid_text`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest

from services.kit.errors import Conflict, InvalidInput, UnsupportedMediaType

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Above what any request body here nests (a few levels; FHIR routes, whose resources nest deeper,
# pass their own limit), far below what exhausts a recursive parser or validator.
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_PATH = 200


def json_body(max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The request's JSON object, checked by `check_json_text` (module docstring)."""
    if not request.is_json:
        raise UnsupportedMediaType("unsupported_media_type", "the request body must be application/json")
    try:
        body = request.get_json(force=False, silent=False)
    except RecursionError as exc:
        # Nesting deep enough to exhaust the parser's stack: the only way JSON makes it recurse that far.
        raise too_deep(max_depth, "") from exc
    except (BadRequest, ValueError) as exc:
        raise InvalidInput("malformed_json", "the request body is not valid JSON") from exc
    check_json_text(body, max_depth)
    if not isinstance(body, dict):
        raise InvalidInput("invalid_body", "the request body must be a JSON object")
    return body


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH, *, allow_nul: bool = False) -> Any:
    """JSON a route reads itself (e.g. a form field holding JSON), refused as `json_body` refuses it.
    `allow_nul`: the caller cleans control characters out of the text itself (NUL is then let
    through; unpaired surrogates never are)."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise too_deep(max_depth, "") from exc
    except ValueError as exc:
        raise InvalidInput("malformed_json", "the text is not valid JSON") from exc
    check_json_text(value, max_depth, allow_nul=allow_nul)
    return value


def too_deep(max_depth: int, path: str) -> InvalidInput:
    return InvalidInput("too_deep", f"the JSON nests more than {max_depth} levels", {"field": path} if path else None)


def _unclean(message: str, path: str) -> InvalidInput:
    return InvalidInput("invalid_text", message, {"field": path} if path else None)


def is_clean_text(text: str, *, allow_nul: bool = False) -> bool:
    """No NUL and no lone surrogate (text UTF-8 can encode and C strings do not cut short)."""
    if "\x00" in text and not allow_nul:
        return False
    return text.isascii() or _SURROGATE.search(text) is None


def _json_path(parent: str, key: object) -> str:
    path = f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else str(key))
    return path[:_MAX_PATH]


def check_json_text(value: Any, max_depth: int = MAX_JSON_DEPTH, *, allow_nul: bool = False) -> None:
    """Refuse a parsed JSON value nesting deeper than `max_depth` (`too_deep`) or holding a string or
    a name that is not clean text (`invalid_text`, see `is_clean_text`). Iterative, so no value can
    exhaust the stack here; `details.field` is the path of the element, never its text."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        current, path, depth = stack.pop()
        if isinstance(current, str):
            if not is_clean_text(current, allow_nul=allow_nul):
                raise _unclean(f"{path or 'the body'} holds a NUL or an unpaired surrogate", path)
            continue
        if not isinstance(current, dict | list):
            continue
        if depth > max_depth:
            raise too_deep(max_depth, path)
        items = current.items() if isinstance(current, dict) else enumerate(current)
        for key, item in items:
            if isinstance(key, str) and not is_clean_text(key, allow_nul=allow_nul):
                raise _unclean(f"a name in {path or 'the body'} holds a NUL or an unpaired surrogate", path)
            stack.append((item, _json_path(path, key), depth + 1))


class Spec:
    required: bool = True

    def clean(self, path: str, value: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


def _type_error(path: str, expected: str) -> InvalidInput:
    return InvalidInput("invalid_type", f"{path} must be {expected}", {"field": path})


@dataclass
class Str(Spec):
    max_len: int = 200
    min_len: int = 1
    required: bool = True
    strip: bool = True
    pattern: re.Pattern | None = None

    def clean(self, path: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "a string")
        text = value.strip() if self.strip else value
        if len(text) < self.min_len:
            raise InvalidInput("invalid_value", f"{path} must not be empty", {"field": path})
        if len(text) > self.max_len:
            raise InvalidInput("too_long", f"{path} must be at most {self.max_len} characters", {"field": path})
        if "\x00" in text:
            raise InvalidInput("invalid_value", f"{path} must not contain NUL characters", {"field": path})
        if not text.isascii() and _SURROGATE.search(text):
            raise InvalidInput("invalid_text", f"{path} holds an unpaired surrogate", {"field": path})
        if self.pattern is not None and not self.pattern.fullmatch(text):
            raise InvalidInput("invalid_value", f"{path} has an invalid format", {"field": path})
        return text


@dataclass
class Id(Str):
    max_len: int = 64
    pattern: re.Pattern | None = ID_PATTERN


@dataclass
class Bool(Spec):
    required: bool = False

    def clean(self, path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _type_error(path, "true or false")
        return value


@dataclass
class Int(Spec):
    """A whole number within [minimum, maximum]; true/false and 1.0 are not numbers here."""

    minimum: int = 0
    maximum: int = 2**31 - 1
    required: bool = False

    def clean(self, path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "a whole number")
        if not self.minimum <= value <= self.maximum:
            raise InvalidInput(
                "out_of_range", f"{path} must be between {self.minimum} and {self.maximum}", {"field": path}
            )
        return value


@dataclass
class Choice(Spec):
    choices: tuple[str, ...] = ()
    required: bool = False

    def clean(self, path: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "a string")
        if value not in self.choices:
            raise InvalidInput("invalid_value", f"{path} must be one of: {', '.join(self.choices)}", {"field": path})
        return value


@dataclass
class Link(Str):
    max_len: int = 2048

    def clean(self, path: str, value: Any) -> str:
        text = super().clean(path, value)
        parts = urllib.parse.urlsplit(text)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise InvalidInput("invalid_link", f"{path} must be an http or https URL", {"field": path})
        return text


# Times people type (reminders, due dates, expiries) are within these years; later ones cannot all be
# shown as UTC ISO-8601 times, earlier ones are mistakes.
EARLIEST_YEAR, LATEST_YEAR = 2000, 2099


def instant_ms(path: str, text: str, code: str = "invalid_time") -> int:
    """An ISO-8601 time as epoch ms. The UTC offset is required: staff of one agency work in
    different time zones, so a bare local time would be ambiguous."""
    refusal = InvalidInput(code, f"{path} must be an ISO-8601 time with a UTC offset", {"field": path})
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise refusal from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise refusal
    if not EARLIEST_YEAR <= moment.year <= LATEST_YEAR:
        raise InvalidInput(code, f"{path} is out of range", {"field": path})
    return int(moment.timestamp() * 1000)


@dataclass
class Instant(Str):
    """An ISO-8601 time with offset (see instant_ms), cleaned to epoch ms."""

    max_len: int = 64
    code: str = "invalid_time"

    def clean(self, path: str, value: Any) -> int:
        return instant_ms(path, super().clean(path, value), self.code)


@dataclass
class ListOf(Spec):
    item: Spec = field(default_factory=Id)
    max_items: int = 100
    required: bool = False
    unique: bool = True

    def clean(self, path: str, value: Any) -> list:
        if not isinstance(value, list):
            raise _type_error(path, "a list")
        if len(value) > self.max_items:
            raise InvalidInput("too_many", f"{path} may hold at most {self.max_items} items", {"field": path})
        cleaned = [self.item.clean(f"{path}[{i}]", v) for i, v in enumerate(value)]
        if self.unique:
            cleaned = list(dict.fromkeys(cleaned))
        return cleaned


def validate(body: dict, specs: dict[str, Spec]) -> dict:
    unknown = sorted(k for k in body if k not in specs)
    if unknown:
        raise InvalidInput("unknown_field", f"unknown field: {unknown[0]}", {"field": unknown[0]})
    cleaned: dict[str, Any] = {}
    for name, spec in specs.items():
        if name not in body or body[name] is None:
            if spec.required:
                raise InvalidInput("missing_field", f"{name} is required", {"field": name})
            continue
        cleaned[name] = spec.clean(name, body[name])
    return cleaned


def query_int(name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidInput("invalid_query", f"{name} must be a whole number", {"field": name})
    value = int(raw)
    if not minimum <= value <= maximum:
        raise InvalidInput("invalid_query", f"{name} must be between {minimum} and {maximum}", {"field": name})
    return value


def query_bool(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no", ""):
        return False
    raise InvalidInput("invalid_query", f"{name} must be true or false", {"field": name})


def path_id(value: str, what: str = "id") -> str:
    """A path id that is malformed can't exist: answer 404 like an unknown one."""
    from services.kit.errors import NotFound

    if not ID_PATTERN.fullmatch(value):
        raise NotFound("not_found", f"no such {what}")
    return value


@dataclass
class Fields(Spec):
    """A nested JSON object validated like a request body (unknown fields rejected; errors name `path.field`)."""

    specs: dict[str, Spec]
    required: bool = False

    def clean(self, path: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise _type_error(path, "an object")
        try:
            return validate(value, self.specs)
        except InvalidInput as exc:
            inner = exc.details.get("field")
            details = {**exc.details, "field": f"{path}.{inner}"} if inner else exc.details
            raise InvalidInput(exc.code, f"{path}: {exc.message}", details) from exc


IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,128}$")


def request_digest(body: object) -> str:
    """A fingerprint of what a create asked for (its JSON, keys sorted), kept with what an
    Idempotency-Key made, so the same key with another request is told apart from a repeat."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def idempotency_key_reused() -> Conflict:
    return Conflict("idempotency_key_reused", "this Idempotency-Key was used for another request")


def idempotency_key_header() -> str | None:
    """The request's `Idempotency-Key` (None when absent): 1-128 printable ASCII characters, else
    400 `invalid_idempotency_key`. A create repeated with the same key by the same caller returns
    what the first one made instead of making it again."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidInput(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 128 printable ASCII characters",
            {"field": "Idempotency-Key"},
        )
    return value
