"""python -m services.inbox: the mailbox of record (HTTP edge, gRPC, outbox relay)."""

from __future__ import annotations

import logging
import sys

from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.inbox import config, store
from services.inbox.announcements import Announcements
from services.inbox.board import Board
from services.inbox.components import Components
from services.inbox.delivery import Delivery
from services.inbox.directory_client import DirectoryClient
from services.inbox.grpc_api import InboxServicer
from services.inbox.http_api import build_app
from services.inbox.mailbox import Mailbox
from services.inbox.portal import Portal
from services.inbox.reminders import Reminders
from services.inbox.signatures import Signatures
from services.kit import mongo
from services.kit.auth import JwksKeySource, RevokedSessions, TokenVerifier
from services.kit.bus import BatchPublisher, Topology
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.grpc_server import GrpcServer, ServiceBinding
from services.kit.logs import configure_logging
from services.kit.outbox import OutboxRelay, outbox_collections
from services.kit.revocations import start_revocation_listener
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import ServiceTokens
from services.kit.settings import SettingsError, service_client_credentials

log = logging.getLogger("inbox")


def main() -> int:
    configure_logging("inbox")
    try:
        settings = config.load()
        credentials = service_client_credentials("inbox")
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    common = settings.common
    configure_logging("inbox", common.log_level)
    db = mongo.database(common.mongo_uri, common.mongo_db)
    mongo.wait_until_ready(db)
    inbox_store = store.InboxStore(db)
    inbox_store.ensure_indexes()
    migrated = inbox_store.migrate_legacy_items()
    if migrated:
        log.info("board items rewritten in the current shape", extra={"count": migrated})
    keyring = KeyRing(db, common.phi_master_keys, common.phi_master_key_id)
    keyring.ensure_indexes()
    directory = DirectoryClient(settings.directory_grpc_target)
    cipher = PhiCipher(keyring)
    board = Board(inbox_store, cipher)
    board.terminology = lambda caller: directory.agency_settings(caller.agency_id).patient_singular
    mailbox = Mailbox(inbox_store, cipher, directory.resolve, board)
    service_tokens = ServiceTokens(settings.directory_grpc_target, credentials.client_id, credentials.secret)
    components = Components(settings, inbox_store, cipher, board, mailbox, directory, service_tokens)
    delivery = Delivery(components)
    components.features = [Announcements(components), Reminders(components), Signatures(components)]
    components.features += [Portal(components), delivery]
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    revoked = RevokedSessions()
    verifier = TokenVerifier(JwksKeySource(settings.directory_jwks_url), revoked=revoked)

    # The relay thread owns its publisher (a pika connection belongs to one thread).
    publisher = BatchPublisher(
        common.amqp_url, Topology(exchange=common.events_exchange), connection_name="inbox-outbox"
    )
    collections = outbox_collections(store.OUTBOX_COLLECTIONS, components.features)
    relay = OutboxRelay(db, collections, publisher, batch_size=settings.relay_batch_size)
    relay.ensure_indexes()

    process = ServiceProcess("inbox")
    # Revoked sessions are heard before serving: consuming first, then the bootstrap from directory.
    start_revocation_listener(
        process,
        common.amqp_url,
        Topology(exchange=common.events_exchange),
        "inbox",
        revoked,
        service_tokens,
        settings.directory_grpc_target,
    )
    app = build_app(components, verifier)
    process.serve_http(app, common.http_host, settings.http_port)
    grpc_server = GrpcServer(
        [
            ServiceBinding(
                inbox_pb2_grpc.add_InboxServiceServicer_to_server,
                InboxServicer(mailbox, settings.max_subject_chars, settings.max_body_chars, delivery, directory),
                inbox_pb2.DESCRIPTOR.services_by_name["InboxService"].full_name,
            )
        ],
        verifier,
        host=common.grpc_host,
        port=settings.grpc_port,
    )
    process.serve_grpc(grpc_server)
    process.background("outbox-relay", relay.run_forever)
    process.background("fanout-repair", mailbox.repair_fanouts)
    for feature in components.features:
        for name, run in feature.background():
            process.background(name, run)
    process.on_stop("directory-client", directory.close)
    process.on_stop("service-tokens", service_tokens.close)
    process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
