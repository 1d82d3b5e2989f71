"""The directory's parts wired together, for the process entry point and for tests; nothing is
started here. The HTTP edge is made from the result by its caller
(`http_api.create_directory_app(directory)`), so the edge depends on this module, not the reverse."""

from __future__ import annotations

from dataclasses import dataclass

from pymongo.database import Database

from services.directory import grpc_api
from services.directory.config import DirectorySettings
from services.directory.passwords import PasswordHasher
from services.directory.service_clients import ServiceClients
from services.directory.sessions import SessionRevocations, Sessions
from services.directory.store import ACCESS_RECORDS, SESSIONS, DirectoryStore
from services.kit.auth import StaticKeySource, TokenVerifier
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.grpc_server import GrpcServer
from services.kit.outbox import BatchPublishing, OutboxRelay
from services.kit.runtime import every
from services.kit.security_events import SecurityLog


@dataclass
class Directory:
    settings: DirectorySettings
    store: DirectoryStore
    hasher: PasswordHasher
    sessions: Sessions
    verifier: TokenVerifier
    service_clients: ServiceClients

    def grpc_server(self, host: str, port: int) -> GrpcServer:
        return GrpcServer(
            [grpc_api.binding(self.store, self.service_clients)],
            self.verifier,
            host=host,
            port=port,
            open_methods=grpc_api.OPEN_METHODS,
        )

    # The collections whose documents carry outbox events: sessions (`session.revoked.v1`) and
    # access records (`phi.accessed.v1` of patient reads). The security events' collection is added
    # to every service's relay by services.kit.bootstrap.
    outbox_collections = (SESSIONS, ACCESS_RECORDS)

    def idle_sweep(self, stop) -> None:
        """The background worker ending idle sessions (sessions.Sessions.sweep_idle), every
        SESSION_IDLE_SWEEP_S until `stop` is set."""
        every(stop, self.settings.idle_sweep_s, self.sessions.sweep_idle, "idle session sweep")

    def outbox_relay(self, publisher: BatchPublishing, **options) -> OutboxRelay:
        """Publishes the events staged in session documents (`session.revoked.v1`)."""
        relay = OutboxRelay(self.store.db, list(self.outbox_collections), publisher, **options)
        relay.ensure_indexes()
        return relay


def build(settings: DirectorySettings, db: Database, *, security_log: SecurityLog | None = None) -> Directory:
    """`security_log`: where sign-ins, sign-outs and ended sessions are recorded (default: one over `db`)."""
    common = settings.common
    cipher = PhiCipher(KeyRing(db, common.phi_master_keys, common.phi_master_key_id))
    store = DirectoryStore(db, cipher)
    hasher = PasswordHasher(settings.password_hash_profile)
    sessions = Sessions(
        store,
        hasher,
        settings.signing_keys,
        access_ttl_s=settings.access_token_ttl_s,
        session_ttl_s=settings.refresh_token_ttl_s,
        policy=settings.login_policy,
        attempt_key_secret=settings.login_attempt_key,
        security_log=security_log,
    )
    # The directory checks tokens with its own keys, in process (no JWKS fetch from itself), and
    # revocation against its own sessions store, the source of truth (no bus round trip). The keys
    # are fixed for the life of the process, so their lookup table is built once.
    verification_keys = settings.signing_keys.verification_keys()
    verifier = TokenVerifier(StaticKeySource(lambda: verification_keys), revoked=SessionRevocations(store))
    service_clients = ServiceClients(
        settings.service_clients, store, settings.signing_keys, settings.access_token_ttl_s
    )
    return Directory(
        settings=settings,
        store=store,
        hasher=hasher,
        sessions=sessions,
        verifier=verifier,
        service_clients=service_clients,
    )
