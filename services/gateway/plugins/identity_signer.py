"""clinic-identity-signer: the gateway vouches for the consumer it authenticated, per request.

The project's own plugin (gateway/kong-plugins/clinic-identity-signer for Kong; this module for
the local gateway, same schema, priority and token). Every request loses any `X-Gateway-Identity`
the client sent. When a consumer was authenticated (key-auth, jwt) and is not in `skip_consumers`,
the request gets a fresh token over its method, upstream target, body and consumer headers
(services.kit.gateway_identity), which the services check before trusting those headers. The
consumer's id, custom id and username come from the authenticated consumer itself, and every
signed header is re-set to exactly the value signed, so a copy the client added never travels
with them. Staff requests (the `clinic-staff` consumer) are skipped in kong.yml: services
verify staff tokens themselves, and their uploads keep streaming unbuffered.

Signing needs the whole body, so a request that is signed is read in full before it is sent
(Kong buffers request bodies too); its size is bounded by request-size-limiting where that applies,
else by MAX_BODY_BYTES (413 beyond).

With `upstream_retry_after` set (seconds), the plugin also makes the gateway's own answers to a
failed upstream retryable, on every route it applies to (kong.yml: globally): when no byte of an
answer came back (the connection was refused or reset, or closed before the service answered, so
the service died or is not running) Kong's 502 becomes 503 "The upstream server is currently
unavailable" with `Retry-After`; a 503 or 504 of the gateway's own (a timeout) keeps its status and
gains `Retry-After`. A 502 after which the upstream did send something (an invalid answer) stays
Kong's 502. Answers from the service itself and plugins' own refusals are never touched.
"""

from __future__ import annotations

from services.gateway.context import RequestContext, wire
from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import Integer, Record, Set, String
from services.gateway.model import GatewayModel, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import DEFAULT_MESSAGES, Exit
from services.kit import gateway_identity

NAME = "clinic-identity-signer"
PRIORITY = 5  # after every auth, acl and limiting plugin (acl 950, rate-limiting 910, prometheus 13)
MAX_BODY_BYTES = 128 * 2**20  # request-size-limiting's own default limit
MAX_RETRY_AFTER_S = 3600
INVALID_ANSWER = DEFAULT_MESSAGES[502].encode()
UNAVAILABLE = DEFAULT_MESSAGES[503].encode()
RETRYABLE = (503, 504)


class IdentitySignerPlugin(Plugin):
    has_access = True
    has_header_filter = True
    has_body_filter = True

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        super().__init__(instance, model)
        self.key: str = self.conf["key"]
        self.header: str = self.conf["header_name"]
        self.skip = frozenset(self.conf["skip_consumers"])
        retry_after = self.conf.get("upstream_retry_after")
        self.retry_after = str(retry_after) if retry_after is not None else None

    def access(self, ctx: RequestContext) -> Exit | None:
        ctx.clear_upstream_header(self.header)  # a client's own token never reaches a service
        consumer = ctx.consumer
        if consumer is None or consumer.username in self.skip or consumer.id in self.skip:
            return None
        if ctx.buffer_body_limit is None:
            ctx.buffer_body_limit = MAX_BODY_BYTES
        ctx.body_signers.append(self.sign)
        return None

    def sign(self, ctx: RequestContext, target: str, body: bytes) -> None:
        # The consumer's own fields from the consumer itself, the credential and anonymous marks as the
        # auth plugin set them; each re-set so that exactly the signed values travel upstream.
        consumer = ctx.consumer
        assert consumer is not None
        headers = {name: ctx.upstream_header(name) for name in gateway_identity.SIGNED_HEADERS}
        headers.update({
            "X-Consumer-ID": wire(consumer.id),
            "X-Consumer-Custom-ID": wire(consumer.custom_id) if consumer.custom_id else None,
            "X-Consumer-Username": wire(consumer.username) if consumer.username else None,
        })
        for name, value in headers.items():
            ctx.keep_upstream_header(name, value)
        token = gateway_identity.sign(self.key, ctx.request.method, target, body, headers)
        ctx.keep_upstream_header(self.header, token)

    # --- retryable upstream failures (handler.lua's header_filter and body_filter) -----------------
    def header_filter(self, ctx: RequestContext) -> None:
        if self.retry_after is None or ctx.source != "error":
            return
        if ctx.status == 502 and ctx.upstream_bytes_received == 0:
            ctx.set_status(503)
            ctx.plugin_state[id(self)] = True  # the body says so too (body_filter)
        if ctx.status in RETRYABLE:
            ctx.set_response_header("Retry-After", self.retry_after)

    def body_filter(self, ctx: RequestContext, body: bytes) -> bytes:
        if not ctx.plugin_state.get(id(self)):
            return body
        return body.replace(INVALID_ANSWER, UNAVAILABLE, 1)


CONFIG = Record(
    fields={
        # The shared key: a vault reference in kong.yml ({vault://env/gateway-identity-key}), never a literal.
        "key": String(required=True, referenceable=True, len_min=gateway_identity.MIN_KEY_CHARS),
        "header_name": t.header_name(required=True, default=gateway_identity.HEADER),
        # Consumers (username or id) whose requests are not signed.
        "skip_consumers": Set(required=True, default=[], elements=String()),
        # Seconds a client is told to wait (Retry-After) when the upstream gave no answer (503) or timed
        # out (504); unset: Kong's own 502 and 504, untouched.
        "upstream_retry_after": Integer(between=(1, MAX_RETRY_AFTER_S)),
    }
)

SPEC = PluginSpec(name=NAME, priority=PRIORITY, config=CONFIG, handler=IdentitySignerPlugin)
