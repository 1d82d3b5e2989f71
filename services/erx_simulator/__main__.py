"""`python -m services.erx_simulator`: the eRx vendor simulator on ERX_SIMULATOR_HOST:ERX_SIMULATOR_PORT
(default 127.0.0.1:8190) until SIGTERM/SIGINT. Development only: it refuses CLINIC_MODE=production
and, unless ERX_SIMULATOR_ALLOW_REMOTE=1, any address but loopback (its control API has no
authentication).

    ERX_SIMULATOR_CLINIC_KEY (or _FILE)       clinic 1001's key (default: a fixed development value)
    ERX_SIMULATOR_TOKEN_TTL_S                 token lifetime, seconds (3600)
    ERX_SIMULATOR_PAGE_SIZE                   items per page of a list (20)
    ERX_SIMULATOR_SUBSCRIPTION_KEY (or _FILE) when set, every API call must carry it (Subscription-Key)
    ERX_SIMULATOR_THREADS                     HTTP worker threads (32)
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.erx_simulator.app import create_app
from services.erx_simulator.data import DEV_CLINIC_KEY, Store
from services.kit.runtime import ServiceProcess, simulator_main
from services.kit.settings import Env, development_listener

SERVICE = "erx-simulator"


@dataclass(frozen=True)
class SimulatorSettings:
    host: str
    port: int
    clinic_key: str = field(repr=False)
    token_ttl_s: float
    page_size: int
    subscription_key: str = field(repr=False)
    threads: int


def load(environ: Mapping[str, str] | None = None) -> SimulatorSettings:
    env = Env(SERVICE, environ)
    host, port = development_listener(env, "ERX_SIMULATOR", 8190, "eRx simulator")
    settings = SimulatorSettings(
        host=host,
        port=port,
        clinic_key=env.given_secret("ERX_SIMULATOR_CLINIC_KEY") or DEV_CLINIC_KEY,
        token_ttl_s=env.float("ERX_SIMULATOR_TOKEN_TTL_S", 3600.0, minimum=1.0),
        page_size=env.int("ERX_SIMULATOR_PAGE_SIZE", 20, minimum=1, maximum=1000),
        subscription_key=env.given_secret("ERX_SIMULATOR_SUBSCRIPTION_KEY") or "",
        threads=env.int("ERX_SIMULATOR_THREADS", 32, minimum=1, maximum=256),
    )
    env.done()
    return settings


def serve(settings: SimulatorSettings, process: ServiceProcess) -> int:
    store = Store(
        clinic_key=settings.clinic_key,
        token_ttl_s=settings.token_ttl_s,
        page_size=settings.page_size,
        subscription_key=settings.subscription_key,
    )
    process.on_stop("held-requests", store.wake_all)  # requests a slow/timeout fault holds
    return process.serve_http(create_app(store), settings.host, settings.port, threads=settings.threads)


def main() -> int:
    return simulator_main(SERVICE, load, serve, "eRx vendor simulator ready (development only, fictional data)")


if __name__ == "__main__":
    sys.exit(main())
