"""Dashboards: an agency's backlog and response times, as aggregates only (no subject, body, patient).

Who reads them:
- agency admins, with their staff token: `GET /api/v1/dashboards/<view>` for their own agency
  (anyone else: 403 `admin_required`);
- an internal dashboard system through the gateway with an API key (consumer in the ACL group
  `dashboards`): `GET /api/v1/partner/dashboards/agencies/<agency_id>/<view>`, for the agencies
  INBOX_DASHBOARD_CONSUMERS binds that consumer to (`consumer=agy_a+agy_b,...`; dev:
  `internal-dashboard=agy_riverbend`); any other agency is 404 `agency_not_found`, whether or not it
  exists. The consumer is believed only with the gateway's identity token
  (services.kit.gateway_identity), like every partner.

Views: `summary` (per folder: items waiting, unread age p50/p90, oldest unread; reminders due;
response times; auto-replies sent), `staff` (the backlog table, also as CSV: `?format=csv` or
`Accept: text/csv`), `teams`, `trends` (per day over the window). `?days=7|30` picks the window.

Computed incrementally, never by reading board items per request (docs/storage.md shapes):
- backlog: the board counters inbox keeps (`board_counters`, `u_<folder>` / `t_<folder>`), read by
  `_id $in` in batches of the agency's staff (directory's ListStaff and GetStaff for their teams,
  kept MEMBERS_TTL_S per agency);
- unread age: `dash_unread`, one document per board (`<agency>|<staff>`): `h:<folder>:<hour>` = how
  many of its unread items arrived in that hour (hours since the epoch, UTC). Moved by the same
  deltas that move the board counters (a wrapper of `InboxStore.apply_deltas`, and of
  `count_passes` guarded by the fan-out pass's own token, swept with it), so it follows reads,
  mark-unread, archive, delete and recall. Ages and the oldest unread are to the hour.
- response times: `dash_times`, one document per (agency, metric, UTC day): `a:<bucket>` for the
  agency and `s:<staff>:<bucket>` per staff member, `$inc`ed on a received message's first read
  (a wrapper of `InboxStore.note_read`, which the store calls once per item) and on a staff
  member's first reply to a message (a wrapper of `Mailbox.reply`; one `dash_replied` marker per
  (message, staff) keeps repeats out). Buckets are fixed and log-scaled (BOUNDS_S); a percentile
  is the upper bound of the bucket it falls in. Teams are the sum of their members' buckets.
- auto-replies sent: `dash_times` metric `auto_reply` (`n`, `s:<staff>:n`), from `Mailbox.send`
  with `auto_reply` (a wrapper). Whether a staff member's auto-reply is switched on lives in the
  auto-reply service and is not read here.

Critical results unacknowledged: read from services/inbox/escalation.py's loop state when that
feature is there (the `unacked_since` index on notices; one range read, CRITICAL_CAP at most), else
null. Not available here (fields present, null, with `not_available` naming them): signature
requests past their due date (due dates are not indexed or counted) and the lab feed, which
notifications serves itself (`GET /api/v1/dashboards/lab`, services/notifications/dashboards.py).
Every wrapper swallows and logs its own failure: a dashboard never fails a read or a reply.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, g, request
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from clinic.directory.v1 import directory_pb2
from services.inbox import domain
from services.inbox.components import Feature
from services.inbox.http_api import only_query, staff_only
from services.inbox.store import COUNTERS, count_token
from services.kit import clock, gateway_identity
from services.kit.cache import TtlCache
from services.kit.errors import Forbidden, InvalidInput, NotFound
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.service_identity import acting_as
from services.kit.validation import ID_PATTERN

log = logging.getLogger(__name__)

UNREAD = "dash_unread"
TIMES = "dash_times"
REPLIED = "dash_replied"
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# Upper bounds (seconds) of the response-time buckets; one more bucket holds everything longer.
BOUNDS_S = (60, 120, 300, 600, 1200, 1800, 3600, 7200, 14_400, 28_800, 43_200, 86_400, 172_800, 345_600, 604_800)
METRIC_FIRST_READ = "first_read"
METRIC_REPLY = "reply"
METRIC_AUTO_REPLY = "auto_reply"
WINDOWS = (7, 30)
VIEWS = ("summary", "staff", "teams", "trends")
ID_BATCH = 500
MEMBERS_TTL_S = 30.0
# At most this many open critical results (all agencies) are read for one summary.
CRITICAL_CAP = 5000
NOTICES = "notices"  # services/inbox/delivery.py: delivered notices, a critical result's loop state on them
NOT_AVAILABLE = ("critical_results_unacknowledged", "signature_requests_past_due", "lab_feed")
STAFF_FOLDERS = tuple(f for f in domain.ITEM_FOLDERS if f not in (domain.FOLDER_SENT, domain.FOLDER_ARCHIVE))
CSV_COLUMNS = (
    "staff_id",
    "name",
    "team_ids",
    "waiting",
    *(f"unread_{f}" for f in STAFF_FOLDERS),
    "oldest_unread_at",
    "first_read_p50_s",
    "first_read_p90_s",
    "reply_p50_s",
    "reply_p90_s",
)
INDEXES = [IndexSpec(UNREAD, [("agency", 1)], name="dash_unread_agency")]
_CONSUMER = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")


def parse_consumers(raw: str) -> dict[str, frozenset[str]]:
    """'consumer=agy_a+agy_b[,consumer=agy_c]' -> consumer -> agencies; ValueError when malformed."""
    consumers: dict[str, frozenset[str]] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        name, _, agencies = entry.partition("=")
        ids = frozenset(a.strip() for a in agencies.split("+") if a.strip())
        if not _CONSUMER.fullmatch(name.strip()) or not ids or not all(ID_PATTERN.fullmatch(a) for a in ids):
            raise ValueError(f"INBOX_DASHBOARD_CONSUMERS entries must be 'consumer=agy_a+agy_b', got {entry!r}")
        consumers[name.strip()] = ids
    return consumers


# --- buckets and percentiles (pure) -------------------------------------------------------------------


def bucket_of(seconds: float) -> int:
    for index, bound in enumerate(BOUNDS_S):
        if seconds < bound:
            return index
    return len(BOUNDS_S)


def percentile(buckets: Mapping[int, int], q: float) -> int | None:
    """The upper bound (s) of the bucket holding the q-th fraction of the counts; the last bound for
    the open bucket; None when there is nothing."""
    total = sum(n for n in buckets.values() if n > 0)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(buckets):
        seen += max(buckets[index], 0)
        if seen >= rank:
            return BOUNDS_S[min(index, len(BOUNDS_S) - 1)]
    return BOUNDS_S[-1]


def merge(target: dict[int, int], buckets: Mapping) -> dict[int, int]:
    for key, value in (buckets or {}).items():
        if str(key).isdigit():
            target[int(key)] = target.get(int(key), 0) + int(value or 0)
    return target


def prefixed(doc: Mapping, prefix: str) -> dict[int, int]:
    """The numbered counts of a document's flat fields `<prefix><n>` (fields are flat, "a:3", never
    nested paths: nx-27017 stores a dotted path of an upserted document as one flat name)."""
    found: dict[int, int] = {}
    for key, value in doc.items():
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            found[int(key[len(prefix) :])] = int(value or 0)
    return found


def age_percentiles(hours: Mapping[int, int], now: int) -> dict:
    """Unread ages (s) p50/p90 and the oldest unread hour, from counts of unread items by arrival hour."""
    live = sorted((hour, n) for hour, n in hours.items() if n > 0)
    total = sum(n for _, n in live)
    if not total:
        return {"unread_age_p50_s": None, "unread_age_p90_s": None, "oldest_unread_at": None}

    def age_at(q: float) -> int:
        seen = 0
        for hour, n in reversed(live):  # newest first: the q-th fraction by age
            seen += n
            if seen >= q * total:
                return max(0, (now - (hour * HOUR_MS + HOUR_MS // 2)) // 1000)
        return max(0, (now - live[0][0] * HOUR_MS) // 1000)

    return {
        "unread_age_p50_s": age_at(0.5),
        "unread_age_p90_s": age_at(0.9),
        "oldest_unread_at": _iso(live[0][0] * HOUR_MS),
    }


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def arrival_hour(item: Mapping) -> int | None:
    key = str(item.get("sort_key") or "")
    return int(key[:13]) // HOUR_MS if key[:13].isdigit() else None


def unread_moves(changes: Iterable[tuple[Mapping, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """owner key -> {"h:<folder>:<hour>": delta} for the unread counts a list of (item, delta) moves."""
    moves: dict[str, dict[str, int]] = {}
    for item, delta in changes:
        hour = arrival_hour(item)
        if hour is None or not delta:
            continue
        for key, value in delta.items():
            if key.startswith("u_") and value:
                owner = domain.owner_key(item["agency_id"], item["owner_id"])
                field = f"h:{key[2:]}:{hour}"
                fields = moves.setdefault(owner, {})
                fields[field] = fields.get(field, 0) + value
    return {owner: {k: v for k, v in fields.items() if v} for owner, fields in moves.items()}


def day_of(ms: int) -> int:
    return ms // DAY_MS


def csv_cell(value: object) -> str:
    """A cell that a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# --- the feature --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    staff_id: str
    name: str
    team_ids: tuple[str, ...]


