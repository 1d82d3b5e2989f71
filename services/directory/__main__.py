"""python -m services.directory [serve | seed-demo | public-key]

serve (default)  run the HTTP edge and the gRPC service until SIGTERM/SIGINT, then drain
seed-demo        insert the demo agencies and staff (idempotent; refused in production), print the logins as JSON
public-key       print the active access-token public key (PEM), e.g. for the gateway's jwt credential
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from services.directory import config, demo, tokens
from services.directory.service import build
from services.kit.bus import BatchPublisher, Topology
from services.kit.logs import configure_logging
from services.kit.mongo import database, wait_until_ready
from services.kit.runtime import ServiceProcess
from services.kit.settings import SettingsError, redact_url

log = logging.getLogger("services.directory")


def load_settings() -> config.DirectorySettings:
    try:
        return config.load()
    except SettingsError as exc:
        log.error("invalid configuration: %s", "; ".join(exc.problems))
        print(exc.text, file=sys.stderr)
        sys.exit(2)


def connect(settings: config.DirectorySettings):
    common = settings.common
    db = database(common.mongo_uri, common.mongo_db)
    try:
        wait_until_ready(db)
    except Exception:
        log.error("MongoDB does not answer at %s", redact_url(common.mongo_uri))
        print(f"directory: MongoDB does not answer at {redact_url(common.mongo_uri)}", file=sys.stderr)
        sys.exit(1)
    return db


def serve(settings: config.DirectorySettings) -> int:
    common = settings.common
    directory = build(settings, connect(settings))
    directory.store.ensure_indexes()
    # The relay thread owns its publisher (a pika connection belongs to one thread).
    publisher = BatchPublisher(
        common.amqp_url, Topology(exchange=common.events_exchange), connection_name="directory-outbox"
    )
    relay = directory.outbox_relay(publisher)
    process = ServiceProcess("directory")
    process.on_stop("mongo", directory.store.db.client.close, after_workers=True)
    process.serve_http(directory.http_app(), common.http_host, settings.http_port)
    process.serve_grpc(directory.grpc_server(common.grpc_host, settings.grpc_port))
    process.background("outbox-relay", relay.run_forever)
    log.info("directory started", extra={"count": len(settings.signing_keys.keys)})
    process.wait()
    return 0


def seed_demo(settings: config.DirectorySettings) -> int:
    if settings.production:
        print("directory: seed-demo is refused in production mode (CLINIC_MODE=production)", file=sys.stderr)
        return 2
    directory = build(settings, connect(settings))
    directory.store.ensure_indexes()
    result = demo.seed(directory.store, directory.hasher)
    log.info("demo data seeded", extra={"count": result.created})
    print(json.dumps({"logins": result.logins}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.directory", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "seed-demo", "public-key"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        configure_logging("directory")
        settings = load_settings()
        configure_logging("directory", settings.common.log_level)
        return serve(settings)
    # One-shot commands print their result on stdout, so their logs go to stderr.
    configure_logging("directory")
    logging.getLogger().handlers[0].setStream(sys.stderr)
    settings = load_settings()
    if args.command == "public-key":
        print(tokens.public_key_pem(settings), end="")
        return 0
    return seed_demo(settings)


if __name__ == "__main__":
    sys.exit(main())
