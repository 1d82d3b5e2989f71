"""The embedded MongoDB default: an nx-27017 server (MongoDB wire protocol over SQLite).

Started by the project when MONGO_URI is unset. Production points MONGO_URI at a
MongoDB replica set instead; nothing else in the code changes.

The database files hold PHI (encrypted fields, but also ids, timestamps and who wrote to whom) and
its log names collections and clients, so the data directory is 0700, its files and the log 0600,
and the server runs with umask 077: readable by their owner only, whatever the caller's umask.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pymongo


class EmbeddedMongoError(RuntimeError):
    pass


log = logging.getLogger(__name__)


@dataclass
class EmbeddedMongo:
    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    log_file: Path | None = None
    pid_file: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    def start(self, timeout: float = 20.0) -> str:
        """Start the server (if this port is not already served by one) and wait until it answers."""
        private_dir(self.data_dir)
        log_file = self.log_file or self.data_dir / "nx-27017.log"
        pid_file = self.pid_file or self.data_dir / "nx-27017.pid"
        if answers(self.uri, timeout=0.5):
            return self.uri
        restrict_tree(self.data_dir)  # files an earlier run (or an older version) left readable
        clear_stale_pid_file(pid_file)
        exe = Path(sys.executable).with_name("nx-27017")
        cmd = [
            str(exe),
            "--data-dir",
            str(self.data_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-file",
            str(log_file),
            "--pid-file",
            str(pid_file),
        ]
        # nx-27017 writes its own pid file (and refuses to start if it names a live process).
        with open_private_log(log_file) as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                umask=PRIVATE_UMASK,  # the SQLite files and the pid file it creates: owner only
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedMongoError(f"nx-27017 exited with {self.process.returncode}; see {log_file}")
            if answers(self.uri, timeout=0.5):
                return self.uri
            time.sleep(0.1)
        self.stop()
        raise EmbeddedMongoError(f"nx-27017 did not answer on {self.uri} within {timeout}s; see {log_file}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as 0700, and make an existing one 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def restrict_tree(path: Path) -> None:
    """Owner-only modes below `path`: directories 0700, files 0600 (symbolic links are left alone)."""
    for root, dirs, files in os.walk(path):
        for name in dirs:
            child = Path(root, name)
            if not child.is_symlink():
                child.chmod(0o700)
        for name in files:
            child = Path(root, name)
            if not child.is_symlink():
                child.chmod(0o600)


def open_private_log(path: Path):
    """Open a log file for appending, created 0600 (an existing one is made 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def pid_alive(pid: int) -> bool:
    """A process with this pid runs (a zombie, exited but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def clear_stale_pid_file(pid_file: Path) -> None:
    """Remove a pid file naming a process that is gone or a zombie. nx-27017 0.8.1 refuses to start
    while its pid file names a pid that exists, and counts an unreaped predecessor (a zombie, e.g.
    after a kill -9 under a supervisor that has not reaped it yet) as running; the server is not
    answering here, so the file can only be stale."""
    try:
        pid = int(pid_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    if not pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        log.warning("removed a stale nx-27017 pid file", extra={"pid": pid, "pid_file": str(pid_file)})


def answers(uri: str, timeout: float = 1.0) -> bool:
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=int(timeout * 1000), connect=True)
        try:
            client.admin.command("ping")
            return True
        finally:
            client.close()
    except pymongo.errors.PyMongoError:
        return False


_HANDED_OUT: set[int] = set()
LOWEST_PORT = 20000


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: 32768 by default)."""
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on now, below the kernel's range for outgoing connections (so no
    client connection takes it as its own port before a server binds it), and never one this
    process handed out before (a port picked for later use, a test's SMTP sink, is not given again
    to a stack started in between)."""
    low = _ephemeral_low()
    candidates = range(LOWEST_PORT, low) if low - LOWEST_PORT >= 1000 else range(1024, 65536)
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port found")
