r"""Each service's own broker user, allowed only its own part of the bus (docs/bus-security.md).

One RabbitMQ user per service. On a vhost, service S (its queues are all named `S.…`) and the
events exchange X (`clinic.events`) get (`grant`):

- configure `^S\.`: declare and delete its own queues and their `<queue>.republish` exchanges;
- write `^(S\..*|X)$`: publish to X and to its own republish exchanges; bind its own queues;
- read `^(S\..*|X)$`: consume and purge its own queues; bind them to X;
- topic write on X: the routing keys (event types) S may publish, from `signing.POLICY`;
- topic read on X: the routing keys S may bind to, `SUBSCRIPTIONS` and session.revoked.v1.

Nothing else: not the default exchange (which reaches every queue by name; a queue that
dead-letters there needs it too, so consumers dead-letter through their own exchange,
services.kit.bus.topology), not `amq.*`, not the alternate exchange nor the unrouted queue, not
another service's queue. So only the audit user can consume, purge or delete `audit.records`;
no one else can bind a queue of theirs to the audit stream's event types, nor publish into
the audit queue but through X, with the event types that are theirs.

The shared names (X, its alternate exchange, the unrouted queue, the audit queue) are declared
by an administrator: the launcher in development and tests, `deploy/rabbitmq/definitions.json`
in deployments (`definitions`, `python -m services.kit.bus broker-definitions`).

Development and tests (services.launcher): `create_users` makes the users of one stack with
rabbitmqctl (one `import_definitions`), named `<vhost>.<stack id>.<service>` (`clinic.<service>`
for `make run` on the vhost `/`) because users are broker-wide and stacks share brokers and
vhosts, with random passwords kept in the stack's run folder; `delete_users` /
`delete_vhost_users` remove them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.kit.bus.signing import KNOWN_PRODUCERS, POLICY
from services.kit.bus.topology import DEFAULT_EXCHANGE, ConsumerQueues, Topology

__all__ = [
    "AUDIT_QUEUE",
    "SERVICES",
    "SUBSCRIPTIONS",
    "BrokerCtlError",
    "Grant",
    "create_users",
    "definitions",
    "delete_users",
    "delete_vhost_users",
    "grant",
    "password_hash",
    "rabbitmqctl_available",
    "service_url",
    "user_name",
    "vhost_of",
]

SERVICES = KNOWN_PRODUCERS
SESSION_REVOKED = "session.revoked.v1"
# The event types each service's consumers bind to, beyond session.revoked.v1 (every service's
# session-revocation listener, services.kit.revocations). A new subscription must be added here,
# or the broker refuses the binding (403) and the consumer keeps reconnecting.
SUBSCRIPTIONS: Mapping[str, tuple[str, ...]] = {
    "inbox": ("board_item.delivery_requested.v1",),
    "auto-reply": ("message.delivered.v1",),
    "web": ("message.delivered.v1", "board_item.delivered.v1", "announcement.posted.v1"),
    "audit": ("phi.accessed.v1", "security_event.recorded.v1"),
}
# The audit service's queue as the administrator declares it (services/audit: AUDIT_QUEUE and
# AUDIT_RETRY_DELAY_MS at their defaults; the audit service redeclares it with its settings).
AUDIT_QUEUE = "audit.records"
AUDIT_RETRY_DELAY_MS = 5_000
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Grant:
    """One service's permissions on a vhost (regular expressions, as RabbitMQ takes them)."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


def _literal(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"not a plain broker name: {name!r}")
    return name.replace(".", r"\.")


def _one_of(names: Iterable[str]) -> str:
    return "^(" + "|".join(_literal(n) for n in sorted(set(names))) + ")$"


def publishes(service: str) -> tuple[str, ...]:
    """The event types `service` may publish (signing.POLICY)."""
    return tuple(sorted(t for t, producers in POLICY.items() if service in producers))


def subscribes(service: str) -> tuple[str, ...]:
    return tuple(sorted({SESSION_REVOKED, *SUBSCRIPTIONS.get(service, ())}))


def grant(service: str, exchange: str = DEFAULT_EXCHANGE) -> Grant:
    if service not in SERVICES:
        raise ValueError(f"not a service: {service!r}")
    own = _literal(service)
    mine = f"^({own}\\..*|{_literal(exchange)})$"
    return Grant(
        configure=f"^{own}\\.",
        write=mine,
        read=mine,
        topic_write=_one_of(publishes(service)),
        topic_read=_one_of(subscribes(service)),
    )


def user_name(vhost: str, service: str, stack: str = "") -> str:
    """The development user of `service` of the stack `stack` (an id, or '') on `vhost`:
    `<vhost>.<stack>.<service>` (users are broker-wide, and stacks share vhosts and brokers),
    with `clinic` for the vhost `/`."""
    return ".".join(part for part in (_vhost_part(vhost), stack, service) if part)


def _vhost_part(vhost: str) -> str:
    return "clinic" if vhost == "/" else vhost


