"""The rate-limiting plugin (Kong 3.9) with the `local` policy: fixed windows counted in this process.

Windows start on calendar boundaries in UTC (the second, minute, hour, day,
month, year), counters are kept per plugin instance and identifier, a request
is refused once a window's count has reached its limit, and only requests that
pass are counted, as in Kong. The headers are Kong's: X-RateLimit-Limit-<Period>
and X-RateLimit-Remaining-<Period> for every configured period, plus
RateLimit-Limit / -Remaining / -Reset for the most constrained one, and
Retry-After on a refusal.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from services.gateway.context import RequestContext
from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import (
    Boolean,
    Integer,
    Number,
    Problems,
    Record,
    String,
    at_least_one_of,
    conditional,
    num,
    required_value,
)
from services.gateway.model import GatewayModel, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit, error

PERIODS = ("second", "minute", "hour", "day", "month", "year")
EXPIRATION = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 2592000, "year": 31536000}
SYNC_RATE_REALTIME = -1


def window_starts(now_ms: int) -> dict[str, int]:
    """kong.tools.timestamp.get_timestamps: the start (ms, UTC) of the current second ... year."""
    seconds = now_ms // 1000
    tm = time.gmtime(seconds)
    day_start = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, 0, 0, 0))
    return {
        "second": seconds * 1000,
        "minute": (seconds - tm.tm_sec) * 1000,
        "hour": (seconds - tm.tm_sec - 60 * tm.tm_min) * 1000,
        "day": day_start * 1000,
        "month": calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0)) * 1000,
        "year": calendar.timegm((tm.tm_year, 1, 1, 0, 0, 0)) * 1000,
    }


class LocalCounters:
    """The `local` policy's shared dictionary: counts per (plugin, identifier, period, window start)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str, int], int] = {}
        self._writes = 0

    def usage(self, plugin_id: str, identifier: str, period: str, start: int) -> int:
        return self._counts.get((plugin_id, identifier, period, start), 0)

    def increment(self, plugin_id: str, identifier: str, starts: dict[str, int], periods: list[str]) -> None:
        for period in periods:
            key = (plugin_id, identifier, period, starts[period])
            self._counts[key] = self._counts.get(key, 0) + 1
        self._writes += 1
        if self._writes % 4096 == 0:
            self._expire(int(time.time() * 1000))

    def _expire(self, now_ms: int) -> None:
        for key in [k for k in self._counts if k[3] + EXPIRATION[k[2]] * 1000 <= now_ms]:
            del self._counts[key]


COUNTERS = LocalCounters()


