"""python -m services.audit [serve | verify [--agency ID] [--public-key PEM_FILE ...] [--witness FILE ...]
[--no-witness] [--json]]

serve (default)  consume the audit stream into the hash chains, sign checkpoints and witness lines,
                 answer auditors
verify           check every chain (or one agency's): links, sequence, checkpoints, and the witness
                 file (by default the service's AUDIT_WITNESS_PATH when it exists); print a summary,
                 the first broken link of each chain and any warning; exit 0 when intact, 1 when not
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.audit import config
from services.audit.chain import SYSTEM_CHAIN, chain_of
from services.audit.export import iso
from services.audit.http_api import create_app
from services.audit.service import build
from services.audit.signing import TrustedKeys, load_public_keys
from services.audit.store import AuditStore
from services.audit.verify import ChainReport, overdue_after_ms, verify_store
from services.audit.witness import WitnessReading, read_witness
from services.kit import bootstrap
from services.kit.bootstrap import ServiceWiring
from services.kit.mongo import now_ms

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
    detail = f"; {broken.detail}" if broken.detail else ""
    return (
        f"{report.chain}: BROKEN at seq {broken.seq}, record {broken.record_id}: {broken.problem}"
        f" ({broken.explanation}{detail}); {report.records} records read"
    )


def _witness_lines(reading: WitnessReading) -> list[str]:
    newest = "none" if reading.newest_at is None else iso(reading.newest_at)
    lines = [
        f"witness {', '.join(reading.files)}: {reading.lines} signed lines of database {reading.db},"
        f" {len(reading.heads)} chains, newest {newest}"
        + (f"; {reading.other_lines} lines of other databases ignored" if reading.other_lines else "")
    ]
    for found in reading.problems:
        lines.append(f"witness BROKEN: {found.source} line {found.line}: {found.problem} ({found.explanation})")
    for found in reading.warnings:
        lines.append(f"witness warning: {found.source} line {found.line}: {found.problem} ({found.explanation})")
    return lines


def _witness_files(args: argparse.Namespace, settings: config.AuditSettings) -> list[Path]:
    """The files to read: those given, else the service's own when it exists, else none."""
    if args.no_witness:
        return []
    if args.witness:
        return [Path(path) for path in args.witness]
    own = settings.witness_file
    return [own] if own is not None and own.exists() else []


def verify_command(args: argparse.Namespace) -> int:
    def run(service: Wiring) -> int:
        settings = service.settings
        trusted = settings.trusted_keys
        if args.public_key:
            trusted = TrustedKeys(key for path in args.public_key for key in load_public_keys(Path(path).read_text()))
        only = None
        if args.agency is not None:
            only = [args.agency if args.agency == SYSTEM_CHAIN else chain_of(args.agency)]
        db = service.database()
        files = _witness_files(args, settings)
        try:
            witness = read_witness(files, trusted, db.name) if files else None
        except OSError as exc:
            print(f"audit verify: the witness file cannot be read ({type(exc).__name__})", file=sys.stderr)
            return 2
        overdue = overdue_after_ms(settings.checkpoint_interval_s)
        reports = verify_store(AuditStore(db), trusted, only, witness=witness, now=now_ms(), overdue_ms=overdue)
        broken = [r for r in reports if not r.intact]
        witness_broken = bool(witness and witness.problems)
        intact = not broken and not witness_broken
        if args.json:
            shown = {"intact": intact, "chains": [r.as_dict() for r in reports]}
            shown["witness"] = None if witness is None else witness.as_dict()
            print(json.dumps(shown, indent=2))
        else:
            for report in reports:
                print(_line(report))
                for warning in report.warnings:
                    print(f"{report.chain}: warning at seq {warning.seq}: {warning.problem} ({warning.explanation})")
            print(*(_witness_lines(witness) if witness else ["witness: none read (see --witness)"]), sep="\n")
            records = sum(r.records for r in reports)
            verdict = "intact" if intact else "BROKEN"
            print(
                f"audit trail {verdict}: {len(reports)} chains, {records} records, {len(broken)} broken"
                + (", witness file BROKEN" if witness_broken else "")
            )
        return 0 if intact else 1

    return bootstrap.command(config.SERVICE, config.load, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "verify"))
    parser.add_argument("--agency", help="verify this agency's chain only (_system: events of no agency)")
    parser.add_argument("--public-key", action="append", help="trust only these Ed25519 public keys (PEM files)")
    parser.add_argument(
        "--witness", action="append", help="check against this witness file (repeatable; default: AUDIT_WITNESS_PATH)"
    )
    parser.add_argument("--no-witness", action="store_true", help="check the database alone")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return bootstrap.serve(config.SERVICE, config.load, wire)
    try:
        if args.agency is not None and args.agency != SYSTEM_CHAIN:
            chain_of(args.agency)
        for path in args.public_key or ():
            load_public_keys(Path(path).read_text())
        for path in args.witness or ():
            if not Path(path).is_file():
                raise ValueError(f"no witness file at {path}")
        if args.witness and args.no_witness:
            raise ValueError("--witness and --no-witness exclude each other")
    except (OSError, ValueError) as exc:
        print(f"audit verify: {exc}", file=sys.stderr)
        return 2
    return verify_command(args)


if __name__ == "__main__":
    sys.exit(main())
