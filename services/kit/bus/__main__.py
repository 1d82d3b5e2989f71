"""python -m services.kit.bus new-keys [NAME...]

Prints a new Ed25519 key pair per producer (default: every known producer): one
`<name> BUS_SIGNING_KEY=...` line each (the private key, for that service alone), then the
`BUS_PRODUCER_KEYS=...` line every service is given. See services/kit/bus/signing.py.
"""

from __future__ import annotations

import argparse
import sys

from services.kit.bus.signing import (
    KNOWN_PRODUCERS,
    is_producer_name,
    new_private_key_b64,
    parse_private_key,
    raw_public_b64,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kit.bus", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("new-keys",))
    parser.add_argument("names", nargs="*", default=list(KNOWN_PRODUCERS))
    args = parser.parse_args(argv)
    bad = [name for name in args.names if not is_producer_name(name)]
    if bad:
        print(f"not producer names: {', '.join(bad)} (lower case letters, digits and '-')", file=sys.stderr)
        return 2
    public = []
    for name in args.names:
        private = new_private_key_b64()
        print(f"{name} BUS_SIGNING_KEY={private}")
        public.append(f"{name}:{raw_public_b64(parse_private_key(private).public_key())}")
    print("BUS_PRODUCER_KEYS=" + ",".join(public))
    return 0


if __name__ == "__main__":
    sys.exit(main())
