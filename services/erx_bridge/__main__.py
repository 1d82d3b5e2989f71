"""python -m services.erx_bridge: eRx Notifications from the ePrescribing vendor onto prescribers'
boards (periodic and manual syncs), single sign-on into the vendor's portal and the Pending Rx
report (HTTP edge, gRPC health, outbox relay, sync workers)."""

from __future__ import annotations

import sys

from services.erx_bridge import config
from services.erx_bridge.http_api import create_app
from services.erx_bridge.service import build
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.kit.http import record_refusals


def wire(service: ServiceWiring[config.ErxBridgeSettings]) -> None:
    settings = service.settings
    bridge = build(settings, service.database(), cipher=service.cipher(), service_tokens=service.service_tokens())
    service.client("erx-bridge-clients", bridge)  # the directory client and vendor adapters build() opened
    service.relay(bridge.outbox_collections, batch_size=settings.relay_batch_size)
    app = create_app(bridge, service.verifier())
    service.http(record_refusals(app, service.security_log()), settings.http_port)
    # Health and reflection only (probes): the bridge serves no gRPC API of its own.
    service.grpc([], settings.grpc_port)
    # The sync pools stop with the workers (a sync in hand gives up at its next vendor call and is
    # recorded as interrupted), before the relay publishes what they staged.
    service.workers(bridge.background())


def main() -> int:
    return bootstrap.serve(config.SERVICE, config.load, wire)


if __name__ == "__main__":
    sys.exit(main())
