"""`python -m services.direct_simulator`: the development partner HISP (hisp.py) on SMTP
DIRECT_SIMULATOR_HOST:DIRECT_SIMULATOR_SMTP_PORT (cloud-comms' CLOUD_SMTP_RELAY points there) and a
small control API on DIRECT_SIMULATOR_HOST:DIRECT_SIMULATOR_PORT, until SIGTERM/SIGINT.

Development only: it refuses CLINIC_MODE=production and, unless DIRECT_SIMULATOR_ALLOW_REMOTE=1,
any address but loopback (its control API has no authentication). README.md lists the settings.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller
from flask import Flask, jsonify

from services.cloud_comms import devcerts
from services.cloud_comms.direct import smime
from services.cloud_comms.direct.smtp import quiet_smtp_log
from services.direct_simulator.hisp import PartnerHisp
from services.kit.runtime import ServiceProcess, simulator_main
from services.kit.settings import Env, development_listener

SERVICE = "direct-simulator"


@dataclass(frozen=True)
class SimulatorSettings:
    host: str
    port: int
    smtp_port: int
    certs_dir: str
    hisp_host: str
    hisp_port: int
    step_s: float


def load(environ: Mapping[str, str] | None = None) -> SimulatorSettings:
    env = Env(SERVICE, environ)
    host, port = development_listener(env, "DIRECT_SIMULATOR", 8192, "Direct partner HISP simulator")
    hisp = env.str("DIRECT_SIMULATOR_HISP", "127.0.0.1:2525")
    hisp_host, _, hisp_port = hisp.rpartition(":")
    if not hisp_host or not hisp_port.isdigit():
        env.problems.append(f"DIRECT_SIMULATOR_HISP must be host:port, got {hisp!r}")
    settings = SimulatorSettings(
        host=host,
        port=port,
        smtp_port=env.int("DIRECT_SIMULATOR_SMTP_PORT", 2526, minimum=0, maximum=65535),
        certs_dir=env.str("DIRECT_SIMULATOR_CERTS_DIR", str(env.run_dir / "cloud-direct")),
        hisp_host=hisp_host,
        hisp_port=int(hisp_port) if hisp_port.isdigit() else 0,
        step_s=env.float("DIRECT_SIMULATOR_STEP_S", 1.0, minimum=0.0),
    )
    env.done()
    return settings


def partner(settings: SimulatorSettings) -> PartnerHisp:
    """The partner HISP over the development certificates (generated when missing)."""
    certs = Path(settings.certs_dir)
    devcerts.ensure(certs)
    stem = devcerts.PARTNER.file_stem
    identity = smime.Identity.load((certs / f"{stem}.cert.pem").read_bytes(), (certs / f"{stem}.key.pem").read_bytes())
    anchors = smime.load_anchors((certs / "anchors.pem").read_bytes())
    return PartnerHisp(identity, anchors, (settings.hisp_host, settings.hisp_port), settings.step_s)


def create_app(hisp: PartnerHisp) -> Flask:
    app = Flask("direct_simulator")

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/simulator/state")
    def state():
        return jsonify(events=hisp.state())

    @app.post("/simulator/reset")
    def reset():
        hisp.reset()
        return jsonify(status="reset")

    return app


def serve(settings: SimulatorSettings, process: ServiceProcess) -> int:
    hisp = partner(settings)
    quiet_smtp_log()
    smtp = Controller(hisp, hostname=settings.host, port=settings.smtp_port, ready_timeout=10.0)
    smtp.start()
    process.on_stop("smtp", smtp.stop)
    process.on_stop("mdn-timers", hisp.stop)
    return process.serve_http(create_app(hisp), settings.host, settings.port)


def main() -> int:
    return simulator_main(SERVICE, load, serve, "Direct partner HISP simulator ready (development only)")


if __name__ == "__main__":
    sys.exit(main())
