"""python -m services.cloud_comms: Direct secure messaging (SMTP listener, the agency's HISP edge)
and eFax onto staff boards (HTTP edge, gRPC health, outbox relay, MDN sender)."""

from __future__ import annotations

import sys

from services.cloud_comms import config
from services.cloud_comms.http_api import create_app
from services.cloud_comms.service import build
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.kit.http import record_refusals


def wire(service: ServiceWiring[config.CloudCommsSettings]) -> None:
    settings = service.settings
    comms = build(settings, service.database(), cipher=service.cipher(), service_tokens=service.service_tokens())
    service.client("cloud-comms-clients", comms)  # the directory client build() opened
    service.relay(comms.outbox_collections, batch_size=settings.relay_batch_size)
    app = create_app(comms.components, service.verifier(), ready_checks={"listeners": service.accepting})
    service.http(record_refusals(app, service.security_log()), settings.http_port)
    # Health and reflection only (probes): cloud-comms serves no gRPC API of its own yet.
    service.grpc([], settings.grpc_port)
    for name, run, ready in comms.listeners():  # the Direct SMTP listener (and any fax one)
        service.listener(name, run, ready=ready)
    service.workers(comms.background())


def main() -> int:
    return bootstrap.serve(config.SERVICE, config.load, wire)


if __name__ == "__main__":
    sys.exit(main())
