"""python -m services.web: the Message Board page, its sign-in endpoints and live board events."""

from __future__ import annotations

import logging
import sys

from services.kit.auth import JwksKeySource, RevokedSessions, TokenVerifier
from services.kit.bus import Topology
from services.kit.logs import configure_logging
from services.kit.revocations import instance_id, start_revocation_listener
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import ServiceTokens
from services.kit.settings import SettingsError, service_client_credentials
from services.web import config
from services.web.http_api import build_app
from services.web.live import BoardEvents, Hub
from services.web.sessions import DirectorySessions

log = logging.getLogger("web")


def main() -> int:
    configure_logging("web")
    try:
        settings = config.load()
        credentials = service_client_credentials("web")
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging("web", settings.log_level)
    topology = Topology(exchange=settings.events_exchange)
    revoked = RevokedSessions()
    verifier = TokenVerifier(JwksKeySource(settings.directory_jwks_url), revoked=revoked)
    service_tokens = ServiceTokens(settings.directory_grpc_target, credentials.client_id, credentials.secret)
    hub = Hub(settings.max_streams, settings.max_streams_per_staff)
    board_events = BoardEvents(hub, settings.amqp_url, topology, instance_id())

    process = ServiceProcess("web")
    start_revocation_listener(
        process, settings.amqp_url, topology, "web", revoked, service_tokens, settings.directory_grpc_target
    )
    process.background("board-events", board_events.run)
    if not board_events.consumer.wait_until_consuming(10.0):
        log.warning("serving before the board events queue was consumed; the consumer keeps trying")
    https_only = all(origin.startswith("https://") for origin in settings.allowed_origins)
    sessions = DirectorySessions(settings.directory_http_url, settings.refresh_cookie_max_age_s, https_only)
    app = build_app(sessions, hub, verifier, settings, live_ready=lambda: board_events.consumer.consuming)
    process.serve_http(app, settings.http_host, settings.http_port, threads=settings.http_threads)
    process.on_stop("event-streams", hub.close)
    process.on_stop("service-tokens", service_tokens.close)
    process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