def vhost_of(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def service_url(amqp_url: str, user: str, password: str) -> str:
    """`amqp_url` (host, port, vhost, TLS and query kept) signing in as `user`."""
    parts = urllib.parse.urlsplit(amqp_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def definitions(
    vhost: str,
    users: Mapping[str, str],
    password_hashes: Mapping[str, str] | None = None,
    *,
    exchange: str = DEFAULT_EXCHANGE,
    shared_topology: bool = False,
) -> dict:
    """Broker definitions (`rabbitmqctl import_definitions`, or loaded at boot) of the users
    `users` (service -> user name) on `vhost`. A user without a hash in `password_hashes` gets an
    empty one: it cannot sign in until given a password (`rabbitmqctl change_password`). With
    `shared_topology`, also the vhost and what an administrator declares: the exchange, its
    alternate, the unrouted queue and the audit queue (with its retry and parking queues)."""
    hashes = password_hashes or {}
    result: dict = {
        "users": [
            {"name": name, "password_hash": hashes.get(service, ""), "hashing_algorithm": HASHING_ALGORITHM, "tags": []}
            for service, name in users.items()
        ],
        "permissions": [],
        "topic_permissions": [],
    }
    for service, name in users.items():
        rights = grant(service, exchange)
        result["permissions"].append(
            {"user": name, "vhost": vhost, "configure": rights.configure, "write": rights.write, "read": rights.read}
        )
        result["topic_permissions"].append(
            {"user": name, "vhost": vhost, "exchange": exchange, "write": rights.topic_write, "read": rights.topic_read}
        )
    if shared_topology:
        result.update({"vhosts": [{"name": vhost}], **_shared_topology(vhost, exchange)})
    return result


def _shared_topology(vhost: str, exchange: str) -> dict:
    topology = Topology(exchange=exchange)
    audit = ConsumerQueues(topology, AUDIT_QUEUE, SUBSCRIPTIONS["audit"], AUDIT_RETRY_DELAY_MS)
    unrouted = topology.unrouted_name

    def an_exchange(name: str, kind: str, auto_delete: bool = False, arguments: dict | None = None) -> dict:
        return {
            "name": name,
            "vhost": vhost,
            "type": kind,
            "durable": True,
            "auto_delete": auto_delete,
            "internal": False,
            "arguments": arguments or {},
        }

    def a_queue(name: str, arguments: dict | None) -> dict:
        return {"name": name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": arguments or {}}

    def a_binding(source: str, queue: str, key: str) -> dict:
        return {
            "source": source,
            "vhost": vhost,
            "destination": queue,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }

    return {
        "exchanges": [
            an_exchange(unrouted, "fanout"),
            an_exchange(exchange, "topic", arguments={"alternate-exchange": unrouted}),
            an_exchange(audit.republish_exchange, "direct", auto_delete=True),
        ],
        "queues": [a_queue(unrouted, None)] + [a_queue(name, args) for name, args in audit.declarations()],
        "bindings": [a_binding(unrouted, unrouted, "")]
        + [a_binding(source, queue, key) for source, queue, key in audit.bindings()],
    }


# -- rabbitmqctl: development and tests ------------------------------------------------------------


class BrokerCtlError(RuntimeError):
    """rabbitmqctl is missing or failed."""


def rabbitmqctl_available() -> bool:
    return shutil.which("rabbitmqctl") is not None


def _rabbitmqctl(*args: str, timeout_s: float = 120.0) -> str:
    if not rabbitmqctl_available():
        raise BrokerCtlError("rabbitmqctl not found")
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerCtlError(f"rabbitmqctl {args[0]}: {type(exc).__name__}") from exc
    if done.returncode != 0:
        raise BrokerCtlError(f"rabbitmqctl {args[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def create_users(
    vhost: str, passwords: Mapping[str, str], exchange: str = DEFAULT_EXCHANGE, stack: str = ""
) -> dict[str, str]:
    """Create (or update) the users of `passwords` (service -> password) of the stack `stack` on
    `vhost` with their grants, in one `rabbitmqctl import_definitions`; returns service -> user name.

    rabbitmqctl reads the file as the broker's own system user (Debian's wrapper switches to it),
    so the file sits in a folder of its own, readable by all for the moment of the import; it holds
    only salted hashes of random passwords."""
    users = {service: user_name(vhost, service, stack) for service in passwords}
    hashes = {service: password_hash(password) for service, password in passwords.items()}
    folder = Path(tempfile.mkdtemp(prefix="clinic-broker-users-"))
    try:
        folder.chmod(0o755)
        path = folder / "definitions.json"
        path.write_text(json.dumps(definitions(vhost, users, hashes, exchange=exchange)))
        path.chmod(0o644)
        _rabbitmqctl("import_definitions", str(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return users


def delete_users(names: Sequence[str]) -> None:
    """Delete these users (absent ones are fine): in one rabbitmqctl call, or one call per user if
    the broker does not take that form (or a name is not plain enough to go into it)."""
    if not names:
        return
    if all(_NAME_RE.match(name) for name in names):
        listed = ", ".join(f'<<"{name}">>' for name in names)
        try:
            _rabbitmqctl(
                "eval",
                f'[catch rabbit_auth_backend_internal:delete_user(U, <<"clinic-launcher">>) || U <- [{listed}]].',
            )
            return
        except BrokerCtlError:
            pass  # one by one below
    present = set(_list_users())
    for name in names:
        if name in present:
            _rabbitmqctl("delete_user", name)


def _list_users() -> list[str]:
    listed = _rabbitmqctl("list_users", "--no-table-headers")
    return [line.split("\t", 1)[0] for line in listed.splitlines() if line.strip()]


def delete_vhost_users(vhost: str) -> list[str]:
    """Delete every user named for `vhost` (`user_name`, any stack): what stacks on it left behind.
    Returns their names."""
    prefix = f"{_vhost_part(vhost)}."
    names = [n for n in _list_users() if n.startswith(prefix) and n.rsplit(".", 1)[-1] in SERVICES]
    delete_users(names)
    return names
