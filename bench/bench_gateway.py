"""Gateway overhead: one authenticated GET (the first page of a staff member's board) through the
gateway and directly against inbox, in the same run, and the ratio of their p50 and p99.

    python -m bench.bench_gateway [--requests 1500] [--rounds 5] [--items 200]

Starts its own stack (embedded database, private RabbitMQ vhost, free ports) and seeds the board.
The baseline, inbox called directly with the same token, is measured in the same run, in rounds
interleaved with the gateway's, so machine noise hits both alike. Each target has one kept-alive
client connection (requests.Session, as bench_mailbox measures). The machine's load average is
reported with the figures: on a 2-core machine the stack itself (five services, the database, the
broker) and anything else running compete with the client for the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import requests

from bench._env import machine, running_stack, write_report
from bench.bench_mailbox import inbox_board_writer, login, percentile, seed_board
from services.launcher import Stack

PAGE = "/api/v1/messages?limit=20"


def summary(samples: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "n": len(samples),
    }


def timed_gets(session: requests.Session, url: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        reply = session.get(url, timeout=10)
        samples.append((time.perf_counter() - start) * 1000)
        reply.raise_for_status()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per target, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=200, help="items seeded on the board")
    args = parser.parse_args()

    with running_stack("gateway") as stack:
        results = run(stack, {"direct": stack.inbox_url, "gateway": stack.gateway_url}, args)
    report(results)
    return 0


def run(stack: Stack, targets: dict[str, str], args) -> dict:
    token, staff_id, agency = login(stack.gateway_url, "dr.reyes")
    _, sender_id, _ = login(stack.gateway_url, "admin")
    db, cipher = inbox_board_writer(stack)
    seed_board(db, cipher, agency, staff_id, sender_id, args.items)

    sessions = {}
    for name, base in targets.items():
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        for _ in range(50):  # warm connections, caches and the gateway's verified-token memory
            s.get(base + PAGE, timeout=10).raise_for_status()
        sessions[name] = s

    load_before = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name in targets}
    per_round = max(1, args.requests // args.rounds)
    started = time.perf_counter()
    for _ in range(args.rounds):
        for name, base in targets.items():
            samples[name] += timed_gets(sessions[name], base + PAGE, per_round)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()

    figures = {name: summary(values) for name, values in samples.items()}
    direct = figures["direct"]
    ratios = {
        name: {
            "p50_ratio": round(row["p50_ms"] / direct["p50_ms"], 3),
            "p99_ratio": round(row["p99_ms"] / direct["p99_ms"], 3),
            "p50_overhead_ms": round(row["p50_ms"] - direct["p50_ms"], 3),
        }
        for name, row in figures.items()
        if name != "direct"
    }
    return {
        "request": f"GET {PAGE} (jwt on the gateway, token checked by inbox too)",
        "items": args.items,
        "rounds": args.rounds,
        "seconds": round(elapsed, 1),
        "latency": figures,
        "vs_direct": ratios,
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
    }


def report(results: dict) -> None:
    results["machine"] = machine()
    path = write_report("gateway", results)
    print(f"Gateway overhead benchmark: {results['request']}, sequential client, loopback")
    print(f"  {'target':<22}{'p50 ms':>10}{'p99 ms':>10}{'p50 x':>8}{'p99 x':>8}{'+p50 ms':>9}")
    for name, row in results["latency"].items():
        ratio = results["vs_direct"].get(name)
        extra = (f"{ratio['p50_ratio']:>8.3f}{ratio['p99_ratio']:>8.3f}{ratio['p50_overhead_ms']:>9.3f}"
                 if ratio else "")
        print(f"  {name:<22}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{extra}")
    load = results["load_average_1m"]
    print(f"  {results['latency']['direct']['n']} requests per target in {results['rounds']} interleaved rounds, "
          f"{results['seconds']} s; load average (1 min) {load['before']} -> {load['after']} "
          f"on {results['machine']['cpus']} CPUs")
    print(f"  stored in {path}")


if __name__ == "__main__":
    sys.exit(main())
