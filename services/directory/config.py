"""Directory settings: the only place this service reads the environment.

JWT_SIGNING_KEYS holds one or more PEM keys, concatenated. The first must be an
RSA private key: it signs new access tokens. The others (private or public PEM)
are earlier keys kept only so tokens they signed still verify until they
expire; publish them in the JWKS during a rotation, drop them after one access
token lifetime. In development a 2048-bit key is generated once into the run
folder; production refuses to start without the variable (or JWT_SIGNING_KEYS_FILE).

SERVICE_CLIENTS registers the services that may ask for service tokens:
`name:sha256hex[,name:sha256hex...]`, the hex SHA-256 of each client's secret
(the secret itself stays with that service, as its SERVICE_CLIENT_SECRET).
A name listed twice (old and new digest) accepts either secret, for rotation.
Required in production; in development each known client's secret is read from,
or generated into, `<run dir>/secrets/service-<name>.secret` and its digest used.

LOGIN_ATTEMPT_KEY (optional, at least 32 characters) keys the hash under which
failed sign-ins are counted. Without it the key is derived (HKDF) from the
active signing key, a secret only the directory holds; rotating that key then
merely restarts the failure counts.

TRUSTED_PROXIES lists the addresses or networks of the hops that call the
directory's HTTP port on a client's behalf (the gateway, the web service): the
X-Real-IP they state names the client whose sign-in budget is spent
(services.kit.http.client_address). Loopback only by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.directory import tokens
from services.directory.passwords import PROFILES
from services.kit import gateway_identity
from services.kit.auth import ACCESS_TOKEN_TTL_S
from services.kit.http import Network, parse_networks
from services.kit.settings import (
    SERVICE_CLIENT_NAMES,
    CommonSettings,
    Env,
    common_settings,
    dev_secret,
    new_service_secret,
    secret_digest,
    service_secret_file,
)

SERVICE = "directory"
CLIENT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MIN_LOGIN_ATTEMPT_KEY_CHARS = 32
LOGIN_ATTEMPT_KEY_INFO = b"clinic-directory login-attempt ids v1"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class LoginPolicy:
    """Sign-in limits (docs/sessions.md). max_failures failed sign-ins to one username from one client
    address within window_s lock that username for that address (only) for lockout_s;
    source_max_failures failures from one address, whatever the usernames, within a window refuse
    its sign-ins until that window ends; source_attempts_per_minute is every address's sign-in
    budget, whichever way it signs in."""

    max_failures: int = 10
    window_s: int = 15 * 60
    lockout_s: int = 15 * 60
    source_max_failures: int = 50
    source_attempts_per_minute: int = 60


LOOPBACK_PROXIES = "127.0.0.1/32,::1/128"


@dataclass(frozen=True)
class DirectorySettings:
    common: CommonSettings
    http_port: int
    grpc_port: int
    signing_keys: tokens.KeySet
    access_token_ttl_s: int
    refresh_token_ttl_s: int
    password_hash_profile: str
    login_policy: LoginPolicy
    # client id -> hex SHA-256 digests of its secrets (two while one is being rotated)
    service_clients: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    # keys the hash failed sign-ins are counted under (domain.login_attempt_key)
    login_attempt_key: bytes = field(default=b"", repr=False)
    # the hops whose X-Real-IP is believed (services.kit.http.client_address)
    trusted_proxies: tuple[Network, ...] = field(default_factory=lambda: parse_networks(LOOPBACK_PROXIES))
    # how often sessions past their idle limit are looked for and revoked
    idle_sweep_s: float = 20.0
    # keys that prove a partner identity came from the gateway (current first; services.kit.gateway_identity)
    gateway_identity_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def production(self) -> bool:
        return self.common.production


def load(environ: Mapping[str, str] | None = None) -> DirectorySettings:
    """Read and validate every setting; raises SettingsError listing all problems at once."""
    env = Env(SERVICE, environ)
    common = common_settings(env)
    http_port = env.int("DIRECTORY_HTTP_PORT", 8101, minimum=0, maximum=65535)
    grpc_port = env.int("DIRECTORY_GRPC_PORT", 50051, minimum=0, maximum=65535)
    pem = env.secret("JWT_SIGNING_KEYS", "jwt-signing-key.pem", tokens.generate_private_key_pem)
    signing_keys = None
    if pem:
        try:
            signing_keys = tokens.KeySet.from_pem(pem)
        except ValueError as exc:
            env.problems.append(f"JWT_SIGNING_KEYS: {exc}")
    access_ttl = env.int("ACCESS_TOKEN_TTL_S", ACCESS_TOKEN_TTL_S, minimum=60, maximum=ACCESS_TOKEN_TTL_S)
    refresh_ttl = env.int("REFRESH_TOKEN_TTL_S", 8 * 3600, minimum=300, maximum=30 * 24 * 3600)
    profile = env.choice("PASSWORD_HASH_PROFILE", tuple(PROFILES), "standard")
    if env.production and profile != "standard":
        env.problems.append("PASSWORD_HASH_PROFILE=fast is for tests only and is refused in production")
    policy = LoginPolicy(
        max_failures=env.int("LOGIN_MAX_FAILURES", LoginPolicy.max_failures, minimum=1, maximum=1000),
        window_s=env.int("LOGIN_FAILURE_WINDOW_S", LoginPolicy.window_s, minimum=1, maximum=24 * 3600),
        lockout_s=env.int("LOGIN_LOCKOUT_S", LoginPolicy.lockout_s, minimum=1, maximum=24 * 3600),
        source_max_failures=env.int(
            "LOGIN_SOURCE_MAX_FAILURES", LoginPolicy.source_max_failures, minimum=1, maximum=100_000
        ),
        source_attempts_per_minute=env.int(
            "LOGIN_SOURCE_ATTEMPTS_PER_MINUTE", LoginPolicy.source_attempts_per_minute, minimum=1, maximum=100_000
        ),
    )
    service_clients = load_service_clients(env)
    attempt_key = load_login_attempt_key(env, signing_keys)
    gateway_identity_keys = gateway_identity.read_keys(env)
    trusted_proxies: tuple[Network, ...] = ()
    try:
        trusted_proxies = parse_networks(env.str("TRUSTED_PROXIES", LOOPBACK_PROXIES))
    except ValueError as exc:
        env.problems.append(f"TRUSTED_PROXIES: {exc}")
    idle_sweep_s = env.float("SESSION_IDLE_SWEEP_S", 20.0, minimum=0.2)
    if idle_sweep_s > 30:
        env.problems.append("SESSION_IDLE_SWEEP_S must be at most 30 (idle sessions must end within a minute)")
    env.done()
    assert signing_keys is not None  # env.done() raised otherwise
    return DirectorySettings(
        common=common,
        http_port=http_port,
        grpc_port=grpc_port,
        signing_keys=signing_keys,
        access_token_ttl_s=access_ttl,
        refresh_token_ttl_s=refresh_ttl,
        password_hash_profile=profile,
        login_policy=policy,
        service_clients=service_clients,
        login_attempt_key=attempt_key,
        trusted_proxies=trusted_proxies,
        idle_sweep_s=idle_sweep_s,
        gateway_identity_keys=gateway_identity_keys,
    )


def load_login_attempt_key(env: Env, signing_keys: tokens.KeySet | None) -> bytes:
    """LOGIN_ATTEMPT_KEY (or _FILE), else a key derived from the active signing key (module docstring)."""
    given = env.given_secret("LOGIN_ATTEMPT_KEY")
    if given is not None:
        if len(given) < MIN_LOGIN_ATTEMPT_KEY_CHARS:
            env.problems.append(f"LOGIN_ATTEMPT_KEY must be at least {MIN_LOGIN_ATTEMPT_KEY_CHARS} characters")
        return given.encode("utf-8")
    if signing_keys is None or signing_keys.active.private_key is None:
        return b""  # JWT_SIGNING_KEYS is already reported
    der = signing_keys.active.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LOGIN_ATTEMPT_KEY_INFO).derive(der)


def load_service_clients(env: Env) -> dict[str, tuple[str, ...]]:
    raw = env.given_secret("SERVICE_CLIENTS")
    if raw is not None:
        return parse_service_clients(raw, env.problems)
    if env.production:
        env.problems.append("SERVICE_CLIENTS (or SERVICE_CLIENTS_FILE) is required in production")
        return {}
    return {
        name: (secret_digest(dev_secret(env.run_dir, service_secret_file(name), new_service_secret)),)
        for name in SERVICE_CLIENT_NAMES
    }


def parse_service_clients(raw: str, problems: list[str]) -> dict[str, tuple[str, ...]]:
    """'name:sha256hex[,name:sha256hex...]' -> {name: digests}; every bad entry is a problem.

    A name may appear twice while its secret is rotated: either secret is accepted.
    """
    clients: dict[str, tuple[str, ...]] = {}
    before = len(problems)
    for position, item in enumerate(raw.split(","), start=1):
        name, _, digest = item.strip().partition(":")
        name, digest = name.strip(), digest.strip().lower()
        if not CLIENT_NAME.fullmatch(name) or not SHA256_HEX.fullmatch(digest):
            problems.append(
                f"SERVICE_CLIENTS entry {position} must be 'name:<hex SHA-256 of the secret>' "
                "(name: lowercase letters, digits, '-')"
            )
            continue
        if digest not in clients.get(name, ()):
            clients[name] = (*clients.get(name, ()), digest)
    if not clients and len(problems) == before:
        problems.append("SERVICE_CLIENTS lists no client")
    return clients