class Dashboards(Feature):
    """Aggregates kept as boards change, and the routes that read them."""

    def __init__(self, components):
        super().__init__(components)
        db = components.store.db
        self.unread = db[UNREAD]
        self.times = db[TIMES]
        self.replied = db[REPLIED]
        self.counters = db[COUNTERS]
        self.notices = db[NOTICES]
        self._escalation: bool | None = None
        # The agency's staff and teams (directory), kept briefly: a dashboard is read again and again.
        self._members: TtlCache[str, list[Member]] = TtlCache(MEMBERS_TTL_S, max_entries=1000)
        raw = getattr(components.settings, "dashboard_consumers", "")
        self.consumers = parse_consumers(raw if isinstance(raw, str) else "")

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    # --- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        store, mailbox = self.components.store, self.components.mailbox
        apply_deltas, count_passes, sweep_tokens = store.apply_deltas, store.count_passes, store.sweep_tokens
        note_read, reply, send = store.note_read, mailbox.reply, mailbox.send

        def apply_deltas_hook(changes):
            apply_deltas(changes)
            self._quietly("unread", self.move_unread, changes)

        def count_passes_hook(passes):
            count_passes(passes)
            self._quietly("unread", self.count_unread_passes, passes)

        def sweep_tokens_hook(tokens_by_owner):
            sweep_tokens(tokens_by_owner)
            self._quietly("sweep", self.sweep, tokens_by_owner)

        def note_read_hook(message_id, staff_id, at_ms):
            note_read(message_id, staff_id, at_ms)
            self._quietly("first_read", self.record_first_read, message_id, staff_id, at_ms)

        def reply_hook(caller, message_id, **kwargs):
            result = reply(caller, message_id, **kwargs)
            if result.created and not kwargs.get("auto_reply"):
                self._quietly("reply", self.record_reply, caller.agency_id, caller.staff_id, message_id)
            return result

        def send_hook(caller, draft, idempotency_key=None, **kwargs):
            result = send(caller, draft, idempotency_key, **kwargs)
            if result.created and kwargs.get("auto_reply"):
                self._quietly("auto_reply", self.record_auto_reply, caller.agency_id, caller.staff_id)
            return result

        store.apply_deltas, store.count_passes, store.sweep_tokens = (
            apply_deltas_hook,
            count_passes_hook,
            sweep_tokens_hook,
        )
        store.note_read = note_read_hook
        mailbox.reply, mailbox.send = reply_hook, send_hook

    @staticmethod
    def _quietly(what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a dashboard never fails the change it watches
            log.warning("dashboard aggregate not updated", extra={"aggregate": what}, exc_info=True)

    # --- unread ages -------------------------------------------------------------------------------
    def move_unread(self, changes) -> None:
        ops = [
            UpdateOne(
                {"_id": {"$eq": owner}}, {"$inc": fields, "$set": {"agency": owner.split("|", 1)[0]}}, upsert=True
            )
            for owner, fields in unread_moves(changes).items()
            if fields
        ]
        for start in range(0, len(ops), ID_BATCH):
            self.unread.bulk_write(ops[start : start + ID_BATCH], ordered=False)

    def count_unread_passes(self, passes: Mapping[str, list[dict]]) -> None:
        """A fan-out pass's unread items, once per (pass, board): the pass's token guards the $inc,
        as it does on the board counters (a repeat of the pass finds the token: 11000, skipped)."""
        ops = []
        for key, items in passes.items():
            token = count_token(key)
            changes = [(item, domain.counter_delta(None, item)) for item in items]
            for owner, fields in unread_moves(changes).items():
                if fields:
                    guard = {"_id": {"$eq": owner}, token: {"$exists": False}}
                    update = {"$inc": fields, "$set": {token: now_ms(), "agency": owner.split("|", 1)[0]}}
                    ops.append(UpdateOne(guard, update, upsert=True))
        for start in range(0, len(ops), ID_BATCH):
            try:
                self.unread.bulk_write(ops[start : start + ID_BATCH], ordered=False)
            except BulkWriteError as exc:
                if any(err.get("code") != 11000 for err in exc.details.get("writeErrors", [])):
                    raise

    def sweep(self, tokens_by_owner: Mapping[str, list[str]]) -> None:
        ops = [
            UpdateOne({"_id": {"$eq": owner}}, {"$unset": dict.fromkeys(tokens, "")})
            for owner, tokens in tokens_by_owner.items()
            if tokens
        ]
        for start in range(0, len(ops), ID_BATCH):
            self.unread.bulk_write(ops[start : start + ID_BATCH], ordered=False)

    # --- response times --------------------------------------------------------------------------
    def _add_time(self, agency_id: str, staff_id: str, metric: str, at_ms: int, seconds: float | None) -> None:
        fields: dict[str, int] = {"n": 1, f"s:{staff_id}:n": 1}
        if seconds is not None:
            bucket = bucket_of(max(0.0, seconds))
            fields |= {f"a:{bucket}": 1, f"s:{staff_id}:{bucket}": 1}
        doc_id = f"{agency_id}|{metric}|{day_of(at_ms)}"
        self.times.update_one({"_id": {"$eq": doc_id}}, {"$inc": fields}, upsert=True)

    def _sent_at(self, message_id: str) -> tuple[str, int] | None:
        message = self.components.store.messages.find_one(
            {"_id": {"$eq": message_id}}, projection={"agency_id": 1, "sent_at": 1}
        )
        if message is None or not isinstance(message.get("sent_at"), int):
            return None
        return message["agency_id"], message["sent_at"]

    def record_first_read(self, message_id: str, staff_id: str, at_ms: int) -> None:
        found = self._sent_at(message_id)
        if found is not None:
            agency_id, sent_at = found
            self._add_time(agency_id, staff_id, METRIC_FIRST_READ, at_ms, (at_ms - sent_at) / 1000)

    def record_reply(self, agency_id: str, staff_id: str, message_id: str) -> None:
        found = self._sent_at(message_id)
        if found is None or found[0] != agency_id:
            return
        at = now_ms()
        try:
            self.replied.insert_one({"_id": f"{message_id}|{staff_id}", "at": at})
        except DuplicateKeyError:
            return  # answered it before: only the first reply counts
        self._add_time(agency_id, staff_id, METRIC_REPLY, at, (at - found[1]) / 1000)

    def record_auto_reply(self, agency_id: str, staff_id: str) -> None:
        self._add_time(agency_id, staff_id, METRIC_AUTO_REPLY, now_ms(), None)

    # --- reading ---------------------------------------------------------------------------------
    def members(self, agency_id: str) -> list[Member]:
        """The agency's active staff with their teams, kept MEMBERS_TTL_S (directory, asked as the
        current identity: the caller, or inbox's service identity for the agency)."""
        return self._members.get_or_load(agency_id, self._load_members)

    def _load_members(self) -> list[Member]:
        directory = self.components.directory
        if hasattr(directory, "list_staff_members"):  # a stand-in in tests
            return [Member(*m) for m in directory.list_staff_members()]
        listed = directory._call("ListStaff", directory_pb2.ListStaffRequest())  # noqa: SLF001
        ids = [m.staff_id for m in listed.staff if m.active]
        members: list[Member] = []
        for start in range(0, len(ids), ID_BATCH):
            found, _ = directory.staff(ids[start : start + ID_BATCH])
            members += [Member(m.staff_id, m.display_name, tuple(m.team_ids)) for m in found if m.active]
        return sorted(members, key=lambda m: m.staff_id)

    def _by_ids(self, collection, ids: list[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for start in range(0, len(ids), ID_BATCH):
            for doc in collection.find({"_id": {"$in": ids[start : start + ID_BATCH]}}):
                found[doc["_id"]] = doc
        return found

    def _times(self, agency_id: str, days: int, now: int) -> dict[str, list[tuple[int, dict]]]:
        """metric -> [(day, document)] over the window, oldest day first."""
        today = day_of(now)
        span = range(today - days + 1, today + 1)
        metrics = (METRIC_FIRST_READ, METRIC_REPLY, METRIC_AUTO_REPLY)
        docs = self._by_ids(self.times, [f"{agency_id}|{m}|{d}" for m in metrics for d in span])
        return {m: [(d, docs.get(f"{agency_id}|{m}|{d}") or {}) for d in span] for m in metrics}

    def report(self, agency_id: str, view: str, days: int) -> dict:
        now = clock.now_ms()
        members = self.members(agency_id)
        owners = [domain.owner_key(agency_id, m.staff_id) for m in members]
        counters = self._by_ids(self.counters, owners)
        unread = self._by_ids(self.unread, owners)
        times = self._times(agency_id, days, now)
        base = {"agency_id": agency_id, "days": days, "generated_at": _iso(now)}
        if view == "trends":
            return base | {"days_series": self._trends(times)}
        rows = [
            self._row(m, counters.get(o) or {}, unread.get(o) or {}, times, now)
            for m, o in zip(members, owners, strict=True)
        ]
        if view == "staff":
            return base | {"staff": [row for row, _ in rows]}
        if view == "teams":
            return base | {"teams": self._teams(members, rows, now)}
        summary = self._summary(rows, counters=counters, unread=unread, owners=owners, times=times, now=now)
        critical = self.critical_unacknowledged(agency_id)
        if critical is not None:
            summary["critical_results_unacknowledged"] = critical
            summary["not_available"].remove("critical_results_unacknowledged")
        return base | summary

    def critical_unacknowledged(self, agency_id: str) -> int | None:
        """Critical results of the agency not acknowledged yet, when critical-result acknowledgement
        is there (services/inbox/escalation.py: `unacked_since` on the result's notice, indexed): one
        range read of that index, all agencies' open results, at most CRITICAL_CAP; None otherwise."""
        if self._escalation is None:
            try:  # by its keys: nx-27017 names indexes its own way
                keys = [list(index.get("key", [])) for index in self.notices.index_information().values()]
            except PyMongoError:
                return None
            self._escalation = [("unacked_since", 1)] in keys
        if not self._escalation:
            return None
        found = self.notices.find({"unacked_since": {"$gte": 0}}, projection={"agency_id": 1}).limit(CRITICAL_CAP)
        return sum(1 for doc in found if doc.get("agency_id") == agency_id)

    def _row(self, member: Member, counter: dict, unread: dict, times, now: int) -> tuple[dict, dict]:
        hours_by_folder = {f: prefixed(unread, f"h:{f}:") for f in STAFF_FOLDERS}
        all_hours: dict[int, int] = {}
        for hours in hours_by_folder.values():
            merge(all_hours, hours)
        ages = age_percentiles(all_hours, now)
        staff_times = {m: merge_days(times[m], member.staff_id) for m in (METRIC_FIRST_READ, METRIC_REPLY)}
        row = {
            "staff_id": member.staff_id,
            "name": member.name,
            "team_ids": list(member.team_ids),
            "waiting": sum(max(int(counter.get(f"u_{f}", 0)), 0) for f in STAFF_FOLDERS),
            "unread": {f: max(int(counter.get(f"u_{f}", 0)), 0) for f in STAFF_FOLDERS},
            "oldest_unread_at": ages["oldest_unread_at"],
            "unread_age_p50_s": ages["unread_age_p50_s"],
            "unread_age_p90_s": ages["unread_age_p90_s"],
            "first_read_p50_s": percentile(staff_times[METRIC_FIRST_READ], 0.5),
            "first_read_p90_s": percentile(staff_times[METRIC_FIRST_READ], 0.9),
            "reply_p50_s": percentile(staff_times[METRIC_REPLY], 0.5),
            "reply_p90_s": percentile(staff_times[METRIC_REPLY], 0.9),
        }
        return row, {"hours": all_hours, "times": staff_times}

    def _teams(self, members: list[Member], rows, now: int) -> list[dict]:
        teams: dict[str, dict] = {}
        for member, (row, raw) in zip(members, rows, strict=True):
            for team_id in member.team_ids:
                team = teams.setdefault(team_id, {"members": 0, "waiting": 0, "hours": {}, "fr": {}, "rp": {}})
                team["members"] += 1
                team["waiting"] += row["waiting"]
                merge(team["hours"], raw["hours"])
                merge(team["fr"], raw["times"][METRIC_FIRST_READ])
                merge(team["rp"], raw["times"][METRIC_REPLY])
        out = []
        for team_id in sorted(teams):
            team = teams[team_id]
            out.append(
                {"team_id": team_id, "members": team["members"], "waiting": team["waiting"]}
                | age_percentiles(team["hours"], now)
                | {
                    "first_read_p50_s": percentile(team["fr"], 0.5),
                    "first_read_p90_s": percentile(team["fr"], 0.9),
                    "reply_p50_s": percentile(team["rp"], 0.5),
                    "reply_p90_s": percentile(team["rp"], 0.9),
                }
            )
        return out

    def _summary(self, rows, *, counters, unread, owners, times, now: int) -> dict:
        folders = {}
        for folder in STAFF_FOLDERS:
            hours: dict[int, int] = {}
            for owner in owners:
                merge(hours, prefixed(unread.get(owner) or {}, f"h:{folder}:"))
            waiting = sum(max(int((counters.get(o) or {}).get(f"u_{folder}", 0)), 0) for o in owners)
            total = sum(max(int((counters.get(o) or {}).get(f"t_{folder}", 0)), 0) for o in owners)
            folders[folder] = {"waiting": waiting, "total": total} | age_percentiles(hours, now)
        response = {}
        for metric in (METRIC_FIRST_READ, METRIC_REPLY):
            merged = merge_days(times[metric], None)
            response[metric] = {
                "count": sum(int(doc.get("n", 0)) for _, doc in times[metric]),
                "p50_s": percentile(merged, 0.5),
                "p90_s": percentile(merged, 0.9),
            }
        return {
            "staff_count": len(rows),
            "waiting": sum(row["waiting"] for row, _ in rows),
            "folders": folders,
            "overdue": {
                "reminders_due": folders.get(domain.FOLDER_REMINDERS, {}).get("waiting", 0),
                "signature_requests_waiting": folders.get(domain.FOLDER_SIGNATURES, {}).get("waiting", 0),
                "signature_requests_past_due": None,
            },
            "time_to_first_read": response[METRIC_FIRST_READ],
            "time_to_reply": response[METRIC_REPLY],
            "auto_replies_sent": sum(int(doc.get("n", 0)) for _, doc in times[METRIC_AUTO_REPLY]),
            "critical_results_unacknowledged": None,
            "lab_feed": None,
            "not_available": list(NOT_AVAILABLE),
        }

    @staticmethod
    def _trends(times) -> list[dict]:
        series = []
        for index, (day, _) in enumerate(times[METRIC_FIRST_READ]):
            point = {"date": (_iso(day * DAY_MS) or "")[:10]}
            for metric, name in ((METRIC_FIRST_READ, "first_read"), (METRIC_REPLY, "reply")):
                doc = times[metric][index][1]
                buckets = prefixed(doc, "a:")
                point[f"{name}_count"] = int(doc.get("n", 0))
                point[f"{name}_p50_s"] = percentile(buckets, 0.5)
                point[f"{name}_p90_s"] = percentile(buckets, 0.9)
            point["auto_replies_sent"] = int(times[METRIC_AUTO_REPLY][index][1].get("n", 0))
            series.append(point)
        return series

    # --- HTTP ------------------------------------------------------------------------------------
    def answer(self, agency_id: str, view: str):
        if view not in VIEWS:
            raise NotFound("not_found", "no such dashboard")
        only_query("days", "format")
        days_raw = request.args.get("days", "7")
        if days_raw not in {str(w) for w in WINDOWS}:
            raise InvalidInput("invalid_query", "days must be 7 or 30", {"field": "days"})
        fmt = request.args.get("format")
        if fmt not in (None, "json", "csv"):
            raise InvalidInput("invalid_query", "format must be json or csv", {"field": "format"})
        wants_csv = fmt == "csv" or (
            fmt is None
            and request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv"
            and "application/json" not in request.accept_mimetypes.values()
        )
        if wants_csv and view != "staff":
            raise InvalidInput("invalid_query", "only the staff view is available as CSV", {"field": "format"})
        body = self.report(agency_id, view, int(days_raw))
        if not wants_csv:
            return body
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        for row in body["staff"]:
            flat = (
                row | {f"unread_{f}": row["unread"][f] for f in STAFF_FOLDERS} | {"team_ids": " ".join(row["team_ids"])}
            )
            writer.writerow([csv_cell(flat.get(column)) for column in CSV_COLUMNS])
        filename = f"staff-backlog-{agency_id}-{body['days']}d.csv"
        return Response(
            out.getvalue(),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
        )

    def partner_agency(self, agency_id: str) -> str:
        components = current_app.extensions["inbox"]
        partner = gateway_identity.verified_partner(
            components.settings.gateway_identity_keys, db=components.store.db, service="inbox"
        )
        if not ID_PATTERN.fullmatch(agency_id) or agency_id not in self.consumers.get(partner.username, ()):
            raise NotFound("agency_not_found", "no such agency")
        return agency_id

    def blueprints(self) -> list:
        staff = Blueprint("dashboards", __name__, url_prefix="/api/v1/dashboards")
        partner = Blueprint("partner_dashboards", __name__, url_prefix="/api/v1/partner/dashboards")

        @staff.get("/<view>")
        @staff_only
        def staff_view(view: str):
            if not g.identity.is_admin:
                raise Forbidden("admin_required", "dashboards are for agency admins")
            return self.answer(g.identity.agency_id, view)

        @partner.get("/agencies/<agency_id>/<view>")
        def partner_view(agency_id: str, view: str):
            agency_id = self.partner_agency(agency_id)
            try:
                identity = self.components.service_tokens.identity(agency_id)
            except NotFound as exc:
                raise NotFound("agency_not_found", "no such agency") from exc
            with acting_as(identity):
                return self.answer(agency_id, view)

        return [staff, partner]


def merge_days(days: list[tuple[int, dict]], staff_id: str | None) -> dict[int, int]:
    """The buckets of a metric over the window: the agency's (staff_id None) or one staff member's."""
    merged: dict[int, int] = {}
    for _, doc in days:
        merge(merged, prefixed(doc, "a:" if staff_id is None else f"s:{staff_id}:"))
    return merged
