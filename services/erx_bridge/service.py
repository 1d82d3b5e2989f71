"""erx-bridge's parts wired together, for the process entry point and for tests; nothing is started
here (no thread runs, no port is bound, the vendor is not called).

    bridge = build(settings, db, cipher=cipher, service_tokens=tokens)        # as the process runs it
    bridge = build(settings, db, directory=stand_in, service_tokens=ids, adapter=adapter)  # a test
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymongo.database import Database

from services.erx_bridge.config import ErxBridgeSettings
from services.erx_bridge.directory_client import DirectoryClient
from services.erx_bridge.runner import RunnerSettings, Scheduler, SyncRunner
from services.erx_bridge.store import OUTBOX_COLLECTIONS, ErxStore
from services.erx_bridge.sync import EngineSettings, SyncEngine
from services.erx_bridge.vendors import registry
from services.erx_bridge.vendors.base import VendorAdapter
from services.kit.bootstrap import phi_cipher
from services.kit.crypto import PhiCipher
from services.kit.features import Assembled, Worker


class Adapters:
    """One adapter per vendor for the whole process (each holds its connection pool, tokens and
    circuit breakers), made on first use; closed with the service."""

    def __init__(self, settings: ErxBridgeSettings, given: VendorAdapter | None = None):
        self._settings = settings
        self._given = given
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, vendor: str) -> VendorAdapter:
        if self._given is not None:
            return self._given
        name = vendor.strip().lower()
        with self._lock:
            adapter = self._made.get(name)
            if adapter is None:
                options: dict[str, Any] = {
                    "connect_timeout_s": self._settings.vendor_connect_timeout_s,
                    "read_timeout_s": self._settings.vendor_read_timeout_s,
                }
                if name == "dosespot" and self._settings.dosespot_subscription_key:
                    options["subscription_key"] = self._settings.dosespot_subscription_key
                adapter = self._made[name] = registry.adapter_for(name, **options)
            return adapter

    def close(self) -> None:
        with self._lock:
            made, self._made = list(self._made.values()), {}
        for adapter in made:
            close = getattr(adapter, "close", None)
            if close is not None:
                close()


@dataclass
class ErxBridge(Assembled):
    settings: ErxBridgeSettings
    store: ErxStore
    cipher: PhiCipher
    directory: Any  # directory_client.DirectoryClient (or a stand-in with its methods)
    service_tokens: Any  # ServiceTokens, or anything with identity(agency_id)
    adapter_for: Callable[[str], VendorAdapter]
    engine: SyncEngine
    runner: SyncRunner
    scheduler: Scheduler | None = None
    outbox_collections: tuple[str, ...] = field(default=OUTBOX_COLLECTIONS)

    def background(self) -> list[Worker]:
        """The sync runner (its pools live until the process stops) and, unless turned off, the
        scheduler."""
        workers: list[Worker] = [("erx-sync-runner", self.runner.run)]
        if self.scheduler is not None:
            workers.append(("erx-sync-scheduler", self.scheduler.run))
        return workers

    def close(self) -> None:
        self.runner.shutdown()
        super().close()


def build(
    settings: ErxBridgeSettings,
    db: Database,
    *,
    directory: Any = None,
    service_tokens: Any = None,
    cipher: PhiCipher | None = None,
    adapter: VendorAdapter | None = None,
) -> ErxBridge:
    """The service over `db`, its indexes created. `directory` defaults to a DirectoryClient of
    settings.directory_grpc_target caching for settings.staff_cache_s; `service_tokens` is what
    syncs act as (one identity per agency); `cipher` defaults to one over `db`'s data keys;
    `adapter`, when given, serves every practice (a test's), else each vendor's from the registry."""
    store = ErxStore(db)
    store.ensure_indexes()
    cipher = cipher or phi_cipher(db, settings.common)
    opened: list[Any] = []
    if directory is None:
        directory = DirectoryClient(settings.directory_grpc_target, cache_s=settings.staff_cache_s)
        opened.append(directory)
    adapters = Adapters(settings, adapter)
    opened.append(adapters)
    engine = SyncEngine(
        store,
        cipher,
        EngineSettings(
            vendor_attempts=settings.vendor_attempts,
            max_backoff_s=settings.max_backoff_s,
            full_check_every=settings.full_check_every,
            lease_s=settings.lease_s,
        ),
    )
    runner = SyncRunner(
        store,
        engine,
        directory=directory,
        service_tokens=service_tokens,
        practices=settings.practices,
        adapter_for=adapters,
        settings=RunnerSettings(
            public_url=settings.public_url,
            sync_workers=settings.sync_workers,
            max_active_syncs=settings.max_active_syncs,
            lease_wait_s=settings.lease_wait_s,
            stale_sync_s=settings.stale_sync_s,
        ),
    )
    scheduler = None
    if settings.sync_interval_s > 0 and settings.practices:
        scheduler = Scheduler(
            store,
            runner,
            sorted(settings.practices),
            interval_s=settings.sync_interval_s,
            first_delay_s=settings.sync_first_delay_s,
        )
    return ErxBridge(
        settings=settings,
        store=store,
        cipher=cipher,
        directory=directory,
        service_tokens=service_tokens,
        adapter_for=adapters,
        engine=engine,
        runner=runner,
        scheduler=scheduler,
        opened=opened,
    )
