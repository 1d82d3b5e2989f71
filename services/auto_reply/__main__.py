"""python -m services.auto_reply: Staff and Patient Auto-Reply (HTTP edge, message.delivered.v1
consumer, outbox relay for its access records)."""

from __future__ import annotations

import sys

from services.auto_reply import config
from services.auto_reply.http_api import build_app
from services.auto_reply.service import build
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.kit.http import record_refusals


def wire(service: ServiceWiring[config.AutoReplySettings]) -> None:
    settings = service.settings
    auto_reply = build(
        settings, service.database(), cipher=service.cipher(), service_tokens=service.service_tokens()
    )
    service.client("auto-reply-clients", auto_reply)  # the directory and inbox clients build() opened
    service.relay(auto_reply.outbox_collections)
    app = build_app(
        auto_reply.store,
        auto_reply.directory,
        service.verifier(),
        ready=auto_reply.ready,
        max_body_bytes=settings.max_request_bytes,
    )
    service.http(record_refusals(app, service.security_log()), settings.http_port)
    # gRPC health (NOT_SERVING from the start of a drain) and reflection, for the platform's probes.
    service.grpc([], settings.grpc_port)
    # Stopping lets the message in hand finish; unacked prefetched ones go back to the queue.
    consumer = auto_reply.consumer
    service.listener("consumer", lambda _stop: consumer.run(), stop=consumer.stop)


def main() -> int:
    return bootstrap.serve(config.SERVICE, config.load, wire)


if __name__ == "__main__":
    sys.exit(main())
