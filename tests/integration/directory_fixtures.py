"""Builders shared by the directory's integration tests.

A test gets its own database (the `db_name` fixture), the demo agencies seeded
into it, and a Flask test client of the real app. Passwords are hashed with the
"fast" profile and a single RSA key is generated per test session.
"""

from __future__ import annotations

import base64
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from flask.testing import FlaskClient

from services.directory import config, demo, tokens
from services.directory.http_api import create_directory_app
from services.directory.service import Directory, build
from services.kit.mongo import database

DEMO_PASSWORD = demo.DEMO_PASSWORD
PHI_KEYS = "test1:" + base64.b64encode(b"k" * 32).decode()


@functools.cache
def signing_key_pem() -> str:
    return tokens.generate_private_key_pem()


def directory_environ(run_dir: Path, mongo_uri: str, **overrides: str) -> dict[str, str]:
    environ = {
        "CLINIC_MODE": "development",
        "CLINIC_RUN_DIR": str(run_dir),
        "MONGO_URI": mongo_uri,
        "JWT_SIGNING_KEYS": signing_key_pem(),
        "PHI_MASTER_KEYS": PHI_KEYS,
        "PASSWORD_HASH_PROFILE": "fast",
        "PATH": os.environ.get("PATH", ""),
    }
    environ.update(overrides)
    return environ


@dataclass
class DirectoryUnderTest:
    directory: Directory
    client: FlaskClient

    @property
    def store(self):
        return self.directory.store

    def sign_in(self, username: str, password: str = DEMO_PASSWORD):
        return self.client.post("/api/v1/auth/token", json={"username": username, "password": password})

    def token(self, username: str) -> str:
        response = self.sign_in(username)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["access_token"]

    def as_user(self, username: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username)}"}


def start_directory(mongo_uri: str, db_name: str, run_dir: Path, *, seed: bool = True, **overrides: str):
    settings = config.load(directory_environ(run_dir, mongo_uri, **overrides))
    directory = build(settings, database(mongo_uri, db_name))
    directory.store.ensure_indexes()
    if seed:
        demo.seed(directory.store, directory.hasher)
    return DirectoryUnderTest(directory=directory, client=create_directory_app(directory).test_client())
