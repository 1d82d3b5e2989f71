"""Throwaway infrastructure for benchmarks: an embedded Mongo and a private RabbitMQ vhost.

    with embedded_mongo() as mongo_uri, private_vhost() as amqp_url:
        ...

Both are removed on exit. AMQP_URL names the broker (default the local one); the vhost is created
with rabbitmqctl, so the broker must be local and rabbitmqctl on PATH. A stack started on it gives
each service a broker user of its own (services.launcher); those are deleted with the vhost.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.kit.bus.users import delete_vhost_users
from services.kit.embedded_mongo import EmbeddedMongo, free_port

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "bench"


@contextmanager
def embedded_mongo() -> Iterator[str]:
    """A fresh nx-27017 server on a free port with its data in a temporary directory; yields its URI."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-nx-27017-"))
    server = EmbeddedMongo(data_dir=data_dir, port=free_port())
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def running_stack(name: str):
    """The whole system as `make run` starts it, on free ports, in a temporary folder and a private
    vhost, with the rate limit out of the way of a benchmark; stopped afterwards."""
    from services.launcher import Ports, Stack, StackConfig

    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp, private_vhost() as amqp_url:
        stack = Stack(
            StackConfig(
                run_dir=Path(tmp),
                ports=Ports.free(),
                amqp_url=amqp_url,
                extra_env={"PASSWORD_HASH_PROFILE": "fast"},
                gateway_env={"DECK_RATE_LIMIT_MINUTE": "1000000"},
            )
        )
        try:
            stack.start()
            use_stack_keys(stack)
            yield stack
        finally:
            stack.stop()


def use_stack_keys(stack) -> None:
    """Make the stack's development keys this process's: what a benchmark publishes is signed as its
    producer (services.kit.bus.signing) and sealed (services.kit.sealing) as the stack's services do."""
    from services.kit import sealing
    from services.kit.bus import signing
    from services.kit.settings import Env, common_settings

    signing.configure(signing.development_keyring(stack.run_dir))
    common = common_settings(Env("bench", {"CLINIC_RUN_DIR": str(stack.run_dir)}))
    sealing.configure(common.phi_master_keys, common.phi_master_key_id)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def private_vhost(base_url: str | None = None) -> Iterator[str]:
    """A vhost of its own on the local broker; yields the AMQP URL that points into it."""
    if not shutil.which("rabbitmqctl"):
        raise SystemExit("rabbitmqctl not found: benchmarks need a local RabbitMQ (see README)")
    parts = urllib.parse.urlsplit(base_url or os.environ.get("AMQP_URL", DEFAULT_AMQP_URL))
    vhost = f"clinic-bench-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        yield urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))
    finally:
        try:
            delete_vhost_users(vhost)  # a stack's services' own broker users (they outlive the vhost)
        finally:
            _rabbitmqctl("delete_vhost", vhost)


def machine() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def write_report(name: str, report: dict) -> Path:
    """Store a benchmark's results as artifacts/bench/<name>.json."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
