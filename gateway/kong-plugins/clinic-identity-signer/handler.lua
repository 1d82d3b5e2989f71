-- clinic-identity-signer (docs/gateway-identity.md): every request loses any X-Gateway-Identity the
-- client sent; a request with an authenticated consumer (key-auth, jwt) that is not skipped gets a
-- fresh token over its method, upstream target, body and X-Consumer-* headers, which the services
-- verify before they trust those headers. The same as services/gateway/plugins/identity_signer.py.
local token = require "kong.plugins.clinic-identity-signer.token"
local sha256_hex = require("kong.tools.sha256").sha256_hex
local openssl_mac = require "resty.openssl.mac"
local openssl_rand = require "resty.openssl.rand"
local to_hex = require("resty.string").to_hex
local encode_base64url = require("ngx.base64").encode_base64url

local kong = kong
local ngx = ngx
local byte = string.byte
local ipairs = ipairs
local type = type

local QUESTION_MARK = byte("?")
local MIN_KEY_CHARS = 32


local crypto = {
  sha256_hex = sha256_hex,
  hmac_sha256 = function(key, data)
    return openssl_mac.new(key, "HMAC", nil, "sha256"):final(data)
  end,
  base64url = encode_base64url,
}


local ClinicIdentitySigner = {
  -- After every auth, acl and limiting plugin (acl 950, rate-limiting 910, prometheus 13).
  PRIORITY = 5,
  VERSION = "1.0.0",
}


-- The target Kong sends upstream: the router's (escaped) upstream_uri, set before the access phase,
-- plus the query string exactly as Kong's access "after" step appends it (kong/runloop/handler.lua).
local function upstream_target()
  local var = ngx.var
  local target = var.upstream_uri
  if byte(ngx.ctx.request_uri or var.request_uri, -1) == QUESTION_MARK or var.is_args == "?" then
    target = target .. "?" .. (var.args or "")
  end
  return target
end


local function skipped(conf, consumer)
  for _, name in ipairs(conf.skip_consumers) do
    if name == consumer.username or name == consumer.id then
      return true
    end
  end
  return false
end


function ClinicIdentitySigner:access(conf)
  local set_header = kong.service.request.set_header
  local clear_header = kong.service.request.clear_header

  clear_header(conf.header_name) -- a client's own token never reaches a service

  local consumer = kong.client.get_consumer()
  if not consumer or skipped(conf, consumer) then
    return
  end

  local key = conf.key
  if type(key) ~= "string" or #key < MIN_KEY_CHARS then
    kong.log.err("the gateway identity key is missing (unresolved vault reference?) or shorter than ",
                 MIN_KEY_CHARS, " characters")
    return kong.response.error(500)
  end

  local body, err = kong.request.get_raw_body(0) -- 0: read a body nginx buffered to a file, too
  if not body then
    kong.log.err("cannot read the request body to sign it: ", err)
    return kong.response.error(500)
  end

  -- The consumer's own fields, from the authenticated consumer itself (as every auth plugin sets
  -- them); the credential and anonymous marks as the auth plugin set them. Each is then re-set so
  -- that exactly the signed values travel upstream, never a copy the client added.
  local values = {
    ["X-Consumer-ID"] = consumer.id,
    ["X-Consumer-Custom-ID"] = consumer.custom_id,
    ["X-Consumer-Username"] = consumer.username,
    ["X-Credential-Identifier"] = kong.request.get_header("X-Credential-Identifier"),
    ["X-Anonymous-Consumer"] = kong.request.get_header("X-Anonymous-Consumer"),
  }
  for _, name in ipairs(token.SIGNED_HEADERS) do
    local value = values[name]
    if type(value) == "string" and value ~= "" then
      set_header(name, value)
    else
      values[name] = nil
      clear_header(name)
    end
  end

  local nonce = to_hex(openssl_rand.bytes(16))
  local signed = token.token(crypto, key, kong.request.get_method(), upstream_target(), body, values,
                             ngx.time(), nonce)
  set_header(conf.header_name, signed)
end


return ClinicIdentitySigner
