"""The notifications service's parts wired together, for the process entry point and for tests;
nothing is started here (no thread, no server, no bound socket).

    notifications = build(settings, db, service_tokens=tokens)     # as the process runs it
    components = build(settings, db, directory=DirectoryStandIn(table),
                       service_tokens=ServiceIdentities(), features=()).components   # a test
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.database import Database

from services.kit.bootstrap import phi_cipher
from services.kit.crypto import PhiCipher
from services.kit.features import Assembled, Worker, background_of
from services.kit.outbox import outbox_collections
from services.notifications import store
from services.notifications.appointments import ScheduleNotifications
from services.notifications.compliance_alerts import ComplianceAlerts
from services.notifications.components import Components, Feature
from services.notifications.config import NotificationsSettings
from services.notifications.dashboards import LabFeedDashboard
from services.notifications.directory_client import DirectoryClient
from services.notifications.lab import LabResults
from services.notifications.mllp import MessageTypes, MllpServer
from services.notifications.registrations import Registrations

# Every feature of the service, in start order. Add yours here (see README.md, "Extending the service").
FEATURES: tuple[Callable[[Components], Feature], ...] = (
    LabResults,
    ScheduleNotifications,
    ComplianceAlerts,
    LabFeedDashboard,
)


@dataclass
class Notifications(Assembled):
    components: Components

    @property
    def features(self) -> list[Feature]:
        return self.components.features

    @property
    def outbox_collections(self) -> list[str]:
        """The collections whose documents carry outbox events: the service's, then the features'."""
        return outbox_collections(store.OUTBOX_COLLECTIONS, self.features)

    def mllp_listener(self) -> MllpServer:
        """The HL7 v2 MLLP listener handing each message to the features' registered types (binds
        its port now; `run(stop_event)` serves)."""
        settings = self.components.settings
        return MllpServer(
            settings.mllp_host,
            settings.mllp_port,
            self.components.message_types.acknowledge,
            max_message_bytes=settings.mllp_max_message_bytes,
            max_connections=settings.mllp_max_connections,
            idle_timeout_s=settings.mllp_idle_timeout_s,
            tls=settings.mllp_tls,
        )

    def background(self) -> list[Worker]:
        return background_of(self.features)



def build(
    settings: NotificationsSettings,
    db: Database,
    *,
    directory: Any = None,
    service_tokens: Any = None,
    cipher: PhiCipher | None = None,
    features: Sequence[Callable[[Components], Feature]] = FEATURES,
) -> Notifications:
    """The service over `db`: indexes created, `features` constructed, indexed and attached.

    `directory` defaults to a DirectoryClient of settings.directory_grpc_target caching for
    settings.recipients_cache_s (a stand-in with its methods in tests); `service_tokens`
    (ServiceTokens, or anything with `identity(agency)`) is what work no user started acts as;
    `cipher` defaults to one over `db`'s data keys."""
    notifications_store = store.NotificationsStore(db)
    notifications_store.ensure_indexes()
    cipher = cipher or phi_cipher(db, settings.common)
    opened = []
    if directory is None:
        directory = DirectoryClient(settings.directory_grpc_target, cache_s=settings.recipients_cache_s)
        opened.append(directory)
    components = Components(
        settings=settings,
        store=notifications_store,
        cipher=cipher,
        directory=directory,
        service_tokens=service_tokens,
        registrations=Registrations(settings.facilities, settings.partners),
        message_types=MessageTypes(settings.processing_id),
    )
    components.features = [feature(components) for feature in features]
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    return Notifications(components, opened=opened)
