"""`make run` / `make stop` as the launcher does them: everything up, a second start refused
without harm, and nothing left behind after stop."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from services.kit.embedded_mongo import EmbeddedMongo, free_port
from services.launcher import AlreadyRunning, LaunchError, Ports, Stack, StackConfig, pid_alive, wait_http
from tests.helpers import DEMO_PASSWORD
from tests.waits import wait_until


def test_start_twice_is_refused_and_stop_leaves_no_process(tmp_path, private_amqp_url):
    stack = Stack(
        StackConfig(
            run_dir=tmp_path / "run",
            ports=Ports.free(),
            mongo_uri=None,  # the embedded database, as on a fresh machine
            amqp_url=private_amqp_url,  # not the session's vhost, where the e2e stack may be running
            extra_env={"PASSWORD_HASH_PROFILE": "fast"},
        )
    )
    try:
        stack.start()
        assert all(stack.status().values()), stack.status()
        pids = {name: int((stack.pids / f"{name}.pid").read_text()) for name in stack.status()}
        login = requests.post(
            f"{stack.gateway_url}/api/v1/auth/token",
            json={"username": "admin", "password": DEMO_PASSWORD},
            timeout=10,
        )
        assert login.status_code == 200

        with pytest.raises(AlreadyRunning):
            Stack(stack.config).start()
        assert all(stack.status().values())  # the refused start stopped nothing
    finally:
        stopped = stack.stop()
    assert set(stopped) == {
        "gateway",
        "erx-bridge",
        "erx-simulator",
        "fax-simulator",
        "direct-simulator",
        "cloud-comms",
        "audit",
        "notifications",
        "auto-reply",
        "web",
        "inbox",
        "directory",
        "nx-27017",
    }
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not any(stack.status().values())
    assert not list(stack.pids.glob("*.pid"))
    # Logs went to files, not the terminal.
    assert (stack.logs / "nx-27017.log").exists() and (stack.logs / "inbox.log").stat().st_size > 0


def test_a_service_that_exits_during_start_fails_at_once_with_its_log(tmp_path):
    log_file = tmp_path / "svc.log"
    log_file.write_text("boom: settings are wrong\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        wait_http(f"http://127.0.0.1:{free_port()}/healthz", "svc", log_file, process, timeout_s=30)
    assert time.monotonic() - started < 10
    assert "exited with status 3" in str(caught.value) and "boom: settings are wrong" in str(caught.value)


def zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped yet: its pid still exists, as a zombie."""
    child = subprocess.Popen(["true"])
    wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().split()[2] == "Z", timeout=10)
    return child


def test_the_embedded_database_starts_next_to_an_unreaped_predecessor(tmp_path):
    child = zombie()
    try:
        assert not pid_alive(child.pid)
        # nx-27017 on its own counts the zombie named in its pid file as running and will not start.
        pid_file = tmp_path / "nx.pid"
        pid_file.write_text(str(child.pid))
        port = free_port()
        exe = Path(sys.executable).with_name("nx-27017")
        alone = [str(exe), "--data-dir", str(tmp_path / "alone"), "--port", str(port), "--pid-file", str(pid_file)]
        refused = subprocess.run(alone, check=False, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        # The launcher's start clears that stale file (and says so in the log), then starts.
        mongo = EmbeddedMongo(data_dir=tmp_path / "data", port=port, pid_file=pid_file)
        try:
            assert mongo.start() == f"mongodb://127.0.0.1:{port}/"
            assert int(pid_file.read_text()) == mongo.process.pid
        finally:
            mongo.stop()
    finally:
        child.wait()


def test_free_ports_are_never_ones_an_outgoing_connection_could_take_nor_repeated():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200
    # Below the kernel's range for outgoing connections: a client's own port never lands on one
    # before the server it was picked for binds it.
    assert all(port < low for port in ports)
