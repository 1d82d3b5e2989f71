"""Transactional outbox without multi-document transactions.

A state change and the events announcing it are written in ONE document write: the events ride
in the changed document itself, as serialized envelopes in a map keyed by event id.

    {
      ...the document's own fields...,
      "_outbox": {"<event_id>": {"rk": "<routing key>", "env": <Envelope bytes>}, ...},
      "_outbox_seq": 7,          # +1 with every write that stages events
      "_outbox_at": 1767225600000,  # epoch ms: publish from then on (absent = nothing to publish)
      "_outbox_tries": 2,        # failed relay attempts since the last full publish (absent = 0)
    }

Producers merge `outbox_fields(...)` into an insert or `with_outbox(update, ...)` into an update
(`outbox_update(...)` is the bare part). `OutboxRelay` finds documents whose `_outbox_at` is due
(indexed), publishes their events with pipelined publisher confirms, then removes the confirmed
entries.

Why nothing is lost, on nx-27017 and on a MongoDB replica set alike:

- A single-document write is atomic on both (nx-27017 runs every command under a per-database
  lock, so an update's read-modify-write of the stored row cannot interleave with another), so
  the change and its events are committed together or not at all. No multi-document transaction
  is needed, and on a replica set a rolled-back write rolls back both.
- The relay removes entries only after the broker confirmed them (persistent messages: the broker
  has taken responsibility): one by one by event id (`$unset _outbox.<event_id>`), which can never
  touch an entry staged later, or, for a fully confirmed document, the whole map together with
  `_outbox_at` in an update conditional on `_outbox_seq` (next point).
- `_outbox_at` is cleared only by an update conditional on the `_outbox_seq` value the relay
  read. Every staging write increments `_outbox_seq` in the same atomic write that adds entries
  and sets `_outbox_at`, so an event staged while a pass is in flight makes that clear match
  nothing: the marker (and the new entry) stay and the next pass publishes the new event.
- A crash (or lost connection) anywhere between publish and cleanup leaves the entries in place;
  they are published again. Consumers deduplicate on event id, so that is a duplicate, never a loss.
- Several relays may run (one per replica): every write they make is idempotent or conditional,
  so the worst case is duplicates. A lease document (one holder per relay group) normally keeps a
  single relay active to avoid those duplicates; correctness never depends on it, so a paused
  holder whose lease lapsed only causes duplicates. Relays read from the primary (the default);
  on a replica set use `w="majority"` for the producers' writes so an acknowledged change (with
  its events) survives a failover.

Waking up: a relay idles between passes (`poll_interval_s`, 0.2 s), but a staging helper called
with due events (`outbox_fields`, `outbox_update`, `with_outbox` ready, `release_update`) also tells
every relay of its own process at once (a process-wide generation counter under a condition
variable), so an event staged here is looked for within milliseconds instead of at the next poll.
The helpers run before the producer's write, so a pass that follows a wake-up may come too early:
while this process staged something less than a poll interval ago, a pass that finds nothing is
retried after 2, 4, 8 ... ms (RECHECK_FIRST_S, doubling) up to the poll interval. Only when passes
run changes; the poll stays the fallback for documents staged by other processes, and the lease,
the `_outbox_seq` guards and the order of events are untouched. OUTBOX_RELAY_WAKE_UP=false (or
`wake=False`) turns it off: the relay then only polls, as before (for comparing the two in bench/).

Events of one document are published in the order they were staged; across documents, roughly
in `_outbox_at` order. Consumers must not rely on a total order.

The backlog is sampled by the relay every `backlog_sample_s` (15 s), holder of the lease or not,
into two gauges per collection (services.kit.metrics): the documents pending, counted by reading
up to OUTBOX_COUNT_CAP (1,000) of their ids from the `_outbox_at` index (never count_documents:
about a second on nx-27017), and the age of the oldest `_outbox_at` (one indexed limit(1) query). A
document retried after a failure is due again later, so its age restarts at its next attempt;
held events (no `_outbox_at`) are not pending.

Rules for producers: stage through these helpers only (event ids are map keys, so they must be
`[A-Za-z0-9_-]`, and every staging write must bump `_outbox_seq`); never replace, or delete and
re-create, a document that has pending events (its events would go with it, and a restarted
`_outbox_seq` would defeat the guard): mark it deleted and remove it once `_outbox_at` is gone;
keep each envelope small (it lives in the document until published).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Condition, Event
from typing import Protocol

import pymongo
import pymongo.errors
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import metrics
from services.kit.events import MalformedEvent, decode_envelope, failure_summary, is_valid_event_id
from services.kit.mongo import now_ms
from services.kit.settings import Env

__all__ = [
    "BatchPublishing",
    "OutboxRelay",
    "merge_update",
    "outbox_collections",
    "outbox_fields",
    "outbox_update",
    "release_update",
    "with_outbox",
]

logger = logging.getLogger(__name__)

OUTBOX = "_outbox"
OUTBOX_SEQ = "_outbox_seq"
OUTBOX_AT = "_outbox_at"
OUTBOX_TRIES = "_outbox_tries"
OUTBOX_FAILED = "_outbox_failed"
LEASES = "outbox_leases"
# A relay that stopped renewing (a killed process) is replaced by a waiting one within this plus
# LEASE_POLL_S; short, so events flow again within seconds of a replacement starting. A holder
# paused for longer than this only causes duplicates (consumers deduplicate), never a loss.
LEASE_TTL_S = 5.0
LEASE_POLL_S = 0.5
BACKLOG_SAMPLE_S = 15.0
# Waking up (module docstring): a pass that finds nothing right after this process staged something
# is retried after RECHECK_FIRST_S, doubling; an idle relay waits for a wake-up in slices of IDLE_SLICE_S
# and services its broker connection for SERVICE_S between them (heartbeats, a closed connection).
RECHECK_FIRST_S = 0.002
IDLE_SLICE_S = 0.1
SERVICE_S = 0.002


class _Staged:
    """What the staging helpers tell the relays of this process: a generation counter bumped by every
    staging of due events, and when that last happened (time.monotonic())."""

    def __init__(self) -> None:
        self._condition = Condition()
        self.generation = 0
        self.at = float("-inf")

    def notify(self) -> None:
        with self._condition:
            self.generation += 1
            self.at = time.monotonic()
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """The generation, once it differs from `seen` or `timeout` s have passed."""
        with self._condition:
            if self.generation == seen and timeout > 0:
                self._condition.wait(timeout)
            return self.generation


_staged = _Staged()


def _entry(envelope: Envelope) -> dict:
    if not is_valid_event_id(envelope.event_id):
        raise ValueError("event id must be 1-128 characters of [A-Za-z0-9_-]")
    if not envelope.event_type:
        raise ValueError("envelope has no event_type")
    return {"rk": envelope.event_type, "env": envelope.SerializeToString()}


def outbox_fields(envelopes: Iterable[Envelope], ready: bool = True, *, now: int | None = None) -> dict:
    """Fields to merge into a document being inserted, staging its events.

    `ready=False` holds the events (no `_outbox_at`) until `release_update()` is applied.
    """
    outbox = {envelope.event_id: _entry(envelope) for envelope in envelopes}
    fields: dict = {OUTBOX: outbox, OUTBOX_SEQ: 1}
    if ready and outbox:
        fields[OUTBOX_AT] = now_ms() if now is None else now
        _staged.notify()
    return fields


def outbox_update(envelopes: Iterable[Envelope], ready: bool = True, *, now: int | None = None) -> dict:
    """The update part that stages events on an existing document (or an upsert).

    `ready=False` adds them without making the document due; note that a document already due
    (earlier events still pending) publishes everything it holds.
    """
    to_set = {f"{OUTBOX}.{envelope.event_id}": _entry(envelope) for envelope in envelopes}
    if not to_set:
        return {}
    if ready:
        to_set[OUTBOX_AT] = now_ms() if now is None else now
        _staged.notify()
    return {"$set": to_set, "$inc": {OUTBOX_SEQ: 1}}


def outbox_collections(base: Iterable[str], features: Iterable) -> list[str]:
    """The collections a service's relay watches: its own, then each feature's `outbox_collections`
    not already named, in order."""
    names = list(dict.fromkeys(base))
    for feature in features:
        names += [name for name in feature.outbox_collections if name not in names]
    return names


def merge_update(update: Mapping, extra: Mapping) -> dict:
    """Merge two update documents operator by operator; ValueError if both touch one field."""
    merged = {operator: dict(fields) for operator, fields in update.items()}
    for operator, fields in extra.items():
        target = merged.setdefault(operator, {})
        for field, value in fields.items():
            if field in target:
                raise ValueError(f"both updates use {operator} on {field!r}")
            target[field] = value
    return merged


def with_outbox(update: Mapping, envelopes: Iterable[Envelope], ready: bool = True) -> dict:
    """`update` plus the staging of `envelopes`, for one atomic update_one/find_one_and_update."""
    return merge_update(update, outbox_update(envelopes, ready))


def release_update(now: int | None = None) -> dict:
    """Make a document's held events due."""
    _staged.notify()
    return {"$set": {OUTBOX_AT: now_ms() if now is None else now}}


