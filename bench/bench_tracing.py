"""What tracing costs (services.kit.tracing, docs/tracing.md): a kit app's request with tracing off
(as shipped) against a baseline whose tracing module is stubbed out, in the same run; the same with
tracing on (every trace sampled, spans batched to an exporter that drops them; and a 0 ratio:
spans made but not sampled); and per message on the bus, the publish-side work (properties and the
trace hook) off against the properties alone.

    python -m bench.bench_tracing [--requests 20000] [--rounds 7]

In-process (no stack, no broker, no collector): the request runs through the WSGI app as waitress
calls it. Each round alternates chunks of CHUNK requests between the two sides compared, timed in
this process's CPU time; the median round is reported. The off/baseline ratio is the figure that
matters: tracing must cost ~nothing unless it is turned on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from bench._env import machine, write_report
from bench.bench_metrics import CHUNK, build_app, request_seconds
from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import http as kit_http
from services.kit import tracing
from services.kit.bus import messages


class _Stub:
    """The tracing module as if it were not there: one constant answer."""

    @staticmethod
    def enabled() -> bool:
        return False


class _Drop:
    """A span exporter that drops what it is given (the collector's cost is not ours)."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def alternate(side_a: Callable[[], float], side_b: Callable[[], float], count: int) -> tuple[float, float]:
    spent = [0.0, 0.0]
    chunks = max(1, count // CHUNK)
    for _ in range(chunks):
        spent[0] += side_a()
        spent[1] += side_b()
    done = chunks * CHUNK
    return spent[0] / done, spent[1] / done


def with_module(module, app) -> Callable[[], float]:
    def run() -> float:
        kit_http.tracing = module
        try:
            return request_seconds(app, CHUNK)
        finally:
            kit_http.tracing = tracing

    return run


def turned_on(ratio: str) -> None:
    # As in production: batched, not one export per span.
    tracing.configure("bench", {"CLINIC_TRACE_SAMPLE_RATIO": ratio}, exporter=_Drop(), batched=True)


def on_seconds(app, ratio: str) -> Callable[[], float]:
    def run() -> float:
        turned_on(ratio)
        try:
            return request_seconds(app, CHUNK)
        finally:
            tracing.shutdown()

    return run


def publish_seconds(count: int, hooked: bool) -> float:
    envelope = Envelope(
        event_id="e" * 32,
        event_type="message.delivered.v1",
        producer="inbox",
        correlation_id="c" * 32,
        agency_id="agy_bench",
    )
    signature = {"x-signer": "inbox", "x-signature": "s" * 86}
    started = time.process_time()
    for _ in range(count):
        if hooked:
            traced, trace = messages.publish_span(envelope)
            messages.message_properties(envelope, signature, "clinic.inbox", trace)
        else:
            messages.message_properties(envelope, signature, "clinic.inbox")
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    assert not tracing.enabled(), "run the bench with tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT)"

    app = build_app()
    request_seconds(app, 2 * CHUNK)  # warm: imports, URL map, labelled children
    off_rounds = [
        alternate(with_module(tracing, app), with_module(_Stub, app), args.requests) for _ in range(args.rounds)
    ]
    off, base = statistics.median(r[0] for r in off_rounds), statistics.median(r[1] for r in off_rounds)
    on_rounds = [alternate(on_seconds(app, "1"), on_seconds(app, "0"), args.requests // 4) for _ in range(args.rounds)]
    sampled, unsampled = statistics.median(r[0] for r in on_rounds), statistics.median(r[1] for r in on_rounds)
    bus = [(publish_seconds(args.requests, True), publish_seconds(args.requests, False)) for _ in range(args.rounds)]
    bus_off = statistics.median(r[0] for r in bus) / args.requests
    bus_base = statistics.median(r[1] for r in bus) / args.requests

    report = {
        "machine": machine(),
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "request_us_baseline": round(base * 1e6, 2),
        "request_us_tracing_off": round(off * 1e6, 2),
        "ratio_off_to_baseline": round(off / base, 4),
        "request_us_tracing_on_sampled": round(sampled * 1e6, 2),
        "request_us_tracing_on_not_sampled": round(unsampled * 1e6, 2),
        "ratio_on_sampled_to_baseline": round(sampled / base, 4),
        "publish_us_properties_only": round(bus_base * 1e6, 3),
        "publish_us_with_trace_hook_off": round(bus_off * 1e6, 3),
        "ratio_publish_off_to_baseline": round(bus_off / bus_base, 4),
    }
    print(
        f"request through the kit app: {report['request_us_tracing_off']} us tracing off, "
        f"{report['request_us_baseline']} us baseline: ratio {report['ratio_off_to_baseline']}"
    )
    print(
        f"tracing on: {report['request_us_tracing_on_sampled']} us sampled, "
        f"{report['request_us_tracing_on_not_sampled']} us not sampled (ratio 0)"
    )
    print(
        f"publish properties: {report['publish_us_with_trace_hook_off']} us with the hook off, "
        f"{report['publish_us_properties_only']} us without: ratio {report['ratio_publish_off_to_baseline']}"
    )
    print(f"  (median of {args.rounds} rounds, CPU time)")
    print(f"report: {write_report('bench_tracing', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
