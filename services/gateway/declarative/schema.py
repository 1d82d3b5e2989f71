"""A small validator with Kong's schema semantics and Kong's error wording.

Kong's schema library (kong/db/schema) types every field as string, integer,
number, boolean, array, set, map or record, applies defaults for absent fields,
treats an empty string as invalid unless `len_min = 0`, and reports problems
per field ("expected an integer", "unknown field", "required field missing").
This module reproduces that for the fields the local gateway knows, and adds
one more kind of problem: a value Kong accepts but the local gateway cannot
reproduce, which is refused at start rather than ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

UNSUPPORTED = "unsupported by the local gateway"


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Problems:
    """Problems found while validating one document, each with the path of the offending field."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(Problem(path, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self):
        return iter(self.items)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


Check = Callable[[Any], "str | None"]


@dataclass
class Field:
    """Kong field attributes shared by every type."""

    required: bool = False
    default: Any = MISSING
    one_of: tuple | None = None
    custom: Check | None = None
    # A function returning why a (valid) value cannot be reproduced locally, or None.
    local: Check | None = None

    type_name = "value"

    def validate(self, value: Any, path: str, problems: Problems) -> Any:
        if value is None or value is MISSING:
            if self.default is not MISSING:
                return _copy(self.default)
            if self.required:
                problems.add(path, "required field missing")
            return MISSING
        checked = self.check_type(value, path, problems)
        if checked is MISSING:
            return MISSING
        if self.one_of is not None and checked not in self.one_of:
            problems.add(path, "expected one of: " + ", ".join(str(v) for v in self.one_of))
            return MISSING
        if self.custom is not None:
            error = self.custom(checked)
            if error:
                problems.add(path, error)
                return MISSING
        if self.local is not None:
            why = self.local(checked)
            if why:
                problems.add(path, f"{UNSUPPORTED}: {why}")
                return MISSING
        return checked

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        return value


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def is_reference(value: Any) -> bool:
    """Kong's test for a vault reference (`{vault://...}`), kong/pdk/vault.lua `is_reference`."""
    return isinstance(value, str) and value.startswith("{vault://") and value.endswith("}")


@dataclass
class String(Field):
    len_min: int = 1
    starts_with: str | None = None
    match: str | None = None
    match_err: str | None = None
    # Kong's `referenceable`: a vault reference is accepted as it is and resolved after validation
    # (services.gateway.declarative.vault); Kong checks nothing else about it.
    referenceable: bool = False

    type_name = "a string"

    def validate(self, value: Any, path: str, problems: Problems) -> Any:
        if self.referenceable and is_reference(value):
            return value
        return super().validate(value, path, problems)

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if not isinstance(value, str):
            problems.add(path, "expected a string")
            return MISSING
        if len(value) < self.len_min:
            problems.add(path, f"length must be at least {self.len_min}")
            return MISSING
        if self.starts_with is not None and not value.startswith(self.starts_with):
            problems.add(path, f"should start with: {self.starts_with}")
            return MISSING
        if self.match is not None and not re.search(self.match, value):
            problems.add(path, self.match_err or f"invalid value: {value}")
            return MISSING
        return value


@dataclass
class Number(Field):
    between: tuple[float, float] | None = None
    gt: float | None = None

    type_name = "a number"

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.add(path, f"expected {self.type_name}")
            return MISSING
        return self.check_range(value, path, problems)

    def check_range(self, value: Any, path: str, problems: Problems) -> Any:
        if self.between is not None and not (self.between[0] <= value <= self.between[1]):
            low, high = (num(b) for b in self.between)
            problems.add(path, f"value should be between {low} and {high}")
            return MISSING
        if self.gt is not None and not value > self.gt:
            problems.add(path, f"value must be greater than {num(self.gt)}")
            return MISSING
        return value


