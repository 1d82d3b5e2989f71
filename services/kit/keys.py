"""Key maintenance for a service's PHI keys, run where the service runs (same environment).

    python -m services.kit.keys rewrap --service inbox          # after adding a new master key
    python -m services.kit.keys rotate --service inbox --agency agy_riverbend   # new data key

`rewrap` re-wraps every data key still wrapped by an older master key with the
active one (PHI_MASTER_KEY_ID) and prints how many; run it until it prints 0
before removing an old master key. `rotate` starts a new data key for one
agency: new writes use it, old ciphertexts keep naming the key that sealed them.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.kit import mongo
from services.kit.crypto import KeyRing
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
    keyring = KeyRing(
        mongo.database(common.mongo_uri, common.mongo_db), common.phi_master_keys, common.phi_master_key_id
    )
    if args.command == "rewrap":
        print(json.dumps({"service": args.service, "rewrapped": keyring.rewrap_all()}))
    else:
        print(json.dumps({"service": args.service, "agency_id": args.agency, "key_id": keyring.rotate(args.agency)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
