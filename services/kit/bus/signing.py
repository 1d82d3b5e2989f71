"""Who may say what on the bus: Ed25519-signed messages, the producers' public keys, and which
producer may publish which event type.

An envelope names its own `producer` and `agency_id`; anyone who can publish to the exchange can
write any of them. So every service signs what it publishes with a key of its own, and every
consumer checks, before its handler runs, that the message was signed by the producer the
envelope names and that this producer may publish this event type:

- the publisher (`Publisher`, `BatchPublisher`, so also every outbox relay) signs
  `clinic-bus-v1 \\n <routing key> \\n <sha256 of the exact body, hex>` and sends the signature in
  the headers `x-signer` (its name) and `x-signature` (base64). The routing key is the event type.
- the `Consumer` refuses, parks (never handles, never retries) and reports to its `on_refused`
  hook (a `Refusal`) a message that is `unsigned`, names a signer it has no key for
  (`unknown_producer`), is signed by another producer than the envelope names or whose signature
  does not verify over its routing key and body (`bad_signature`), comes from a producer that may
  not publish its event type (`producer_not_allowed`, `POLICY`), or reached a queue not bound to
  its event type (`unexpected_event_type`, e.g. published straight to the queue).
- retries and parking republish the body and headers unchanged, so a good event stays valid.

Keys (`load_signing`): `BUS_SIGNING_KEY` (or `_FILE`) is the service's private key, base64 of
the raw 32-byte Ed25519 key or a PKCS#8 PEM; `BUS_PRODUCER_KEYS` (or `_FILE`) the public keys of
every producer, `name:<base64 of the raw 32-byte public key>` separated by commas or new lines.
Both are required in production. In development one key pair per known producer is generated into
the run folder (`secrets/bus-signing-<name>.key`), so a dev stack and the test stacks need no
configuration. `python -m services.kit.bus new-keys NAME...` prints new keys for production.

A process's keys: `services.kit.bootstrap.serve` loads them and `configure`s them (with a hook
recording each refusal as an `event_refused` security event); publishers and consumers built
without explicit keys use `current()`. Code running outside `serve` in development (tests,
benchmarks) gets the development keyring of the run folder, which signs as the producer each
envelope names: in development every private key is in that folder anyway. In production,
without `configure`, `current()` refuses.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.kit.events import EVENT_TYPE_RE, PermanentError
from services.kit.settings import Env, dev_secret

__all__ = [
    "HEADER_SIGNATURE",
    "HEADER_SIGNER",
    "KNOWN_PRODUCERS",
    "POLICY",
    "REFUSAL_REASONS",
    "EventRefused",
    "Keyring",
    "ProducerKeys",
    "Refusal",
    "Signer",
    "Signing",
    "configure",
    "current",
    "development_keyring",
    "load_signing",
    "record_refusal",
    "refusal_hook",
    "topic_matches",
]

HEADER_SIGNER = "x-signer"
HEADER_SIGNATURE = "x-signature"
DOMAIN = b"clinic-bus-v1"  # a signature made for the bus means nothing anywhere else

# Every service that publishes; each has a key pair (generated per run folder in development).
KNOWN_PRODUCERS = ("directory", "inbox", "notifications", "erx-bridge", "cloud-comms", "auto-reply", "web", "audit")
ANY_PRODUCER = frozenset(KNOWN_PRODUCERS)

# Which producers may publish which event type; a type not listed here is refused from anyone.
POLICY: Mapping[str, frozenset[str]] = {
    "board_item.delivery_requested.v1": frozenset({"notifications", "erx-bridge", "cloud-comms"}),
    "board_item.delivered.v1": frozenset({"inbox"}),
    "message.delivered.v1": frozenset({"inbox"}),
    "announcement.posted.v1": frozenset({"inbox"}),
    "session.revoked.v1": frozenset({"directory"}),
    "phi.accessed.v1": ANY_PRODUCER,
    "security_event.recorded.v1": ANY_PRODUCER,
}

REFUSAL_REASONS = ("unsigned", "unknown_producer", "bad_signature", "producer_not_allowed", "unexpected_event_type")

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def signed_bytes(routing_key: str, body: bytes) -> bytes:
    return b"\n".join((DOMAIN, routing_key.encode("utf-8"), hashlib.sha256(body).hexdigest().encode("ascii")))


class Signer:
    """Signs what one producer publishes."""

    def __init__(self, name: str, key: Ed25519PrivateKey):
        self.name = name
        self._key = key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def headers(self, routing_key: str, body: bytes, producer: str) -> dict[str, str]:  # noqa: ARG002 - as Keyring
        """The signature headers for `body` published with `routing_key` (signed as this producer,
        whatever the envelope claims: a consumer refuses the mismatch)."""
        signature = self._key.sign(signed_bytes(routing_key, body))
        return {HEADER_SIGNER: self.name, HEADER_SIGNATURE: base64.b64encode(signature).decode("ascii")}


class Keyring:
    """Development and tests only: signs as the producer each envelope names, with that producer's
    key from the run folder; leaves unsigned what names no known producer."""

    def __init__(self, signers: Mapping[str, Signer]):
        self.signers = dict(signers)

    def headers(self, routing_key: str, body: bytes, producer: str) -> dict[str, str]:
        signer = self.signers.get(producer)
        return signer.headers(routing_key, body, producer) if signer is not None else {}


class EventRefused(PermanentError):
    """A message whose producer is not proven (`reason` is one of REFUSAL_REASONS)."""


@dataclass(frozen=True)
class Refusal:
    """One refused message, for the consumer's `on_refused` hook. Every field is what the message
    claims (never trusted), reduced to a safe shape: an id-like or name-like value, else ''."""

    reason: str
    queue: str
    event_id: str
    event_type: str
    agency_id: str
    producer: str
    signer: str


def header_text(headers: Mapping, name: str) -> str:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


class ProducerKeys:
    """The public keys of every producer and the publishing policy: says why a message is refused.
    A producer may have several keys (while its key is being replaced): any of them will do."""

    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey | Sequence[Ed25519PublicKey]],
        policy: Mapping[str, frozenset[str]] = POLICY,
    ):
        self.keys = {name: tuple(k) if isinstance(k, Sequence) else (k,) for name, k in keys.items()}
        self.policy = policy

    def refusal(
        self, routing_key: str, body: bytes, headers: Mapping | None, *, producer: str, event_type: str
    ) -> str | None:
        """None when `producer` signed `body` for `routing_key` (= `event_type`) and may publish it;
        otherwise the reason (REFUSAL_REASONS)."""
        headers = headers or {}
        signer, signature = header_text(headers, HEADER_SIGNER), header_text(headers, HEADER_SIGNATURE)
        if not signer or not signature:
            return "unsigned"
        keys = self.keys.get(signer)
        if not keys:
            return "unknown_producer"
        if signer != producer or routing_key != event_type:
            return "bad_signature"  # not the producer the envelope names, or signed for another route
        if not _verifies(keys, signature, signed_bytes(routing_key, body)):
            return "bad_signature"
        if producer not in self.policy.get(event_type, ()):
            return "producer_not_allowed"
        return None


def _verifies(keys: Sequence[Ed25519PublicKey], signature: str, data: bytes) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        return False
    for key in keys:
        try:
            key.verify(raw, data)
            return True
        except InvalidSignature:
            continue
    return False


@dataclass(frozen=True)
class Signing:
    """A process's bus keys: how it signs, whom it believes, and what it does with a refusal."""

    signer: Signer | Keyring
    producers: ProducerKeys
    on_refused: Callable[[Refusal], None] | None = None


