"""The compose stack for real: images built from deploy/Dockerfile, MongoDB replica set, RabbitMQ,
the services in production mode and Kong 3.9 DB-less, then a staff journey through Kong.

Needs a Docker engine with the compose plugin; skipped (at fixture time) only where no engine
answers `docker info` (where one answers but the compose plugin is missing, it fails). Secrets
come from deploy/compose/make-secrets.sh (git-ignored output); demo staff are seeded by a one-off
`seed-demo` container, which directory refuses in production mode, so that single container runs
in development mode against the same database.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid

import pytest
import requests

from tests.docker import deploy_files as d
from tests.helpers import DEMO_PASSWORD

pytestmark = pytest.mark.docker

STACK_TIMEOUT_S = 900


# --- pytest-docker fixtures, overridden for this stack --------------------------------------------
@pytest.fixture(scope="session")
def docker_compose_command():
    engine = d.docker_engine_problem()
    if engine:
        pytest.skip(f"compose stack test skipped: {engine}")
    plugin = d.compose_plugin_problem()
    if plugin:
        pytest.fail(f"a Docker engine answers but the compose stack cannot start: {plugin}")
    return "docker compose"


@pytest.fixture(scope="session")
def docker_compose_file():
    return str(d.COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name():
    return f"clinic-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def compose_environment(docker_compose_command):
    """Secrets generated (kept if they exist) and Kong published on a free loopback port."""
    result = subprocess.run(["bash", str(d.MAKE_SECRETS)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"make-secrets.sh failed:\n{result.stderr}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    previous = os.environ.get("KONG_HTTP_PORT")
    os.environ["KONG_HTTP_PORT"] = str(port)  # read by compose when it interpolates the file
    yield
    if previous is None:
        os.environ.pop("KONG_HTTP_PORT", None)
    else:
        os.environ["KONG_HTTP_PORT"] = previous


@pytest.fixture(scope="session")
def docker_setup(compose_environment):
    return [f"up --build --wait --wait-timeout {STACK_TIMEOUT_S}"]


@pytest.fixture(scope="session")
def docker_cleanup():
    return ["down --volumes --remove-orphans"]


# --- the stack --------------------------------------------------------------------------------------
def compose(docker_compose_command, docker_compose_file, project, *args, timeout=300):
    command = [*docker_compose_command.split(), "-f", docker_compose_file, "-p", project, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def stack(docker_services, docker_compose_command, docker_compose_file, docker_compose_project_name):
    def run(*args, timeout=300):
        return compose(docker_compose_command, docker_compose_file, docker_compose_project_name, *args, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def demo_logins(stack):
    seeded = stack(
        "run", "--rm", "--no-deps", "-T", "-e", "CLINIC_MODE=development",
        "directory", "services.directory", "seed-demo",
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    body = json.loads(seeded.stdout[seeded.stdout.index("{") :])
    return {login["username"]: login for login in body["logins"]}


@pytest.fixture(scope="session")
def gateway_url(docker_services, docker_ip):
    url = f"http://{docker_ip}:{docker_services.port_for('kong', 8000)}"

    def answers() -> bool:
        try:
            return requests.get(f"{url}/api/v1/auth/jwks", timeout=3).status_code == 200
        except requests.RequestException:
            return False

    docker_services.wait_until_responsive(check=answers, timeout=120, pause=1)
    return url


class Staff:
    """One staff member's session through Kong."""

    def __init__(self, gateway_url: str, username: str):
        self.url = gateway_url
        self.http = requests.Session()
        reply = self.http.post(
            f"{gateway_url}/api/v1/auth/token", json={"username": username, "password": DEMO_PASSWORD}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        self.staff_id = body["staff"]["id"]
        self.http.headers["Authorization"] = f"Bearer {body['access_token']}"

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.http.get(f"{self.url}{path}", timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.http.post(f"{self.url}{path}", timeout=30, **kwargs)


def test_a_colleague_reads_a_message_sent_through_kong(gateway_url, demo_logins):
    assert {"admin", "dr.reyes"} <= set(demo_logins)
    # Kong's jwt plugin answers before any service does.
    refused = requests.get(f"{gateway_url}/api/v1/messages", timeout=30)
    assert refused.status_code == 401
    assert "message" in refused.json()

    admin = Staff(gateway_url, "admin")
    reyes = Staff(gateway_url, "dr.reyes")
    subject = f"Intake follow-up {uuid.uuid4().hex[:8]}"
    sent = admin.post(
        "/api/v1/messages",
        json={"to_staff_ids": [reyes.staff_id], "subject": subject, "body": "Please call the client back."},
    )
    assert sent.status_code == 201, sent.text
    assert sent.headers.get("X-Correlation-ID")  # Kong's correlation-id plugin ran
    message_id = sent.json()["id"]

    board = reyes.get("/api/v1/messages", params={"limit": 100})
    assert board.status_code == 200, board.text
    listed = next(item for item in board.json()["items"] if item["id"] == message_id)
    assert listed["subject"] == subject and listed["read"] is False

    opened = reyes.get(f"/api/v1/messages/{message_id}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["body"] == "Please call the client back."
    assert opened.json()["read"] is True


@pytest.mark.parametrize("service", d.deployed_services())
def test_service_containers_run_as_uid_10001_on_a_read_only_root(stack, service):
    uid = stack("exec", "-T", service, "python", "-c", "import os; print(os.getuid())")
    assert uid.returncode == 0, uid.stderr
    assert uid.stdout.strip() == "10001"
    root_mount = "print(next(line.split()[3] for line in open('/proc/mounts') if line.split()[1] == '/'))"
    options = stack("exec", "-T", service, "python", "-c", root_mount)
    assert options.returncode == 0, options.stderr
    assert "ro" in options.stdout.strip().split(",")


def test_internal_links_refuse_plaintext_and_answer_over_tls(stack):
    """What the deployed files promise, asked of the running stack: mongod answers TLS clients only, the
    broker listens on amqps (5671) alone, and a service's gRPC port takes mutual TLS only."""
    ping = ["mongosh", "--quiet", "--norc", "--host", "localhost", "--eval", "quit(db.adminCommand('ping').ok ? 0 : 1)"]
    plain = stack("exec", "-T", "mongo", *ping, timeout=120)
    assert plain.returncode != 0, plain.stdout
    over_tls = stack("exec", "-T", "mongo", *ping[:3], "--tls", "--tlsCAFile", "/run/secrets/clinic_ca", *ping[3:])
    assert over_tls.returncode == 0, over_tls.stderr
    listeners = stack("exec", "-T", "rabbitmq", "rabbitmq-diagnostics", "-q", "listeners")
    assert listeners.returncode == 0, listeners.stderr
    assert "5671" in listeners.stdout and "5672" not in listeners.stdout, listeners.stdout
    # The same health check as the container's, with the certificates taken away: plaintext, refused.
    health = ["python", "-m", "services.kit.transport", "health", "127.0.0.1:50052"]
    assert stack("exec", "-T", "inbox", *health).returncode == 0
    no_tls = ["-e", "GRPC_TLS_CERT_FILE=", "-e", "GRPC_TLS_KEY_FILE=", "-e", "GRPC_TLS_CA_FILE="]
    refused = stack("exec", "-T", *no_tls, "inbox", *health)
    assert refused.returncode == 1 and "not healthy" in refused.stderr, refused.stderr
