"""python -m services.kit.bus new-keys [NAME...] | broker-definitions [--vhost V] [--passwords DIR]
                            | parked QUEUE | replay-parked QUEUE [--event-id ID]... [--limit N]

new-keys: prints a new Ed25519 key pair per producer (default: every known producer): one
`<name> BUS_SIGNING_KEY=...` line each (the private key, for that service alone), then the
`BUS_PRODUCER_KEYS=...` line every service is given. See services/kit/bus/signing.py.

broker-definitions: prints the RabbitMQ definitions (JSON, for `rabbitmqctl import_definitions` or
`load_definitions`) of a deployment's vhost: the vhost, one user per service (named as the
service) with its permissions and topic permissions, the events exchange, its alternate and the
audit queue. With `--passwords DIR`, each user's password hash is made from the file DIR/<service>
(a user without one cannot sign in until given a password). deploy/rabbitmq/definitions.json is
its output with the defaults. See services/kit/bus/users.py.

parked: lists what `<QUEUE>.parking` holds (one JSON object a line: event id, type, reason, when
parked, retries; never a body). replay-parked: moves them back to QUEUE, all of them or the
`--event-id`s given, at most `--limit`, and prints `{"queue", "replayed", "left"}`. Both connect to
AMQP_URL (the service's own broker user may: they go through the consumer's `<QUEUE>.republish`).
See services/kit/bus/parking.py and docs/runbook.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.kit.bus import users
from services.kit.bus.signing import (
    KNOWN_PRODUCERS,
    is_producer_name,
    new_private_key_b64,
    parse_private_key,
    raw_public_b64,
)
from services.kit.bus.topology import DEFAULT_EXCHANGE

DEPLOY_VHOST = "clinic"


def new_keys(names: list[str]) -> int:
    bad = [name for name in names if not is_producer_name(name)]
    if bad:
        print(f"not producer names: {', '.join(bad)} (lower case letters, digits and '-')", file=sys.stderr)
        return 2
    public = []
    for name in names:
        private = new_private_key_b64()
        print(f"{name} BUS_SIGNING_KEY={private}")
        public.append(f"{name}:{raw_public_b64(parse_private_key(private).public_key())}")
    print("BUS_PRODUCER_KEYS=" + ",".join(public))
    return 0


def deployment_definitions(
    vhost: str = DEPLOY_VHOST, exchange: str = DEFAULT_EXCHANGE, passwords: Path | None = None
) -> dict:
    """The definitions `broker-definitions` prints (deploy/rabbitmq/definitions.json with the defaults)."""
    hashes = {}
    if passwords is not None:
        for service in users.SERVICES:
            path = passwords / service
            if path.is_file():
                hashes[service] = users.password_hash(path.read_text().strip())
    names = {service: service for service in users.SERVICES}
    return users.definitions(vhost, names, hashes, exchange=exchange, shared_topology=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kit.bus", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("new-keys", help="new Ed25519 signing keys")
    keys.add_argument("names", nargs="*", default=list(KNOWN_PRODUCERS))
    defs = commands.add_parser("broker-definitions", help="the broker's users, permissions and shared topology")
    defs.add_argument("--vhost", default=DEPLOY_VHOST)
    defs.add_argument("--exchange", default=DEFAULT_EXCHANGE)
    defs.add_argument("--passwords", type=Path, help="a folder with one file per service holding its password")
    parked = commands.add_parser("parked", help="list a consumer's parked messages")
    parked.add_argument("queue")
    replay = commands.add_parser("replay-parked", help="move a consumer's parked messages back to its queue")
    replay.add_argument("queue")
    replay.add_argument("--event-id", action="append", dest="event_ids", help="only this event (repeatable)")
    replay.add_argument("--limit", type=int, help="at most this many")
    args = parser.parse_args(argv)
    if args.command == "new-keys":
        return new_keys(args.names)
    if args.command in ("parked", "replay-parked"):
        return _parking(args)
    print(json.dumps(deployment_definitions(args.vhost, args.exchange, args.passwords), indent=2))
    return 0


def _parking(args: argparse.Namespace) -> int:
    from services.kit.bus import parking

    amqp_url = os.environ.get("AMQP_URL", "").strip() or "amqp://guest:guest@127.0.0.1:5672/"
    if args.command == "parked":
        for item in parking.list_parked(amqp_url, args.queue):
            print(json.dumps(item.__dict__))
        return 0
    if args.limit is not None and args.limit < 1:
        print("--limit must be at least 1", file=sys.stderr)
        return 2
    ids = set(args.event_ids) if args.event_ids else None
    report = parking.replay_parked(amqp_url, args.queue, event_ids=ids, limit=args.limit)
    print(json.dumps({"queue": report.queue, "replayed": report.replayed, "left": report.left}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