def num(value: float) -> str:
    """A number as Kong prints it: `600`, not `600.0`."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class Integer(Number):
    type_name = "an integer"

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, "expected an integer")
            return MISSING
        return self.check_range(value, path, problems)


@dataclass
class Boolean(Field):
    type_name = "a boolean"

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if not isinstance(value, bool):
            problems.add(path, "expected a boolean")
            return MISSING
        return value


@dataclass
class Array(Field):
    elements: Field = field(default_factory=Field)
    len_min: int | None = None
    is_set: bool = False

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if not isinstance(value, list):
            problems.add(path, "expected a set" if self.is_set else "expected an array")
            return MISSING
        if self.len_min is not None and len(value) < self.len_min:
            problems.add(path, f"length must be at least {self.len_min}")
            return MISSING
        before = len(problems.items)
        result = []
        for i, item in enumerate(value):
            checked = self.elements.validate(item, join(path, i), problems)
            if checked is MISSING:
                if item is None:
                    problems.add(join(path, i), "required field missing")
                continue
            if self.is_set and checked in result:
                continue  # Kong keeps each element of a set once
            result.append(checked)
        return MISSING if len(problems.items) > before else result


def Set(**kwargs: Any) -> Array:  # noqa: N802 - mirrors Kong's type name
    return Array(is_set=True, **kwargs)


@dataclass
class Map(Field):
    keys: Field = field(default_factory=String)
    values: Field = field(default_factory=Field)

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if not isinstance(value, dict):
            problems.add(path, "expected a map")
            return MISSING
        before = len(problems.items)
        result = {}
        for key, item in value.items():
            k = self.keys.validate(key, join(path, str(key)), problems)
            v = self.values.validate(item, join(path, str(key)), problems)
            if k is not MISSING and v is not MISSING:
                result[k] = v
        return MISSING if len(problems.items) > before else result


EntityCheck = Callable[[dict, str, Problems], None]


@dataclass
class Record(Field):
    fields: dict[str, Field] = field(default_factory=dict)
    checks: tuple[EntityCheck, ...] = ()
    # Keys that belong to the file format (decK nesting) rather than to the entity.
    passthrough: frozenset[str] = frozenset()

    def validate(self, value: Any, path: str, problems: Problems) -> Any:
        if (value is None or value is MISSING) and self.default is MISSING:
            value = {}  # a record absent from the input is built from its defaults, as Kong does
        return super().validate(value, path, problems)

    def check_type(self, value: Any, path: str, problems: Problems) -> Any:
        if not isinstance(value, dict):
            problems.add(path, "expected a record")
            return MISSING
        before = len(problems.items)
        result: dict[str, Any] = {}
        for key in value:
            if key not in self.fields and key not in self.passthrough:
                problems.add(join(path, str(key)), "unknown field")
        for name, spec in self.fields.items():
            checked = spec.validate(value.get(name, MISSING), join(path, name), problems)
            if checked is not MISSING:
                result[name] = checked
        if len(problems.items) > before:
            return MISSING
        for check in self.checks:
            check(result, path, problems)
        if len(problems.items) > before:
            return MISSING
        for key in self.passthrough:
            if key in value:
                result[key] = value[key]
        return result


# --- entity checks, worded as Kong words them ---------------------------------------------


def _get(record: Mapping, dotted: str) -> Any:
    current: Any = record
    for part in dotted.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _empty(value: Any) -> bool:
    return value in (None, [], {})


def at_least_one_of(*names: str) -> EntityCheck:
    def check(record: dict, path: str, problems: Problems) -> None:
        if all(_empty(_get(record, n)) for n in names):
            problems.add(path, "at least one of these fields must be non-empty: " + ", ".join(f"'{n}'" for n in names))

    return check


def only_one_of(*names: str) -> EntityCheck:
    def check(record: dict, path: str, problems: Problems) -> None:
        if sum(not _empty(_get(record, n)) for n in names) > 1:
            problems.add(path, "only one of these fields must be non-empty: " + ", ".join(f"'{n}'" for n in names))

    return check


def conditional(if_field: str, matches: Callable[[Any], bool], then_field: str,
                then_check: Callable[[Any], str | None]) -> EntityCheck:
    def check(record: dict, path: str, problems: Problems) -> None:
        if matches(_get(record, if_field)):
            error = then_check(_get(record, then_field))
            if error:
                problems.add(join(path, then_field), error)

    return check


def required_value(value: Any) -> str | None:
    return "required field missing" if _empty(value) else None

