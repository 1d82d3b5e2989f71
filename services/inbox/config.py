"""Inbox settings: the only reader of the environment for this service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.kit import clock, faults, gateway_identity
from services.kit.settings import CommonSettings, Env, common_settings


@dataclass(frozen=True)
class InboxSettings:
    common: CommonSettings
    http_port: int
    grpc_port: int
    directory_grpc_target: str
    directory_jwks_url: str
    max_body_chars: int
    max_subject_chars: int
    max_request_bytes: int
    relay_batch_size: int
    recipients_cache_s: float
    # Keys that prove a partner identity came from the gateway (current first; services.kit.gateway_identity).
    gateway_identity_keys: tuple[str, ...] = field(default=(), repr=False)
    # The counter drift check (services/inbox/counter_check.py): how often a pass runs (0: never), how
    # many boards and items one pass may read, and how long a drift must stay unchanged to be repaired.
    counter_check_interval_s: float = 600.0
    counter_check_boards: int = 100
    counter_check_max_items: int = 50_000
    counter_check_confirm_s: float = 60.0
    # Fault injection (services.kit.faults): points where this process kills itself; tests only.
    crash_points: frozenset[str] = frozenset()
    # A deadline clock tests may move forward (services.kit.clock); tests only.
    test_clock: bool = False
    # How often the signature/announcement deadline pass runs (services/inbox/deadlines.py; 0: never)
    # and the retention job (services/inbox/retention.py; 0: never, default a day).
    deadline_interval_s: float = 2.0
    retention_interval_s: float = 86_400.0
    # Dashboard consumers (gateway API keys) and the agencies each may read: "consumer=agy_a+agy_b,..."
    # (services/inbox/dashboards.py).
    dashboard_consumers: str = ""


def load(environ: Mapping[str, str] | None = None) -> InboxSettings:
    env = Env("inbox", environ)
    common = common_settings(env)
    settings = InboxSettings(
        common=common,
        http_port=env.int("INBOX_HTTP_PORT", 8102, minimum=0, maximum=65535),
        grpc_port=env.int("INBOX_GRPC_PORT", 50052, minimum=0, maximum=65535),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        max_body_chars=env.int("MESSAGE_MAX_BODY_CHARS", 20_000, minimum=1, maximum=200_000),
        max_subject_chars=env.int("MESSAGE_MAX_SUBJECT_CHARS", 200, minimum=1, maximum=1000),
        max_request_bytes=env.int("INBOX_MAX_REQUEST_BYTES", 256 * 1024, minimum=1024, maximum=8 * 1024 * 1024),
        relay_batch_size=env.int("OUTBOX_BATCH_SIZE", 500, minimum=1, maximum=5000),
        # How long a delivery may rely on directory's word that a staff member is active (0: always ask).
        recipients_cache_s=env.float("INBOX_RECIPIENTS_CACHE_S", 10.0, minimum=0.0),
        gateway_identity_keys=gateway_identity.read_keys(env),
        counter_check_interval_s=env.float("INBOX_COUNTER_CHECK_INTERVAL_S", 600.0),
        counter_check_boards=env.int("INBOX_COUNTER_CHECK_BOARDS", 100, minimum=1, maximum=10_000),
        counter_check_max_items=env.int("INBOX_COUNTER_CHECK_MAX_ITEMS", 50_000, minimum=100, maximum=10_000_000),
        counter_check_confirm_s=env.float("INBOX_COUNTER_CHECK_CONFIRM_S", 60.0),
        crash_points=faults.crash_points(env),
        test_clock=clock.test_clock_setting(env),
        deadline_interval_s=env.float("INBOX_DEADLINE_INTERVAL_S", 2.0, minimum=0.0),
        retention_interval_s=env.float("INBOX_RETENTION_INTERVAL_S", 86_400.0, minimum=0.0),
        dashboard_consumers=env.str(
            "INBOX_DASHBOARD_CONSUMERS", "" if env.production else "internal-dashboard=agy_riverbend"
        ),
    )
    env.done()
    return settings
