"""python -m services.gateway [--check] [--config PATH]

Loads and validates the decK file (GATEWAY_CONFIG, gateway/kong.yml by
default); with --check, reports and exits (0 valid, 1 invalid). Otherwise
serves it on GATEWAY_HOST:GATEWAY_PORT until SIGTERM or SIGINT, then stops
accepting, lets in-flight requests finish and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from services.gateway import config
from services.gateway.declarative.loader import ConfigError, load_file
from services.gateway.model import GatewayModel
from services.gateway.proxy import Gateway, new_request_id
from services.gateway.server import GatewayServer
from services.gateway.tls import route_problems
from services.gateway.upstream import UpstreamPool
from services.kit.logs import configure_logging
from services.kit.runtime import raise_open_files_limit
from services.kit.settings import SettingsError

log = logging.getLogger("services.gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--config", help="the decK file to load (default: GATEWAY_CONFIG or gateway/kong.yml)")
    args = parser.parse_args(argv)
    try:
        settings = config.load(config_path=args.config)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    # Request lines carry only the kit's whitelisted fields: request_id, method, route, status, timings.
    configure_logging(config.SERVICE, settings.log_level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    try:
        model = load_file(settings.config_path, settings.deck_env, settings.vault_env)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        log.error("configuration refused", extra={"count": len(exc.problems)})
        return 1
    if settings.tls is not None and (problems := route_problems(model)):
        print("\n".join(problems), file=sys.stderr)
        log.error("configuration refused", extra={"count": len(problems)})
        return 1
    if args.check:
        print(f"{settings.config_path}: OK ({summary(model)})")
        return 0
    return asyncio.run(serve(model, settings))


def summary(model: GatewayModel) -> str:
    return (f"{len(model.services)} services, {len(model.routes)} routes, {len(model.consumers)} consumers, "
            f"{len(model.plugins)} plugins")


async def serve(model: GatewayModel, settings: config.GatewaySettings) -> int:
    loop = asyncio.get_running_loop()
    open_files = raise_open_files_limit()
    pool = UpstreamPool(loop)
    gateway = Gateway(model, settings.port, pool, settings.access_log, settings.scheme)
    server = GatewayServer(loop, gateway.handle, new_request_id)
    ssl_context = settings.tls.server_context() if settings.tls is not None else None
    port = await server.start(settings.host, settings.port, ssl_context)
    gateway.server_port = port
    for level, note in gateway.startup_notes():
        log.log(level, note)
    log.info("gateway listening", extra={"address": f"{settings.host}:{port}", "port": port,
                                         "count": len(model.routes)})
    log.info("open files limit", extra={"count": open_files})
    print(json.dumps({"event": "listening", "host": settings.host, "port": port, "scheme": settings.scheme}),
          flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests", extra={"delay_s": settings.drain_seconds})
    gateway.draining = True
    finished = await server.shutdown(settings.drain_seconds)
    pool.close()
    log.info("gateway stopped", extra={"status": "drained" if finished else "grace period over"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
