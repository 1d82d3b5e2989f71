"""The key-auth plugin (Kong 3.9): an API key in a header or the query string identifies a consumer."""

from __future__ import annotations

from services.gateway.context import RequestContext
from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import Array, Boolean, Record, String
from services.gateway.model import GatewayModel, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit, error

ERR_DUPLICATE_API_KEY = "Duplicate API key found"
ERR_NO_API_KEY = "No API key found in request"
ERR_INVALID_AUTH_CRED = "Unauthorized"


class KeyAuthPlugin(Plugin):
    has_access = True

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        super().__init__(instance, model)
        realm = self.conf.get("realm")
        self.www = f'Key realm="{realm}"' if realm else "Key"
        anonymous = self.conf.get("anonymous")
        self.anonymous = model.consumer_by_id_or_username(anonymous) if anonymous else None

    def access(self, ctx: RequestContext) -> Exit | None:
        if not self.conf["run_on_preflight"] and ctx.request.method == "OPTIONS":
            return None
        if self.anonymous is not None:
            if ctx.credential is not None:
                return None  # logical OR with another auth plugin that already succeeded
            if self._authenticate(ctx) is not None:
                ctx.authenticate(self.anonymous, None)
                ctx.set_consumer_headers(self.anonymous, None, anonymous=True)
            return None
        failure = self._authenticate(ctx)
        if failure is None:
            return None
        return error(401, ctx.request_id, ctx.request.header("accept"), failure, [("WWW-Authenticate", self.www)])

    def _authenticate(self, ctx: RequestContext) -> str | None:
        conf, request = self.conf, ctx.request
        query = request.query_args() if conf["key_in_query"] else {}
        key = None
        for name in conf["key_names"]:
            values: list = []
            if conf["key_in_header"]:
                # ngx's header table: case-insensitive, '_' looked up as '-'
                values = request.header_values(name.lower().replace("_", "-"))
            if not values and conf["key_in_query"]:
                values = query.get(name, [])
            if len(values) > 1:
                return ERR_DUPLICATE_API_KEY
            if values and isinstance(values[0], str):
                key = values[0]
                if conf["hide_credentials"]:
                    ctx.clear_query_arg(name)
                    ctx.clear_upstream_header(name)
                break
        if not key:
            return ERR_NO_API_KEY
        credential = self.model.keyauth_credentials.get(key)
        if credential is None:
            return ERR_INVALID_AUTH_CRED
        ctx.authenticate(credential.consumer, credential)
        ctx.set_consumer_headers(credential.consumer, credential.id, anonymous=False)
        return None


CONFIG = Record(
    fields={
        "key_names": Array(required=True, elements=t.header_name(), default=["apikey"]),
        "hide_credentials": Boolean(default=False),
        "anonymous": String(),
        "key_in_header": Boolean(default=True),
        "key_in_query": Boolean(default=True),
        "key_in_body": Boolean(default=False, local=lambda v: "key_in_body: true" if v else None),
        "run_on_preflight": Boolean(default=True),
        "realm": String(),
    }
)

SPEC = PluginSpec(name="key-auth", priority=1250, config=CONFIG, handler=KeyAuthPlugin,
                  protocols=(*t.PROTOCOLS_HTTP, "ws", "wss"))
