"""Key maintenance for a service's PHI keys, run where the service runs (same environment).

    python -m services.kit.keys rewrap --service inbox          # after adding a new master key
    python -m services.kit.keys rotate --service inbox --agency agy_riverbend   # new data key

`rewrap` re-wraps every data key still wrapped by an older master key with the
active one (PHI_MASTER_KEY_ID) and prints how many; run it until it prints 0
before removing an old master key. `rotate` starts a new data key for one
agency: new writes use it, old ciphertexts keep naming the key that sealed them.

Both leave a `key_rotated` security event in the service's own database (its `security_outbox`,
which the service's relay publishes when it runs): `rotate` one for the agency (reason
`data_key_rotated`), `rewrap` one per agency whose data keys it re-wrapped (reason
`master_key_rewrapped`; nothing when there was nothing to re-wrap). The actor is the operator:
the account the command ran as, on the host named as the source.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys

from services.kit import mongo
from services.kit.crypto import KeyRing
from services.kit.security_events import SecurityLog
from services.kit.settings import Env, SettingsError, common_settings

PHI_SERVICES = ("directory", "inbox", "auto-reply")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kit.keys")
    parser.add_argument("command", choices=("rewrap", "rotate"))
    parser.add_argument("--service", required=True, choices=PHI_SERVICES)
    parser.add_argument("--agency", help="agency id (rotate)")
    args = parser.parse_args(argv)
    if args.command == "rotate" and not args.agency:
        parser.error("rotate needs --agency")
    env = Env(args.service)
    common = common_settings(env)
    try:
        env.done()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    db = mongo.database(common.mongo_uri, common.mongo_db)
    keyring = KeyRing(db, common.phi_master_keys, common.phi_master_key_id)
    security = SecurityLog(db, service=args.service)
    if args.command == "rewrap":
        agencies = _agencies_to_rewrap(keyring)
        rewrapped = keyring.rewrap_all()
        for agency_id in agencies if rewrapped else ():
            _record(security, agency_id, "master_key_rewrapped")
        print(json.dumps({"service": args.service, "rewrapped": rewrapped}))
    else:
        key_id = keyring.rotate(args.agency)
        _record(security, args.agency, "data_key_rotated")
        print(json.dumps({"service": args.service, "agency_id": args.agency, "key_id": key_id}))
    return 0


def _agencies_to_rewrap(keyring: KeyRing) -> list[str]:
    """The agencies with a data key or a search key not wrapped by the active master key (what
    `rewrap_all` changes)."""
    stale = {"master_key_id": {"$ne": keyring.active_master_id}}
    found = set()
    for collection in (keyring.collection, keyring.search_keys):
        found |= {doc["agency_id"] for doc in collection.find(stale, {"agency_id": 1})}
    return sorted(found)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        return ""


def _record(security: SecurityLog, agency_id: str, reason: str) -> None:
    security.record(
        "key_rotated",
        agency_id=agency_id,
        actor_id=_operator(),
        actor_kind="operator",
        outcome="succeeded",
        reason=reason,
        target_type="agency",
        target_id=agency_id,
        source=socket.gethostname(),
    )


if __name__ == "__main__":
    sys.exit(main())
