"""Run every bench/bench_*.py in turn, each in its own process, and print its report.

    python -m bench                 # all of them
    python -m bench outbox          # only bench_outbox
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = sorted(path.stem for path in HERE.glob("bench_*.py"))
    wanted = {arg if arg.startswith("bench_") else f"bench_{arg}" for arg in argv}
    if wanted:
        unknown = wanted - set(names)
        if unknown:
            print(f"no such benchmark: {', '.join(sorted(unknown))} (have: {', '.join(names)})", file=sys.stderr)
            return 2
        names = [name for name in names if name in wanted]
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=HERE.parent, check=False)
        print(f"== {name}: {'ok' if result.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.1f}s\n",
              flush=True)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
