"""The gateway listener's TLS: Kong's `KONG_PROXY_LISTEN 0.0.0.0:8443 ssl` with KONG_SSL_CERT and
KONG_SSL_CERT_KEY, from GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE (both or neither).

With them the listener speaks HTTPS only (TLS 1.2 at least), so tokens, API keys and the PHI in
requests never cross the network in the clear. Without them it speaks plain HTTP, which production
(CLINIC_MODE=production) refuses unless something else protects the link: a TLS-terminating load
balancer in front (GATEWAY_BEHIND_TLS_PROXY=1, the deploy/ shape) or a network declared trusted
(CLINIC_TRUSTED_NETWORK=1).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from services.gateway.model import GatewayModel
from services.kit.settings import TRUSTED_NETWORK, Env

CERT = "GATEWAY_TLS_CERT_FILE"
KEY = "GATEWAY_TLS_KEY_FILE"
BEHIND_TLS_PROXY = "GATEWAY_BEHIND_TLS_PROXY"
_YES = ("1", "true", "yes")


@dataclass(frozen=True)
class ListenerTls:
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["http/1.1"])  # HTTP/1.1 only, as the server speaks it
        return context


def read_listener_tls(env: Env) -> ListenerTls | None:
    """The listener's certificate and key, or None for plain HTTP; problems go to `env.problems`."""
    cert, key = env.str(CERT, ""), env.str(KEY, "")
    behind_proxy = env.str(BEHIND_TLS_PROXY, "0").lower() in _YES
    trusted = env.str(TRUSTED_NETWORK, "0").lower() in _YES
    if not cert and not key:
        if env.production and not (behind_proxy or trusted):
            env.problems.append(
                f"the gateway listener would carry PHI in plain HTTP, which production refuses; set {CERT} and {KEY}"
                f" (docs/transport-security.md), or {BEHIND_TLS_PROXY}=1 behind a TLS-terminating load balancer,"
                f" or {TRUSTED_NETWORK}=1 if the network itself is protected"
            )
        return None
    if not cert or not key:
        given, missing = (CERT, KEY) if cert else (KEY, CERT)
        env.problems.append(f"{missing} must be set with {given} (the listener's TLS takes both or neither)")
        return None
    unreadable = [f"{name} cannot be read: {value}" for name, value in ((CERT, cert), (KEY, key))
                  if not os.access(value, os.R_OK)]
    if unreadable:
        env.problems.extend(unreadable)
        return None
    tls = ListenerTls(Path(cert), Path(key))
    try:
        tls.server_context()
    except (OSError, ValueError):  # ssl.SSLError is an OSError; its text is not repeated
        env.problems.append(f"{CERT} and {KEY} must hold a PEM certificate (chain) and its private key")
        return None
    return tls


def route_problems(model: GatewayModel) -> list[str]:
    """On an HTTPS listener Kong matches only routes that list https: one that does not would never
    match here, so it is refused at start rather than silently served differently."""
    return [f"route {route.name or route.id}: unsupported by the local gateway: protocols {route.protocols}"
            f" exclude https, which the listener speaks ({CERT} is set)"
            for route in model.routes if "https" not in route.protocols]
