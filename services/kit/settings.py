"""Settings from the environment, validated once at start-up.

Each service's config.py builds its settings with `Env`; every problem is
collected and reported together, so an operator fixes them in one pass.
Development mode generates missing keys and secrets into the git-ignored run
folder; production mode refuses to start without them.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import secrets
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.kit.transport import GRPC_TLS_VARIABLES, GrpcTls, grpc_tls_from

REPO_ROOT = Path(__file__).resolve().parents[2]
MODES = ("development", "production")


class SettingsError(Exception):
    """Every invalid or missing setting, listed; a service's main prints it and exits with `code` (2)."""

    def __init__(self, service: str, problems: list[str]):
        self.problems = problems
        text = f"{service}: invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)
        self.code = 2
        self.text = text

    def __str__(self) -> str:
        return self.text


class Env:
    """Typed reads of environment variables that record problems instead of failing one at a time."""

    def __init__(self, service: str, environ: Mapping[str, str] | None = None):
        self.service = service
        self.environ = dict(os.environ if environ is None else environ)
        self.problems: list[str] = []
        self._unreadable: set[str] = set()
        self.mode = self.choice("CLINIC_MODE", MODES, "development")
        self.run_dir = Path(self.str("CLINIC_RUN_DIR", str(REPO_ROOT / ".run"))).resolve()

    @property
    def production(self) -> bool:
        return self.mode == "production"

    def _raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._raw(name)
        if value is None:
            if required or default is None:
                self.problems.append(f"{name} is required")
                return ""
            return default
        return value

    def int(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be an integer, got {raw!r}")
            return default
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            self.problems.append(f"{name} must be between {minimum} and {maximum}, got {value}")
        return value

    def float(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name} must be a number, got {raw!r}")
            return default
        if value < minimum:
            self.problems.append(f"{name} must be at least {minimum}, got {value}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        """1/true/yes/on or 0/false/no/off (any case)."""
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self._raw(name) or default
        if value not in choices:
            self.problems.append(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def url(self, name: str, default: str | None, schemes: tuple[str, ...]) -> str:
        value = self.str(name, default)
        if value:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in schemes or not parts.hostname:
                self.problems.append(f"{name} must be a {'/'.join(schemes)} URL, got {redact_url(value)!r}")
        return value

    def secret(self, name: str, file_name: str, generate: Callable[[], str]) -> str:
        """A secret from the environment (or NAME_FILE); in development generated once into the run folder."""
        value = self.given_secret(name)
        if value is not None:
            return value
        if f"{name}_FILE" in self._unreadable:
            return ""
        if self.production:
            self.problems.append(f"{name} (or {name}_FILE) is required in production")
            return ""
        return dev_secret(self.run_dir, file_name, generate)

    def given_secret(self, name: str) -> str | None:
        """NAME, or the contents of the file NAME_FILE names; None when neither is set (or readable)."""
        value = self._raw(name)
        file_path = self._raw(f"{name}_FILE")
        if value is None and file_path:
            try:
                value = Path(file_path).read_text().strip()
            except OSError as exc:
                self.problems.append(f"{name}_FILE cannot be read: {exc.strerror}")
                self._unreadable.add(f"{name}_FILE")
                return None
        return value

    def service_client_secret(self, client_id: str) -> str:
        """This service's SERVICE_CLIENT_SECRET (or _FILE), with which it asks directory for service
        tokens; in development the secret directory generated for `client_id` in the run folder."""
        return self.secret("SERVICE_CLIENT_SECRET", service_secret_file(client_id), new_service_secret)

    def done(self) -> None:
        if self.problems:
            raise SettingsError(self.service, self.problems)


def dev_secret(run_dir: Path, file_name: str, generate: Callable[[], str]) -> str:
    """Read a development secret, creating it atomically if absent (safe when processes race)."""
    secrets_dir = run_dir / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = secrets_dir / file_name
    if not path.exists():
        tmp = secrets_dir / f".{file_name}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(generate())
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # fails if another process won the race; theirs is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


# Service clients directory knows in development (one dev secret each in <run dir>/secrets/).
SERVICE_CLIENT_NAMES = ("inbox", "notifications", "erx-bridge", "cloud-comms", "auto-reply", "web", "audit")


def service_secret_file(client_id: str) -> str:
    return f"service-{client_id}.secret"


def new_service_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_digest(secret: str) -> str:
    """What directory's SERVICE_CLIENTS holds for a client: the SHA-256 of its secret, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ServiceClientCredentials:
    client_id: str
    secret: str = field(repr=False)


def service_client_credentials(client_id: str, environ: Mapping[str, str] | None = None) -> ServiceClientCredentials:
    """Read SERVICE_CLIENT_SECRET (or _FILE) for the service `client_id`; SettingsError when missing in
    production. Every calling service reads its credentials through this one function."""
    env = Env(client_id, environ)
    secret = env.service_client_secret(client_id)
    env.done()
    return ServiceClientCredentials(client_id, secret)


def random_key_b64() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def redact_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


TRUSTED_NETWORK = "CLINIC_TRUSTED_NETWORK"


@dataclass(frozen=True)
class TransportPolicy:
    """How this process reaches MongoDB, RabbitMQ and the other services: `plaintext` names each
    link without TLS. Production refuses any unless CLINIC_TRUSTED_NETWORK=1 says the network
    itself is protected; that override is logged as a warning at every start (services.kit.bootstrap)."""

    grpc_tls: GrpcTls | None = None
    plaintext: tuple[str, ...] = ()
    trusted_network: bool = False


def mongo_uses_tls(uri: str) -> bool:
    """mongodb+srv is TLS unless told otherwise; mongodb:// only with tls=true or ssl=true."""
    parts = urllib.parse.urlsplit(uri)
    options = {k.lower(): v.lower() for k, v in urllib.parse.parse_qsl(parts.query)}
    flag = options.get("tls", options.get("ssl"))
    if parts.scheme == "mongodb+srv":
        return flag not in ("false", "0")
    return flag in ("true", "1")


def transport_policy(env: Env, *, mongo_uri: str | None, amqp_url: str | None, grpc: bool = True) -> TransportPolicy:
    """Check the transport settings of one process (what it uses: a None URL is not used; `grpc`
    False for a process with no gRPC). GRPC_TLS_* are all or none in every mode; in production
    each plaintext link is a problem unless CLINIC_TRUSTED_NETWORK=1."""
    tls = grpc_tls_from(env.environ, env.problems) if grpc else None
    trusted = env.str(TRUSTED_NETWORK, "0").lower() in ("1", "true", "yes")
    plaintext = []
    if mongo_uri and not mongo_uses_tls(mongo_uri):
        plaintext.append("MongoDB (MONGO_URI without tls=true)")
    if amqp_url and urllib.parse.urlsplit(amqp_url).scheme != "amqps":
        plaintext.append("RabbitMQ (AMQP_URL is not amqps://)")
    ca_file = env.str("AMQP_CA_FILE", "")
    if ca_file and not os.access(ca_file, os.R_OK):
        env.problems.append(f"AMQP_CA_FILE cannot be read: {ca_file}")
    if grpc and tls is None and not any(env._raw(name) for name in GRPC_TLS_VARIABLES):  # (a partial set: above)
        plaintext.append("gRPC (GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE, GRPC_TLS_CA_FILE unset)")
    if env.production and not trusted:
        for link in plaintext:
            env.problems.append(
                f"{link} would carry PHI in plaintext, which production refuses; configure TLS"
                f" (docs/transport-security.md), or set {TRUSTED_NETWORK}=1 if the network itself is protected"
            )
    return TransportPolicy(grpc_tls=tls, plaintext=tuple(plaintext), trusted_network=trusted)


@dataclass(frozen=True)
class CommonSettings:
    """What every service process needs."""

    service: str
    mode: str
    run_dir: Path
    mongo_uri: str
    mongo_db: str
    amqp_url: str
    events_exchange: str
    phi_master_keys: dict[str, bytes]
    phi_master_key_id: str
    log_level: str
    grpc_host: str
    http_host: str
    transport: TransportPolicy = field(default_factory=TransportPolicy)

    @property
    def production(self) -> bool:
        return self.mode == "production"


EMBEDDED_MONGO_URI = "mongodb://127.0.0.1:27018/"


def common_settings(env: Env) -> CommonSettings:
    service = env.service
    mongo_uri = env.url("MONGO_URI", None if env.production else EMBEDDED_MONGO_URI, ("mongodb", "mongodb+srv"))
    prefix = env.str("MONGO_DB_PREFIX", "clinic_")
    master_raw = env.secret("PHI_MASTER_KEYS", "phi-master-keys", lambda: f"dev1:{random_key_b64()}")
    keys = parse_master_keys(master_raw, env.problems)
    default_id = next(iter(keys), "")
    active = env.str("PHI_MASTER_KEY_ID", default_id) if keys else ""
    if keys and active not in keys:
        env.problems.append(f"PHI_MASTER_KEY_ID {active!r} is not one of the ids in PHI_MASTER_KEYS")
    amqp_url = env.url("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", ("amqp", "amqps"))
    return CommonSettings(
        service=service,
        mode=env.mode,
        run_dir=env.run_dir,
        mongo_uri=mongo_uri,
        mongo_db=f"{prefix}{service}",
        amqp_url=amqp_url,
        events_exchange=env.str("EVENTS_EXCHANGE", "clinic.events"),
        phi_master_keys=keys,
        phi_master_key_id=active,
        log_level=env.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        grpc_host=env.str("GRPC_HOST", "127.0.0.1"),
        http_host=env.str("HTTP_HOST", "127.0.0.1"),
        transport=transport_policy(env, mongo_uri=mongo_uri, amqp_url=amqp_url),
    )


def parse_master_keys(raw: str, problems: list[str]) -> dict[str, bytes]:
    """PHI_MASTER_KEYS is 'id:base64key[,id:base64key...]'; each key is 32 random bytes (AES-256)."""
    keys: dict[str, bytes] = {}
    if not raw:
        return keys
    for item in raw.split(","):
        key_id, _, encoded = item.strip().partition(":")
        try:
            key = base64.b64decode(encoded, validate=True)
        except ValueError:
            key = b""
        if not key_id or len(key) != 32:
            problems.append("PHI_MASTER_KEYS entries must be 'id:<base64 of 32 bytes>'")
            continue
        keys[key_id] = key
    return keys


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def development_listener(env: Env, prefix: str, default_port: int, what: str) -> tuple[str, int]:
    """(host, port) of a development-only process (a vendor simulator): refused in production, and
    bound to loopback unless `<prefix>_ALLOW_REMOTE=1` (its control API has no authentication)."""
    if env.production:
        env.problems.append(f"the {what} is for development and tests only (CLINIC_MODE is production)")
    host = env.str(f"{prefix}_HOST", "127.0.0.1")
    allow_remote = env.str(f"{prefix}_ALLOW_REMOTE", "0").lower() in ("1", "true", "yes")
    if not _loopback(host) and not allow_remote:
        env.problems.append(
            f"{prefix}_HOST must be a loopback address (its control API has no authentication), got {host!r};"
            f" set {prefix}_ALLOW_REMOTE=1 to bind it elsewhere anyway"
        )
    return host, env.int(f"{prefix}_PORT", default_port, minimum=0, maximum=65535)