# --- keys -------------------------------------------------------------------------------------------


def key_file(name: str) -> str:
    return f"bus-signing-{name}.key"


def new_private_key_b64() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def raw_public_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_private_key(text: str) -> Ed25519PrivateKey:
    """Base64 of the raw 32-byte key, or a PKCS#8 PEM; ValueError otherwise."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
        return key
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("not 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


def parse_producer_keys(text: str, problems: list[str]) -> dict[str, list[Ed25519PublicKey]]:
    """`name:<base64 raw public key>` items separated by commas or new lines; a name given more than
    once has each of those keys (while its key is being replaced)."""
    keys: dict[str, list[Ed25519PublicKey]] = {}
    for item in re.split(r"[,\n]", text):
        if not item.strip():
            continue
        name, _, encoded = item.strip().partition(":")
        try:
            raw = base64.b64decode(encoded.strip(), validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw) if len(raw) == 32 else None
        except ValueError:
            key = None
        if not _NAME_RE.match(name) or key is None:
            problems.append("BUS_PRODUCER_KEYS entries must be '<producer>:<base64 of a 32-byte Ed25519 public key>'")
            continue
        keys.setdefault(name, []).append(key)
    return keys


def _dev_signer(run_dir: Path, name: str) -> Signer:
    return Signer(name, parse_private_key(dev_secret(run_dir, key_file(name), new_private_key_b64)))


def load_signing(env: Env, service: str) -> Signing | None:
    """The keys of the service `service` from `env`, problems recorded in `env.problems` (call
    `env.done()`; None only when there are problems). See the module docstring."""
    signer: Signer | None = None
    problems_before = len(env.problems)
    own = env.secret("BUS_SIGNING_KEY", key_file(service), new_private_key_b64)
    if own:
        try:
            signer = Signer(service, parse_private_key(own))
        except (ValueError, TypeError, UnsupportedAlgorithm):  # not a key, an encrypted PEM, not Ed25519
            env.problems.append(
                "BUS_SIGNING_KEY must be base64 of a raw 32-byte Ed25519 key or an unencrypted Ed25519 PKCS#8 PEM"
            )
    given = env.given_secret("BUS_PRODUCER_KEYS")
    keys: dict[str, list[Ed25519PublicKey]] = {}
    if given is not None:
        keys = parse_producer_keys(given, env.problems)
    elif env.production:
        if not env.environ.get("BUS_PRODUCER_KEYS_FILE"):
            env.problems.append("BUS_PRODUCER_KEYS (or BUS_PRODUCER_KEYS_FILE) is required in production")
    else:
        names = dict.fromkeys((*KNOWN_PRODUCERS, service))
        keys = {name: [_dev_signer(env.run_dir, name).public_key] for name in names}
    if signer is not None and (given is not None or not env.production):
        listed = [raw_public_b64(key) for key in keys.get(service, ())]
        if not listed:
            env.problems.append(f"BUS_PRODUCER_KEYS has no key for {service}: its own events would be refused")
        elif raw_public_b64(signer.public_key) not in listed:
            env.problems.append(f"BUS_SIGNING_KEY does not match the key BUS_PRODUCER_KEYS lists for {service}")
    if signer is None or len(env.problems) > problems_before:
        return None
    return Signing(signer, ProducerKeys(keys))


def development_keyring(run_dir: Path) -> Signing:
    """Every known producer's development key of `run_dir`: signs as each envelope's producer."""
    signers = {name: _dev_signer(run_dir, name) for name in KNOWN_PRODUCERS}
    return Signing(Keyring(signers), ProducerKeys({name: s.public_key for name, s in signers.items()}))


# --- the process's keys -----------------------------------------------------------------------------

_lock = threading.Lock()
_configured: Signing | None = None
_development: dict[Path, Signing] = {}


def configure(signing: Signing | None) -> None:
    """Make `signing` this process's keys (None: back to the default of `current()`)."""
    global _configured  # noqa: PLW0603 - one process, one set of bus keys
    with _lock:
        _configured = signing


