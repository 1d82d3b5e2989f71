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
from services.directory.http_api import create_directory_app
from services.directory.service import build
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring

log = logging.getLogger("services.directory")

Wiring = ServiceWiring[config.DirectorySettings]


def wire(service: Wiring) -> None:
    """Directory issues the tokens everyone else checks: its own verifier, no service identity."""
    settings = service.settings
    directory = build(settings, service.database(), security_log=service.security_log())
    directory.store.ensure_indexes()
    service.relay(directory.outbox_collections)
    service.worker("idle-sessions", directory.idle_sweep)
    service.http(create_directory_app(directory), settings.http_port)
    service.grpc_server(directory.grpc_server(settings.common.grpc_host, settings.grpc_port))
    log.info("signing keys loaded", extra={"count": len(settings.signing_keys.keys)})


def seed_demo(service: Wiring) -> int:
    if service.settings.production:
        print("directory: seed-demo is refused in production mode (CLINIC_MODE=production)", file=sys.stderr)
        return 2
    directory = build(service.settings, service.database())
    directory.store.ensure_indexes()
    result = demo.seed(directory.store, directory.hasher)
    log.info("demo data seeded", extra={"count": result.created})
    print(json.dumps({"logins": result.logins}, indent=2))
    return 0


def public_key(service: Wiring) -> int:
    print(tokens.public_key_pem(service.settings), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.directory", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "seed-demo", "public-key"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return bootstrap.serve("directory", config.load, wire, client_id=None)
    # One-shot commands print their result on stdout, so their logs go to stderr.
    return bootstrap.command("directory", config.load, seed_demo if args.command == "seed-demo" else public_key)


if __name__ == "__main__":
    sys.exit(main())
