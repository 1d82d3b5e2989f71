"""The directory's parts wired together, for the process entry point and for tests."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask
from pymongo.database import Database

from services.directory import grpc_api
from services.directory.config import DirectorySettings
from services.directory.http_api import create_directory_app
from services.directory.passwords import PasswordHasher
from services.directory.sessions import Sessions
from services.directory.store import DirectoryStore
from services.kit.auth import StaticKeySource, TokenVerifier
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.grpc_server import GrpcServer


@dataclass
class Directory:
    settings: DirectorySettings
    store: DirectoryStore
    hasher: PasswordHasher
    sessions: Sessions
    verifier: TokenVerifier

    def http_app(self) -> Flask:
        return create_directory_app(self)

    def grpc_server(self, host: str, port: int) -> GrpcServer:
        return GrpcServer([grpc_api.binding(self.store)], self.verifier, host=host, port=port)


def build(settings: DirectorySettings, db: Database) -> Directory:
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
    )
    # The directory checks tokens with its own keys, in process: no JWKS fetch from itself.
    verifier = TokenVerifier(StaticKeySource(settings.signing_keys.verification_keys))
    return Directory(settings=settings, store=store, hasher=hasher, sessions=sessions, verifier=verifier)
