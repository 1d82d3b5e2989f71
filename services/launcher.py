"""Starts and stops the whole system on one machine: `make run`, `make stop`, and the test suite's stack.

    python -m services.launcher start    # broker check, embedded database, services, gateway, demo data
    python -m services.launcher stop     # stops everything `start` started
    python -m services.launcher status

Every process is started in its own session with its log in <run dir>/logs and
its pid in <run dir>/pids, so `stop` finds them after the launcher has exited.
The run folder holds development secrets, certificates, the embedded database and
logs: its directories are 0700, the logs 0600, and every process runs with umask 077.

Each service connects to RabbitMQ as its own broker user (services.kit.bus.users,
docs/bus-security.md): `start` creates them on the vhost of AMQP_URL with rabbitmqctl, named
`<vhost>.<stack id>.<service>` (`clinic.<service>` on `/`), with passwords kept in <run dir>/secrets, and
gives each service process its own AMQP_URL; `stop` deletes them. AMQP_URL itself (an
administrator of the vhost) is the launcher's: it declares the shared exchange and the audit
queue before any service starts. Where the users cannot be made (no rabbitmqctl, a remote
broker) every service shares AMQP_URL, said in one line; production mode refuses that unless
AMQP_SERVICE_USERS=shared says so.

A second copy beside the first (docs/runbook.md, "A second copy on one machine"): `PORT_BASE=9000 make
run` gives that copy every port from 9000 up (`Ports.from_environment`; each port variable, e.g.
`GATEWAY_PORT` or `INBOX_HTTP_PORT`, still wins for its own port), its own run folder
(`.run-9000`, unless CLINIC_RUN_DIR says), its own RabbitMQ vhost (`clinic-9000` on the local broker,
made when missing, unless AMQP_URL says) and so its own embedded database; `PORT_BASE=9000 make stop`
stops it. Every service is told which copy it belongs to (CLINIC_DEPLOYMENT, default `local-<hash of
the run folder>`): a consumer refuses a shared queue another copy's consumers hold
(services.kit.bus.topology.ConsumerQueues.claim), so two copies on one vhost never split each other's
events silently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path

import jwt
import pika
import requests
from cryptography.hazmat.primitives import serialization

from services.kit.bus import users as broker_users
from services.kit.bus.topology import DEFAULT_EXCHANGE, connection_parameters
from services.kit.embedded_mongo import (
    PRIVATE_UMASK,
    EmbeddedMongo,
    free_port,
    open_private_log,
    pid_alive,
    private_dir,
    restrict_tree,
)
from services.kit.settings import REPO_ROOT, SettingsError, dev_secret
from services.kit.transport import GRPC_TLS_VARIABLES, GrpcTls, development_grpc_tls, grpc_tls_from

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# "per-service" (the default): each service its own broker user; "shared": every service AMQP_URL's.
SERVICE_USERS_SETTING = "AMQP_SERVICE_USERS"


class LaunchError(RuntimeError):
    pass


class AlreadyRunning(LaunchError):
    """Processes of an earlier start are alive; nothing was started (and nothing is stopped)."""


@dataclass
class Ports:
    gateway: int = 8000
    directory_http: int = 8101
    directory_grpc: int = 50051
    inbox_http: int = 8102
    inbox_grpc: int = 50052
    mongo: int = 27018
    notifications_http: int = 8103
    notifications_grpc: int = 50053
    notifications_mllp: int = 2575
    auto_reply_http: int = 8104
    auto_reply_grpc: int = 50054
    web_http: int = 8105
    web_events: int = 8109
    erx_bridge_http: int = 8106
    erx_bridge_grpc: int = 50056
    erx_simulator: int = 8190
    fax_simulator: int = 8191
    direct_simulator: int = 8192
    direct_simulator_smtp: int = 2526
    cloud_comms_http: int = 8107
    cloud_comms_grpc: int = 50057
    cloud_comms_smtp: int = 2525
    audit_http: int = 8108
    audit_grpc: int = 50058

    @classmethod
    def free(cls) -> Ports:
        return cls(**{f.name: free_port() for f in fields(cls)})

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Ports:
        """The ports `make run` uses: the defaults; with PORT_BASE every port from PORT_BASE up, in the
        order of `PORT_VARIABLES` (the gateway at PORT_BASE itself); then each port variable that is
        set (`port_variable`). LaunchError names every bad value and every port given twice."""
        env = os.environ if environ is None else environ
        problems = []
        values = {f.name: getattr(cls(), f.name) for f in fields(cls)}
        raw_base = env.get("PORT_BASE", "").strip()
        if raw_base:
            base = _port_number("PORT_BASE", raw_base, problems, top=65535 - len(values))
            if base is not None:
                values = {name: base + offset for offset, name in enumerate(values)}
        for name in values:
            variable = port_variable(name)
            raw = env.get(variable, "").strip()
            if raw:
                number = _port_number(variable, raw, problems)
                if number is not None:
                    values[name] = number
        taken: dict[int, str] = {}
        for name, port in values.items():
            if port in taken:
                problems.append(f"{port_variable(name)} and {port_variable(taken[port])} are both {port}")
            taken.setdefault(port, name)
        if problems:
            raise LaunchError("bad port settings: " + "; ".join(problems))
        return cls(**values)


# A port's variable is <FIELD>_PORT, as the services read it, but for these two.
_PORT_VARIABLE_NAMES = {"fax_simulator": "CLOUD_FAX_SIMULATOR_PORT", "cloud_comms_smtp": "CLOUD_SMTP_PORT"}


def port_variable(name: str) -> str:
    """The environment variable that sets the port `name` of `Ports` (e.g. INBOX_HTTP_PORT)."""
    return _PORT_VARIABLE_NAMES.get(name, f"{name.upper()}_PORT")


def _port_number(variable: str, raw: str, problems: list[str], top: int = 65535) -> int | None:
    try:
        number = int(raw)
    except ValueError:
        number = -1
    if not 1024 <= number <= top:
        problems.append(f"{variable} must be a port number from 1024 to {top}, got {raw!r}")
        return None
    return number


@dataclass
class StackConfig:
    run_dir: Path
    ports: Ports = field(default_factory=Ports)
    mongo_uri: str | None = None  # None: start the embedded nx-27017
    amqp_url: str = DEFAULT_AMQP_URL
    extra_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    seed_demo: bool = True
    # The vendor simulators: eRx, fax, partner HISP (development only: never with CLINIC_MODE=production).
    erx_simulator: bool = True


class Stack:
    """The processes of the system, started in dependency order."""

    # Stopped in reverse: audit goes after every producer, so it still records their last events.
    SERVICES = (
        "directory",
        "audit",
        "erx-simulator",
        "fax-simulator",
        "direct-simulator",
        "inbox",
        "notifications",
        "auto-reply",
        "erx-bridge",
        "cloud-comms",
        "web",
        "gateway",
    )

    def __init__(self, config: StackConfig):
        self.config = config
        self.run_dir = config.run_dir
        self.logs = self.run_dir / "logs"
        self.pids = self.run_dir / "pids"
        self.mongo: EmbeddedMongo | None = None
        self.demo_logins: list[dict] = []
        self.patient_portal_api_key = ""
        self.lab_interface_api_key = ""
        self.practice_management_api_key = ""
        self.compliance_tracker_api_key = ""
        self.dashboards_api_key = ""
        self._env: dict[str, str] = {}
        self._amqp_urls: dict[str, str] = {}  # service -> its own AMQP URL (empty: all share AMQP_URL)
        self._processes: dict[str, subprocess.Popen] = {}

    # --- addresses ----------------------------------------------------------
    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.gateway}"

    @property
    def directory_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.directory_http}"

    @property
    def inbox_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.inbox_http}"

    @property
    def notifications_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.notifications_http}"

    @property
    def auto_reply_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.auto_reply_http}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.web_http}"

    @property
    def web_events_url(self) -> str:
        """web's event stream server (`/app/events`), a port of its own."""
        return f"http://127.0.0.1:{self.config.ports.web_events}"

    @property
    def erx_bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.erx_bridge_http}"

    @property
    def cloud_comms_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.cloud_comms_http}"

    @property
    def audit_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.audit_http}"

    @property
    def cloud_direct_certs(self) -> Path:
        """Development Direct certificates (CA, agency identities, partner HISP), made on first start."""
        return self.run_dir / "cloud-direct"

    @property
    def erx_simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.erx_simulator}"

    @property
    def fax_simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.fax_simulator}"

    @property
    def direct_simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.direct_simulator}"

    @property
    def runs_simulators(self) -> bool:
        """The vendor simulators (eRx, fax, partner HISP) run in development only, when the stack asks."""
        return self.config.erx_simulator and self.mode != "production"

    @property
    def mode(self) -> str:
        return self.config.extra_env.get("CLINIC_MODE", os.environ.get("CLINIC_MODE", "development"))

    @property
    def grpc_tls_dir(self) -> Path:
        """The development service CA and certificate, made by `start` (development only)."""
        return self.run_dir / "grpc-tls"

    @property
    def grpc_tls(self) -> GrpcTls | None:
        """The gRPC mTLS certificates the services use: the operator's (GRPC_TLS_* in the environment
        or extra_env), else in development the ones `start` generates; None: plaintext (production
        without certificates, which the services refuse unless the network is declared trusted)."""
        given = {**os.environ, **self.config.extra_env}
        if any(given.get(name) for name in GRPC_TLS_VARIABLES):
            try:
                return grpc_tls_from(given)
            except ValueError:
                return None  # passed on as given: each service reports what is wrong with it
        if self.mode == "production":
            return None
        folder = self.grpc_tls_dir
        return GrpcTls(folder / "service.pem", folder / "service.key", folder / "ca.pem")

    @property
    def mongo_uri(self) -> str:
        return self.config.mongo_uri or f"mongodb://127.0.0.1:{self.config.ports.mongo}/"

    @property
    def broker_users_file(self) -> Path:
        """The broker users `start` created (vhost and names), for `stop` to delete, in any process."""
        return self.run_dir / "broker-users.json"

    def amqp_url_of(self, service: str) -> str:
        """The AMQP URL `service` connects with: its own broker user's, or the shared AMQP_URL."""
        return self._amqp_urls.get(service, self.config.amqp_url)

    @property
    def broker_stack_id(self) -> str:
        """What sets this stack's broker users apart from another stack's on the vhost: from the run
        folder; none on `/` (`make run`: `clinic.<service>`)."""
        if broker_users.vhost_of(self.config.amqp_url) == "/":
            return ""
        return hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:8]

    @property
    def deployment(self) -> str:
        """Which copy of the system this stack is (CLINIC_DEPLOYMENT for every service): the
        environment's CLINIC_DEPLOYMENT, else `local-<hash of the run folder>`."""
        given = self.config.extra_env.get("CLINIC_DEPLOYMENT") or os.environ.get("CLINIC_DEPLOYMENT", "")
        return given.strip() or "local-" + hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:8]

    def broker_user(self, service: str) -> str:
        """`service`'s own broker user: `<vhost>.<stack id>.<service>` (`clinic.<service>` on `/`)."""
        return broker_users.user_name(broker_users.vhost_of(self.config.amqp_url), service, self.broker_stack_id)

    def service_env(self) -> dict[str, str]:
        p = self.config.ports
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DECK_", "GATEWAY_"))}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "CLINIC_RUN_DIR": str(self.run_dir),
                "CLINIC_DEPLOYMENT": self.deployment,
                "MONGO_URI": self.mongo_uri,
                "AMQP_URL": self.config.amqp_url,
                "DIRECTORY_HTTP_PORT": str(p.directory_http),
                "DIRECTORY_GRPC_PORT": str(p.directory_grpc),
                "INBOX_HTTP_PORT": str(p.inbox_http),
                "INBOX_GRPC_PORT": str(p.inbox_grpc),
                "NOTIFICATIONS_HTTP_PORT": str(p.notifications_http),
                "NOTIFICATIONS_GRPC_PORT": str(p.notifications_grpc),
                "NOTIFICATIONS_MLLP_PORT": str(p.notifications_mllp),
                "NOTIFICATIONS_PUBLIC_URL": self.gateway_url,
                "AUTO_REPLY_HTTP_PORT": str(p.auto_reply_http),
                "AUTO_REPLY_GRPC_PORT": str(p.auto_reply_grpc),
                "WEB_HTTP_PORT": str(p.web_http),
                "WEB_EVENTS_PORT": str(p.web_events),
                "ERX_BRIDGE_HTTP_PORT": str(p.erx_bridge_http),
                "ERX_BRIDGE_GRPC_PORT": str(p.erx_bridge_grpc),
                # Board items link to the gateway's address (the page signs in to the vendor from there).
                "ERX_BRIDGE_PUBLIC_URL": self.gateway_url,
                # The simulator's address; in development erx-bridge's default practice points at it.
                "ERX_SIMULATOR_HOST": "127.0.0.1",
                "ERX_SIMULATOR_PORT": str(p.erx_simulator),
                "CLOUD_COMMS_HTTP_PORT": str(p.cloud_comms_http),
                "CLOUD_COMMS_GRPC_PORT": str(p.cloud_comms_grpc),
                "CLOUD_SMTP_PORT": str(p.cloud_comms_smtp),
                "CLOUD_COMMS_PUBLIC_URL": self.gateway_url,
                "AUDIT_HTTP_PORT": str(p.audit_http),
                "AUDIT_GRPC_PORT": str(p.audit_grpc),
                # The fax provider: its API (the simulator in development) and the callback address
                # it signs, which is the gateway's route to cloud-comms.
                "CLOUD_FAX_API_URL": self.fax_simulator_url,
                "CLOUD_FAX_PUBLIC_CALLBACK_URL": f"{self.gateway_url}/api/v1/fax/callbacks",
                "CLOUD_FAX_SIMULATOR_PORT": str(p.fax_simulator),
                "CLOUD_FAX_SIMULATOR_RECEIVED_URL": f"{self.gateway_url}/api/v1/fax/callbacks/received",
                "CLOUD_FAX_SIMULATOR_STATUS_URL": f"{self.gateway_url}/api/v1/fax/callbacks/status",
                "DIRECTORY_HTTP_URL": self.directory_url,
                "WEB_ALLOWED_ORIGINS": f"{self.gateway_url},http://localhost:{p.gateway}",
                "DIRECTORY_GRPC_TARGET": f"127.0.0.1:{p.directory_grpc}",
                "INBOX_GRPC_TARGET": f"127.0.0.1:{p.inbox_grpc}",
                "DIRECTORY_JWKS_URL": f"{self.directory_url}/api/v1/auth/jwks",
            }
        )
        tls = self.grpc_tls
        if tls is not None:
            env.update(tls.environ())  # gRPC between the services over mutual TLS
        if self.runs_simulators:
            # The partner HISP simulator: cloud-comms relays outbound Direct (and MDNs) to it, and it
            # answers with MDNs to cloud-comms' listener. A test's own sink (extra_env) wins.
            env.update(
                {
                    "CLOUD_SMTP_RELAY": f"127.0.0.1:{p.direct_simulator_smtp}",
                    "DIRECT_SIMULATOR_PORT": str(p.direct_simulator),
                    "DIRECT_SIMULATOR_SMTP_PORT": str(p.direct_simulator_smtp),
                    "DIRECT_SIMULATOR_CERTS_DIR": str(self.cloud_direct_certs),
                    "DIRECT_SIMULATOR_HISP": f"127.0.0.1:{p.cloud_comms_smtp}",
                }
            )
        env.update(self.config.extra_env)
        return env

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        running = [name for name, alive in self.status().items() if alive]
        if running:
            raise AlreadyRunning(f"already running: {', '.join(running)}; use `make stop` first")
        for folder in (self.run_dir, self.logs, self.pids):
            private_dir(folder)
        restrict_tree(self.logs)  # logs an earlier start left readable
        self._check_ports_free()
        try:
            self._start_processes()
        except BaseException:
            self.stop()  # whatever went wrong, leave nothing half-started behind
            raise

    def _start_processes(self) -> None:
        ensure_broker(self.config.amqp_url)
        given = {**os.environ, **self.config.extra_env}
        if self.mode != "production" and not any(given.get(name) for name in GRPC_TLS_VARIABLES):
            development_grpc_tls(self.grpc_tls_dir)
        env = self.service_env()
        declare_audit_queue(env)
        self._amqp_urls = self._broker_users(env)
        if self.config.mongo_uri is None:
            self.mongo = EmbeddedMongo(
                data_dir=self.run_dir / "mongo",
                port=self.config.ports.mongo,
                log_file=self.logs / "nx-27017.log",
                pid_file=self.pids / "nx-27017.pid",
            )
            self.mongo.start()
        self._env = env
        directory = self._spawn("directory", [sys.executable, "-m", "services.directory"], env)
        simulator = fax_simulator = None
        if self.runs_simulators:
            simulator = self._spawn("erx-simulator", [sys.executable, "-m", "services.erx_simulator"], env)
            fax_simulator = self._spawn("fax-simulator", [sys.executable, "-m", "services.fax_simulator"], env)
        wait_http(f"{self.directory_url}/healthz", "directory", self.logs / "directory.log", directory)
        if self.config.seed_demo:
            self.demo_logins = self._seed(env)
        audit = self._spawn("audit", [sys.executable, "-m", "services.audit"], env)
        inbox = self._spawn("inbox", [sys.executable, "-m", "services.inbox"], env)
        notifications = self._spawn("notifications", [sys.executable, "-m", "services.notifications"], env)
        auto_reply = self._spawn("auto-reply", [sys.executable, "-m", "services.auto_reply"], env)
        if simulator is not None:
            wait_http(f"{self.erx_simulator_url}/healthz", "erx-simulator", self.logs / "erx-simulator.log", simulator)
        if fax_simulator is not None:
            log = self.logs / "fax-simulator.log"
            wait_http(f"{self.fax_simulator_url}/healthz", "fax-simulator", log, fax_simulator)
        erx_bridge = self._spawn("erx-bridge", [sys.executable, "-m", "services.erx_bridge"], env)
        if env.get("CLINIC_MODE", "development") != "production" and "CLOUD_DIRECT_CERTS_DIR" not in env:
            self._devcerts(env)
        direct_simulator = None
        if self.runs_simulators:
            direct_simulator = self._spawn("direct-simulator", [sys.executable, "-m", "services.direct_simulator"], env)
        cloud_comms = self._spawn("cloud-comms", [sys.executable, "-m", "services.cloud_comms"], env)
        web = self._spawn("web", [sys.executable, "-m", "services.web"], env)
        self.patient_portal_api_key = dev_secret(self.run_dir, "patient-portal-api-key", lambda: os.urandom(24).hex())
        self.lab_interface_api_key = dev_secret(self.run_dir, "lab-interface-api-key", lambda: os.urandom(24).hex())
        self.practice_management_api_key = dev_secret(
            self.run_dir, "practice-management-api-key", lambda: os.urandom(24).hex()
        )
        self.compliance_tracker_api_key = dev_secret(
            self.run_dir, "compliance-tracker-api-key", lambda: os.urandom(24).hex()
        )
        self.dashboards_api_key = dev_secret(self.run_dir, "dashboards-api-key", lambda: os.urandom(24).hex())
        gateway = self._spawn("gateway", [sys.executable, "-m", "services.gateway"], {**env, **self.gateway_env()})
        # Ready = consuming the audit stream (its queue was declared before any service started).
        wait_http(f"{self.audit_url}/readyz", "audit", self.logs / "audit.log", audit)
        wait_http(f"{self.inbox_url}/healthz", "inbox", self.logs / "inbox.log", inbox)
        wait_http(f"{self.notifications_url}/readyz", "notifications", self.logs / "notifications.log", notifications)
        # Ready = consuming message.delivered.v1 (its queue exists, so no delivery is missed).
        wait_http(f"{self.auto_reply_url}/readyz", "auto-reply", self.logs / "auto-reply.log", auto_reply)
        wait_http(f"{self.erx_bridge_url}/readyz", "erx-bridge", self.logs / "erx-bridge.log", erx_bridge)
        if direct_simulator is not None:
            log = self.logs / "direct-simulator.log"
            wait_http(f"{self.direct_simulator_url}/healthz", "direct-simulator", log, direct_simulator)
        wait_http(f"{self.cloud_comms_url}/readyz", "cloud-comms", self.logs / "cloud-comms.log", cloud_comms)
        wait_http(f"{self.web_url}/healthz", "web", self.logs / "web.log", web)
        wait_http(f"{self.gateway_url}/api/v1/auth/jwks", "gateway", self.logs / "gateway.log", gateway)

    # --- faults: what the fault tests and bench/bench_faults.py do to a running stack -------------
    MODULES = {
        "directory": "services.directory",
        "audit": "services.audit",
        "erx-simulator": "services.erx_simulator",
        "fax-simulator": "services.fax_simulator",
        "direct-simulator": "services.direct_simulator",
        "inbox": "services.inbox",
        "notifications": "services.notifications",
        "auto-reply": "services.auto_reply",
        "erx-bridge": "services.erx_bridge",
        "cloud-comms": "services.cloud_comms",
        "web": "services.web",
        "gateway": "services.gateway",
    }

    def ready_url(self, name: str) -> str:
        """The URL that answers 200 once `name` serves (what `start` waits for)."""
        if name == "gateway":
            return f"{self.gateway_url}/api/v1/auth/jwks"
        base = getattr(self, f"{name.replace('-', '_')}_url")
        plain_health = ("directory", "inbox", "web", "erx-simulator", "fax-simulator", "direct-simulator")
        return f"{base}/healthz" if name in plain_health else f"{base}/readyz"

    def pid(self, name: str) -> int:
        try:
            return int((self.pids / f"{name}.pid").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def kill(self, name: str, timeout_s: float = 10.0) -> None:
        """SIGKILL `name`'s process group (kill -9: no drain, no goodbye) and wait until it is gone.
        `name` is a service of SERVICES or `nx-27017` (the embedded database)."""
        pid = self.pid(name)
        if not pid or not pid_alive(pid):
            raise LaunchError(f"{name} is not running")
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise LaunchError(f"{name} (pid {pid}) outlived SIGKILL for {timeout_s} s")
            time.sleep(0.05)
        child = self.mongo.process if name == "nx-27017" and self.mongo else self._processes.get(name)
        if child is not None and child.pid == pid:
            child.wait(timeout=timeout_s)  # reap it: a zombie holds its pid (and nx-27017's pid file)

    def restart(
        self,
        name: str,
        *,
        wait: bool = True,
        timeout_s: float = 60.0,
        env_overrides: dict[str, str | None] | None = None,
    ) -> subprocess.Popen | None:
        """Start `name` again with the settings it first ran with (after `kill` or a crash); with
        `wait`, return once it answers its readiness URL. `nx-27017` restarts the embedded database.
        `env_overrides`: settings changed from now on for every later start (None removes one)."""
        for key, value in (env_overrides or {}).items():
            if value is None:
                self._env.pop(key, None)
            else:
                self._env[key] = value
        if name == "nx-27017":
            if self.mongo is None:
                raise LaunchError("this stack does not run the embedded database")
            self.mongo.start()
            return None
        if pid_alive(self.pid(name)):
            raise LaunchError(f"{name} is still running (pid {self.pid(name)}); kill it first")
        env = self._env if name != "gateway" else {**self._env, **self.gateway_env()}
        (self.pids / f"{name}.pid").unlink(missing_ok=True)
        process = self._spawn(name, [sys.executable, "-m", self.MODULES[name]], env)
        if wait:
            wait_http(self.ready_url(name), name, self.logs / f"{name}.log", process, timeout_s=timeout_s)
        return process

    def _devcerts(self, env: dict[str, str]) -> None:
        """Development Direct certificates into the run folder when it lacks them."""
        result = subprocess.run(
            [sys.executable, "-m", "services.cloud_comms.devcerts", str(self.cloud_direct_certs)],
            env=self._process_env("cloud-comms", env),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            umask=PRIVATE_UMASK,
        )
        if result.returncode != 0:
            raise LaunchError(f"development Direct certificates failed:\n{result.stderr[-2000:]}")

    def _check_ports_free(self) -> None:
        ports = vars(self.config.ports).copy()
        if self.config.mongo_uri is not None:
            ports.pop("mongo")
        if not self.runs_simulators:
            ports.pop("erx_simulator")
            ports.pop("fax_simulator")
            ports.pop("direct_simulator")
            ports.pop("direct_simulator_smtp")
        taken = []
        for name, port in ports.items():
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    taken.append(f"{name} ({port})")
        if taken:
            raise AlreadyRunning(f"ports in use by another program: {', '.join(taken)}")

    def gateway_env(self) -> dict[str, str]:
        p = self.config.ports
        env = {
            "GATEWAY_PORT": str(p.gateway),
            "GATEWAY_CONFIG": str(REPO_ROOT / "gateway" / "kong.yml"),
            "DECK_DIRECTORY_URL": self.directory_url,
            "DECK_INBOX_URL": self.inbox_url,
            "DECK_NOTIFICATIONS_URL": self.notifications_url,
            "DECK_AUTO_REPLY_URL": self.auto_reply_url,
            "DECK_WEB_URL": self.web_url,
            "DECK_WEB_EVENTS_URL": self.web_events_url,
            "DECK_ERX_BRIDGE_URL": self.erx_bridge_url,
            "DECK_CLOUD_COMMS_URL": self.cloud_comms_url,
            "DECK_AUDIT_URL": self.audit_url,
            "DECK_DIRECTORY_JWT_PUBLIC_KEY": jwks_public_pem(f"{self.directory_url}/api/v1/auth/jwks"),
            "DECK_PATIENT_PORTAL_API_KEY": self.patient_portal_api_key,
            "DECK_LAB_INTERFACE_API_KEY": self.lab_interface_api_key,
            "DECK_PRACTICE_MANAGEMENT_API_KEY": self.practice_management_api_key,
            "DECK_COMPLIANCE_TRACKER_API_KEY": self.compliance_tracker_api_key,
            "DECK_DASHBOARDS_API_KEY": self.dashboards_api_key,
            "DECK_RATE_LIMIT_MINUTE": "6000",
            "DECK_AUTH_RATE_LIMIT_MINUTE": "120",
            # Per partner (the lab tests post hundreds of results a minute through lab-interface).
            "DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE": "60000",
            "DECK_LAB_INTERFACE_RATE_LIMIT_MINUTE": "60000",
            "DECK_PRACTICE_MANAGEMENT_RATE_LIMIT_MINUTE": "60000",
            "DECK_COMPLIANCE_TRACKER_RATE_LIMIT_MINUTE": "60000",
            "DECK_CORS_ORIGIN": self.gateway_url,
        }
        env.update(self.config.gateway_env)
        return env

    def _seed(self, env: dict[str, str]) -> list[dict]:
        result = subprocess.run(
            [sys.executable, "-m", "services.directory", "seed-demo"],
            env=self._process_env("directory", env),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            umask=PRIVATE_UMASK,
        )
        if result.returncode != 0:
            raise LaunchError(f"seeding demo data failed:\n{result.stderr[-2000:]}")
        return json.loads(result.stdout)["logins"]

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        pid_file = self.pids / f"{name}.pid"
        if pid_file.exists() and pid_alive(int(pid_file.read_text() or 0)):
            raise LaunchError(f"{name} is already running (pid {pid_file.read_text()}); run `make stop` first")
        log_file = open_private_log(self.logs / f"{name}.log")  # handed to the child
        process = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=self._process_env(name, env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            umask=PRIVATE_UMASK,  # what a service writes into the run folder is its owner's only
        )
        log_file.close()
        pid_file.write_text(str(process.pid))
        self._processes[name] = process
        return process

    def stop(self) -> list[str]:
        stopped = []
        for name in (*reversed(self.SERVICES), "nx-27017"):
            pid_file = self.pids / f"{name}.pid"
            if not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and stop_process_group(pid):
                stopped.append(name)
            pid_file.unlink(missing_ok=True)
        self._delete_broker_users()  # after the services: deleting a user closes its connections
        return stopped

    # --- broker users ---------------------------------------------------------
    def _process_env(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """`env` for process `name`: its own AMQP URL when it has a broker user; none for a process
        that does not use the bus (the gateway, the simulators) while the services have their own."""
        if not self._amqp_urls:
            return env
        env = dict(env)
        if name in self._amqp_urls:
            env["AMQP_URL"] = self._amqp_urls[name]
        else:
            env.pop("AMQP_URL", None)
        return env

    def _broker_users(self, env: dict[str, str]) -> dict[str, str]:
        """Create each service's broker user on AMQP_URL's vhost; service -> its AMQP URL. Empty
        (every service shares AMQP_URL) when asked to (AMQP_SERVICE_USERS=shared), or in development
        when they cannot be made; production refuses that unless asked to."""
        admin = self.config.amqp_url
        who = urllib.parse.unquote(urllib.parse.urlsplit(admin).username or "guest")
        choice = env.get(SERVICE_USERS_SETTING, "per-service").strip().lower()
        if choice not in ("per-service", "shared"):
            raise LaunchError(f"{SERVICE_USERS_SETTING} must be per-service or shared, not {choice!r}")
        if choice == "shared":
            print(f"broker: every service connects as {who!r} ({SERVICE_USERS_SETTING}=shared)", flush=True)
            return {}
        vhost = broker_users.vhost_of(admin)
        host = urllib.parse.urlsplit(admin).hostname
        if host not in LOCAL_HOSTS:
            reason = f"the broker at {host} is not on this machine"
        elif not broker_users.rabbitmqctl_available():
            reason = "rabbitmqctl is not installed"
        else:
            passwords = {
                service: dev_secret(self.run_dir, f"amqp-{service}.password", lambda: secrets.token_urlsafe(24))
                for service in broker_users.SERVICES
            }
            names = {service: self.broker_user(service) for service in broker_users.SERVICES}
            # Recorded first: a stop after a failure half-way still deletes whatever was made.
            self.broker_users_file.write_text(json.dumps({"vhost": vhost, "users": sorted(names.values())}))
            exchange = env.get("EVENTS_EXCHANGE", DEFAULT_EXCHANGE)
            try:
                broker_users.create_users(vhost, passwords, exchange, self.broker_stack_id)
            except broker_users.BrokerCtlError as exc:
                reason = str(exc)
                self.broker_users_file.unlink(missing_ok=True)  # nothing rabbitmqctl could make, nor delete
            else:
                return {s: broker_users.service_url(admin, names[s], passwords[s]) for s in broker_users.SERVICES}
        if self.mode == "production":
            raise LaunchError(
                f"per-service broker users cannot be created ({reason}). Production gives each service its own "
                f"broker user (docs/bus-security.md); set {SERVICE_USERS_SETTING}=shared to let every service "
                f"connect as {who!r} instead."
            )
        print(f"broker: per-service users not created ({reason}); every service connects as {who!r}", flush=True)
        return {}

    def _delete_broker_users(self) -> None:
        """Delete the broker users `start` made (recorded in the run folder, so `make stop` finds them)."""
        try:
            recorded = json.loads(self.broker_users_file.read_text())
        except (OSError, ValueError):
            return
        try:
            broker_users.delete_users(list(recorded.get("users", [])))
        except (broker_users.BrokerCtlError, ValueError) as exc:
            print(f"broker: users of this stack not deleted ({exc}); the next stop tries again", flush=True)
            return
        self.broker_users_file.unlink(missing_ok=True)
        self._amqp_urls = {}

    def status(self) -> dict[str, bool]:
        result = {}
        for name in (*self.SERVICES, "nx-27017"):
            if name in ("erx-simulator", "fax-simulator", "direct-simulator") and not self.runs_simulators:
                continue
            pid_file = self.pids / f"{name}.pid"
            try:
                result[name] = pid_alive(int(pid_file.read_text().strip() or 0))
            except (OSError, ValueError):
                result[name] = False
        return result


# --- helpers ------------------------------------------------------------------
def declare_audit_queue(env: dict[str, str]) -> None:
    """Declare the events exchange and the audit service's queue before any service starts (as
    AMQP_URL's user: a service's own broker user may not declare the shared exchange), so no audit
    event published before the audit process first consumes is left unrouted. Settings the audit
    process itself would refuse are left for it to report."""
    from services.audit import config as audit_config
    from services.audit.ingest import consumer_queues

    try:
        settings = audit_config.load(env)
    except SettingsError:
        return
    try:
        connection = pika.BlockingConnection(connection_parameters(settings.amqp_url, "clinic-launcher", env))
        try:
            consumer_queues(settings).open(connection)
        finally:
            connection.close()
    except pika.exceptions.AMQPError as exc:
        raise LaunchError(f"declaring the audit queue failed ({type(exc).__name__}: {exc})") from exc


def stop_process_group(pid: int, timeout_s: float = 15.0) -> bool:
    """SIGTERM the process group (graceful drain), SIGKILL whatever is left after the timeout."""
    if not pid_alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def wait_http(
    url: str, name: str, log_file: Path, process: subprocess.Popen | None = None, timeout_s: float = 60.0
) -> None:
    """Wait until `url` answers 200; a process that exits meanwhile fails at once, with its log."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            last = f"exited with status {process.returncode}"
            break
        try:
            response = requests.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else "(no log)"
    raise LaunchError(f"{name} did not become healthy at {url} ({last}); last log lines:\n{tail}")


def jwks_public_pem(jwks_url: str) -> str:
    """The active signing key from directory's JWKS, as the PEM that Kong's jwt credential wants."""
    keys = requests.get(jwks_url, timeout=5).json()["keys"]
    public_key = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(keys[0]))
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def broker_answers(amqp_url: str, timeout_s: float = 3.0) -> bool:
    params = connection_parameters(amqp_url, "clinic-launcher")  # amqps as the services speak it
    params.socket_timeout = timeout_s
    params.blocked_connection_timeout = timeout_s
    params.connection_attempts = 1
    try:
        pika.BlockingConnection(params).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def ensure_broker(amqp_url: str) -> None:
    """Make sure RabbitMQ answers: start the local server, or install it, or say exactly what to do.
    A vhost that the local broker lacks (a second copy's, `clinic-<PORT_BASE>`) is made."""
    if broker_answers(amqp_url):
        return
    _ensure_broker_running(_root_url(amqp_url))
    if broker_answers(amqp_url):
        return
    vhost = broker_users.vhost_of(amqp_url)
    host = urllib.parse.urlsplit(amqp_url).hostname
    if host in LOCAL_HOSTS and shutil.which("rabbitmqctl"):
        print(f"RabbitMQ has no vhost {vhost!r}; adding it ...", flush=True)
        user = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).username or "guest")
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=False, capture_output=True, timeout=120)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            check=False,
            capture_output=True,
            timeout=120,
        )
        if broker_answers(amqp_url):
            return
    raise LaunchError(
        f"RabbitMQ answers but not on the vhost {vhost!r} of AMQP_URL: add it (rabbitmqctl add_vhost {vhost}) and give"
        " AMQP_URL's user its permissions, or point AMQP_URL elsewhere"
    )


