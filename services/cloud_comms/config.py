"""cloud-comms settings: the only reader of the environment for this service.

Each channel has its own settings block, read by its own package from the same kit `Env`:
`direct` (services/cloud_comms/direct/settings.py), `fax` (services/cloud_comms/fax/settings.py) and
`triage` (services/cloud_comms/triage/settings.py).
Every problem of every block is reported in one pass (an invalid configuration exits 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from services.cloud_comms.direct import settings as direct_settings
from services.cloud_comms.direct import smtp_tls
from services.cloud_comms.direct.settings import DirectSettings
from services.cloud_comms.direct.smtp_tls import SmtpTls
from services.cloud_comms.fax import settings as fax_settings
from services.cloud_comms.fax.settings import FaxSettings
from services.cloud_comms.triage import settings as triage_settings
from services.cloud_comms.triage.settings import TriageSettings
from services.kit.settings import CommonSettings, Env, common_settings

SERVICE = "cloud-comms"


@dataclass(frozen=True)
class CloudCommsSettings:
    common: CommonSettings
    http_port: int
    grpc_port: int
    # The SMTP listener (the agency's HISP edge for inbound Direct).
    smtp_host: str
    smtp_port: int
    directory_grpc_target: str
    directory_jwks_url: str
    public_url: str
    max_request_bytes: int
    relay_batch_size: int
    direct: DirectSettings
    fax: FaxSettings
    triage: TriageSettings
    # How long a resolved cloud address (Direct address, fax number) is cached.
    address_cache_s: float = 30.0
    # STARTTLS on the SMTP listener and towards the relay (services/cloud_comms/direct/smtp_tls.py).
    smtp_tls: SmtpTls = field(default_factory=SmtpTls)


def load(environ: Mapping[str, str] | None = None) -> CloudCommsSettings:
    env = Env(SERVICE, environ)
    common = common_settings(env)
    direct = direct_settings.load(env)
    tls = smtp_tls.load(env, trusted_network=common.transport.trusted_network, relay_configured=bool(direct.relay_host))
    common = replace(common, transport=replace(common.transport, plaintext=common.transport.plaintext + tls.plaintext))
    settings = CloudCommsSettings(
        common=common,
        http_port=env.int("CLOUD_COMMS_HTTP_PORT", 8107, minimum=0, maximum=65535),
        grpc_port=env.int("CLOUD_COMMS_GRPC_PORT", 50057, minimum=0, maximum=65535),
        smtp_host=env.str("CLOUD_SMTP_HOST", "127.0.0.1"),
        smtp_port=env.int("CLOUD_SMTP_PORT", 2525, minimum=0, maximum=65535),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        public_url=env.url("CLOUD_COMMS_PUBLIC_URL", "http://127.0.0.1:8000", ("http", "https")).rstrip("/"),
        max_request_bytes=env.int("CLOUD_COMMS_MAX_REQUEST_BYTES", 256 * 1024, minimum=1024, maximum=8 * 1024 * 1024),
        relay_batch_size=env.int("OUTBOX_BATCH_SIZE", 500, minimum=1, maximum=5000),
        address_cache_s=env.float("CLOUD_ADDRESS_CACHE_S", 30.0, minimum=0.0),
        direct=direct,
        fax=fax_settings.load(env),
        triage=triage_settings.load(env),
        smtp_tls=tls,
    )
    env.done()
    return settings
