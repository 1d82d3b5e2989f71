"""The web service's parts wired together, for the process entry point and for tests; nothing is
started here (the board events consumer connects when it runs). Web keeps no database."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit import metrics
from services.kit.bus import Topology
from services.kit.revocations import instance_id
from services.web.config import WebSettings
from services.web.live import BoardEvents, Hub
from services.web.sessions import DirectorySessions


@dataclass
class Web:
    settings: WebSettings
    hub: Hub
    board_events: BoardEvents
    sessions: DirectorySessions

    def live_ready(self) -> bool:
        """Whether delivery events reach this instance (the readiness answer)."""
        return self.board_events.consumer.consuming


def build(
    settings: WebSettings,
    *,
    sessions: DirectorySessions | None = None,
    hub: Hub | None = None,
    instance: str | None = None,
) -> Web:
    """The page's sign-in (`sessions`, forwarding to directory), the live streams' `hub` and the
    board events consumer feeding it from a queue of this instance (`instance`: a fresh id)."""
    hub = hub or Hub(settings.max_streams, settings.max_streams_per_staff)
    metrics.track_live_streams(lambda: hub.streams)  # clinic_live_streams_open, read at each scrape
    topology = Topology(exchange=settings.events_exchange)
    board_events = BoardEvents(hub, settings.amqp_url, topology, instance or instance_id())
    if sessions is None:
        https_only = all(origin.startswith("https://") for origin in settings.allowed_origins)
        sessions = DirectorySessions(
            settings.directory_http_url, settings.refresh_cookie_max_age_s, https_only, settings.trusted_proxies
        )
    return Web(settings, hub, board_events, sessions)
