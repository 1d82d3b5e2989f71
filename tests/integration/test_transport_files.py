"""Development hygiene: the embedded database's files, its log and the run folder's logs are
readable by their owner only, whatever the umask of whoever ran `make run`."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pymongo
import pytest

from services.kit.embedded_mongo import EmbeddedMongo, free_port
from services.launcher import LaunchError, Ports, Stack, StackConfig


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    """The common default umask 022: files world-readable unless the code says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_embedded_database_files_and_log_are_owner_only(tmp_path, loose_umask):
    data = tmp_path / "mongo"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    leftover = data / "left-by-an-earlier-run.sqlite"
    leftover.write_bytes(b"x")
    leftover.chmod(0o644)
    log_file = tmp_path / "logs" / "nx-27017.log"
    log_file.parent.mkdir()
    mongo = EmbeddedMongo(data_dir=data, port=free_port(), log_file=log_file, pid_file=data / "nx.pid")
    try:
        client = pymongo.MongoClient(mongo.start(), serverSelectionTimeoutMS=5000)
        client["hygiene"]["notes"].insert_one({"subject": "Patient MRN 123"})
        client.close()
        assert mode(data) == 0o700
        files = [p for p in data.rglob("*") if p.is_file()]
        assert leftover in files and len(files) > 1, files  # the server's own files are there too
        assert {str(p.relative_to(data)): mode(p) for p in files} == {
            str(p.relative_to(data)): 0o600 for p in files
        }
        assert all(mode(p) == 0o700 for p in data.rglob("*") if p.is_dir())
        assert mode(log_file) == 0o600 and log_file.stat().st_size > 0
    finally:
        mongo.stop()


def test_the_run_folder_and_each_service_log_are_owner_only(tmp_path, loose_umask):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True, mode=0o755)
    old_log = run_dir / "logs" / "inbox.log"
    old_log.write_text("{}\n")
    old_log.chmod(0o644)
    stack = Stack(StackConfig(run_dir=run_dir, ports=Ports.free()))
    for folder in (stack.run_dir, stack.logs, stack.pids):
        folder.mkdir(parents=True, exist_ok=True)
    written = tmp_path / "written-by-the-service"
    process = stack._spawn("directory", [sys.executable, "-c", f"open({str(written)!r}, 'w').write('k')"], {})
    assert process.wait(timeout=30) == 0
    assert mode(stack.logs / "directory.log") == 0o600
    assert mode(written) == 0o600  # the service runs with umask 077
    stack.stop()

    # A start tightens what an earlier one left, before anything else (here it then fails: no broker).
    for folder in (stack.run_dir, stack.logs, stack.pids):
        folder.chmod(0o755)
    unreachable = Stack(StackConfig(run_dir=run_dir, ports=Ports.free(), amqp_url="amqp://u:p@127.0.0.2:1/"))
    with pytest.raises(LaunchError):
        unreachable.start()
    assert mode(stack.run_dir) == mode(stack.logs) == mode(stack.pids) == 0o700
    assert mode(old_log) == 0o600
