"""eFax settings, read from the service's kit `Env` by services/cloud_comms/config.py.

    CLOUD_FAX_PROVIDER                "phaxio" (the only one for now)
    CLOUD_FAX_CALLBACK_TOKEN (_FILE)  the provider's callback (webhook) token: the HMAC key of every
                                      callback's X-Phaxio-Signature. Secret; required in production
    CLOUD_FAX_API_URL                 the provider's API root (development: the fax simulator)
    CLOUD_FAX_API_KEY / _SECRET       (or _FILE) API credentials for sending; required in production
    CLOUD_FAX_PUBLIC_CALLBACK_URL     the public root of the callbacks exactly as configured at the
                                      provider (the signature covers it): <root>/received, <root>/status
    CLOUD_FAX_MAX_PDF_BYTES           the largest received PDF accepted (20 MiB)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.kit.settings import Env

PROVIDERS = ("phaxio",)
# Development values, shared with the fax simulator (services/fax_simulator): never valid in production.
DEV_CALLBACK_TOKEN = "dev-fax-callback-token-not-secret"  # noqa: S105 - development only
DEV_API_KEY = "dev-fax-api-key"
DEV_API_SECRET = "dev-fax-api-secret-not-secret"  # noqa: S105 - development only
DEV_API_URL = "http://127.0.0.1:8191"
DEV_PUBLIC_CALLBACK_URL = "http://127.0.0.1:8000/api/v1/fax/callbacks"
DEFAULT_MAX_PDF_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class FaxSettings:
    provider: str = "phaxio"
    callback_token: str = field(default=DEV_CALLBACK_TOKEN, repr=False)
    api_url: str = DEV_API_URL
    api_key: str = field(default=DEV_API_KEY, repr=False)
    api_secret: str = field(default=DEV_API_SECRET, repr=False)
    public_callback_url: str = DEV_PUBLIC_CALLBACK_URL
    max_pdf_bytes: int = DEFAULT_MAX_PDF_BYTES

    @property
    def received_callback_url(self) -> str:
        """The inbound-fax callback URL as the provider calls and signs it."""
        return f"{self.public_callback_url}/received"

    @property
    def status_callback_url(self) -> str:
        """The sent-fax status callback URL as the provider calls and signs it."""
        return f"{self.public_callback_url}/status"


def _secret(env: Env, name: str, dev_value: str) -> str:
    value = env.given_secret(name)
    if value is not None:
        return value
    if env.production:
        env.problems.append(f"{name} (or {name}_FILE) is required in production")
        return ""
    return dev_value


def load(env: Env) -> FaxSettings:
    """The eFax block; problems go to `env.problems` (the service's config reports them all)."""
    public = env.url(
        "CLOUD_FAX_PUBLIC_CALLBACK_URL", None if env.production else DEV_PUBLIC_CALLBACK_URL, ("http", "https")
    ).rstrip("/")
    if env.production and public.startswith("http://"):
        env.problems.append("CLOUD_FAX_PUBLIC_CALLBACK_URL must be https in production (faxes carry PHI)")
    return FaxSettings(
        provider=env.choice("CLOUD_FAX_PROVIDER", PROVIDERS, "phaxio"),
        callback_token=_secret(env, "CLOUD_FAX_CALLBACK_TOKEN", DEV_CALLBACK_TOKEN),
        api_url=env.url("CLOUD_FAX_API_URL", None if env.production else DEV_API_URL, ("http", "https")).rstrip("/"),
        api_key=_secret(env, "CLOUD_FAX_API_KEY", DEV_API_KEY),
        api_secret=_secret(env, "CLOUD_FAX_API_SECRET", DEV_API_SECRET),
        public_callback_url=public,
        max_pdf_bytes=env.int(
            "CLOUD_FAX_MAX_PDF_BYTES", DEFAULT_MAX_PDF_BYTES, minimum=1024, maximum=100 * 1024 * 1024
        ),
    )
