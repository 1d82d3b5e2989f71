"""python -m services.notifications: lab results, schedule changes and compliance alerts into boards
(MLLP listener, HTTP edge, outbox relay)."""

from __future__ import annotations

import logging
import sys

from services.kit import mongo
from services.kit.auth import JwksKeySource, RevokedSessions, TokenVerifier
from services.kit.bus import BatchPublisher, Topology
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.grpc_server import GrpcServer
from services.kit.logs import configure_logging
from services.kit.outbox import OutboxRelay, outbox_collections
from services.kit.revocations import start_revocation_listener
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import ServiceTokens
from services.kit.settings import SettingsError, service_client_credentials
from services.notifications import config, store
from services.notifications.appointments import ScheduleNotifications
from services.notifications.compliance_alerts import ComplianceAlerts
from services.notifications.components import Components
from services.notifications.directory_client import DirectoryClient
from services.notifications.http_api import create_app
from services.notifications.lab import LabResults
from services.notifications.mllp import MessageTypes, MllpServer
from services.notifications.registrations import Registrations

log = logging.getLogger("notifications")

# Every feature of the service, in start order. Add yours here (see README.md, "Extending the service").
FEATURES = (LabResults, ScheduleNotifications, ComplianceAlerts)


def main() -> int:
    configure_logging("notifications")
    try:
        settings = config.load()
        credentials = service_client_credentials("notifications")
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    common = settings.common
    configure_logging("notifications", common.log_level)
    db = mongo.database(common.mongo_uri, common.mongo_db)
    mongo.wait_until_ready(db)
    notifications_store = store.NotificationsStore(db)
    notifications_store.ensure_indexes()
    keyring = KeyRing(db, common.phi_master_keys, common.phi_master_key_id)
    keyring.ensure_indexes()
    directory = DirectoryClient(settings.directory_grpc_target, cache_s=settings.recipients_cache_s)
    service_tokens = ServiceTokens(settings.directory_grpc_target, credentials.client_id, credentials.secret)
    components = Components(
        settings=settings,
        store=notifications_store,
        cipher=PhiCipher(keyring),
        directory=directory,
        service_tokens=service_tokens,
        registrations=Registrations(settings.facilities, settings.partners),
        message_types=MessageTypes(settings.processing_id),
    )
    components.features = [feature(components) for feature in FEATURES]
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    revoked = RevokedSessions()
    verifier = TokenVerifier(JwksKeySource(settings.directory_jwks_url), revoked=revoked)

    # The relay thread owns its publisher (a pika connection belongs to one thread).
    publisher = BatchPublisher(
        common.amqp_url, Topology(exchange=common.events_exchange), connection_name="notifications-outbox"
    )
    collections = outbox_collections(store.OUTBOX_COLLECTIONS, components.features)
    relay = OutboxRelay(db, collections, publisher, batch_size=settings.relay_batch_size)
    relay.ensure_indexes()

    process = ServiceProcess("notifications")
    start_revocation_listener(
        process,
        common.amqp_url,
        Topology(exchange=common.events_exchange),
        "notifications",
        revoked,
        service_tokens,
        settings.directory_grpc_target,
    )
    listener = MllpServer(
        settings.mllp_host,
        settings.mllp_port,
        components.message_types.acknowledge,
        max_message_bytes=settings.mllp_max_message_bytes,
        max_connections=settings.mllp_max_connections,
        idle_timeout_s=settings.mllp_idle_timeout_s,
    )
    app = create_app(components, verifier, ready_checks={"mllp": lambda: not process.stop_event.is_set()})
    process.serve_http(app, common.http_host, settings.http_port)
    # Health and reflection only for now (probes); a feature needing a gRPC API adds a binding here.
    process.serve_grpc(GrpcServer([], verifier, host=common.grpc_host, port=settings.grpc_port))
    process.background("mllp-listener", listener.run)
    process.background("outbox-relay", relay.run_forever)
    for feature in components.features:
        for name, run in feature.background():
            process.background(name, run)
    process.on_stop("directory-client", directory.close, after_workers=True)
    process.on_stop("service-tokens", service_tokens.close, after_workers=True)
    process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
