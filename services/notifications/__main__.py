"""python -m services.notifications: lab results, schedule changes and compliance alerts into boards
(MLLP listener, HTTP edge, outbox relay)."""

from __future__ import annotations

import sys

from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.kit.http import record_refusals
from services.notifications import config
from services.notifications.http_api import create_app
from services.notifications.service import build


def wire(service: ServiceWiring[config.NotificationsSettings]) -> None:
    settings = service.settings
    notifications = build(
        settings, service.database(), cipher=service.cipher(), service_tokens=service.service_tokens()
    )
    service.client("notifications-clients", notifications)  # the directory client build() opened
    service.relay(notifications.outbox_collections, batch_size=settings.relay_batch_size)
    app = create_app(notifications.components, service.verifier(), ready_checks={"mllp": service.accepting})
    service.http(record_refusals(app, service.security_log()), settings.http_port)
    # Health and reflection only for now (probes); a feature needing a gRPC API adds a binding here.
    service.grpc([], settings.grpc_port)
    service.listener("mllp-listener", notifications.mllp_listener().run)
    service.workers(notifications.background())


def main() -> int:
    return bootstrap.serve("notifications", config.load, wire)


if __name__ == "__main__":
    sys.exit(main())
