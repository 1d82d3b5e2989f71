"""The auto-reply service's parts wired together, for the process entry point and for tests;
nothing is started here (the consumer connects when it runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymongo.database import Database

from services.auto_reply import config
from services.auto_reply.clients import DirectoryClient, InboxClient
from services.auto_reply.replier import EVENT_TYPE, AutoReplier
from services.auto_reply.store import OUTBOX_COLLECTIONS, AutoReplyStore
from services.kit.bootstrap import phi_cipher
from services.kit.bus import Consumer, Topology
from services.kit.crypto import PhiCipher
from services.kit.features import Assembled
from services.kit.processed_events import ProcessedEvents


@dataclass
class AutoReply(Assembled):
    settings: config.AutoReplySettings
    db: Database
    store: AutoReplyStore
    directory: Any  # clients.DirectoryClient (or a stand-in with its methods)
    inbox: Any  # clients.InboxClient (or a stand-in with its methods)
    replier: AutoReplier
    consumer: Consumer

    outbox_collections = OUTBOX_COLLECTIONS  # its access records

    def ready(self) -> list[str]:
        """What keeps this instance from doing its work (the readiness answer's problems)."""
        problems = []
        if not self.consumer.consuming:
            problems.append("consumer_not_consuming")
        try:
            self.db.command("ping")
        except Exception:  # noqa: BLE001 - any database failure means not ready
            problems.append("database_unavailable")
        return problems



def build_consumer(settings: config.AutoReplySettings, replier: AutoReplier, db: Database) -> Consumer:
    """The durable, competing consumer every instance of the service shares."""
    common = settings.common
    return Consumer(
        common.amqp_url,
        settings.queue,
        [EVENT_TYPE],
        replier.handle,
        topology=Topology(exchange=common.events_exchange),
        processed=ProcessedEvents(db, config.SERVICE),
        prefetch=settings.prefetch,
        max_retries=settings.max_retries,
        retry_delay_ms=settings.retry_delay_ms,
        connection_name=f"{config.SERVICE}-consumer",
    )


def build(
    settings: config.AutoReplySettings,
    db: Database,
    *,
    directory: Any = None,
    inbox: Any = None,
    service_tokens: Any = None,
    cipher: PhiCipher | None = None,
) -> AutoReply:
    """The service over `db`, its indexes created. `directory` and `inbox` default to gRPC clients
    of the configured targets; `service_tokens` (ServiceTokens, or anything with
    `identity(agency)`) is what answering an event acts as; `cipher` defaults to one over `db`'s
    data keys."""
    auto_store = AutoReplyStore(db, cipher or phi_cipher(db, settings.common))
    auto_store.ensure_indexes()
    opened: list[Any] = []
    if directory is None:
        directory = DirectoryClient(settings.directory_grpc_target)
        opened.append(directory)
    if inbox is None:
        inbox = InboxClient(settings.inbox_grpc_target)
        opened.append(inbox)
    replier = AutoReplier(auto_store, inbox, service_tokens)
    consumer = build_consumer(settings, replier, db)
    return AutoReply(settings, db, auto_store, directory, inbox, replier, consumer, opened=opened)
