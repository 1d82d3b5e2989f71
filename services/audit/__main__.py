"""python -m services.audit [serve | verify [--agency ID] [--public-key PEM_FILE ...] [--json]]

serve (default)  consume the audit stream into the hash chains, sign checkpoints, answer auditors
verify           check every chain (or one agency's): links, sequence, checkpoint signatures; print
                 a summary and the first broken link of each chain; exit 0 when intact, 1 when not
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.audit import config
from services.audit.chain import SYSTEM_CHAIN, chain_of
from services.audit.http_api import create_app
from services.audit.service import build
from services.audit.signing import TrustedKeys, load_public_keys
from services.audit.store import AuditStore
from services.audit.verify import ChainReport, verify_store
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring

Wiring = ServiceWiring[config.AuditSettings]


def wire(service: Wiring) -> None:
    settings = service.settings
    audit = build(settings, service.database(), security_log=service.security_log())
    service.relay(audit.outbox_collections)  # its reads of the trail, and its security events
    app = create_app(audit.components, service.verifier(), ready_checks={"consuming": audit.consuming})
    service.http(app, settings.http_port)
    # gRPC health (NOT_SERVING from the start of a drain) and reflection, for the platform's probes.
    service.grpc([], settings.grpc_port)
    for name, run, stop, ready in audit.listeners():
        service.listener(
            name, run, stop=stop, ready=ready, not_ready="serving before the audit queue was consumed; it keeps trying"
        )
    service.workers(audit.background())


def _line(report: ChainReport) -> str:
    if report.broken is None:
        return (
            f"{report.chain}: intact, {report.records} records, {report.checkpoints} checkpoints,"
            f" head seq {report.head_seq} hash {report.head_hash}"
        )
    broken = report.broken
    return (
        f"{report.chain}: BROKEN at seq {broken.seq}, record {broken.record_id}: {broken.problem}"
        f" ({broken.explanation}); {report.records} records read"
    )


def verify_command(args: argparse.Namespace) -> int:
    def run(service: Wiring) -> int:
        trusted = service.settings.trusted_keys
        if args.public_key:
            trusted = TrustedKeys(key for path in args.public_key for key in load_public_keys(Path(path).read_text()))
        only = None
        if args.agency is not None:
            only = [args.agency if args.agency == SYSTEM_CHAIN else chain_of(args.agency)]
        reports = verify_store(AuditStore(service.database()), trusted, only)
        broken = [r for r in reports if not r.intact]
        if args.json:
            print(json.dumps({"intact": not broken, "chains": [r.as_dict() for r in reports]}, indent=2))
        else:
            for report in reports:
                print(_line(report))
            records = sum(r.records for r in reports)
            verdict = "BROKEN" if broken else "intact"
            print(f"audit trail {verdict}: {len(reports)} chains, {records} records, {len(broken)} broken")
        return 1 if broken else 0

    return bootstrap.command(config.SERVICE, config.load, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "verify"))
    parser.add_argument("--agency", help="verify this agency's chain only (_system: events of no agency)")
    parser.add_argument("--public-key", action="append", help="trust only these Ed25519 public keys (PEM files)")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return bootstrap.serve(config.SERVICE, config.load, wire)
    try:
        if args.agency is not None and args.agency != SYSTEM_CHAIN:
            chain_of(args.agency)
        for path in args.public_key or ():
            load_public_keys(Path(path).read_text())
    except (OSError, ValueError) as exc:
        print(f"audit verify: {exc}", file=sys.stderr)
        return 2
    return verify_command(args)


if __name__ == "__main__":
    sys.exit(main())
