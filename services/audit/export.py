"""How records leave the service: one JSON object per record, or CSV rows with the same columns.

Records hold ids and actions, never PHI. `clock_skew_ms` is the producer's `occurred_at` minus the
audit service's receipt time when they differ by more than AUDIT_MAX_CLOCK_SKEW_S (else 0; empty
for records of version 1, which did not measure it). A spreadsheet opening the CSV must not run
anything a producer put into an id, so a cell that would start a formula (= + - @, tab, carriage
return) is prefixed with an apostrophe (OWASP's advice on CSV injection); the JSON export is left
exact.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable

COLUMNS = (
    "id",
    "chain",
    "seq",
    "occurred_at",
    "recorded_at",
    "clock_skew_ms",
    "category",
    "event_type",
    "event_id",
    "service",
    "producer",
    "actor_id",
    "actor_kind",
    "action",
    "outcome",
    "resource_type",
    "resource_id",
    "patient_id",
    "reason",
    "source",
    "correlation_id",
    "prev_hash",
    "hash",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def iso(ms: int) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def item(doc: dict) -> dict:
    """A stored record as the API shows it (times as UTC ISO-8601)."""
    shown = {column: doc.get(column, "") for column in COLUMNS}
    shown["id"] = doc["_id"]
    shown["occurred_at"] = iso(doc["occurred_at"])
    shown["recorded_at"] = iso(doc["recorded_at"])
    # Measured from record version 2 on; None (an empty CSV cell) for older records.
    shown["clock_skew_ms"] = doc.get("clock_skew_ms") if doc.get("v", 1) >= 2 else None
    return shown


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)  # a number (a negative clock skew) is no formula
    cell = str(value)
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def csv_text(items: Iterable[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for shown in items:
        writer.writerow([_cell(shown[column]) for column in COLUMNS])
    return out.getvalue()