class _NothingConfirmed(Exception):
    """A pass published events and none was confirmed: back off before the next."""


def _finish(future: Future | None, raise_errors: bool = False) -> None:
    """Wait for a worker job; its error is raised, or (when cleaning up) logged."""
    if future is None:
        return None
    try:
        future.result()
    except Exception as exc:
        if raise_errors:
            raise
        logger.warning("outbox settle failed (%s)", failure_summary(exc), extra={"error_type": type(exc).__name__})
    return None


def _latest_due(docs: list[tuple[Collection, dict]]) -> dict[str, tuple[int, int]]:
    """Per collection: the latest `_outbox_at` among `docs` and how many of them have it."""
    latest: dict[str, tuple[int, int]] = {}
    for collection, doc in docs:
        at = doc.get(OUTBOX_AT)
        if not isinstance(at, int):
            continue
        seen_at, seen = latest.get(collection.name, (at, 0))
        if at > seen_at:
            latest[collection.name] = (at, 1)
        elif at == seen_at:
            latest[collection.name] = (at, seen + 1)
    return latest


class BatchPublishing(Protocol):
    """What the relay needs from a publisher (services.kit.bus.BatchPublisher is the real one)."""

    def publish_batch(self, envelopes: Sequence[Envelope]) -> set[str]:
        """Publish; return the event ids the broker confirmed."""
        ...

    def idle(self, seconds: float) -> None:
        """Wait between passes (keeping the broker connection serviced)."""
        ...