def _root_url(amqp_url: str) -> str:
    """`amqp_url` on the vhost `/` (to tell a broker that is down from a vhost that is missing)."""
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(amqp_url)._replace(path="/"))


def _ensure_broker_running(amqp_url: str) -> None:
    if broker_answers(amqp_url):
        return
    host = urllib.parse.urlsplit(amqp_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise LaunchError(f"RabbitMQ at {host} does not answer; check AMQP_URL and that the broker is running")
    if not shutil.which("rabbitmq-server") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("RabbitMQ is not installed; installing Debian's rabbitmq-server ...", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "rabbitmq-server"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if shutil.which("rabbitmq-server"):
        print("RabbitMQ is not answering; starting rabbitmq-server ...", flush=True)
        subprocess.run(["rabbitmq-server", "-detached"], check=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if broker_answers(amqp_url):
                return
            time.sleep(1)
    raise LaunchError(
        "RabbitMQ does not answer at AMQP_URL. Install and start it, e.g. on Debian/Ubuntu:\n"
        "  sudo apt-get update && sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached\n"
        "or point AMQP_URL at a running broker (amqp://user:password@host:5672/vhost)."
    )


def _default_config(environ: dict[str, str] | None = None) -> StackConfig:
    """What `make run` / `make stop` / `make status` act on. With PORT_BASE (a second copy), the run
    folder defaults to `.run-<PORT_BASE>` and the broker to the local one's vhost `clinic-<PORT_BASE>`."""
    env = os.environ if environ is None else environ
    ports = Ports.from_environment(env)
    base = env.get("PORT_BASE", "").strip()
    run_dir = Path(env.get("CLINIC_RUN_DIR") or REPO_ROOT / (f".run-{base}" if base else ".run")).resolve()
    amqp_url = env.get("AMQP_URL") or (f"{DEFAULT_AMQP_URL}clinic-{base}" if base else DEFAULT_AMQP_URL)
    return StackConfig(run_dir=run_dir, ports=ports, mongo_uri=env.get("MONGO_URI") or None, amqp_url=amqp_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.launcher")
    parser.add_argument("command", choices=("start", "stop", "status", "ensure-broker"))
    args = parser.parse_args(argv)
    try:
        stack = Stack(_default_config())
    except LaunchError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "ensure-broker":
        try:
            ensure_broker(stack.config.amqp_url)
        except LaunchError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if args.command == "stop":
        stopped = stack.stop()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.command == "status":
        for name, alive in stack.status().items():
            print(f"{name:10s} {'running' if alive else 'stopped'}")
        return 0
    try:
        stack.start()
    except AlreadyRunning as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    except LaunchError as exc:
        print(f"\nmake run failed: {exc}", file=sys.stderr)
        return 1
    print_welcome(stack)
    return 0


def print_welcome(stack: Stack) -> None:
    print()
    print("Clinic Message Board is running.")
    print(f"  Message Board (open in a browser): {stack.gateway_url}/")
    print(f"  Gateway (the one address to use): {stack.gateway_url}")
    base = os.environ.get("PORT_BASE", "").strip()
    print(f"  Logs: {stack.logs}/   Stop with: {f'PORT_BASE={base} ' if base else ''}make stop")
    tls = stack.grpc_tls
    print(f"  gRPC between services: {'mutual TLS, CA ' + str(tls.ca_file) if tls else 'plaintext'}")
    if stack.amqp_url_of("inbox") != stack.config.amqp_url:
        print(
            f"  RabbitMQ: each service its own user ({stack.broker_user('<service>')}), passwords in "
            f"{stack.run_dir / 'secrets'}/amqp-<service>.password"
        )
    if stack.config.mongo_uri is None:
        print(f"  Embedded database (nx-27017): {stack.mongo_uri}")
    print()
    print("Demo logins (development only):")
    for login in stack.demo_logins:
        roles = ",".join(login.get("roles", []))
        print(f"  {login['username']:<20} {login['password']:<22} {login.get('agency', ''):<30} {roles}")
    print()
    print(f"Partner API key for the patient portal consumer: {stack.patient_portal_api_key}")
    print(f"Partner API key for the lab interface consumer:  {stack.lab_interface_api_key}")
    print(f"Partner API key for the practice-management consumer: {stack.practice_management_api_key}")
    print(f"Partner API key for the compliance-tracker consumer:  {stack.compliance_tracker_api_key}")
    print(f"API key for the internal-dashboard consumer:  {stack.dashboards_api_key}")
    print(f"HL7 v2 MLLP listener (lab results, schedule changes): 127.0.0.1:{stack.config.ports.notifications_mllp}")
    print(
        f"Direct secure messaging SMTP listener (S/MIME, the agency's HISP edge): "
        f"127.0.0.1:{stack.config.ports.cloud_comms_smtp}   certificates: {stack.cloud_direct_certs}/"
    )
    if stack.runs_simulators:
        print(f"eRx vendor simulator (development only, fictional data): {stack.erx_simulator_url}/simulator/state")
        print(f"Fax provider simulator (development only): {stack.fax_simulator_url}/simulator/state")
        print(
            f"Partner HISP simulator (development only; outbound Direct is relayed to it and it answers with MDNs): "
            f"{stack.direct_simulator_url}/simulator/state   SMTP 127.0.0.1:{stack.config.ports.direct_simulator_smtp}"
        )
    print(
        f"Audit trail (agency admins, compliance officers): {stack.gateway_url}/api/v1/audit/records   "
        "chain check: python -m services.audit verify"
    )
    print("Try it:")
    print(
        f"  curl -s -X POST {stack.gateway_url}/api/v1/auth/token -H 'Content-Type: application/json' "
        '-d \'{"username":"admin","password":"demo-Password-2026"}\''
    )


if __name__ == "__main__":
    sys.exit(main())
