"""cloud-comms' parts wired together, for the process entry point and for tests; nothing is started
here (no thread, no server, no bound socket).

    comms = build(settings, db, cipher=cipher, service_tokens=tokens)         # as the process runs it
    comms = build(settings, db, directory=stand_in, service_tokens=ids, features=(DirectMessaging,))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.database import Database

from services.cloud_comms.components import Components, Feature
from services.cloud_comms.config import CloudCommsSettings
from services.cloud_comms.direct.feature import DirectMessaging
from services.cloud_comms.directory_client import DirectoryClient
from services.cloud_comms.fax.feature import Faxes
from services.cloud_comms.store import OUTBOX_COLLECTIONS, CloudCommsStore
from services.cloud_comms.triage.feature import Triage
from services.kit.bootstrap import phi_cipher
from services.kit.crypto import PhiCipher
from services.kit.features import Assembled, Worker, background_of
from services.kit.outbox import outbox_collections

# Every channel of the service, in start order.
FEATURES: tuple[Callable[[Components], Feature], ...] = (DirectMessaging, Faxes, Triage)


@dataclass
class CloudComms(Assembled):
    components: Components

    @property
    def features(self) -> list[Feature]:
        return self.components.features

    @property
    def outbox_collections(self) -> list[str]:
        """The collections whose documents carry outbox events: the service's, then the features'."""
        return outbox_collections(OUTBOX_COLLECTIONS, self.features)

    def background(self) -> list[Worker]:
        return background_of(self.features)

    def listeners(self) -> list[tuple[str, Any, Any]]:
        """(name, run(stop_event), ready(timeout) | None) of every feature's socket listener (the
        Direct SMTP listener); each binds when it runs."""
        return [listener for feature in self.features for listener in feature.listeners()]


def build(
    settings: CloudCommsSettings,
    db: Database,
    *,
    directory: Any = None,
    service_tokens: Any = None,
    cipher: PhiCipher | None = None,
    features: Sequence[Callable[[Components], Feature]] = FEATURES,
) -> CloudComms:
    """The service over `db`: indexes created, `features` constructed, indexed and attached.

    `directory` defaults to a DirectoryClient of settings.directory_grpc_target acting with the
    platform identity of `service_tokens` (a stand-in with `resolve_address(kind, address)` in
    tests); `cipher` defaults to one over `db`'s data keys."""
    store = CloudCommsStore(db)
    store.ensure_indexes()
    cipher = cipher or phi_cipher(db, settings.common)
    opened: list[Any] = []
    if directory is None:
        directory = DirectoryClient(settings.directory_grpc_target, service_tokens, cache_s=settings.address_cache_s)
        opened.append(directory)
    components = Components(
        settings=settings, store=store, cipher=cipher, directory=directory, service_tokens=service_tokens
    )
    components.features = [feature(components) for feature in features]
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    return CloudComms(components, opened=opened)
