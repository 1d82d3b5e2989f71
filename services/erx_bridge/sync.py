"""The sync engine: one prescriber's items at the vendor brought onto their board.

Per prescriber (`SyncEngine.sync_prescriber`):

1. The prescriber's lease (`erx_prescribers`, `find_one_and_update` guarded by `lease_until < now`,
   or the insert of their first document): never two syncs of one prescriber at once, across
   replicas. Another sync holding it: a manual sync waits up to `lease_wait_s`, then skips.
2. `adapter.counts()`: one vendor call. Compared with the counts stored at the last sync, only the
   kinds whose count changed are fetched with `adapter.items()`. Every `full_check_every`-th sync
   of a prescriber (and a sync asked with `full`) also fetches every kind with open items, since a
   count can stay the same while one item goes and another comes, or an item's content changes.
3. Each fetched kind is compared with the prescriber's open items of that kind (`erx_items`):
   new -> stored and delivered; changed content (keyed digest) -> updated and delivered again
   (`mark_unread`); gone at the vendor -> resolved (delivered with `resolved`: kept on the board,
   read, out of the counts). Each item is one document whose write also stages its delivery event
   (kit outbox), so a crash between the two cannot lose or double a delivery.
4. The counts of the kinds fetched (and of those unchanged) are stored as the lease is released.

Vendor failures: `VendorUnavailable` (timeouts, 5xx, 429 with its Retry-After, an open circuit,
an unreadable answer) is retried within the sync, `vendor_attempts` times in all, waiting
`resilience.backoff_s(attempt, retry_after_s)` between attempts (a wait longer than
`max_backoff_s` ends the attempts at once); then the error is recorded and the prescriber's items
stay as they were: nothing is resolved or changed on the strength of a failed or unreadable
answer, and the counts of the kinds not fetched are not stored, so the next sync asks again.
`VendorRejected` is recorded without a retry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from services.erx_bridge import domain
from services.erx_bridge.delivery import delivery_request, delivery_requested
from services.erx_bridge.directory_client import AgencyErx, Prescriber
from services.erx_bridge.resilience import backoff_s
from services.erx_bridge.store import ErxStore
from services.erx_bridge.vendors.base import (
    KINDS,
    PracticeCredentials,
    VendorAdapter,
    VendorError,
    VendorMalformed,
    VendorRejected,
    VendorUnavailable,
)
from services.kit.crypto import PhiCipher
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields, with_outbox

log = logging.getLogger(__name__)

STATE_OPEN, STATE_RESOLVED = "open", "resolved"
LEASE_POLL_S = 0.25


class SyncStopped(Exception):
    """The process is stopping: the sync gives up where it is (nothing half-written)."""


@dataclass(frozen=True)
class SyncError:
    code: str
    message: str  # safe to show and log: no PHI, no secret


def error_of(exc: VendorError) -> SyncError:
    if isinstance(exc, VendorRejected):
        return SyncError("vendor_rejected", str(exc))
    if isinstance(exc, VendorMalformed):
        return SyncError("vendor_malformed", str(exc))
    return SyncError("vendor_unavailable", str(exc))


@dataclass
class Outcome:
    """What one prescriber's sync did."""

    added: int = 0
    updated: int = 0
    resolved: int = 0
    unchanged: int = 0
    vendor_calls: int = 0
    kinds_fetched: list[str] = field(default_factory=list)
    skipped: bool = False  # another sync held the prescriber
    error: SyncError | None = None


@dataclass(frozen=True)
class SyncTarget:
    """Where one sync reads and what its boards say: the agency, its practice and its adapter."""

    agency: AgencyErx
    practice: PracticeCredentials
    adapter: VendorAdapter
    public_url: str
    full: bool = False
    lease_wait_s: float = 0.0


@dataclass(frozen=True)
class EngineSettings:
    vendor_attempts: int = 3
    max_backoff_s: float = 30.0
    full_check_every: int = 12
    lease_s: float = 120.0


class _Lease:
    """One prescriber's lease, renewed when half of it has passed."""

    def __init__(self, store: ErxStore, key: str, holder: str, lease_s: float):
        self.store, self.key, self.holder = store, key, holder
        self.lease_ms = int(lease_s * 1000)
        self.renewed = time.monotonic()

    def keep(self) -> None:
        if time.monotonic() - self.renewed > self.lease_ms / 2000:
            self.store.renew_lease(self.key, self.holder, self.lease_ms)
            self.renewed = time.monotonic()


@dataclass
class _Run:
    """One prescriber's sync under way."""

    target: SyncTarget
    prescriber: Prescriber
    lease: _Lease
    outcome: Outcome


