"""python -m services.web: the Message Board page, its sign-in endpoints and live board events."""

from __future__ import annotations

import sys

from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.web import config
from services.web.event_server import EventStreamServer
from services.web.http_api import build_app
from services.web.service import build


def wire(service: ServiceWiring[config.WebSettings]) -> None:
    settings = service.settings
    web = build(settings)
    verifier = service.verifier()
    service.listener(
        "board-events",
        web.board_events.run,
        ready=web.board_events.consumer.wait_until_consuming,
        not_ready="serving before the board events queue was consumed; the consumer keeps trying",
    )
    # The event streams on their own port and loop, fed by the same hub as the consumer above.
    streams = EventStreamServer(web.hub, verifier, settings)
    service.listener(
        "event-streams",
        streams.run,
        ready=streams.wait_listening,
        not_ready="serving before the event stream server was listening",
    )
    app = build_app(web.sessions, web.hub, verifier, settings, live_ready=web.live_ready)
    service.http(app, settings.http_port, threads=settings.http_threads)
    service.on_stop("event-streams", web.hub.close)  # open streams end at once; pages reconnect


def main() -> int:
    return bootstrap.serve("web", config.load, wire)


if __name__ == "__main__":
    sys.exit(main())
