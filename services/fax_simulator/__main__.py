"""`python -m services.fax_simulator`: the Phaxio-shaped fax provider simulator on
CLOUD_FAX_SIMULATOR_HOST:CLOUD_FAX_SIMULATOR_PORT (default 127.0.0.1:8191) until SIGTERM/SIGINT.
Development only: it refuses CLINIC_MODE=production and, unless CLOUD_FAX_SIMULATOR_ALLOW_REMOTE=1,
any address but loopback (its control API has no authentication).

    CLOUD_FAX_SIMULATOR_CALLBACK_TOKEN (or _FILE)  the token it signs callbacks with (default: the
                                                   development value cloud-comms also defaults to)
    CLOUD_FAX_SIMULATOR_API_KEY / _API_SECRET      the basic-auth credentials of POST /v2/faxes
    CLOUD_FAX_SIMULATOR_RECEIVED_URL               where received faxes are posted (and the URL signed)
    CLOUD_FAX_SIMULATOR_STATUS_URL                 where sent-fax status updates go unless a send names
                                                   its own callback_url
    CLOUD_FAX_SIMULATOR_STEP_S                     seconds between status updates of a sent fax (0.5)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.cloud_comms.fax.settings import DEV_API_KEY, DEV_API_SECRET, DEV_CALLBACK_TOKEN, DEV_PUBLIC_CALLBACK_URL
from services.fax_simulator.app import Simulator, create_app
from services.kit.runtime import ServiceProcess, simulator_main
from services.kit.settings import Env, development_listener

SERVICE = "fax-simulator"


@dataclass(frozen=True)
class SimulatorSettings:
    host: str
    port: int
    callback_token: str = field(repr=False)
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    received_url: str
    status_url: str
    step_s: float


def load(environ: Mapping[str, str] | None = None) -> SimulatorSettings:
    env = Env(SERVICE, environ)
    host, port = development_listener(env, "CLOUD_FAX_SIMULATOR", 8191, "fax simulator")
    settings = SimulatorSettings(
        host=host,
        port=port,
        callback_token=env.given_secret("CLOUD_FAX_SIMULATOR_CALLBACK_TOKEN") or DEV_CALLBACK_TOKEN,
        api_key=env.given_secret("CLOUD_FAX_SIMULATOR_API_KEY") or DEV_API_KEY,
        api_secret=env.given_secret("CLOUD_FAX_SIMULATOR_API_SECRET") or DEV_API_SECRET,
        received_url=env.url(
            "CLOUD_FAX_SIMULATOR_RECEIVED_URL", f"{DEV_PUBLIC_CALLBACK_URL}/received", ("http", "https")
        ),
        status_url=env.url("CLOUD_FAX_SIMULATOR_STATUS_URL", f"{DEV_PUBLIC_CALLBACK_URL}/status", ("http", "https")),
        step_s=env.float("CLOUD_FAX_SIMULATOR_STEP_S", 0.5, minimum=0.0),
    )
    env.done()
    return settings


def serve(settings: SimulatorSettings, process: ServiceProcess) -> int:
    simulator = Simulator(
        callback_token=settings.callback_token,
        api_key=settings.api_key,
        api_secret=settings.api_secret,
        received_url=settings.received_url,
        status_url=settings.status_url,
        step_s=settings.step_s,
    )
    process.on_stop("status-updates", simulator.stop)
    return process.serve_http(create_app(simulator), settings.host, settings.port)


def main() -> int:
    return simulator_main(SERVICE, load, serve, "fax provider simulator ready (development only, fictional data)")


if __name__ == "__main__":
    sys.exit(main())
