"""eFax settings, read from the service's kit `Env` by services/cloud_comms/config.py.

CLOUD_FAX_PROVIDER                "phaxio" (the only one for now)
CLOUD_FAX_CALLBACK_TOKEN (_FILE)  the provider's callback (webhook) token: the HMAC key of every
                                  callback's X-Phaxio-Signature. Secret; required in production
CLOUD_FAX_API_URL                 the provider's API root (development: the fax simulator)
CLOUD_FAX_API_KEY / _SECRET       (or _FILE) API credentials for sending; required in production
CLOUD_FAX_PUBLIC_CALLBACK_URL     the public root of the callbacks exactly as configured at the
                                  provider (the signature covers it): <root>/received, <root>/status
CLOUD_FAX_MAX_PDF_BYTES           the largest PDF received or sent (20 MiB)
CLOUD_FAX_SEND_ATTEMPTS           tries of one send when the provider cannot be reached or
                                  answers 5xx, before the fax fails (5)
CLOUD_FAX_SEND_RETRY_S            the wait before the second try, doubled for each next one (10)
CLOUD_FAX_SEND_PASS_S             how often the sender looks for faxes to send (1)
CLOUD_FAX_SEND_TIMEOUT_S          the provider's time to answer one upload (60)
CLOUD_FAX_SEND_LEASE_S            how long a claimed send is left to its sender before another
                                  replica takes it over; longer than any upload (300)
CLOUD_FAX_ALLOWED_COUNTRY_CODES   the E.164 country codes Send Fax may dial, comma-separated ("1":
                                  the NANP only); other destinations are 400 destination_not_allowed
"""

from __future__ import annotations

import re
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
UPLOAD_CONNECT_S = 5.0  # the connect timeout of a send (phaxio_api.CONNECT_TIMEOUT_S)
DEFAULT_COUNTRY_CODES = ("1",)
COUNTRY_CODE = re.compile(r"^[1-9][0-9]{0,2}$")


@dataclass(frozen=True)
class FaxSettings:
    provider: str = "phaxio"
    callback_token: str = field(default=DEV_CALLBACK_TOKEN, repr=False)
    api_url: str = DEV_API_URL
    api_key: str = field(default=DEV_API_KEY, repr=False)
    api_secret: str = field(default=DEV_API_SECRET, repr=False)
    public_callback_url: str = DEV_PUBLIC_CALLBACK_URL
    max_pdf_bytes: int = DEFAULT_MAX_PDF_BYTES
    send_attempts: int = 5
    send_retry_s: float = 10.0
    send_pass_s: float = 1.0
    send_timeout_s: float = 60.0
    send_lease_s: float = 300.0
    allowed_country_codes: tuple[str, ...] = DEFAULT_COUNTRY_CODES

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


def _country_codes(env: Env) -> tuple[str, ...]:
    text = env.str("CLOUD_FAX_ALLOWED_COUNTRY_CODES", ",".join(DEFAULT_COUNTRY_CODES))
    codes = tuple(dict.fromkeys(code.strip().lstrip("+") for code in text.split(",") if code.strip()))
    if not codes or not all(COUNTRY_CODE.fullmatch(code) for code in codes):
        env.problems.append("CLOUD_FAX_ALLOWED_COUNTRY_CODES must be a comma list of E.164 country codes (e.g. 1,44)")
        return DEFAULT_COUNTRY_CODES
    return codes


def load(env: Env) -> FaxSettings:
    """The eFax block; problems go to `env.problems` (the service's config reports them all)."""
    public = env.url(
        "CLOUD_FAX_PUBLIC_CALLBACK_URL", None if env.production else DEV_PUBLIC_CALLBACK_URL, ("http", "https")
    ).rstrip("/")
    if env.production and public.startswith("http://"):
        env.problems.append("CLOUD_FAX_PUBLIC_CALLBACK_URL must be https in production (faxes carry PHI)")
    settings = FaxSettings(
        provider=env.choice("CLOUD_FAX_PROVIDER", PROVIDERS, "phaxio"),
        callback_token=_secret(env, "CLOUD_FAX_CALLBACK_TOKEN", DEV_CALLBACK_TOKEN),
        api_url=env.url("CLOUD_FAX_API_URL", None if env.production else DEV_API_URL, ("http", "https")).rstrip("/"),
        api_key=_secret(env, "CLOUD_FAX_API_KEY", DEV_API_KEY),
        api_secret=_secret(env, "CLOUD_FAX_API_SECRET", DEV_API_SECRET),
        public_callback_url=public,
        max_pdf_bytes=env.int(
            "CLOUD_FAX_MAX_PDF_BYTES", DEFAULT_MAX_PDF_BYTES, minimum=1024, maximum=100 * 1024 * 1024
        ),
        send_attempts=env.int("CLOUD_FAX_SEND_ATTEMPTS", 5, minimum=1, maximum=50),
        send_retry_s=env.float("CLOUD_FAX_SEND_RETRY_S", 10.0),
        send_pass_s=env.float("CLOUD_FAX_SEND_PASS_S", 1.0, minimum=0.01),
        send_timeout_s=env.float("CLOUD_FAX_SEND_TIMEOUT_S", 60.0, minimum=1.0),
        send_lease_s=env.float("CLOUD_FAX_SEND_LEASE_S", 300.0, minimum=1.0),
        allowed_country_codes=_country_codes(env),
    )
    if settings.send_lease_s <= settings.send_timeout_s + UPLOAD_CONNECT_S:
        # A sender still uploading must never see its fax taken over by another replica.
        env.problems.append("CLOUD_FAX_SEND_LEASE_S must be longer than CLOUD_FAX_SEND_TIMEOUT_S + 5 s")
    return settings