class OutboxRelay:
    """Publishes due outbox events of `collection_names` and removes them once confirmed.

    `run_once()` is one pass (at most `batch_size` documents); `run_forever(stop_event)` runs
    pipelined passes until stopped. With `lease_ttl_s` set, relays sharing `lease_name` (default:
    derived from the collection names) take turns through a lease document in `outbox_leases`
    (the holder renews it every pass; a stopped holder releases it, a dead one loses it after
    the TTL, LEASE_TTL_S = 5 s by default); set it to None to let every instance work at once (more duplicates, same
    guarantees). Documents with unconfirmed events are retried after a backoff that doubles
    from 0.5 s up to `max_backoff_s`. `rescan_s` bounds how long a long backlog may delay a
    document staged with an earlier `_outbox_at` than the scan position (clock skew). An idle
    relay wakes up at once when its own process stages due events, unless `wake` is False (None:
    the OUTBOX_RELAY_WAKE_UP environment variable, default true; module docstring).
    """

    def __init__(
        self,
        db: Database,
        collection_names: Sequence[str],
        publisher: BatchPublishing,
        batch_size: int = 500,
        *,
        lease_ttl_s: float | None = LEASE_TTL_S,
        lease_name: str | None = None,
        relay_id: str | None = None,
        poll_interval_s: float = 0.2,
        max_backoff_s: float = 60.0,
        rescan_s: float = 2.0,
        backlog_sample_s: float = BACKLOG_SAMPLE_S,
        wake: bool | None = None,
    ):
        if not collection_names:
            raise ValueError("the relay needs at least one collection")
        self._db = db
        self._collections: list[Collection] = [db[name] for name in collection_names]
        self._publisher = publisher
        self.batch_size = batch_size
        self.relay_id = relay_id or uuid.uuid4().hex
        self._lease_ttl_ms = None if lease_ttl_s is None else int(lease_ttl_s * 1000)
        self._lease_name = lease_name or "outbox-relay:" + ",".join(sorted(collection_names))
        self._lease_until = 0
        self._poll_interval_s = poll_interval_s
        self._max_backoff_ms = int(max_backoff_s * 1000)
        self._next_collection = 0
        self._rescan_s = rescan_s
        self._backlog_sample_s = backlog_sample_s
        self._sampled_at: float | None = None
        # Woken by this process's stagings (module docstring); None: OUTBOX_RELAY_WAKE_UP (default on).
        self._wake = Env("outbox").bool("OUTBOX_RELAY_WAKE_UP", True) if wake is None else wake
        self._seen = _staged.generation  # the staging generation the last pass started after
        self._recheck_s = RECHECK_FIRST_S
        self._serviced_at = time.monotonic()

    def ensure_indexes(self) -> None:
        for collection in self._collections:
            collection.create_index([(OUTBOX_AT, pymongo.ASCENDING)], name="outbox_due")

    # -- backlog --------------------------------------------------------------------------------

    def sample_backlog(self, now: int | None = None) -> dict[str, tuple[int, float]]:
        """Per collection: (documents pending, counted up to OUTBOX_COUNT_CAP; seconds the oldest has
        been due, 0 when none is), also set into the gauges (module docstring)."""
        now = now_ms() if now is None else now
        sampled = {}
        for collection in self._collections:
            pending = {OUTBOX_AT: {"$gte": 0}}
            oldest = list(collection.find(pending, {OUTBOX_AT: 1}).sort(OUTBOX_AT, pymongo.ASCENDING).limit(1))
            count = len(list(collection.find(pending, {"_id": 1}).limit(metrics.OUTBOX_COUNT_CAP))) if oldest else 0
            age_s = max(0, now - int(oldest[0][OUTBOX_AT])) / 1000 if oldest else 0.0
            metrics.outbox_backlog(collection.name, count, age_s)
            sampled[collection.name] = (count, age_s)
        return sampled

    def _sample_when_due(self) -> None:
        """`sample_backlog` once every `backlog_sample_s`; Mongo trouble leaves the last sample."""
        if self._sampled_at is not None and time.monotonic() - self._sampled_at < self._backlog_sample_s:
            return
        self._sampled_at = time.monotonic()
        try:
            self.sample_backlog()
        except pymongo.errors.PyMongoError as exc:
            logger.info(
                "outbox backlog not sampled (%s)", failure_summary(exc), extra={"error_type": type(exc).__name__}
            )

    # -- passes ---------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One pass; returns how many events were confirmed (0 when another relay holds the lease)."""
        now = now_ms()
        if not self.hold_lease(now):
            return 0
        docs = self._due_documents(now)
        if not docs:
            return 0
        envelopes = self._envelopes(docs)
        confirmed = self._publish(envelopes)
        self._settle(docs, confirmed, now)
        return len(confirmed)

    def run_forever(self, stop_event: Event, *, drain_s: float = 0.0) -> None:
        """Relay until `stop_event` is set; then, for up to `drain_s`, publish what is still due
        (events staged by work that finished as the process stopped) until a pass finds nothing;
        releases the lease on the way out.

        Pipelined: while a batch is being published and its confirms awaited, a worker thread
        settles the previous batch and, after a full batch, finds the next one (leaving out the
        documents in flight). A single worker runs those in order, so a document is looked for
        again only after its previous pass was settled. Idle: polls every `poll_interval_s`;
        after failures: backs off.
        """
        failures = 0
        rescanned = time.monotonic()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-settle") as worker:
            settling: Future | None = None
            ahead: list[tuple[Collection, dict]] | None = None
            try:
                while not stop_event.is_set():
                    self._sample_when_due()
                    try:
                        if not self.hold_lease(now_ms()):
                            settling, ahead = _finish(settling), None
                            self._idle(stop_event, LEASE_POLL_S)
                            continue
                        now = now_ms()
                        if ahead is None:
                            settling = _finish(settling, raise_errors=True)
                            docs = self._due_documents(now)
                            rescanned = time.monotonic()
                        else:
                            docs, ahead = ahead, None
                        if not docs:
                            self._idle(stop_event, self._quiet_idle_s(), wake=True)
                            continue
                        self._recheck_s = RECHECK_FIRST_S
                        envelopes = self._envelopes(docs)
                        next_docs = None
                        if len(docs) >= self.batch_size:
                            in_flight = {(collection.name, doc["_id"]) for collection, doc in docs}
                            resume = None
                            if time.monotonic() - rescanned < self._rescan_s:
                                resume = _latest_due(docs)
                            else:
                                rescanned = time.monotonic()
                            next_docs = worker.submit(self._due_documents, now, in_flight, resume)
                        confirmed = self._publish(envelopes)
                        previous, settling = settling, worker.submit(self._settle, docs, confirmed, now)
                        _finish(previous, raise_errors=True)
                        if envelopes and not confirmed:
                            raise _NothingConfirmed()
                        failures = 0
                        if next_docs is not None:
                            ahead = next_docs.result()
                        else:
                            self._idle(stop_event, self._poll_interval_s, wake=True)
                    except Exception as exc:  # Mongo or broker trouble: keep going, with backoff
                        failures += 1
                        if not isinstance(exc, _NothingConfirmed):
                            logger.warning(
                                "outbox relay pass failed (%s)",
                                failure_summary(exc),
                                extra={"attempt": failures, "error_type": type(exc).__name__},
                            )
                        settling, ahead = _finish(settling), None
                        self._idle(stop_event, min(self._max_backoff_ms / 1000, 0.5 * 2 ** min(failures, 10)))
            finally:
                _finish(settling)
                if drain_s > 0 and stop_event.is_set():
                    self._drain(drain_s)
                self._release_lease()

    def _drain(self, within_s: float) -> None:
        """Passes until one confirms nothing or `within_s` has passed. A failure ends the drain:
        what is left stays staged for the next relay, as after a crash."""
        deadline = time.monotonic() + within_s
        try:
            while time.monotonic() < deadline and self.run_once():
                pass
        except Exception as exc:  # Mongo or broker trouble: the next relay publishes it
            logger.warning("outbox drain stopped (%s)", failure_summary(exc), extra={"error_type": type(exc).__name__})

    def _publish(self, envelopes: list[Envelope]) -> set[str]:
        confirmed = self._publisher.publish_batch(envelopes) if envelopes else set()
        if len(confirmed) < len(envelopes):
            logger.warning(
                "outbox events not confirmed; will retry",
                extra={"count": len(envelopes) - len(confirmed), "batch": len(envelopes)},
            )
        return confirmed

    def _envelopes(self, docs: list[tuple[Collection, dict]]) -> list[Envelope]:
        envelopes: list[Envelope] = []
        for collection, doc in docs:
            for event_id, entry in list((doc.get(OUTBOX) or {}).items()):
                try:
                    envelope = decode_envelope(entry["env"])
                    if envelope.event_id != event_id:
                        raise MalformedEvent("envelope id differs from its outbox key")
                except (MalformedEvent, KeyError, TypeError):
                    self._set_aside(collection, doc, event_id)
                    continue
                envelopes.append(envelope)
        return envelopes

    def _due_documents(
        self,
        now: int,
        skip: AbstractSet[tuple[str, object]] = frozenset(),
        resume: Mapping[str, tuple[int, int]] | None = None,
    ) -> list[tuple[Collection, dict]]:
        """Up to `batch_size` due documents, oldest first, leaving out `skip` (collection, _id) pairs.

        `resume` (collection name -> (`_outbox_at`, how many in-flight documents have exactly it))
        starts a collection's scan there instead of at the oldest, because the documents before
        it are in flight. Only an optimisation: anything due that it passes over (a document
        staged meanwhile with an earlier time) is found by the next full scan (`rescan_s`).
        """
        found: list[tuple[Collection, dict]] = []
        count = len(self._collections)
        start, self._next_collection = self._next_collection, (self._next_collection + 1) % count
        for offset in range(count):
            remaining = self.batch_size - len(found)
            if remaining <= 0:
                break
            collection = self._collections[(start + offset) % count]
            due: dict = {"$lte": now}
            skipped = sum(1 for name, _ in skip if name == collection.name)
            if resume is not None and collection.name in resume:
                # Of the documents in flight only those due exactly at the resume point come back.
                due["$gte"], skipped = resume[collection.name]
            # Whole documents: on nx-27017 an inclusion projection costs more than the bytes it saves.
            cursor = collection.find({OUTBOX_AT: due}).sort(OUTBOX_AT, pymongo.ASCENDING).limit(remaining + skipped)
            docs = [doc for doc in cursor if (collection.name, doc["_id"]) not in skip]
            found.extend((collection, doc) for doc in docs[:remaining])
        return found

    def _settle(self, docs: list[tuple[Collection, dict]], confirmed: set[str], now: int) -> None:
        """Remove confirmed events; push back documents that still hold unconfirmed ones.

        Every write is guarded by the `_outbox_seq` read with the document. A fully published
        document (the common case) has its whole map and marker dropped in one `update_many` per
        collection and sequence value; an unchanged sequence means no event was staged since the
        read, so the map holds nothing else. Where a guard missed, only the confirmed entries are
        removed, by id, and the marker stays for the next pass.
        """
        finished: dict[tuple[str, object], list] = {}
        partial: dict[str, list[UpdateOne]] = {}
        by_name: dict[str, Collection] = {}
        for collection, doc in docs:
            by_name[collection.name] = collection
            entries = doc.get(OUTBOX) or {}
            done = {f"{OUTBOX}.{event_id}": "" for event_id in entries if event_id in confirmed}
            if len(done) == len(entries):
                finished.setdefault((collection.name, doc.get(OUTBOX_SEQ)), []).append(doc)
                continue
            tries = int(doc.get(OUTBOX_TRIES) or 0) + 1
            update: dict = {"$set": {OUTBOX_AT: now + self._backoff_ms(tries)}, "$inc": {OUTBOX_TRIES: 1}}
            if done:
                update["$unset"] = done
            guard = {"_id": doc["_id"], OUTBOX_SEQ: {"$eq": doc.get(OUTBOX_SEQ)}}
            partial.setdefault(collection.name, []).append(UpdateOne(guard, update))

        missed: dict[str, list[dict]] = {}
        for (name, seq), group in finished.items():
            result = by_name[name].update_many(
                {"_id": {"$in": [doc["_id"] for doc in group]}, OUTBOX_SEQ: {"$eq": seq}},
                {"$unset": {OUTBOX: "", OUTBOX_AT: "", OUTBOX_TRIES: ""}},
            )
            if result.matched_count < len(group):
                missed.setdefault(name, []).extend(group)
        for name, operations in partial.items():
            result = by_name[name].bulk_write(operations, ordered=False)
            if result.matched_count < len(operations):
                missed.setdefault(name, []).extend(
                    doc for collection, doc in docs if collection.name == name and doc.get(OUTBOX)
                )
        for name, group in missed.items():
            # Events were staged meanwhile: drop just what was confirmed (already-removed ids are no-ops).
            fallback = [
                UpdateOne({"_id": doc["_id"]}, {"$unset": done})
                for doc in group
                if (done := {f"{OUTBOX}.{eid}": "" for eid in (doc.get(OUTBOX) or {}) if eid in confirmed})
            ]
            if fallback:
                by_name[name].bulk_write(fallback, ordered=False)

    def _set_aside(self, collection: Collection, doc: dict, event_id: str) -> None:
        """An entry that cannot be published at all is moved to `_outbox_failed` for a human."""
        logger.error("unreadable outbox entry set aside", extra={"event_id": event_id, "collection": collection.name})
        entry = (doc.get(OUTBOX) or {}).get(event_id)
        collection.update_one(
            {"_id": doc["_id"]},
            {"$set": {f"{OUTBOX_FAILED}.{event_id}": entry}, "$unset": {f"{OUTBOX}.{event_id}": ""}},
        )
        doc[OUTBOX].pop(event_id, None)

    def _backoff_ms(self, tries: int) -> int:
        return min(self._max_backoff_ms, 500 * 2 ** min(tries - 1, 20))

    def _quiet_idle_s(self) -> float:
        """How long to idle after a pass that found nothing: the poll interval, or, while this process
        staged something less than a poll interval ago (its write may not have landed when the pass
        looked), the next recheck delay (2, 4, 8 ... ms)."""
        recent = time.monotonic() - _staged.at < self._poll_interval_s
        if self._wake and recent and self._recheck_s < self._poll_interval_s:
            seconds, self._recheck_s = self._recheck_s, self._recheck_s * 2
            return seconds
        return self._poll_interval_s

    def _idle(self, stop_event: Event, seconds: float, *, wake: bool = False) -> None:
        """Wait `seconds` (servicing the broker connection); with `wake`, return as soon as this process
        stages due events (module docstring)."""
        deadline = time.monotonic() + seconds
        while not stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not (wake and self._wake):
                self._publisher.idle(min(remaining, 0.1))
                continue
            generation = _staged.wait(self._seen, min(remaining, IDLE_SLICE_S))
            if generation != self._seen:
                self._seen = generation
                self._recheck_s = RECHECK_FIRST_S
                return
            if time.monotonic() - self._serviced_at >= IDLE_SLICE_S:
                self._publisher.idle(SERVICE_S)
                self._serviced_at = time.monotonic()

    # -- lease ----------------------------------------------------------------------------------

    def hold_lease(self, now: int) -> bool:
        """Hold (take or renew) the relay group's lease at `now` (epoch ms); True when this relay may
        work. The holder renews it once a third of the TTL has passed (every pass checks), so a
        holder that stopped renewing (killed) is replaced within one TTL plus a waiting relay's
        poll, and a holder that finds the lease taken meanwhile stops."""
        ttl = self._lease_ttl_ms
        if ttl is None:
            return True
        if self._lease_until - now > ttl * 2 // 3:
            return True
        leases = self._db[LEASES]
        until = now + ttl
        key = {"_id": self._lease_name}
        held = (
            leases.update_one({**key, "holder": {"$eq": self.relay_id}}, {"$set": {"until": until}}).matched_count
            or leases.update_one(
                {**key, "until": {"$lt": now}}, {"$set": {"holder": self.relay_id, "until": until}}
            ).matched_count
        )
        if not held:
            try:
                leases.insert_one({**key, "holder": self.relay_id, "until": until})
                held = 1
            except pymongo.errors.DuplicateKeyError:
                held = 0
        if held and self._lease_until <= now:
            logger.info("outbox relay lease taken", extra={"collection": self._lease_name})
        self._lease_until = until if held else 0
        return bool(held)

    def _release_lease(self) -> None:
        if self._lease_ttl_ms is None or not self._lease_until:
            return
        self._lease_until = 0
        try:
            self._db[LEASES].update_one(
                {"_id": self._lease_name, "holder": {"$eq": self.relay_id}}, {"$set": {"until": 0}}
            )
        except pymongo.errors.PyMongoError as exc:
            logger.warning("could not release the outbox relay lease (%s)", failure_summary(exc))