class RateLimitingPlugin(Plugin):
    has_access = True

    def __init__(self, instance: PluginInstance, model: GatewayModel, counters: LocalCounters = COUNTERS):
        super().__init__(instance, model)
        self.counters = counters
        self.limits = [(p, self.conf[p]) for p in PERIODS if self.conf.get(p) is not None]

    def identifier(self, ctx: RequestContext) -> str:
        limit_by, ident = self.conf["limit_by"], None
        if limit_by == "service":
            ident = ctx.service.id if ctx.service else None
        elif limit_by == "consumer":
            who = ctx.consumer or ctx.credential
            ident = who.id if who else None
        elif limit_by == "credential":
            ident = ctx.credential.id if ctx.credential else None
        elif limit_by == "header":
            ident = ctx.request.header(self.conf["header_name"].lower())
        elif limit_by == "path" and ctx.request.raw_path == self.conf["path"]:
            ident = ctx.request.raw_path
        return ident or ctx.client_ip

    def access(self, ctx: RequestContext, now_ms: int | None = None) -> Exit | None:
        conf = self.conf
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        identifier = self.identifier(ctx)
        starts = window_starts(now_ms)
        plugin_id = self.instance.id

        usage: dict[str, tuple[Any, Any]] = {}
        stop = None
        for period, limit in self.limits:
            remaining = limit - self.counters.usage(plugin_id, identifier, period, starts[period])
            usage[period] = (limit, remaining)
            if remaining <= 0:
                stop = period

        reset = None
        if not conf["hide_client_headers"]:
            best: tuple[Any, int, Any] | None = None  # (remaining, window, limit) of the most constrained period
            for period, (limit, left) in usage.items():
                # this request counts too, unless another period already refused it
                remaining = max(0, left - 1 if stop is None or stop == period else left)
                window = EXPIRATION[period]
                if best is None or remaining < best[0] or (remaining == best[0] and window > best[1]):
                    best = (remaining, window, limit)
                    reset = max(1, window - (now_ms - starts[period]) // 1000)
                ctx.set_response_header(f"X-RateLimit-Limit-{period.capitalize()}", num(limit))
                ctx.set_response_header(f"X-RateLimit-Remaining-{period.capitalize()}", num(remaining))
            if best is not None:
                ctx.set_response_header("RateLimit-Limit", num(best[2]))
                ctx.set_response_header("RateLimit-Remaining", num(best[0]))
                ctx.set_response_header("RateLimit-Reset", str(reset))

        if stop is not None:
            if reset is not None:
                ctx.set_response_header("Retry-After", str(reset))
            return error(int(conf["error_code"]), ctx.request_id, ctx.request.header("accept"), conf["error_message"])

        self.counters.increment(plugin_id, identifier, starts, [p for p, _ in self.limits])
        return None


def _validate_periods_order(config: dict, path: str, problems: Problems) -> None:
    for i, lower in enumerate(PERIODS):
        v1 = config.get(lower)
        if v1 is None:
            continue
        for upper in PERIODS[i + 1 :]:
            v2 = config.get(upper)
            if v2 is not None and v2 < v1:
                problems.add(path, f"The limit for {upper}({v2:.1f}) cannot be lower than the limit for "
                                   f"{lower}({v1:.1f})")
                return
    if config.get("policy") != "redis" and config.get("sync_rate") != SYNC_RATE_REALTIME:
        problems.add(path, "sync_rate can only be used with the redis policy")
    elif config.get("policy") == "redis" and config["sync_rate"] != SYNC_RATE_REALTIME and config["sync_rate"] < 0.02:
        problems.add(path, "sync_rate must be greater than 0.02, or -1 to disable")


REDIS = Record(
    fields={
        "host": t.host(),
        "port": t.port(default=6379),
        "timeout": t.timeout(2000),
        "connect_timeout": t.timeout(2000),
        "send_timeout": t.timeout(2000),
        "read_timeout": t.timeout(2000),
        "username": String(),
        "password": String(len_min=0),
        "database": Integer(default=0),
        "ssl": Boolean(required=True, default=False),
        "ssl_verify": Boolean(required=True, default=False),
        "server_name": String(),
        "keepalive_pool_size": Integer(default=256, between=(1, 2**31 - 1)),
        "keepalive_backlog": Integer(between=(0, 2**31 - 1)),
    }
)

# Kong 3.9 still accepts the deprecated flat redis_* fields and moves them into `redis`.
REDIS_SHORTHANDS = {f"redis_{name}": name for name in
                    ("host", "port", "password", "username", "ssl", "ssl_verify", "server_name", "timeout", "database")}


def expand_shorthands(config: Any, path: str, problems: Problems) -> Any:
    if not isinstance(config, dict) or not any(k in config for k in REDIS_SHORTHANDS):
        return config
    config = dict(config)
    redis = dict(config.get("redis") or {})
    for flat, nested in REDIS_SHORTHANDS.items():
        if flat in config:
            redis.setdefault(nested, config.pop(flat))
    config["redis"] = redis
    return config


CONFIG = Record(
    fields={
        **{p: Number(gt=0) for p in PERIODS},
        "limit_by": String(default="consumer", one_of=("consumer", "credential", "ip", "service", "header", "path")),
        "header_name": t.header_name(),
        "path": t.path(),
        # Kong running DB-less (as production does) offers only these two policies.
        "policy": String(default="local", len_min=0, one_of=("local", "redis"),
                         local=lambda v: "policy 'redis' (use 'local')" if v == "redis" else None),
        "fault_tolerant": Boolean(required=True, default=True),
        "redis": REDIS,
        "hide_client_headers": Boolean(required=True, default=False),
        "error_code": Number(default=429, gt=0),
        "error_message": String(default="API rate limit exceeded"),
        "sync_rate": Number(required=True, default=-1),
    },
    checks=(_validate_periods_order,),
)

SPEC = PluginSpec(
    name="rate-limiting",
    priority=910,
    config=CONFIG,
    handler=RateLimitingPlugin,
    preprocess=expand_shorthands,
    checks=(
        at_least_one_of(*(f"config.{p}" for p in PERIODS)),
        conditional("config.limit_by", lambda v: v == "header", "config.header_name", required_value),
        conditional("config.limit_by", lambda v: v == "path", "config.path", required_value),
    ),
)
