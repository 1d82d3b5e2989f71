"""An auditor's question, read from the query string and refused (400 `invalid_query`) unless every
parameter is known, given once, and shaped as an id, a time or a choice: nothing a caller sends
becomes a database operator, and the agency is never a parameter (it is the caller's).

    patient_id, actor, action, resource_type, outcome   exact ids (letters, digits and _ . : @ | + -)
    category                                            phi_access | security
    from, to                                            when it happened (the producer's clock): ISO-8601
                                                        with offset, or a UTC date YYYY-MM-DD; from
                                                        inclusive, to exclusive
    recorded_from, recorded_to                          when the audit service recorded it (its own clock),
                                                        the same forms; pages are then newest recorded first
    limit, cursor                                       page size; the next page's cursor
    format                                              json | csv
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.audit.chain import CATEGORY_PHI, CATEGORY_SECURITY
from services.audit.store import Filters
from services.kit.errors import InvalidInput
from services.kit.validation import instant_ms

ID_VALUE = re.compile(r"^[A-Za-z0-9_.:@|+-]{1,200}$")
CURSOR = re.compile(r"^[0-9]{13}\.[0-9]{12}$")
DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
ID_PARAMETERS = {
    "patient_id": "patient_id",
    "actor": "actor_id",
    "action": "action",
    "resource_type": "resource_type",
    "outcome": "outcome",
}
# (from, to) pairs of time parameters and the Filters fields they fill.
TIME_RANGES = (("from", "to", "since", "until"), ("recorded_from", "recorded_to", "recorded_since", "recorded_until"))
PARAMETERS = frozenset(
    {*ID_PARAMETERS, "category", *(name for pair in TIME_RANGES for name in pair[:2]), "limit", "cursor", "format"}
)
CATEGORIES = (CATEGORY_PHI, CATEGORY_SECURITY)
FORMATS = ("json", "csv")


@dataclass(frozen=True)
class Query:
    filters: Filters
    limit: int
    cursor: str | None
    format: str


def _refuse(field: str, message: str) -> InvalidInput:
    return InvalidInput("invalid_query", message, {"field": field})


def _instant(name: str, value: str) -> int:
    if DATE.fullmatch(value):
        try:
            day = dt.date.fromisoformat(value)
        except ValueError as exc:
            raise _refuse(name, f"{name} is not a date") from exc
        return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
    try:
        return instant_ms(name, value, "invalid_query")
    except InvalidInput as exc:
        raise _refuse(name, f"{name} must be an ISO-8601 time with a UTC offset, or a date YYYY-MM-DD") from exc


def _single(args: Mapping[str, Sequence[str]]) -> dict[str, str]:
    unknown = sorted(name for name in args if name not in PARAMETERS)
    if unknown:
        raise _refuse(unknown[0][:64], f"unknown query parameter: {unknown[0][:64]}")
    values = {}
    for name, given in args.items():
        if len(given) != 1:
            raise _refuse(name, f"{name} may be given once")
        values[name] = given[0]
    return values


def parse(args: Mapping[str, Sequence[str]], *, default_limit: int, max_limit: int) -> Query:
    """The question in `args` (every value of each parameter, as request.args.to_dict(flat=False))."""
    values = _single(args)
    fields: dict = {}
    for name, field in ID_PARAMETERS.items():
        if name in values:
            if not ID_VALUE.fullmatch(values[name]):
                raise _refuse(name, f"{name} must be an id")
            fields[field] = values[name]
    if "category" in values:
        if values["category"] not in CATEGORIES:
            raise _refuse("category", f"category must be one of: {', '.join(CATEGORIES)}")
        fields["category"] = values["category"]
    for lower, upper, since_field, until_field in TIME_RANGES:
        since = _instant(lower, values[lower]) if lower in values else None
        until = _instant(upper, values[upper]) if upper in values else None
        if since is not None and until is not None and since >= until:
            raise _refuse(lower, f"{lower} must be before {upper}")
        fields[since_field], fields[until_field] = since, until
    limit = default_limit
    if "limit" in values:
        raw = values["limit"]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= max_limit:
            raise _refuse("limit", f"limit must be a whole number between 1 and {max_limit}")
        limit = int(raw)
    cursor = values.get("cursor")
    if cursor is not None and not CURSOR.fullmatch(cursor):
        raise _refuse("cursor", "cursor is not one this service gave")
    form = values.get("format", "json")
    if form not in FORMATS:
        raise _refuse("format", f"format must be one of: {', '.join(FORMATS)}")
    return Query(Filters(**fields), limit, cursor, form)
