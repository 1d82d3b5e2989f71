"""The key maintenance command, run as an operator would (a subprocess with the service's environment)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

from services.kit.crypto import KeyRing, PhiCipher
from services.kit.settings import REPO_ROOT


def run(args: list[str], env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "services.kit.keys", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_rewrap_moves_data_keys_to_the_new_master_key_and_rotate_starts_a_new_key(
    mongo_uri, mongo_client, db_name, tmp_path
):
    old, new = os.urandom(32), os.urandom(32)
    prefix = f"{db_name}_"
    service_db = mongo_client[f"{prefix}inbox"]
    blob = PhiCipher(KeyRing(service_db, {"old": old}, "old")).seal("agy_a", "msg_1", "body", "sealed before rotation")
    env = {
        **os.environ,
        "CLINIC_RUN_DIR": str(tmp_path),
        "MONGO_URI": mongo_uri,
        "MONGO_DB_PREFIX": prefix,
        "PHI_MASTER_KEYS": f"new:{b64(new)},old:{b64(old)}",
        "PHI_MASTER_KEY_ID": "new",
    }
    try:
        assert run(["rewrap", "--service", "inbox"], env) == {"service": "inbox", "rewrapped": 1}
        assert run(["rewrap", "--service", "inbox"], env)["rewrapped"] == 0
        only_new = PhiCipher(KeyRing(service_db, {"new": new}, "new"))
        assert only_new.open("agy_a", "msg_1", "body", blob) == "sealed before rotation"
        assert run(["rotate", "--service", "inbox", "--agency", "agy_a"], env)["key_id"] == "agy_a:2"
        assert only_new.open("agy_a", "msg_1", "body", blob) == "sealed before rotation"
    finally:
        mongo_client.drop_database(service_db.name)


def test_an_invalid_environment_is_reported_not_raised(tmp_path):
    env = {**os.environ, "CLINIC_RUN_DIR": str(tmp_path), "CLINIC_MODE": "production"}
    env.pop("MONGO_URI", None)
    env.pop("PHI_MASTER_KEYS", None)
    done = subprocess.run(
        [sys.executable, "-m", "services.kit.keys", "rewrap", "--service", "inbox"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "PHI_MASTER_KEYS" in done.stderr and "Traceback" not in done.stderr
