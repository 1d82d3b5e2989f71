"""Gateway settings: the only place this service reads the environment.

GATEWAY_HOST (default 127.0.0.1), GATEWAY_PORT (default 8000) and
GATEWAY_CONFIG (default gateway/kong.yml) say where to listen and what to
serve; GATEWAY_DRAIN_SECONDS bounds the wait for in-flight requests on
SIGTERM; GATEWAY_ACCESS_LOG=off silences the per-request log line. The DECK_*
variables are handed to the decK template renderer untouched.

Vault references in plugin configuration (`{vault://env/NAME}`) read the environment, as Kong's
env vault does; GATEWAY_IDENTITY_KEY (clinic-identity-signer's key) may also come from
GATEWAY_IDENTITY_KEY_FILE and, in development, from the run folder, where the services read the
same key (services.kit.gateway_identity).

GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE (both or neither) make the listener HTTPS only; production
refuses a plain HTTP listener unless GATEWAY_BEHIND_TLS_PROXY=1 or CLINIC_TRUSTED_NETWORK=1
(services.gateway.tls).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.tls import ListenerTls, read_listener_tls
from services.kit import gateway_identity
from services.kit.settings import REPO_ROOT, Env

SERVICE = "gateway"
DEFAULT_CONFIG = REPO_ROOT / "gateway" / "kong.yml"


@dataclass(frozen=True)
class GatewaySettings:
    host: str
    port: int
    config_path: Path
    drain_seconds: float
    access_log: bool
    log_level: str
    deck_env: Mapping[str, str]
    # What `{vault://env/...}` references read: the environment, with the gateway identity key.
    vault_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    tls: ListenerTls | None = None  # None: plain HTTP

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


def load(environ: Mapping[str, str] | None = None, config_path: str | None = None) -> GatewaySettings:
    """Read and validate every setting; raises SettingsError listing all problems at once."""
    env = Env(SERVICE, environ)
    host = env.str("GATEWAY_HOST", "127.0.0.1")
    port = env.int("GATEWAY_PORT", 8000, minimum=0, maximum=65535)
    path = Path(config_path or env.str("GATEWAY_CONFIG", str(DEFAULT_CONFIG)))
    drain = env.float("GATEWAY_DRAIN_SECONDS", 30.0)
    access_log = env.choice("GATEWAY_ACCESS_LOG", ("on", "off"), "on") == "on"
    level = env.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    identity_key = gateway_identity.read_keys(env)[:1]
    tls = read_listener_tls(env)
    env.done()
    deck_env = {k: v for k, v in env.environ.items() if k.startswith("DECK_")}
    vault_env = {**env.environ, gateway_identity.KEY_ENV: identity_key[0] if identity_key else ""}
    return GatewaySettings(host, port, path, drain, access_log, level, deck_env, vault_env, tls)
