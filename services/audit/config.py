"""audit settings: the only reader of the environment for this service.

The audit service holds no PHI and decrypts nothing, so unlike the other services it reads no
PHI master keys: only its database, the broker, directory's keys (to check callers' tokens),
its own checkpoint signing key, where its witness file goes, and the patient reference keys
(services.kit.patient_ref) that turn a record number an auditor searches by into the reference
the trail holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.audit.signing import SigningKey, TrustedKeys, generate_private_pem, load_public_keys
from services.kit.patient_ref import PatientRefKeys, read_keys
from services.kit.settings import EMBEDDED_MONGO_URI, Env, TransportPolicy, transport_policy

SERVICE = "audit"
DEV_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class AuditSettings:
    mode: str
    run_dir: Path
    mongo_uri: str
    mongo_db: str
    amqp_url: str
    events_exchange: str
    log_level: str
    http_host: str
    grpc_host: str
    http_port: int
    grpc_port: int  # health and reflection only (native probes)
    directory_grpc_target: str
    directory_jwks_url: str
    queue: str
    max_retries: int
    retry_delay_ms: int
    prefetch: int
    # A signed checkpoint every `checkpoint_every` records of a chain, and at least every
    # `checkpoint_interval_s` for a chain that grew since its last one.
    checkpoint_every: int
    checkpoint_interval_s: float
    # The append-only witness file outside the database (services.audit.witness): a signed line of
    # every chain's head at each checkpoint pass. Required in production.
    witness_file: Path | None
    # An event whose occurred_at is further than this from its receipt is recorded with its skew.
    max_clock_skew_ms: int
    page_max: int
    export_max_rows: int
    max_request_bytes: int
    signing_key: SigningKey | None = field(repr=False)
    # The public keys a verification accepts: the signing key's and retired ones.
    trusted_keys: TrustedKeys = field(repr=False)
    # Its links in plaintext (production refuses them unless the network is trusted).
    transport: TransportPolicy | None = None
    # PATIENT_REF_KEY and PATIENT_REF_PREVIOUS_KEYS: a search by record number tries each.
    patient_ref_keys: PatientRefKeys = field(default_factory=PatientRefKeys, repr=False)

    @property
    def production(self) -> bool:
        return self.mode == "production"


def _signing_key(env: Env) -> SigningKey | None:
    pem = env.secret("AUDIT_SIGNING_KEY", "audit-signing-key.pem", generate_private_pem)
    if not pem:
        return None  # already reported (required in production, or its file unreadable)
    try:
        return SigningKey.from_pem(pem)
    except ValueError:
        env.problems.append("AUDIT_SIGNING_KEY must be an unencrypted Ed25519 private key in PEM (PKCS#8)")
        return None


def _retired_keys(env: Env) -> list:
    pem = env.given_secret("AUDIT_TRUSTED_PUBLIC_KEYS")
    try:
        return load_public_keys(pem or "")
    except ValueError:
        env.problems.append("AUDIT_TRUSTED_PUBLIC_KEYS must hold Ed25519 public keys in PEM")
        return []


def _witness_file(env: Env) -> Path | None:
    """AUDIT_WITNESS_PATH, an absolute path; in development `<run dir>/audit/witness.jsonl`."""
    given = env.str("AUDIT_WITNESS_PATH", "")
    if not given:
        if env.production:
            env.problems.append(
                "AUDIT_WITNESS_PATH is required in production (append-only storage outside the database)"
            )
            return None
        return env.run_dir / "audit" / "witness.jsonl"
    path = Path(given)
    if not path.is_absolute():
        env.problems.append("AUDIT_WITNESS_PATH must be an absolute path")
        return None
    return path


def load(environ: Mapping[str, str] | None = None) -> AuditSettings:
    env = Env(SERVICE, environ)
    mongo_uri = env.url("MONGO_URI", None if env.production else EMBEDDED_MONGO_URI, ("mongodb", "mongodb+srv"))
    signing_key = _signing_key(env)
    retired = _retired_keys(env)
    trusted = TrustedKeys([*([signing_key.public_key] if signing_key else []), *retired])
    amqp_url = env.url("AMQP_URL", None if env.production else DEV_AMQP_URL, ("amqp", "amqps"))
    settings = AuditSettings(
        mode=env.mode,
        run_dir=env.run_dir,
        mongo_uri=mongo_uri,
        mongo_db=f"{env.str('MONGO_DB_PREFIX', 'clinic_')}{SERVICE}",
        amqp_url=amqp_url,
        events_exchange=env.str("EVENTS_EXCHANGE", "clinic.events"),
        log_level=env.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        http_host=env.str("HTTP_HOST", "127.0.0.1"),
        grpc_host=env.str("GRPC_HOST", "127.0.0.1"),
        http_port=env.int("AUDIT_HTTP_PORT", 8108, minimum=0, maximum=65535),
        grpc_port=env.int("AUDIT_GRPC_PORT", 50058, minimum=0, maximum=65535),
        directory_grpc_target=env.str("DIRECTORY_GRPC_TARGET", "127.0.0.1:50051"),
        directory_jwks_url=env.url("DIRECTORY_JWKS_URL", "http://127.0.0.1:8101/api/v1/auth/jwks", ("http", "https")),
        queue=env.str("AUDIT_QUEUE", "audit.records"),
        max_retries=env.int("AUDIT_MAX_RETRIES", 10, minimum=0, maximum=100),
        retry_delay_ms=env.int("AUDIT_RETRY_DELAY_MS", 5_000, minimum=10, maximum=3_600_000),
        prefetch=env.int("AUDIT_PREFETCH", 64, minimum=1, maximum=1000),
        checkpoint_every=env.int("AUDIT_CHECKPOINT_EVERY", 1000, minimum=1, maximum=1_000_000),
        checkpoint_interval_s=env.float("AUDIT_CHECKPOINT_INTERVAL_S", 300.0, minimum=0.1),
        witness_file=_witness_file(env),
        max_clock_skew_ms=env.int("AUDIT_MAX_CLOCK_SKEW_S", 300, minimum=1, maximum=86_400) * 1000,
        page_max=env.int("AUDIT_PAGE_MAX", 200, minimum=1, maximum=1000),
        export_max_rows=env.int("AUDIT_EXPORT_MAX_ROWS", 10_000, minimum=1, maximum=1_000_000),
        max_request_bytes=env.int("AUDIT_MAX_REQUEST_BYTES", 16 * 1024, minimum=1024, maximum=1024 * 1024),
        signing_key=signing_key,
        trusted_keys=trusted,
        transport=transport_policy(env, mongo_uri=mongo_uri, amqp_url=amqp_url),
        patient_ref_keys=read_keys(env),
    )
    env.done()
    return settings
