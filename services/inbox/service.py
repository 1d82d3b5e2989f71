"""The inbox's parts wired together, for the process entry point and for tests; nothing is started
here (no thread, no server, no connection beyond the clients' lazy channels).

    inbox = build(settings, db)                                  # as the process runs it
    inbox = build(settings, db, directory=table, features=())    # a test: directory stood in for,
                                                                 # features attached by the test
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.database import Database

from clinic.inbox.v1 import inbox_pb2_grpc
from services.inbox import audit, store
from services.inbox.agency_options import AgencyOptions
from services.inbox.announcements import Announcements
from services.inbox.board import Board
from services.inbox.bulk import Bulk
from services.inbox.components import Components, Feature
from services.inbox.config import InboxSettings
from services.inbox.counter_check import CounterCheck
from services.inbox.coverage import Coverage
from services.inbox.dashboards import Dashboards
from services.inbox.deadlines import Deadlines
from services.inbox.delivery import Delivery
from services.inbox.directory_client import DirectoryClient
from services.inbox.escalation import Escalation
from services.inbox.grpc_api import SERVICE_NAME, InboxServicer
from services.inbox.mailbox import Mailbox
from services.inbox.portal import Portal
from services.inbox.recall import Receipts
from services.inbox.reminders import Reminders
from services.inbox.retention import Retention
from services.inbox.search import Search
from services.inbox.signatures import Signatures
from services.inbox.team_queue import TeamQueue
from services.kit import clock, faults
from services.kit.bootstrap import phi_cipher
from services.kit.crypto import PhiCipher
from services.kit.features import Assembled, Worker, background_of
from services.kit.grpc_server import ServiceBinding
from services.kit.outbox import outbox_collections
from services.kit.security_events import SecurityLog

# Every feature of the mailbox, in start order (the agency options first: others read them; the counter
# drift check, with the /metrics route, last).
FEATURES: tuple[Callable[[Components], Feature], ...] = (
    AgencyOptions,
    Announcements,
    Reminders,
    Signatures,
    Deadlines,
    Retention,
    Portal,
    Receipts,
    TeamQueue,
    Bulk,
    Coverage,
    Delivery,
    Escalation,
    Dashboards,
    Search,
    CounterCheck,
)


@dataclass
class Inbox(Assembled):
    components: Components

    @property
    def features(self) -> list[Feature]:
        return self.components.features

    @property
    def delivery(self) -> Delivery | None:
        """The delivery API (producers' DeliverItem), when it is one of the features."""
        return next((feature for feature in self.features if isinstance(feature, Delivery)), None)

    @property
    def outbox_collections(self) -> list[str]:
        """The collections whose documents carry outbox events: the mailbox's, then the features'."""
        return outbox_collections(store.OUTBOX_COLLECTIONS, self.features)

    def grpc_binding(self) -> ServiceBinding:
        settings = self.components.settings
        servicer = InboxServicer(
            self.components.mailbox,
            settings.max_subject_chars,
            settings.max_body_chars,
            self.delivery,
            self.components.directory,
            security=SecurityLog(self.components.store.db, service=audit.PRODUCER),
        )
        return ServiceBinding(inbox_pb2_grpc.add_InboxServiceServicer_to_server, servicer, SERVICE_NAME)

    def background(self) -> list[Worker]:
        """The mailbox's own repair loop, then every feature's workers."""
        return [("fanout-repair", self.components.mailbox.repair_fanouts), *background_of(self.features)]


def build(
    settings: InboxSettings,
    db: Database,
    *,
    directory: Any = None,
    service_tokens: Any = None,
    cipher: PhiCipher | None = None,
    features: Sequence[Callable[[Components], Feature]] = FEATURES,
) -> Inbox:
    """The inbox over `db`: indexes created, `features` constructed, indexed and attached.

    `directory` defaults to a DirectoryClient of settings.directory_grpc_target (a stand-in with
    its methods in tests); `service_tokens` (ServiceTokens, or anything with `identity(agency)`)
    is what work no user started acts as; `cipher` defaults to one over `db`'s data keys."""
    if settings.crash_points:  # fault tests only (production refuses the setting)
        faults.arm(settings.crash_points)
    clock.enable(settings.test_clock)  # tests only (production refuses the setting)
    inbox_store = store.InboxStore(db)
    inbox_store.ensure_indexes()
    cipher = cipher or phi_cipher(db, settings.common)
    opened = []
    if directory is None:
        directory = DirectoryClient(settings.directory_grpc_target)
        opened.append(directory)
    board = Board(inbox_store, cipher)
    board.terminology = lambda caller: directory.agency_settings(caller.agency_id).patient_singular
    mailbox = Mailbox(inbox_store, cipher, directory.resolve, board)
    components = Components(settings, inbox_store, cipher, board, mailbox, directory, service_tokens)
    components.features = [feature(components) for feature in features]
    if components.options is None:  # built without its routes (tests): the options still apply
        AgencyOptions(components)
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    return Inbox(components, opened=opened)
