"""A real upstream, real RSA keys and a real gateway process, for the gateway's end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO_ROOT = Path(__file__).resolve().parents[2]


class EchoHandler(BaseHTTPRequestHandler):
    """Answers with what it received: method, path, headers and body size.

    X-Test-Sleep delays the answer (seconds); X-Test-Chunks answers with that many
    chunked-encoded parts; X-Test-Status sets the status code.
    """

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return "echo-upstream"

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self):
        body = self._read_body()
        self.server.seen.append({"path": self.path, "headers": list(self.headers.items())})
        delay = float(self.headers.get("X-Test-Sleep") or 0)
        if delay:
            time.sleep(delay)
        status = int(self.headers.get("X-Test-Status") or 200)
        payload = json.dumps({
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": len(body),
            "body": body[:200].decode("latin-1"),
        }).encode()
        chunks = int(self.headers.get("X-Test-Chunks") or 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunks:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(chunks):
                part = f"part-{i};".encode()
                self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _answer


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.seen: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # the gateway hanging up on a slow answer (504 tests) is expected here


@pytest.fixture(scope="session")
def upstream():
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Keys:
    private_pem: bytes
    public_pem: str
    other_private_pem: bytes


@pytest.fixture(scope="session")
def keys() -> Keys:
    def pair():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return private, public

    private, public = pair()
    other, _ = pair()
    return Keys(private, public, other)


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    port: int
    stdout_path: Path
    stderr_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict]:
        """The JSON lines the gateway has written so far (a line still being written is left out)."""
        lines = self.stdout_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)


def gateway_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DECK_", "GATEWAY_"))}
    env.update({"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start_gateway(config_path: Path, env: dict[str, str], workdir: Path) -> GatewayProcess:
    stdout_path, stderr_path = workdir / "gateway.out", workdir / "gateway.err"
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--config", str(config_path)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=err,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in stdout_path.read_text().splitlines():
            if line.startswith('{"event": "listening"'):
                return GatewayProcess(process, json.loads(line)["port"], stdout_path, stderr_path)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"gateway did not start:\n{stdout_path.read_text()}\n{stderr_path.read_text()}")


def run_check(config_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.gateway", "--check", "--config", str(config_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
