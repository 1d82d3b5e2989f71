"""The acl plugin (Kong 3.9): allow or deny the authenticated consumer by its groups."""

from __future__ import annotations

from services.gateway.context import RequestContext
from services.gateway.declarative.schema import Array, Boolean, Record, String, at_least_one_of, only_one_of
from services.gateway.model import GatewayModel, PluginInstance
from services.gateway.plugins.base import Plugin, PluginSpec
from services.gateway.responses import Exit, error

FORBIDDEN = "You cannot consume this service"


class AclPlugin(Plugin):
    has_access = True

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        super().__init__(instance, model)
        self.deny = bool(self.conf.get("deny"))
        self.groups = set(self.conf.get("deny") or self.conf.get("allow") or [])

    def access(self, ctx: RequestContext) -> Exit | None:
        # Kong also reads "authenticated groups" (set by ldap-auth, oauth2 ...); none of the auth plugins
        # served here sets them, so only the consumer's own groups count and
        # always_use_authenticated_groups has nothing to switch to.
        accept = ctx.request.header("accept")
        consumer = ctx.consumer
        if consumer is None:
            if ctx.credential is not None:
                return error(403, ctx.request_id, accept, FORBIDDEN)
            return error(401, ctx.request_id, accept)
        groups = consumer.groups
        in_group = bool(self.groups.intersection(groups))
        if in_group == self.deny:
            return error(403, ctx.request_id, accept, FORBIDDEN)
        if not self.conf["hide_groups_header"] and groups:
            ctx.set_upstream_header("X-Consumer-Groups", ", ".join(groups))
        return None


CONFIG = Record(
    fields={
        "allow": Array(elements=String()),
        "deny": Array(elements=String()),
        "hide_groups_header": Boolean(required=True, default=False),
        "always_use_authenticated_groups": Boolean(required=True, default=False),
    }
)

SPEC = PluginSpec(
    name="acl",
    priority=950,
    config=CONFIG,
    handler=AclPlugin,
    checks=(only_one_of("config.allow", "config.deny"), at_least_one_of("config.allow", "config.deny")),
)
