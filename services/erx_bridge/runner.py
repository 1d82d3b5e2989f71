"""Syncs as jobs: started by a request (POST /api/v1/erx/sync) or by the scheduler, run on this
process's bounded thread pools, their progress in `erx_syncs`.

A sync is one document (`sync_…`): who asked, the scope (one prescriber, or the whole agency), the
status (running -> done | failed), prescribers_total / prescribers_done and the sums of what their
syncs did (added, updated, resolved, skipped), and one error per prescriber that failed
(`errors.<staff id>`: code and a message safe to show). Starting one:

1. claims the slot `<agency>|<scope>|<staff or *>` (`erx_sync_slots`): asking again while the same
   sync runs answers that sync's id, so a double click or two replicas' schedulers never start a
   second one;
2. a planning task (acting as the agency's service identity) checks the agency's subscription
   and that its practice is the one directory names, lists the prescribers (one for a
   prescriber's own sync, directory's ListStaff(eprescribing_only) for the agency), and queues one
   task per prescriber;
3. each prescriber task runs the engine (sync.py) and adds its outcome to the document in one
   `$inc`; the task that brings prescribers_done to the total finishes the sync: "done", or
   "failed" when setting up failed or every prescriber failed.

Two pools: a prescriber's own syncs go to a small pool of their own, so a staff member pressing
"eRx Sync" does not wait behind the agency-wide scheduled sync of 200 prescribers.
A sync whose process died shows as failed (`sync_interrupted`) once its progress has not moved
for `stale_sync_s`.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pymongo.errors import PyMongoError

from services.erx_bridge.directory_client import Prescriber
from services.erx_bridge.store import ErxStore, new_sync_id
from services.erx_bridge.sync import Outcome, SyncEngine, SyncError, SyncTarget
from services.erx_bridge.vendors.base import PracticeCredentials, VendorAdapter
from services.kit.errors import DomainError, Unavailable
from services.kit.events import failure_summary
from services.kit.mongo import now_ms
from services.kit.service_identity import acting_as

log = logging.getLogger(__name__)

SCOPE_SELF, SCOPE_AGENCY = "self", "agency"
SCHEDULER = "scheduler"
RUNNING, DONE, FAILED = "running", "done", "failed"
MAX_ERRORS_SHOWN = 200


@dataclass(frozen=True)
class RunnerSettings:
    public_url: str
    sync_workers: int = 4
    max_active_syncs: int = 64
    lease_wait_s: float = 10.0
    stale_sync_s: float = 600.0


def iso_ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def jittered(seconds: float, spread: float = 0.2, rand: Callable[[], float] = random.random) -> float:
    """`seconds` +- `spread` (20%), so replicas and agencies do not all sync in the same second."""
    return seconds * (1.0 - spread + 2.0 * spread * rand())


class SyncRunner:
    def __init__(
        self,
        store: ErxStore,
        engine: SyncEngine,
        *,
        directory,
        service_tokens,
        practices: dict[str, PracticeCredentials],
        adapter_for: Callable[[str], VendorAdapter],
        settings: RunnerSettings,
    ):
        self.store = store
        self.engine = engine
        self.directory = directory
        self.service_tokens = service_tokens
        self.practices = practices
        self.adapter_for = adapter_for
        self.settings = settings
        own_workers = max(1, min(4, settings.sync_workers // 2 or 1))
        self._bulk = ThreadPoolExecutor(max_workers=settings.sync_workers, thread_name_prefix="erx-sync")
        self._own = ThreadPoolExecutor(max_workers=own_workers, thread_name_prefix="erx-sync-own")
        self._active: dict[str, str] = {}  # sync id -> slot, for the syncs this process runs
        self._lock = threading.Lock()
        self._stopped = False

    # --- starting --------------------------------------------------------------------------------
    def start(
        self,
        agency_id: str,
        *,
        requested_by: str,
        scope: str,
        prescriber: Prescriber | None = None,
        full: bool = False,
    ) -> tuple[str, bool]:
        """(sync id, started now); the running sync's id (False) when the same one runs already.
        503 `sync_busy` when this process runs `max_active_syncs` already."""
        if scope == SCOPE_SELF and prescriber is None:
            raise ValueError("a prescriber's own sync names the prescriber")
        slot = f"{agency_id}|{scope}|{prescriber.staff_id if prescriber else '*'}"
        sync_id = new_sync_id()
        with self._lock:
            if self._stopped:
                raise Unavailable("stopping", "the service is stopping; try again")
            if len(self._active) >= self.settings.max_active_syncs:
                raise Unavailable("sync_busy", "too many syncs are running; try again shortly")
            until = now_ms() + int(self.settings.stale_sync_s * 1000)
            running = self.store.claim_slot(slot, sync_id, until)
            if running is not None:
                return running, False
            self._active[sync_id] = slot
        try:
            self._queue(sync_id, agency_id, requested_by=requested_by, scope=scope, prescriber=prescriber, full=full)
        except BaseException:
            with self._lock:
                self._active.pop(sync_id, None)
            self.store.free_slot(slot, sync_id)
            raise
        log.info("sync started", extra={"agency_id": agency_id, "item_id": sync_id, "route": scope})
        return sync_id, True

    def _queue(
        self, sync_id: str, agency_id: str, *, requested_by: str, scope: str, prescriber: Prescriber | None, full: bool
    ) -> None:
        now = now_ms()
        self.store.insert_sync(
            {
                "_id": sync_id,
                "agency_id": agency_id,
                "requested_by": requested_by,
                "scope": scope,
                "full": int(full),
                "status": RUNNING,
                "prescribers_total": 1 if prescriber else 0,
                "prescribers_done": 0,
                "failed": 0,
                "added": 0,
                "updated": 0,
                "resolved": 0,
                "skipped": 0,
                "errors": {},
                "started_at": now,
                "heartbeat_at": now,
            }
        )
        pool = self._own if scope == SCOPE_SELF else self._bulk
        pool.submit(self._guarded, sync_id, self._plan, sync_id, agency_id, scope, prescriber, full)

    def _guarded(self, sync_id: str, task: Callable, *args) -> None:
        """A pool task: whatever goes wrong ends in the sync's progress, never in a silent thread."""
        try:
            task(*args)
        except Exception as exc:  # noqa: BLE001 - recorded on the sync, which then fails
            log.warning("sync task failed (%s)", failure_summary(exc), extra={"item_id": sync_id})
            try:
                self._fail(sync_id, "setup", SyncError("internal_error", "the sync could not run; try again"))
            except PyMongoError:
                pass

    # --- planning --------------------------------------------------------------------------------
    def _plan(self, sync_id: str, agency_id: str, scope: str, prescriber: Prescriber | None, full: bool) -> None:
        try:
            with acting_as(self.service_tokens.identity(agency_id)):
                target = self.target(agency_id, full=full, manual=scope == SCOPE_SELF)
                prescribers = [prescriber] if prescriber else self.directory.prescribers(agency_id)
        except SetupError as exc:
            self._fail(sync_id, "setup", exc.error)
            return
        except DomainError as exc:
            self._fail(sync_id, "setup", SyncError("directory_unavailable", f"directory: {exc.code}"))
            return
        if not prescribers:
            self.store.update_sync(sync_id, {"$set": {"prescribers_total": 0, "heartbeat_at": now_ms()}})
            self._finish(sync_id, DONE)
            return
        self.store.update_sync(sync_id, {"$set": {"prescribers_total": len(prescribers), "heartbeat_at": now_ms()}})
        pool = self._own if scope == SCOPE_SELF else self._bulk
        for one in prescribers:
            pool.submit(self._guarded, sync_id, self._sync_one, sync_id, target, one)

    def target(self, agency_id: str, *, full: bool = False, manual: bool = False) -> SyncTarget:
        """The agency's practice and adapter, checked against directory (run with an identity of
        the agency); SetupError when the agency cannot be synced."""
        practice = self.practices.get(agency_id)
        if practice is None:
            raise SetupError(SyncError("erx_not_configured", "no ePrescribing practice is configured for this agency"))
        agency = self.directory.agency(agency_id)
        if not agency.subscribed:
            raise SetupError(SyncError("erx_not_subscribed", "the agency does not subscribe to ePrescribing"))
        if (agency.vendor and agency.vendor.lower() != practice.vendor.lower()) or (
            agency.clinic_id and agency.clinic_id != practice.clinic_id
        ):
            raise SetupError(
                SyncError("practice_mismatch", "the configured practice is not the one directory names for the agency")
            )
        return SyncTarget(
            agency=agency,
            practice=practice,
            adapter=self.adapter_for(practice.vendor),
            public_url=self.settings.public_url,
            full=full,
            lease_wait_s=self.settings.lease_wait_s if manual else 0.0,
        )

    # --- one prescriber --------------------------------------------------------------------------
    def _sync_one(self, sync_id: str, target: SyncTarget, prescriber: Prescriber) -> None:
        try:
            outcome = self.engine.sync_prescriber(target, prescriber)
        except Exception as exc:  # noqa: BLE001 - one prescriber's failure is theirs, not the sync's
            log.warning("prescriber sync failed (%s)", failure_summary(exc), extra={"staff_id": prescriber.staff_id})
            outcome = Outcome(error=SyncError("internal_error", "this prescriber could not be synced"))
        self._record(sync_id, prescriber.staff_id, outcome)

    def _record(self, sync_id: str, staff_id: str, outcome: Outcome) -> None:
        update: dict = {
            "$inc": {
                "prescribers_done": 1,
                "added": outcome.added,
                "updated": outcome.updated,
                "resolved": outcome.resolved,
                "skipped": int(outcome.skipped),
                "failed": int(outcome.error is not None),
            },
            "$set": {"heartbeat_at": now_ms()},
        }
        if outcome.error is not None:
            update["$set"][f"errors.{staff_id}"] = {"code": outcome.error.code, "message": outcome.error.message}
        doc = self.store.update_sync(sync_id, update)
        if doc is not None and doc["prescribers_done"] >= doc["prescribers_total"]:
            failed_all = doc["failed"] >= doc["prescribers_total"] > 0
            self._finish(sync_id, FAILED if failed_all else DONE)

    # --- finishing -------------------------------------------------------------------------------
    def _fail(self, sync_id: str, key: str, error: SyncError) -> None:
        entry = {"code": error.code, "message": error.message}
        self.store.update_sync(sync_id, {"$set": {f"errors.{key}": entry, "heartbeat_at": now_ms()}})
        self._finish(sync_id, FAILED)

    def _finish(self, sync_id: str, status: str) -> None:
        if self.store.finish_sync(sync_id, status):
            doc = self.store.sync(sync_id) or {}
            extra = {"agency_id": doc.get("agency_id"), "item_id": sync_id, "status": status, "count": doc.get("added")}
            log.info("sync finished", extra=extra)
        with self._lock:
            slot = self._active.pop(sync_id, None)
        if slot is not None:
            self.store.free_slot(slot, sync_id)

    # --- reading ---------------------------------------------------------------------------------
    def progress(self, doc: dict) -> dict:
        """A sync as the API shows it; a running one whose progress stopped moving is failed."""
        if doc["status"] == RUNNING and doc.get("heartbeat_at", 0) < now_ms() - int(self.settings.stale_sync_s * 1000):
            entry = {"code": "sync_interrupted", "message": "the sync stopped before it finished"}
            self.store.update_sync(doc["_id"], {"$set": {"errors.setup": entry}})
            self.store.finish_sync(doc["_id"], FAILED)
            doc = self.store.sync(doc["_id"]) or doc
        errors = [
            {"code": e.get("code", ""), "message": e.get("message", ""), **({"staff_id": k} if k != "setup" else {})}
            for k, e in (doc.get("errors") or {}).items()
            if isinstance(e, dict)
        ][:MAX_ERRORS_SHOWN]
        return {
            "sync_id": doc["_id"],
            "status": doc["status"],
            "scope": doc.get("scope", SCOPE_SELF),
            "prescribers_done": int(doc.get("prescribers_done", 0)),
            "prescribers_total": int(doc.get("prescribers_total", 0)),
            "added": int(doc.get("added", 0)),
            "updated": int(doc.get("updated", 0)),
            "resolved": int(doc.get("resolved", 0)),
            "skipped": int(doc.get("skipped", 0)),
            "errors": errors,
            "started_at": iso_ms(doc.get("started_at")),
            "finished_at": iso_ms(doc.get("finished_at")),
        }

    # --- the process -----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """The runner as a background worker: the pools work until the process stops; then the
        engine's waits end, queued tasks are dropped and this process's running syncs are failed
        (`sync_interrupted`)."""
        stop.wait()
        self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
        self.engine.stop_event.set()
        for pool in (self._own, self._bulk):
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left = list(self._active)
        for sync_id in left:
            try:
                self._fail(sync_id, "setup", SyncError("sync_interrupted", "the service stopped before it finished"))
            except PyMongoError:
                pass

    def idle(self) -> bool:
        with self._lock:
            return not self._active


class SetupError(Exception):
    def __init__(self, error: SyncError):
        super().__init__(error.code)
        self.error = error


class Scheduler:
    """Every configured agency synced every `interval_s` (+-20%), by one replica at a time: each
    agency's `erx_schedule` document says when its next sync is due, and the replica whose
    `find_one_and_update` moves it on starts the sync."""

    def __init__(
        self, store: ErxStore, runner: SyncRunner, agencies: list[str], *, interval_s: float, first_delay_s: float
    ):
        self.store = store
        self.runner = runner
        self.agencies = agencies
        self.interval_s = interval_s
        self.first_delay_s = min(first_delay_s, interval_s)
        self.poll_s = max(0.2, min(5.0, interval_s / 10))

    def run_once(self) -> list[str]:
        """One look at every agency's schedule; the ids of the syncs it started."""
        started = []
        for agency_id in self.agencies:
            now = now_ms()
            next_at = now + int(jittered(self.interval_s) * 1000)
            first_at = now + int(jittered(self.first_delay_s) * 1000)
            try:
                if not self.store.claim_schedule(agency_id, next_at, first_at):
                    continue
                sync_id, created = self.runner.start(agency_id, requested_by=SCHEDULER, scope=SCOPE_AGENCY)
            except (PyMongoError, DomainError) as exc:
                log.warning("scheduled sync not started (%s)", failure_summary(exc), extra={"agency_id": agency_id})
                continue
            if created:
                started.append(sync_id)
        return started

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            self.run_once()
