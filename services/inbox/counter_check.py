"""The counter drift check: a pass every INBOX_COUNTER_CHECK_INTERVAL_S (10 min) recounts a bounded
turn of boards, compares each with its maintained counters and repairs those found off, with a
Prometheus metric and a log line (ids and counts only, never content).

Why it exists: a fan-out pass counts what it places exactly once, even across a crash
(services/inbox/fanout.py), but a single item change (read, archive, delete, an update of a
delivered item) is a version-guarded item write followed by an $inc of its owner's counters, and a
process killed between the two leaves that board off by the change. This check finds it.

How a board is checked without stopping anyone (Board.observe): the counter document is read, the
board's items recounted (only the fields a count needs), the counter document read again. Every
write that moves a count also moves the document's `seq`, so a different `seq` means the board was
busy: no conclusion, next time. A drift is repaired only once it has been seen again, unchanged
with the same `seq`, at least INBOX_COUNTER_CHECK_CONFIRM_S later (an item write whose $inc was
still on its way has landed by then and moved `seq`), and only while no fan-out has been pending
longer than a repair waits (a crashed pass about to count). The repair is one $inc of the
difference guarded by that `seq`: a count moved in between is never overwritten.

What one pass costs is bounded: at most INBOX_COUNTER_CHECK_BOARDS boards (taken in key order from
a cursor all replicas share, wrapping around) and at most INBOX_COUNTER_CHECK_MAX_ITEMS items read;
a board larger than what is left of that budget is left for the recount tool
(`python -m services.inbox.recount`). Never a full scan: each board is one index range per folder.

Metrics (GET /metrics on inbox's own HTTP port, the kit's route, never routed by the gateway):
- inbox_counter_drift_repaired_total{folder}  boards whose counts of that folder were repaired
  (label counts as folder="label");
- inbox_counter_check_boards_total{outcome}    boards looked at: ok, repaired, drifting (seen,
  not yet confirmed), busy, too_big;
- inbox_counter_check_items_read_total, inbox_counter_check_last_pass_seconds (gauge) and
  inbox_counter_check_pass_seconds (histogram).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from pymongo.errors import PyMongoError

from services.inbox import domain
from services.inbox.components import Feature
from services.inbox.fanout import Fanout
from services.kit.errors import DomainError
from services.kit.metrics import metrics_blueprint
from services.kit.mongo import now_ms
from services.kit.runtime import every

log = logging.getLogger(__name__)

STATE = "counter_check"  # one document: the shared cursor of the boards' turn
CURSOR_ID = "cursor"
ORPHAN_TOKEN_MS = 3_600_000  # a pass token this old belongs to no running pass: dropped when seen
MAX_SUSPECTS = 1000
LABEL = "label"

REPAIRED = Counter(
    "inbox_counter_drift_repaired",
    "Boards whose maintained counts of a folder differed from a recount of their items and were repaired",
    ["folder"],
)
BOARDS = Counter("inbox_counter_check_boards", "Boards the counter drift check looked at, by outcome", ["outcome"])
ITEMS_READ = Counter("inbox_counter_check_items_read", "Board items the counter drift check read")
LAST_PASS = Gauge("inbox_counter_check_last_pass_seconds", "How long the last counter drift check pass took")
PASS_SECONDS = Histogram(
    "inbox_counter_check_pass_seconds",
    "How long counter drift check passes take",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def folder_of(field_name: str) -> str:
    """The metric label of a counter field: its folder, or "label" for a label's counts."""
    kind, _, rest = field_name.partition("_")
    if kind in ("l", "lt"):
        return LABEL
    return rest if rest in domain.FOLDERS else "other"


@dataclass(frozen=True)
class Suspect:
    """A drift seen once: repaired when seen again the same, with the same `seq`, after a while."""

    drift: dict[str, int]
    seq: int | None
    since: float


@dataclass
class PassReport:
    boards: int = 0
    items_read: int = 0
    repaired: int = 0
    drifting: int = 0
    busy: int = 0
    too_big: int = 0
    seconds: float = 0.0


