"""The directory as a process: demo seeding, the public-key command, serving and draining on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.directory import demo
from services.kit.embedded_mongo import free_port
from services.kit.mongo import database
from tests.helpers import DEMO_PASSWORD
from tests.integration.directory_fixtures import directory_environ, signing_key_pem, start_directory
from tests.waits import wait_until

DIRECTORY = [sys.executable, "-m", "services.directory"]
TYPED_PASSWORD = "Typed-Secret-2026"


def run(*command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*DIRECTORY, *command], env=env, capture_output=True, text=True, timeout=60, check=False)


def _snapshot(db) -> dict:
    return {
        name: sorted(json.dumps(doc, sort_keys=True, default=repr) for doc in db[name].find({}))
        for name in sorted(db.list_collection_names())
    }


def test_seeding_twice_changes_nothing(mongo_uri, db_name, tmp_path):
    dut = start_directory(mongo_uri, db_name, tmp_path)
    db = database(mongo_uri, db_name)
    before = _snapshot(db)
    result = demo.seed(dut.store, dut.directory.hasher)
    assert result.created == 0
    assert _snapshot(db) == before
    assert len(before["staff"]) == len(demo.STAFF) == 24
    assert len(before["teams"]) == 4


def test_seeding_keeps_what_an_admin_changed_since(mongo_uri, db_name, tmp_path):
    dut = start_directory(mongo_uri, db_name, tmp_path)
    admin = dut.as_user("admin")
    dut.client.patch("/api/v1/directory/agency", json={"terminology": {"patient_singular": "Member"}}, headers=admin)
    demo.seed(dut.store, dut.directory.hasher)
    assert dut.store.get_agency("agy_riverbend").terminology.patient_singular == "Member"


def test_every_printed_demo_login_signs_in(mongo_uri, db_name, tmp_path):
    dut = start_directory(mongo_uri, db_name, tmp_path)
    logins = demo.demo_logins()
    assert {"admin", "dr.reyes", "nurse.kim", "compliance.ortiz", "lakeside.admin"} <= {x["username"] for x in logins}
    for login in logins:
        response = dut.sign_in(login["username"], login["password"])
        assert response.status_code == 200, login["username"]
        assert response.get_json()["staff"]["roles"] == login["roles"]


@pytest.fixture
def process_env(mongo_uri, mongo_client, tmp_path):
    prefix = f"t_{uuid.uuid4().hex[:8]}_"
    environ = directory_environ(tmp_path / "run", mongo_uri, MONGO_DB_PREFIX=prefix, LOG_LEVEL="INFO")
    yield environ
    mongo_client.drop_database(f"{prefix}directory")


def test_seed_demo_command_prints_the_logins_and_is_idempotent(process_env):
    first = run("seed-demo", env=process_env)
    assert first.returncode == 0, first.stderr
    logins = json.loads(first.stdout)["logins"]
    admin = next(login for login in logins if login["username"] == "admin")
    assert admin == {
        "username": "admin",
        "password": DEMO_PASSWORD,
        "agency": "Riverbend Behavioral Health",
        "agency_id": "agy_riverbend",
        "staff_id": "stf_riverbend_admin",
        "roles": ["staff", "admin"],
    }
    second = run("seed-demo", env=process_env)
    assert second.returncode == 0 and second.stdout == first.stdout


def test_seed_demo_is_refused_in_production(process_env):
    environ = {**process_env, "CLINIC_MODE": "production", "PASSWORD_HASH_PROFILE": "standard"}
    result = run("seed-demo", env=environ)
    assert result.returncode == 2
    assert "production" in result.stderr
    assert result.stdout == ""


def test_public_key_command_prints_the_active_public_key(process_env):
    result = run("public-key", env=process_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in result.stdout
    load_pem_public_key(result.stdout.encode())
    assert signing_key_pem() not in result.stdout


def test_invalid_configuration_exits_2_naming_every_problem(process_env):
    environ = {**process_env, "ACCESS_TOKEN_TTL_S": "3600", "JWT_SIGNING_KEYS": "not a key"}
    result = run(env=environ)
    assert result.returncode == 2
    assert "ACCESS_TOKEN_TTL_S" in result.stderr and "JWT_SIGNING_KEYS" in result.stderr
    for line in result.stdout.splitlines():
        json.loads(line)


def test_the_service_serves_http_and_grpc_and_exits_cleanly_on_sigterm(process_env):
    http_port, grpc_port = free_port(), free_port()
    environ = {**process_env, "DIRECTORY_HTTP_PORT": str(http_port), "DIRECTORY_GRPC_PORT": str(grpc_port)}
    seeded = run("seed-demo", env=environ)
    assert seeded.returncode == 0
    process = subprocess.Popen(DIRECTORY, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{http_port}"

        def healthy() -> bool:
            assert process.poll() is None, process.stderr.read()  # exited instead of starting
            try:
                return requests.get(f"{base}/healthz", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, timeout=20, interval=0.1, message="the directory answering /healthz")
        signed_in = requests.post(
            f"{base}/api/v1/auth/token", json={"username": "dr.reyes", "password": DEMO_PASSWORD}, timeout=5
        )
        assert signed_in.status_code == 200
        for username, password in (("dr.reyes", TYPED_PASSWORD), (TYPED_PASSWORD, DEMO_PASSWORD)):
            failed = requests.post(
                f"{base}/api/v1/auth/token", json={"username": username, "password": password}, timeout=5
            )
            assert failed.status_code == 401
        jwks = requests.get(f"{base}/.well-known/jwks.json", timeout=5).json()
        assert jwks["keys"][0]["kid"]
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and all(line["service"] == "directory" for line in lines)
    assert any(line["msg"] == "stopped" for line in lines)
    # Neither stream ever shows what was typed to sign in (right or wrong) nor the tokens handed out.
    grant = signed_in.json()
    for stream in (stdout, stderr):
        for secret in ("dr.reyes", DEMO_PASSWORD, TYPED_PASSWORD, grant["access_token"], grant["refresh_token"]):
            assert secret not in stream
    assert any(line["msg"] == "sign-in failed" for line in lines)  # the failures were logged, without them