class SyncEngine:
    def __init__(
        self,
        store: ErxStore,
        cipher: PhiCipher,
        settings: EngineSettings,
        stop_event: threading.Event | None = None,
        *,
        backoff: Callable[[int, float | None], float] = backoff_s,
    ):
        self.store = store
        self.cipher = cipher
        self.settings = settings
        self.stop_event = stop_event or threading.Event()
        self.backoff = backoff

    # --- one prescriber ------------------------------------------------------------------------
    def sync_prescriber(self, target: SyncTarget, prescriber: Prescriber) -> Outcome:
        outcome = Outcome()
        if not prescriber.clinician_id:
            outcome.error = SyncError("no_clinician_id", "directory has no ePrescribing clinician id for them")
            return outcome
        key = domain.prescriber_key(prescriber.agency_id, prescriber.staff_id)
        holder = uuid.uuid4().hex
        doc = self._take_lease(key, holder, prescriber, target.lease_wait_s)
        if doc is None:
            outcome.skipped = True
            return outcome
        run = _Run(target, prescriber, _Lease(self.store, key, holder, self.settings.lease_s), outcome)
        release: dict = {"$set": {"last_synced_at": now_ms()}, "$inc": {"syncs": 1}}
        try:
            self._sync_leased(run, doc, release)
        except VendorError as exc:
            outcome.error = error_of(exc)
        except SyncStopped:
            outcome.error = SyncError("sync_interrupted", "the service stopped during the sync")
        finally:
            if outcome.error is not None:
                release["$set"]["last_error"] = outcome.error.code
            else:
                release.setdefault("$unset", {})["last_error"] = ""
            self.store.release_lease(key, holder, release)
        if outcome.error is not None:
            log.warning(
                "prescriber sync failed",
                extra={"agency_id": prescriber.agency_id, "staff_id": prescriber.staff_id, "code": outcome.error.code},
            )
        return outcome

    def _take_lease(self, key: str, holder: str, prescriber: Prescriber, wait_s: float) -> dict | None:
        fields = {"agency_id": prescriber.agency_id, "staff_id": prescriber.staff_id}
        lease_ms = int(self.settings.lease_s * 1000)
        deadline = time.monotonic() + wait_s
        while True:
            doc = self.store.take_lease(key, holder, lease_ms, fields)
            if doc is not None or time.monotonic() >= deadline:
                return doc
            if self.stop_event.wait(LEASE_POLL_S):
                return None

    def _sync_leased(self, run: _Run, doc: dict, release: dict) -> None:
        target, prescriber, outcome = run.target, run.prescriber, run.outcome
        practice, adapter, clinician = target.practice, target.adapter, prescriber.clinician_id
        counts = domain.counts_map(self._call(run, lambda: adapter.counts(practice, clinician)))
        last = doc.get("counts")
        last = {k: int(v) for k, v in last.items()} if isinstance(last, dict) else None
        since_full = int(doc.get("since_full") or 0) + 1
        # The first sync fetches every kind with anything open: it is a full check too.
        full = target.full or last is None or since_full >= self.settings.full_check_every

        # Open items stored here that the counts cannot show (first sync, or a kind never fetched):
        # looked for only where the vendor counts none, so a resolved-everything kind is noticed.
        def probe(kind: str) -> bool:
            first = last is None or kind not in last
            return counts[kind] == 0 and not (last or {}).get(kind) and (full or first)

        agency_id, staff_id = prescriber.agency_id, prescriber.staff_id
        held = [k for k in KINDS if probe(k) and self.store.holds_open(domain.open_key(agency_id, staff_id, k))]
        wanted = domain.kinds_to_fetch(counts, last, full=full, holds_open=held)
        stored_counts = {k: counts[k] for k in KINDS if k not in wanted}
        try:
            for kind in wanted:
                fetched = self._call(run, lambda kind=kind: adapter.items(practice, clinician, kind))
                stored_counts[kind] = self._apply(run, kind, fetched)
                outcome.kinds_fetched.append(kind)
        finally:
            complete = len(outcome.kinds_fetched) == len(wanted)
            release["$set"].update({f"counts.{k}": v for k, v in stored_counts.items()})
            release["$set"]["since_full"] = 0 if (full and complete) else since_full

    def _call(self, run: _Run, call: Callable):
        """One vendor request, with the retries and waits the module docstring describes."""
        attempts = max(1, self.settings.vendor_attempts)
        for attempt in range(1, attempts + 1):
            if self.stop_event.is_set():
                raise SyncStopped()
            run.lease.keep()
            run.outcome.vendor_calls += 1
            try:
                return call()
            except VendorRejected:
                raise
            except VendorUnavailable as exc:
                if attempt == attempts:
                    raise
                wait = self.backoff(attempt, exc.retry_after_s)
                if wait > self.settings.max_backoff_s:
                    raise
                if self.stop_event.wait(wait):
                    raise SyncStopped() from exc
        raise AssertionError("unreachable")

    # --- one kind's items ----------------------------------------------------------------------
    def _apply(self, run: _Run, kind: str, fetched: list) -> int:
        """Bring the prescriber's stored items of `kind` in line with `fetched`; returns how many
        are open now."""
        target, prescriber, outcome, lease = run.target, run.prescriber, run.outcome, run.lease
        agency_id, staff_id = prescriber.agency_id, prescriber.staff_id
        stored = {doc["_id"]: doc for doc in self.store.open_items(domain.open_key(agency_id, staff_id, kind))}
        digests = {iid: doc.get("digest", "") for iid, doc in stored.items()}
        plan = domain.plan_kind(
            agency_id,
            target.practice.vendor,
            kind,
            fetched=fetched,
            stored=digests,
            digest_of=lambda iid, content: self._digest(agency_id, stored[iid]["item"], content),
        )
        outcome.unchanged += plan.unchanged
        for iid, content in plan.new:
            lease.keep()
            if self._insert(target, prescriber, iid, content):
                outcome.added += 1
            elif self._replace(target, prescriber, iid, content, self.store.item(iid)):
                outcome.added += 1
        for iid, content in plan.changed:
            lease.keep()
            if self._replace(target, prescriber, iid, content, stored[iid]):
                outcome.updated += 1
        for iid in plan.gone:
            lease.keep()
            if self._resolve(target, stored[iid]):
                outcome.resolved += 1
        return len(plan.new) + len(plan.changed) + plan.unchanged

    def _seal(self, agency_id: str, iid: str, content: dict) -> tuple[bytes, str]:
        sealed = self.cipher.seal(agency_id, iid, "item", domain.canonical(content))
        return sealed, self._digest(agency_id, sealed, content)

    def _digest(self, agency_id: str, sealed: bytes, content: dict) -> str:
        """The content's digest under the data key that sealed `sealed` (its id is in the blob)."""
        blob = bytes(sealed)
        key_id = blob[2 : 2 + blob[1]].decode()
        return domain.content_digest(self.cipher.keyring.key(key_id), content)

    def _open(self, doc: dict) -> dict:
        return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "item", doc["item"]))

    def _event(self, target: SyncTarget, iid: str, version: int, staff_id: str, content: dict, **flags):
        request = delivery_request(
            iid=iid,
            version=version,
            staff_id=staff_id,
            content=content,
            patient_word=target.agency.patient_word,
            time_zone=target.agency.time_zone,
            public_url=target.public_url,
            **flags,
        )
        return delivery_requested(target.agency.agency_id, request)

    def _open_fields(self, agency_id: str, staff_id: str, kind: str) -> dict:
        return {
            "staff_id": staff_id,
            "kind": kind,
            "state": STATE_OPEN,
            "open_key": domain.open_key(agency_id, staff_id, kind),
            "agency_open": domain.agency_open_key(agency_id, kind),
        }

    def _insert(self, target: SyncTarget, prescriber: Prescriber, iid: str, content: dict) -> bool:
        agency_id = prescriber.agency_id
        sealed, digest = self._seal(agency_id, iid, content)
        now = now_ms()
        event = self._event(target, iid, 1, prescriber.staff_id, content)
        doc = {
            "_id": iid,
            "agency_id": agency_id,
            "vendor": target.practice.vendor,
            **self._open_fields(agency_id, prescriber.staff_id, content["kind"]),
            "item": sealed,
            "digest": digest,
            "version": 1,
            "first_seen_at": now,
            "updated_at": now,
            **outbox_fields([event]),
        }
        return self.store.insert_item(doc)

    def _replace(self, target: SyncTarget, prescriber: Prescriber, iid: str, content: dict, doc: dict | None) -> bool:
        """New content for a stored item (changed, resolved earlier and back, or now listed under
        this prescriber): a new version, delivered unread again. One retry when it changed meanwhile."""
        agency_id = prescriber.agency_id
        for _ in range(2):
            if doc is None:
                return False
            same_place = doc.get("state") == STATE_OPEN and doc.get("staff_id") == prescriber.staff_id
            if same_place and doc.get("digest") == self._digest(agency_id, doc["item"], content):
                return False
            version = int(doc.get("version") or 0) + 1
            sealed, digest = self._seal(agency_id, iid, content)
            event = self._event(target, iid, version, prescriber.staff_id, content, mark_unread=True)
            update = {
                "$set": {
                    **self._open_fields(agency_id, prescriber.staff_id, content["kind"]),
                    "item": sealed,
                    "digest": digest,
                    "version": version,
                    "updated_at": now_ms(),
                },
                "$unset": {"resolved_at": ""},
            }
            if self.store.update_item(iid, int(doc.get("version") or 0), with_outbox(update, [event])):
                return True
            doc = self.store.item(iid)
        return False

    def _resolve(self, target: SyncTarget, doc: dict) -> bool:
        """An item the vendor no longer lists: resolved on the board (kept, read, out of the counts)."""
        content = self._open(doc)
        version = int(doc.get("version") or 0) + 1
        event = self._event(target, doc["_id"], version, doc["staff_id"], content, resolved=True)
        now = now_ms()
        update = {
            "$set": {"state": STATE_RESOLVED, "version": version, "resolved_at": now, "updated_at": now},
            "$unset": {"open_key": "", "agency_open": ""},
        }
        return self.store.update_item(doc["_id"], int(doc.get("version") or 0), with_outbox(update, [event]))
