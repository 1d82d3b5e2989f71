"""One service process, wired the same way everywhere: a service's `__main__` says only what is its own.

    def main() -> int:
        return bootstrap.serve("inbox", config.load, wire)

    def wire(service: ServiceWiring[InboxSettings]) -> None:
        settings = service.settings
        inbox = build(settings, service.database(), cipher=service.cipher(),
                      service_tokens=service.service_tokens())
        service.client("inbox", inbox)                 # what build() opened, closed last
        service.relay(inbox.outbox_collections, batch_size=settings.relay_batch_size)
        service.http(build_app(inbox.components, service.verifier()), settings.http_port)
        service.grpc([inbox.grpc_binding()], settings.grpc_port)
        service.workers(inbox.background())

`serve` configures JSON logging, reads the settings, the service's client credentials and its bus
signing keys (an invalid configuration exits 2, every problem listed on stderr), names the process's
metrics after the service (services.kit.metrics; every HTTP app serves them at /metrics), makes those keys
the process's (services.kit.bus.signing: every publisher signs with them, every consumer checks
with them and records what it refuses as a security event), calls `wire`, then `run()`.

`wire` builds the service's domain (its `build()` factory) from the shared parts, made on first
use and each made once: `database()` (waits until it answers; exits 1 when it never does),
`cipher()`, `service_tokens()`, `verifier()` (which also listens to session revocations,
`revocations()`), `topology()`, `signing()`; and declares what runs: `relay(...)`, `http(...)`, `grpc(...)`,
`listener(...)` (MLLP, consumers), `worker(s)(...)`, `client(...)` (closed last), `on_stop(...)`.
Nothing starts before `run()`.

`run()` starts in the reverse of the stop order, so whatever a part uses is running before it:
the outbox relay, the background workers, the revocation listener (revoked sessions are known
before serving; it waits up to 10 s), the other listeners, then HTTP and gRPC. On SIGTERM/SIGINT
(or a failed worker) it stops in one order for every service (services.kit.runtime.Stage):

    1. INTAKE   HTTP and gRPC servers close (gRPC health turns NOT_SERVING, calls in flight
                finish), on_stop hooks run, listeners and consumers stop (a message in hand finishes)
    2. WORKERS  background workers stop (they may still stage outbox events)
    3. RELAY    the outbox relay publishes what the work above left staged (up to 5 s), releases
                its lease and stops
    4. CLIENTS  other services' clients, service tokens and the database client close, last

One-shot commands of a service (directory's seed-demo) use `command(...)`: the same settings and
shared parts, logs on stderr, nothing served.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from flask import Flask
from pymongo.database import Database

from services.kit import metrics, mongo, sealing
from services.kit.auth import JwksKeySource, RevokedSessions, TokenVerifier
from services.kit.bus import BatchPublisher, Topology
from services.kit.bus import signing as bus_signing
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.features import Worker
from services.kit.grpc_server import GrpcServer, ServiceBinding
from services.kit.logs import configure_logging
from services.kit.outbox import LEASE_TTL_S, OutboxRelay
from services.kit.revocations import RevocationListener
from services.kit.runtime import ServiceProcess, Stage
from services.kit.security_events import COLLECTION as SECURITY_COLLECTION
from services.kit.security_events import SecurityLog
from services.kit.service_identity import ServiceTokens
from services.kit.settings import (
    Env,
    ServiceClientCredentials,
    SettingsError,
    redact_url,
    service_client_credentials,
)

__all__ = ["ServiceWiring", "StartupFailed", "Stage", "command", "phi_cipher", "serve"]

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

READY_WITHIN_S = 10.0  # how long start-up waits for a listener to be ready before serving anyway
RELAY_DRAIN_S = 5.0  # how long a stopping relay keeps publishing what the workers staged last
SAME_AS_NAME = "<the service's name>"


class StartupFailed(Exception):
    """The process cannot start (e.g. the database never answered); `serve` exits with `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message = message
        self.code = code


def phi_cipher(db: Database, common: Any) -> PhiCipher:
    """The PHI cipher over this database's data keys, wrapped with the configured master keys."""
    keyring = KeyRing(db, common.phi_master_keys, common.phi_master_key_id)
    keyring.ensure_indexes()
    return PhiCipher(keyring)


@dataclass
class _Listener:
    name: str
    run: Callable
    stop: Callable[[], None] | None
    ready: Callable[[float], bool] | None
    not_ready: str


class ServiceWiring(Generic[S]):
    """The shared parts of one service process, and what it runs, started and stopped in one order.

    `settings` is the service's settings; the shared parts read what they need with `setting()`:
    mongo_uri and mongo_db, phi_master_keys and phi_master_key_id, amqp_url, events_exchange,
    log_level, http_host, grpc_host, directory_grpc_target, directory_jwks_url.
    """

    def __init__(
        self,
        name: str,
        settings: S,
        *,
        credentials: ServiceClientCredentials | None = None,
        process: ServiceProcess | None = None,
        signing: bus_signing.Signing | None = None,
    ):
        self.name = name
        self.settings = settings
        self.common: Any = getattr(settings, "common", settings)
        self.process = process or ServiceProcess(name)
        self._credentials = credentials
        self._signing = signing
        self._db: Database | None = None
        self._cipher: PhiCipher | None = None
        self._security_log: SecurityLog | None = None
        self._service_tokens: ServiceTokens | None = None
        self._revoked: RevokedSessions | None = None
        self._verifier: TokenVerifier | None = None
        self._relays: list[OutboxRelay] = []
        self._workers: list[Worker] = []
        self._listeners: list[_Listener] = []
        self._http: list[tuple[Flask, int, int]] = []
        self._grpc: list[Callable[[], GrpcServer]] = []  # built (and bound) at run()
        self._stops: list[tuple[str, Callable[[], None], Stage]] = []
        self.revocation_listener: RevocationListener | None = None

    def setting(self, name: str) -> Any:
        """A setting of the service's own (`settings.<name>`), else a process-wide one
        (`settings.common.<name>`, services.kit.settings.CommonSettings)."""
        if hasattr(self.settings, name):
            return getattr(self.settings, name)
        return getattr(self.common, name)

    # --- shared parts, each made once, on first use -----------------------------------------------

    def database(self) -> Database:
        """The service's own database, once it answers; its client closes last."""
        if self._db is None:
            db = mongo.database(self.setting("mongo_uri"), self.setting("mongo_db"))
            try:
                mongo.wait_until_ready(db)
            except Exception as exc:
                where = redact_url(self.setting("mongo_uri"))
                raise StartupFailed(f"{self.name}: MongoDB does not answer at {where}") from exc
            self.process.on_stop("mongo", db.client.close, stage=Stage.CLIENTS)
            self._db = db
        return self._db

    def cipher(self) -> PhiCipher:
        """The PHI cipher over the service's data keys (services.kit.crypto)."""
        if self._cipher is None:
            self._cipher = phi_cipher(self.database(), self.common)
        return self._cipher

    def security_log(self) -> SecurityLog:
        """Where this service records security events (services.kit.security_events); every relay
        of the service publishes them."""
        if self._security_log is None:
            self._security_log = SecurityLog(self.database(), service=self.name)
        return self._security_log

    def signing(self) -> bus_signing.Signing:
        """The bus keys this service signs with and checks producers against (services.kit.bus.signing):
        the ones `serve` loaded, else the process's (`current()`)."""
        return self._signing or bus_signing.current()

    def record_refused_event(self, refusal: bus_signing.Refusal) -> None:
        """A bus consumer refused a message: an `event_refused` security event, when this service has
        a database (one without still parks and logs the message)."""
        if self._db is not None:
            bus_signing.record_refusal(self.security_log(), refusal)

    def service_tokens(self) -> ServiceTokens:
        """This service's own identity for work no user started (services.kit.service_identity)."""
        if self._service_tokens is None:
            if self._credentials is None:
                raise RuntimeError(f"{self.name} was started without service client credentials")
            tokens = ServiceTokens(
                self.setting("directory_grpc_target"), self._credentials.client_id, self._credentials.secret
            )
            self._service_tokens = self.client("service-tokens", tokens)
        return self._service_tokens

    def revocations(self) -> RevokedSessions:
        """The sessions directory revoked, kept current by a listener this process runs
        (services.kit.revocations), ready before the process serves."""
        if self._revoked is None:
            self._revoked = RevokedSessions()
        return self._revoked

    def verifier(self) -> TokenVerifier:
        """Checks directory's access tokens (keys from its JWKS), refusing revoked sessions."""
        if self._verifier is None:
            keys = JwksKeySource(self.setting("directory_jwks_url"))
            self._verifier = TokenVerifier(keys, revoked=self.revocations())
        return self._verifier

    def topology(self) -> Topology:
        return Topology(exchange=self.setting("events_exchange"))

    def client(self, name: str, client: T, close: Callable[[], None] | None = None) -> T:
        """Close `client` (by `close`, or its own close()) in the last stage, after everything that
        may still use it; returns it."""
        self.process.on_stop(name, close or client.close, stage=Stage.CLIENTS)  # type: ignore[attr-defined]
        return client

    def accepting(self) -> bool:
        """False from the moment the process starts to stop (for readiness answers)."""
        return not self.process.stop_event.is_set()

    # --- what runs ---------------------------------------------------------------------------------

    def relay(self, collections: Sequence[str], **options) -> OutboxRelay:
        """The outbox relay over `collections` (services.kit.outbox), with a publisher of its own
        (a pika connection belongs to the one thread that uses it), signing with `signing()`. The
        relay waits for confirms no longer than its lease lasts: a stalled connection is dropped
        and the batch published again before another replica could take the lease over."""
        publisher = BatchPublisher(
            self.setting("amqp_url"), self.topology(), connection_name=f"{self.name}-outbox",
            signer=self.signing().signer, confirm_timeout_s=LEASE_TTL_S,
        )
        watched = list(collections)
        if SECURITY_COLLECTION not in watched:
            watched.append(SECURITY_COLLECTION)  # security events of every service (security_log())
        relay = OutboxRelay(self.database(), watched, publisher, **options)
        relay.ensure_indexes()
        self._relays.append(relay)
        return relay

    def http(self, app: Flask, port: int, *, threads: int = 8) -> None:
        self._http.append((app, port, threads))

    def grpc(self, bindings: Iterable[ServiceBinding], port: int, **options) -> None:
        """A gRPC server of these bindings (none: health and reflection only), checking tokens with
        `verifier()`; built and bound at `run()`."""
        verifier, bindings = self.verifier(), list(bindings)
        options.setdefault("service", self.name)
        self._grpc.append(
            lambda: GrpcServer(bindings, verifier, host=self.setting("grpc_host"), port=port, **options)
        )

    def grpc_server(self, server: GrpcServer) -> None:
        """A gRPC server the service built itself (e.g. with its own verifier)."""
        self._grpc.append(lambda: server)

    def listener(
        self,
        name: str,
        run: Callable,
        *,
        stop: Callable[[], None] | None = None,
        ready: Callable[[float], bool] | None = None,
        not_ready: str = "serving before the listener was ready; it keeps trying",
    ) -> None:
        """Something that takes work in (a socket listener, a bus consumer): `run(stop_event)`,
        stopped with the servers. `stop` is called then too; `ready(timeout)` is waited for (up to
        10 s, then `not_ready` is logged) before the process serves."""
        self._listeners.append(_Listener(name, run, stop, ready, not_ready))

    def worker(self, name: str, run: Callable) -> None:
        """A background worker: `run(stop_event)`, stopped once nothing takes work in any more."""
        self._workers.append((name, run))

    def workers(self, workers: Iterable[Worker]) -> None:
        for name, run in workers:
            self.worker(name, run)

    def on_stop(self, name: str, stop: Callable[[], None], stage: Stage = Stage.INTAKE) -> None:
        """Call `stop` while `stage` drains (default: with the servers, before they close)."""
        self._stops.append((name, stop, stage))

    def run(self) -> int:
        """`start()`, serve until SIGTERM/SIGINT or a failed worker, then drain stage by stage
        (module docstring). Returns the exit code."""
        self.start()
        self.process.wait()
        return 0

    def start(self) -> None:
        """Start everything declared, in the reverse of the stop order: the relay, the workers, the
        listeners (revocations first, each waited for), then HTTP and gRPC. When a part fails to
        start, what already runs is stopped again. `stop()` drains without a signal."""
        try:
            self._start()
        except BaseException:
            self.process.stop()
            raise
        log.info("started")

    def stop(self) -> None:
        self.process.stop()

    def _start(self) -> None:
        process = self.process
        for relay in self._relays:
            process.background("outbox-relay", _relaying(relay), Stage.RELAY)
        for name, run in self._workers:
            process.background(name, run, Stage.WORKERS)
        if self._revoked is not None:
            self.revocation_listener = RevocationListener(
                self.setting("amqp_url"),
                self.topology(),
                self.name,
                self._revoked,
                self.service_tokens(),
                self.setting("directory_grpc_target"),
            )
            self._listeners.insert(
                0,
                _Listener(
                    "session-revocations",
                    self.revocation_listener.run,
                    None,
                    self.revocation_listener.wait_ready,
                    "serving before the revoked sessions were loaded; the listener keeps trying",
                ),
            )
        for listener in self._listeners:
            process.background(listener.name, listener.run, Stage.INTAKE)
            if listener.stop is not None:
                process.on_stop(listener.name, listener.stop, stage=Stage.INTAKE)
            if listener.ready is not None and not listener.ready(READY_WITHIN_S):
                log.warning(listener.not_ready, extra={"route": listener.name})
        for app, port, threads in self._http:
            process.serve_http(app, self.setting("http_host"), port, threads=threads)
        for make_server in self._grpc:
            process.serve_grpc(make_server())
        for name, stop, stage in self._stops:
            process.on_stop(name, stop, stage=stage)


def _relaying(relay: OutboxRelay) -> Callable[[threading.Event], None]:
    """The relay's worker: relay until its stage drains, then publish what the workers left."""
    return lambda stop: relay.run_forever(stop, drain_s=RELAY_DRAIN_S)


def _load(
    name: str, load: Callable[[], S], client_id: str | None, *, logs_to_stderr: bool = False, signs: bool = False
) -> tuple[S, ServiceClientCredentials | None, bus_signing.Signing | None]:
    """Logging first (so a refusal is logged too), then the settings, the client credentials and
    (`signs`) the bus signing keys; StartupFailed (code 2) listing every problem when they are invalid."""
    configure_logging(name)
    if logs_to_stderr:
        logging.getLogger().handlers[0].setStream(sys.stderr)
    problems: list[str] = []
    settings = _checked(load, problems)
    credentials = _checked(lambda: service_client_credentials(client_id), problems) if client_id else None
    signing = _checked(lambda: _signing(name), problems) if signs else None
    if problems:
        exc = SettingsError(name, problems)
        log.error("invalid configuration: %s", "; ".join(exc.problems))
        print(exc.text, file=sys.stderr)
        raise StartupFailed(exc.text, exc.code)
    return settings, credentials, signing  # type: ignore[return-value] - set when there are no problems


def _configure_sealing(service: ServiceWiring) -> None:
    """Event payloads carrying PHI are sealed and opened with keys derived from the service's master
    keys (services.kit.sealing); a service whose settings hold none keeps the default."""
    keys, active = getattr(service.common, "phi_master_keys", None), getattr(service.common, "phi_master_key_id", "")
    if keys and active:
        sealing.configure(keys, active)


def _checked(read: Callable[[], T], problems: list[str]) -> T | None:
    """`read()`, or None with its SettingsError's problems added to `problems` (all are reported at once)."""
    try:
        return read()
    except SettingsError as exc:
        problems.extend(exc.problems)
        return None


def _signing(name: str) -> bus_signing.Signing | None:
    """BUS_SIGNING_KEY and BUS_PRODUCER_KEYS of the service `name`; SettingsError listing what is wrong."""
    env = Env(name)
    signing = bus_signing.load_signing(env, name)
    env.done()
    return signing


def _warn_plaintext(service: ServiceWiring) -> None:
    """CLINIC_TRUSTED_NETWORK=1 lets links run without TLS (production refuses them otherwise):
    say at every start which ones, so the override is never silent."""
    transport = getattr(service.common, "transport", None) or getattr(service.settings, "transport", None)
    if transport is not None and transport.trusted_network and transport.plaintext:
        log.warning(
            "CLINIC_TRUSTED_NETWORK=1: running without TLS on a network declared trusted: %s",
            "; ".join(transport.plaintext),
        )


def _refused(failed: StartupFailed) -> int:
    log.error("cannot start: %s", failed.message)
    print(failed.message, file=sys.stderr)
    return failed.code


def serve(
    name: str,
    load: Callable[[], S],
    wire: Callable[[ServiceWiring[S]], None],
    *,
    client_id: str | None = SAME_AS_NAME,
) -> int:
    """Run the service `name`: settings from `load()` (exit 2 when invalid), the client credentials
    of `client_id` (default: the service's name; None for a service that needs none), `wire`
    declaring its parts, then `ServiceWiring.run()`. Returns the process's exit code."""
    try:
        settings, credentials, signing = _load(
            name, load, name if client_id == SAME_AS_NAME else client_id, signs=True
        )
    except StartupFailed as failed:
        return failed.code
    metrics.configure(name)  # the `service` label of what the process counts (services.kit.metrics)
    service = ServiceWiring(name, settings, credentials=credentials, signing=signing)
    _configure_sealing(service)
    if signing is not None:
        bus_signing.configure(bus_signing.with_hook(signing, service.record_refused_event))
    configure_logging(name, service.setting("log_level"))
    _warn_plaintext(service)
    try:
        wire(service)
        return service.run()
    except StartupFailed as failed:
        return _refused(failed)


def command(
    name: str,
    load: Callable[[], S],
    run: Callable[[ServiceWiring[S]], int],
    *,
    client_id: str | None = None,
) -> int:
    """A one-shot command of the service `name` (it prints its result on stdout, so its logs go to
    stderr): settings as `serve` reads them, then `run(service)` with the same shared parts; nothing
    is served. Returns `run`'s exit code."""
    try:
        settings, credentials, _ = _load(name, load, client_id, logs_to_stderr=True)
    except StartupFailed as failed:
        return failed.code
    try:
        return run(ServiceWiring(name, settings, credentials=credentials))
    except StartupFailed as failed:
        return _refused(failed)
