"""What the kit's HTTP metrics cost (services.kit.metrics, docs/metrics.md): per request, a kit app's
request with the metrics hook against the same app with the hook replaced by a no-op; the hook alone;
and one scrape of GET /metrics for a registry as full as a busy service's.

    python -m bench.bench_metrics [--requests 20000] [--rounds 7] [--routes 60]

In-process (no stack, no broker, no database): the request runs through the WSGI app as waitress
calls it (a prepared environ, the body read), so the figures are the Flask request's own cost and
the hook's share of it, without the network. Each round runs its requests in chunks of CHUNK that
alternate with and without the hook, timed in this process's CPU time (other processes on a busy
machine do not count); the median round is reported.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

from bench._env import machine, write_report
from services.kit import http as kit_http
from services.kit import metrics
from services.kit.http import create_app

ROUTE = "/api/v1/things/<thing_id>"
CHUNK = 500


def build_app():
    app = create_app("bench", None)

    @app.get(ROUTE)
    def thing(thing_id: str):
        return {"id": thing_id}

    return app


def environ(path: str) -> dict:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8102",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


def request_seconds(app, count: int) -> float:
    """`count` requests through the WSGI app: CPU seconds in all."""

    def start_response(status, headers, exc_info=None):
        return None

    started = time.process_time()
    for n in range(count):
        body = app(environ(f"/api/v1/things/msg_{n % 1000}"), start_response)
        b"".join(body)
        getattr(body, "close", lambda: None)()
    return time.process_time() - started


def one_round(app, count: int) -> tuple[float, float]:
    """Seconds per request (with the hook, without it), over `count` requests each, in alternating chunks."""
    real_hook = kit_http.observe_http
    spent = {True: 0.0, False: 0.0}
    try:
        for _ in range(max(1, count // CHUNK)):
            for hooked in (True, False):
                kit_http.observe_http = real_hook if hooked else _no_op
                spent[hooked] += request_seconds(app, CHUNK)
    finally:
        kit_http.observe_http = real_hook
    done = max(1, count // CHUNK) * CHUNK
    return spent[True] / done, spent[False] / done


def _no_op(*_args, **_kwargs) -> None:
    return None


def hook_alone(count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        metrics.observe_http("bench", "GET", ROUTE, 200, 0.001)
    return (time.process_time() - started) / count


def scrape_cost(routes: int, rounds: int) -> tuple[float, int]:
    """A registry holding `routes` routes x 3 methods x 4 statuses of HTTP series (a busy service's
    share, with the kit's other metrics beside it): seconds per scrape and the exposition's bytes."""
    for route in range(routes):
        for method in ("GET", "POST", "DELETE"):
            for status in (200, 400, 404, 503):
                metrics.observe_http("bench-scrape", method, f"/api/v1/r{route}/<id>", status, 0.01)
    app = build_app()
    client = app.test_client()
    size = len(client.get("/metrics").get_data())
    times = []
    for _ in range(rounds):
        started = time.process_time()
        client.get("/metrics").get_data()
        times.append(time.process_time() - started)
    return statistics.median(times), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--routes", type=int, default=60, help="routes in the scraped registry")
    args = parser.parse_args(argv)

    app = build_app()
    one_round(app, 2 * CHUNK)  # warm: imports, URL map, labelled children
    rounds = [one_round(app, args.requests) for _ in range(args.rounds)]
    on, off = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    alone = statistics.median(hook_alone(args.requests) for _ in range(args.rounds))
    scrape_s, scrape_bytes = scrape_cost(args.routes, args.rounds)
    report = {
        "machine": machine(),
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "request_us_with_metrics": round(on * 1e6, 2),
        "request_us_without_metrics": round(off * 1e6, 2),
        "overhead_us_per_request": round((on - off) * 1e6, 2),
        "ratio_with_to_without": round(on / off, 4),
        "hook_alone_us": round(alone * 1e6, 2),
        "scrape_routes": args.routes,
        "scrape_ms": round(scrape_s * 1000, 2),
        "scrape_bytes": scrape_bytes,
    }
    with_us, without_us = report["request_us_with_metrics"], report["request_us_without_metrics"]
    print(f"request through the kit app: {with_us} us with metrics, {without_us} us without")
    print(f"  (median of {args.rounds} rounds of {args.requests} requests each way, CPU time)")
    overhead, ratio = report["overhead_us_per_request"], report["ratio_with_to_without"]
    print(f"overhead: {overhead} us per request, ratio {ratio}; the hook alone: {report['hook_alone_us']} us")
    print(f"one scrape with {args.routes * 12} HTTP series: {report['scrape_ms']} ms, {scrape_bytes} bytes")
    print(f"report: {write_report('bench_metrics', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
