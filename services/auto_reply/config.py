"""auto-reply settings: the only reader of the environment for this service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.kit.settings import CommonSettings, Env, common_settings

SERVICE = "auto-reply"


@dataclass(frozen=True)
class AutoReplySettings:
    common: CommonSettings
    http_port: int
    grpc_port: int  # health and reflection only (native probes); auto-reply serves no RPCs of its own
    directory_grpc_target: str
    directory_jwks_url: str
    inbox_grpc_target: str
    queue: str
    max_retries: int
    retry_delay_ms: int
    prefetch: int
    max_request_bytes: int


def load(environ: Mapping[str, str] | None = None) -> AutoReplySettings:
    env = Env(SERVICE, environ)
    common = common_settings(env)
    settings = AutoReplySettings(
        common=common,
        http_port=env.int("AUTO_REPLY_HTTP_PORT", 8104, minimum=0, maximum=65535),
        grpc_port=env.int("AUTO_REPLY_GRPC_PORT", 50054, minimum=0, maximum=65535),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        inbox_grpc_target=env.str("INBOX_GRPC_TARGET", "127.0.0.1:50052"),
        queue=env.str("AUTO_REPLY_QUEUE", "auto-reply.message-delivered"),
        max_retries=env.int("AUTO_REPLY_MAX_RETRIES", 5, minimum=0, maximum=100),
        retry_delay_ms=env.int("AUTO_REPLY_RETRY_DELAY_MS", 5_000, minimum=10, maximum=3_600_000),
        prefetch=env.int("AUTO_REPLY_PREFETCH", 16, minimum=1, maximum=1000),
        max_request_bytes=env.int("AUTO_REPLY_MAX_REQUEST_BYTES", 64 * 1024, minimum=1024, maximum=1024 * 1024),
    )
    env.done()
    return settings
