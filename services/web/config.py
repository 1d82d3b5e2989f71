"""Web settings: the only reader of the environment for this service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.kit.http import Network, parse_networks
from services.kit.settings import Env, TransportPolicy, transport_policy

DEV_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOOPBACK_PROXIES = "127.0.0.1/32,::1/128"


@dataclass(frozen=True)
class WebSettings:
    """The web service holds no PHI key and no database: it serves files, forwards sign-in to
    directory and relays delivery events, so it reads only what that needs."""

    mode: str
    amqp_url: str
    events_exchange: str
    log_level: str
    http_host: str
    http_port: int
    http_threads: int
    # The event stream server's port (services.web.event_server): the gateway routes /app/events there.
    events_port: int
    directory_http_url: str
    directory_grpc_target: str
    directory_jwks_url: str
    # Origins the page is served from (scheme://host[:port]); cookie-using requests from others are refused.
    allowed_origins: tuple[str, ...]
    refresh_cookie_max_age_s: int
    events_heartbeat_s: float
    max_streams: int
    max_streams_per_staff: int
    # The hops in front (the gateway) whose X-Real-IP names the client; passed on to directory so the
    # page's sign-ins spend the client's budget (docs/sessions.md).
    trusted_proxies: tuple[Network, ...] = field(default_factory=lambda: parse_networks(LOOPBACK_PROXIES))
    # Its links in plaintext (production refuses them unless the network is trusted; the broker and
    # directory's gRPC are all it uses).
    transport: TransportPolicy | None = None


def load(environ: Mapping[str, str] | None = None) -> WebSettings:
    env = Env("web", environ)
    # Production names its own page origin(s) and broker; development defaults to this machine.
    dev_origins = None if env.production else "http://127.0.0.1:8000,http://localhost:8000"
    origins = tuple(o.strip().rstrip("/") for o in env.str("WEB_ALLOWED_ORIGINS", dev_origins).split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
            env.problems.append(f"WEB_ALLOWED_ORIGINS entries must be scheme://host[:port], got {origin!r}")
    amqp_url = env.url("AMQP_URL", None if env.production else DEV_AMQP_URL, ("amqp", "amqps"))
    settings = WebSettings(
        mode=env.mode,
        amqp_url=amqp_url,
        events_exchange=env.str("EVENTS_EXCHANGE", "clinic.events"),
        log_level=env.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        http_host=env.str("HTTP_HOST", "127.0.0.1"),
        http_port=env.int("WEB_HTTP_PORT", 8105, minimum=0, maximum=65535),
        # The page, sign-in, activity reports and the documents: no thread is held by an open page.
        http_threads=env.int("WEB_HTTP_THREADS", 48, minimum=4, maximum=512),
        events_port=env.int("WEB_EVENTS_PORT", 8109, minimum=0, maximum=65535),
        directory_http_url=env.url("DIRECTORY_HTTP_URL", "http://127.0.0.1:8101", ("http", "https")).rstrip("/"),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        allowed_origins=origins,
        refresh_cookie_max_age_s=env.int("WEB_REFRESH_COOKIE_MAX_AGE_S", 8 * 3600, minimum=300, maximum=30 * 24 * 3600),
        # Below the gateway's read_timeout (30 s), so an idle stream is never cut as a stalled upstream.
        events_heartbeat_s=env.float("WEB_EVENTS_HEARTBEAT_S", 15.0, minimum=0.2),
        # An open stream is a connection and a few small objects on the event stream server's loop.
        max_streams=env.int("WEB_MAX_EVENT_STREAMS", 5_000, minimum=1, maximum=100_000),
        max_streams_per_staff=env.int("WEB_MAX_EVENT_STREAMS_PER_STAFF", 6, minimum=1, maximum=100),
        trusted_proxies=trusted_proxies(env),
        transport=transport_policy(env, mongo_uri=None, amqp_url=amqp_url, grpc=True),
    )
    env.done()
    return settings


def trusted_proxies(env: Env) -> tuple[Network, ...]:
    try:
        return parse_networks(env.str("TRUSTED_PROXIES", LOOPBACK_PROXIES))
    except ValueError as exc:
        env.problems.append(f"TRUSTED_PROXIES: {exc}")
        return ()