def current() -> Signing:
    """The keys `configure`d, else (development only) the run folder's development keyring."""
    with _lock:
        if _configured is not None:
            return _configured
        env = Env("bus")
        if env.production:
            raise RuntimeError("bus signing keys are not configured (services.kit.bus.signing.configure)")
        if env.run_dir not in _development:
            _development[env.run_dir] = development_keyring(env.run_dir)
        return _development[env.run_dir]


def refusal_hook() -> Callable[[Refusal], None] | None:
    """The configured process's hook for refused messages (none when not configured)."""
    with _lock:
        return _configured.on_refused if _configured is not None else None


def with_hook(signing: Signing, on_refused: Callable[[Refusal], None] | None) -> Signing:
    return replace(signing, on_refused=on_refused)


def is_producer_name(value: str) -> bool:
    return bool(_NAME_RE.match(value or ""))


def safe_name(value: str) -> str:
    return value if is_producer_name(value) else ""


def safe_id(value: str) -> str:
    return value if _ID_RE.match(value or "") else ""


def safe_type(value: str) -> str:
    return value if len(value or "") <= 120 and EVENT_TYPE_RE.match(value or "") else ""


def record_refusal(security_log, refusal: Refusal) -> None:
    """Stage an `event_refused` security event (services.kit.security_events.SecurityLog) for it:
    who the message claimed to come from, which event, on which queue, and why (a code)."""
    security_log.record(
        "event_refused",
        agency_id=refusal.agency_id,
        actor_id=refusal.producer or refusal.signer,
        actor_kind="service",
        outcome="refused",
        reason=refusal.reason,
        target_type=f"event:{refusal.event_type}" if refusal.event_type else "event",
        target_id=refusal.event_id,
        source=f"queue:{refusal.queue}",
    )
