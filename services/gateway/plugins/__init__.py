"""The Kong plugins the local gateway reproduces, by name (and the project's own, clinic-identity-signer)."""

from __future__ import annotations

from services.gateway.plugins import (
    acl,
    correlation_id,
    cors,
    identity_signer,
    jwt,
    key_auth,
    opentelemetry,
    prometheus,
    rate_limiting,
)
from services.gateway.plugins import request_size_limiting as size_limiting
from services.gateway.plugins.base import Plugin, PluginSpec

REGISTRY: dict[str, PluginSpec] = {
    spec.name: spec
    for spec in (
        acl.SPEC,
        correlation_id.SPEC,
        cors.SPEC,
        identity_signer.SPEC,
        jwt.SPEC,
        key_auth.SPEC,
        opentelemetry.SPEC,
        prometheus.SPEC,
        rate_limiting.SPEC,
        size_limiting.SPEC,
    )
}

# Plugins bundled with Kong 3.9 that the local gateway does not reproduce: named so that a
# config using one gets "unsupported" rather than Kong's "not enabled" message.
KONG_BUNDLED = frozenset({
    "acme", "ai-azure-content-safety", "ai-prompt-decorator", "ai-prompt-guard", "ai-prompt-template",
    "ai-proxy", "ai-request-transformer", "ai-response-transformer", "aws-lambda", "azure-functions",
    "basic-auth", "bot-detection", "datadog", "file-log", "grpc-gateway", "grpc-web", "hmac-auth", "http-log",
    "ip-restriction", "ldap-auth", "loggly", "oauth2", "post-function", "pre-function",
    "proxy-cache", "redirect", "request-termination", "request-transformer", "response-ratelimiting",
    "response-transformer", "session", "standard-webhooks", "statsd", "syslog", "tcp-log", "udp-log", "zipkin",
})

__all__ = ["KONG_BUNDLED", "REGISTRY", "Plugin", "PluginSpec"]
