"""python -m services.inbox: the mailbox of record (HTTP edge, gRPC, outbox relay)."""

from __future__ import annotations

import logging
import sys

from services.inbox import config
from services.inbox.http_api import build_app
from services.inbox.service import build
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.kit.http import record_refusals

log = logging.getLogger("inbox")


def wire(service: ServiceWiring[config.InboxSettings]) -> None:
    settings = service.settings
    inbox = build(settings, service.database(), cipher=service.cipher(), service_tokens=service.service_tokens())
    service.client("inbox-clients", inbox)  # the directory client build() opened
    migrated = inbox.components.store.migrate_legacy_items()
    if migrated:
        log.info("board items rewritten in the current shape", extra={"count": migrated})
    service.relay(inbox.outbox_collections, batch_size=settings.relay_batch_size)
    app = build_app(inbox.components, service.verifier())
    service.http(record_refusals(app, service.security_log()), settings.http_port)
    service.grpc([inbox.grpc_binding()], settings.grpc_port)
    service.workers(inbox.background())


def main() -> int:
    return bootstrap.serve("inbox", config.load, wire)


if __name__ == "__main__":
    sys.exit(main())
