"""A small in-process cache whose entries expire: answers another service gives that change rarely
(an agency's settings, its staff list), remembered for a short, bounded time.

    settings = TtlCache(ttl_s=60.0, max_entries=10_000)
    answer = settings.get_or_load(agency_id, lambda: ask_directory(agency_id))

An entry is fresh while less than `ttl_s` has passed since the load that produced it *started*,
so a cached answer never outlives one fetched fresh at the same moment. `ttl_s` <= 0 turns the
cache off (every call loads). At most `max_entries` are kept: a full cache drops its expired
entries, then the least recently stored ones. Thread-safe; a load runs outside the lock, so two
threads missing the same key at once both load (the later answer is kept), as directory is
simply asked twice. A load that raises stores nothing.

Refresh ahead (`get_or_load(..., refresh_after_s=r)`): an entry still fresh but older than `r` is
returned as it is and reloaded once in the background, so a busy key never makes a caller wait
for a slow load (an agency's whole staff list is one such); what is returned is never older than
`ttl_s`, as without it. A key not asked for between `r` and `ttl_s` is loaded by its next caller,
unless its owner keeps it warm (`age` tells a warmer which entries are due; `put` stores the reload).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()
log = logging.getLogger(__name__)


class TtlCache(Generic[K, V]):
    def __init__(self, ttl_s: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()  # key -> (loaded at, value)
        self._lock = threading.Lock()
        self._refreshing: set[K] = set()  # keys being reloaded in the background

    def age(self, key: K) -> float | None:
        """Seconds since the load of `key`'s entry started; None when there is no fresh entry."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or now - entry[0] >= self.ttl_s:
            return None
        return now - entry[0]

    def get(self, key: K, default: V | None = None) -> V | None:
        """The fresh value for `key`, or `default`."""
        found = self._fresh(key, self._clock())
        return default if found is _MISSING else found  # type: ignore[return-value]

    def get_or_load(self, key: K, load: Callable[[], V], *, refresh_after_s: float | None = None) -> V:
        """The fresh value for `key`, or `load()`'s answer, stored for `ttl_s` from before the load.
        With `refresh_after_s`, a fresh entry older than that is also reloaded in the background."""
        started = self._clock()
        found = self._fresh(key, started)
        if found is not _MISSING:
            if refresh_after_s is not None and self._due_for_refresh(key, started, refresh_after_s):
                # In the caller's context: a load that calls another service needs the identity
                # (services.kit.service_identity.acting_as) its outgoing calls carry.
                context = contextvars.copy_context()
                threading.Thread(
                    target=context.run, args=(self._refresh, key, load), name="cache-refresh", daemon=True
                ).start()
            return found  # type: ignore[return-value]
        value = load()
        self.put(key, value, at=started)
        return value

    def _due_for_refresh(self, key: K, now: float, refresh_after_s: float) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or now - entry[0] < refresh_after_s or key in self._refreshing:
                return False
            self._refreshing.add(key)
            return True

    def _refresh(self, key: K, load: Callable[[], V]) -> None:
        started = self._clock()
        try:
            self.put(key, load(), at=started)
        except Exception as exc:  # the entry stays until it expires; its next caller loads it
            log.warning("background cache refresh failed", extra={"error_type": type(exc).__name__})
        finally:
            with self._lock:
                self._refreshing.discard(key)

    def put(self, key: K, value: V, *, at: float | None = None) -> None:
        """Remember `value` for `key`, fresh for `ttl_s` from `at` (default: now)."""
        if self.ttl_s <= 0:
            return
        at = self._clock() if at is None else at
        with self._lock:
            self._entries.pop(key, None)
            if len(self._entries) >= self.max_entries:
                self._drop_expired(self._clock())
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = (at, value)

    def forget(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _fresh(self, key: K, now: float) -> object:
        if self.ttl_s <= 0:
            return _MISSING
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return _MISSING
            if now - entry[0] < self.ttl_s:
                return entry[1]
            del self._entries[key]
            return _MISSING

    def _drop_expired(self, now: float) -> None:
        for key in [key for key, (at, _) in self._entries.items() if now - at >= self.ttl_s]:
            del self._entries[key]
