"""python -m services.auto_reply: Staff and Patient Auto-Reply (HTTP edge, message.delivered.v1
consumer, outbox relay for its access records)."""

from __future__ import annotations

import logging
import sys

from services.auto_reply import config, store
from services.auto_reply.clients import DirectoryClient, InboxClient
from services.auto_reply.http_api import build_app
from services.auto_reply.replier import EVENT_TYPE, AutoReplier
from services.kit import mongo
from services.kit.auth import JwksKeySource, RevokedSessions, TokenVerifier
from services.kit.bus import BatchPublisher, Consumer, ProcessedEvents, Topology
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.grpc_server import GrpcServer
from services.kit.logs import configure_logging
from services.kit.outbox import OutboxRelay
from services.kit.revocations import start_revocation_listener
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import ServiceTokens
from services.kit.settings import SettingsError, service_client_credentials

log = logging.getLogger("auto-reply")


def build_consumer(settings: config.AutoReplySettings, replier: AutoReplier, db) -> Consumer:
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


def main() -> int:
    configure_logging(config.SERVICE)
    try:
        settings = config.load()
        credentials = service_client_credentials(config.SERVICE)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    common = settings.common
    configure_logging(config.SERVICE, common.log_level)
    db = mongo.database(common.mongo_uri, common.mongo_db)
    mongo.wait_until_ready(db)
    keyring = KeyRing(db, common.phi_master_keys, common.phi_master_key_id)
    keyring.ensure_indexes()
    auto_store = store.AutoReplyStore(db, PhiCipher(keyring))
    auto_store.ensure_indexes()
    directory = DirectoryClient(settings.directory_grpc_target)
    inbox = InboxClient(settings.inbox_grpc_target)
    service_tokens = ServiceTokens(settings.directory_grpc_target, credentials.client_id, credentials.secret)
    replier = AutoReplier(auto_store, inbox, service_tokens)
    consumer = build_consumer(settings, replier, db)
    revoked = RevokedSessions()
    verifier = TokenVerifier(JwksKeySource(settings.directory_jwks_url), revoked=revoked)
    publisher = BatchPublisher(
        common.amqp_url, Topology(exchange=common.events_exchange), connection_name="auto-reply-outbox"
    )
    relay = OutboxRelay(db, list(store.OUTBOX_COLLECTIONS), publisher)
    relay.ensure_indexes()

    process = ServiceProcess(config.SERVICE)
    start_revocation_listener(
        process,
        common.amqp_url,
        Topology(exchange=common.events_exchange),
        config.SERVICE,
        revoked,
        service_tokens,
        settings.directory_grpc_target,
    )

    def ready() -> list[str]:
        problems = []
        if not consumer.consuming:
            problems.append("consumer_not_consuming")
        try:
            db.command("ping")
        except Exception:  # noqa: BLE001 - any database failure means not ready
            problems.append("database_unavailable")
        return problems

    app = build_app(auto_store, directory, verifier, ready=ready, max_body_bytes=settings.max_request_bytes)
    process.serve_http(app, common.http_host, settings.http_port)
    # gRPC health (NOT_SERVING from the start of a drain) and reflection, for the platform's probes.
    process.serve_grpc(GrpcServer([], verifier, host=common.grpc_host, port=settings.grpc_port))

    # Stopping lets the message in hand finish; unacked prefetched ones go back to the queue.
    process.background("consumer", lambda _stop: consumer.run())
    process.on_stop("consumer", consumer.stop)
    process.background("outbox-relay", relay.run_forever)
    process.on_stop("directory-client", directory.close, after_workers=True)
    process.on_stop("inbox-client", inbox.close, after_workers=True)
    process.on_stop("service-tokens", service_tokens.close, after_workers=True)
    process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
