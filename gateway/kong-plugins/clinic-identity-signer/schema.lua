-- clinic-identity-signer: the gateway vouches for the consumer it authenticated (docs/gateway-identity.md).
-- The local gateway validates the same fields (services/gateway/plugins/identity_signer.py).
local typedefs = require "kong.db.schema.typedefs"


return {
  name = "clinic-identity-signer",
  fields = {
    { consumer = typedefs.no_consumer },
    { protocols = typedefs.protocols_http },
    { config = {
        type = "record",
        fields = {
          { key = {
              description = "The key shared with the services: a vault reference such as {vault://env/gateway-identity-key}.",
              type = "string",
              required = true,
              referenceable = true,
              encrypted = true, -- Kong Enterprise-exclusive feature, does nothing in Kong CE
              len_min = 32,
          } },
          { header_name = typedefs.header_name {
              description = "The upstream header that carries the token.",
              required = true,
              default = "X-Gateway-Identity",
          } },
          { skip_consumers = {
              description = "Consumers (username or id) whose requests are not signed.",
              type = "set",
              required = true,
              default = {},
              elements = { type = "string" },
          } },
          { upstream_retry_after = {
              description = "Seconds a client is told to wait (Retry-After) when the upstream gave no answer "
                         .. "(503 instead of 502) or timed out (504); unset: Kong's own 502 and 504.",
              type = "integer",
              required = false,
              between = { 1, 3600 },
          } },
        },
      },
    },
  },
}