class CounterCheck(Feature):
    """The drift check's worker; its metrics are served by the kit's /metrics route."""

    def __init__(self, components, *, clock: Callable[[], float] = time.monotonic):
        super().__init__(components)
        settings = components.settings
        self.store = components.store
        self.board = components.board
        self.interval_s = settings.counter_check_interval_s
        self.boards_per_pass = settings.counter_check_boards
        self.max_items = settings.counter_check_max_items
        self.confirm_s = settings.counter_check_confirm_s
        self.clock = clock
        self.suspects: dict[str, Suspect] = {}
        self.state = components.store.db[STATE]
        self.stop = threading.Event()  # set: a pass in progress ends after the board in hand

    def blueprint(self):
        """The metrics route, for an app without one (every kit app has it: services.kit.http)."""
        return metrics_blueprint("inbox_metrics")

    def background(self):
        return [("counter-check", self.run)] if self.interval_s > 0 else []

    def run(self, stop: threading.Event) -> None:
        self.stop = stop
        every(stop, self.interval_s, self.check_pass, "counter check", errors=(PyMongoError, DomainError))

    # --- one pass -------------------------------------------------------------------------------
    def check_pass(self) -> PassReport:
        started = time.perf_counter()
        report = PassReport()
        hold = self.repairs_pending()
        turn = self.next_boards(self.boards_per_pass)
        owners = list(dict.fromkeys([*self.suspects, *turn]))
        budget = self.max_items
        last = None
        for owner in owners:
            if budget <= 0 or self.stop.is_set():
                break
            outcome, read = self.check_board(owner, budget, hold=hold)
            budget -= read
            last = owner if owner in turn else last
            report.boards += 1
            report.items_read += read
            if outcome != "ok":
                setattr(report, outcome, getattr(report, outcome) + 1)
            BOARDS.labels(outcome).inc()
        if last is not None:  # the next pass goes on after the last board of the turn this one reached
            self.state.update_one({"_id": {"$eq": CURSOR_ID}}, {"$set": {"after": last}}, upsert=True)
        ITEMS_READ.inc(report.items_read)
        report.seconds = time.perf_counter() - started
        LAST_PASS.set(report.seconds)
        PASS_SECONDS.observe(report.seconds)
        log.info(
            "counter check pass",
            extra={"count": report.boards, "batch": report.items_read, "duration_ms": round(report.seconds * 1000, 1)},
        )
        return report

    def next_boards(self, limit: int) -> list[str]:
        """The next `limit` boards after the shared cursor, wrapping around to the first ones.
        Replicas taking the same turn at once check a board twice, which is harmless."""
        state = self.state.find_one({"_id": {"$eq": CURSOR_ID}}) or {}
        after = state.get("after", "")
        owners = self.store.counter_owners(after, limit)
        if len(owners) < limit and after:
            owners += [o for o in self.store.counter_owners("", limit - len(owners)) if o not in owners]
        return owners

    def repairs_pending(self) -> bool:
        """Whether a counting fan-out pass has been pending longer than a repair waits: it may
        still count, so no drift is repaired this pass."""
        fanouts = [self.components.mailbox.fanout]
        fanouts += [getattr(feature, "fanout", None) for feature in self.components.features]
        return any(isinstance(f, Fanout) and f.counters is not None and f.stalled() for f in fanouts)

    # --- one board ------------------------------------------------------------------------------
    def check_board(self, owner: str, budget: int, *, hold: bool = False) -> tuple[str, int]:
        """(outcome, items read) for one board: ok, repaired, drifting, busy or too_big."""
        agency_id, _, staff_id = owner.partition("|")
        observed = self.board.observe(agency_id, staff_id, max_items=budget)
        if observed.recounted is None:
            return "too_big", observed.items_read
        if observed.busy:
            self.suspects.pop(owner, None)
            return "busy", observed.items_read
        self._drop_orphan_tokens(owner, observed.tokens)
        drift = observed.drift
        if not drift:
            self.suspects.pop(owner, None)
            return "ok", observed.items_read
        now = self.clock()
        seen = self.suspects.get(owner)
        if seen is None or seen.drift != drift or seen.seq != observed.seq:
            if seen is not None or len(self.suspects) < MAX_SUSPECTS:
                self.suspects[owner] = Suspect(drift, observed.seq, now)
            return "drifting", observed.items_read
        if now - seen.since < self.confirm_s or hold:
            return "drifting", observed.items_read
        del self.suspects[owner]
        if not self.store.correct_counters(owner, observed.seq, {k: -v for k, v in drift.items()}):
            return "busy", observed.items_read
        folders = sorted({folder_of(name) for name in drift})
        for folder in folders:
            REPAIRED.labels(folder).inc()
        log.warning(
            "board counters repaired",
            extra={
                "agency_id": agency_id,
                "staff_id": staff_id,
                "folder": ",".join(folders),
                "count": sum(abs(v) for v in drift.values()),
            },
        )
        return "repaired", observed.items_read

    def _drop_orphan_tokens(self, owner: str, tokens: dict[str, int]) -> None:
        """Tokens no sweep will remove (a pass rewritten before it was released) are dropped once
        old enough that no attempt of their pass can still run."""
        stale = [name for name, at in tokens.items() if at <= now_ms() - ORPHAN_TOKEN_MS]
        if stale:
            self.store.sweep_tokens({owner: stale})
