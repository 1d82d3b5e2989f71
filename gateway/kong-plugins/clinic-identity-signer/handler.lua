-- clinic-identity-signer (docs/gateway-identity.md): every request loses any X-Gateway-Identity the
-- client sent; a request with an authenticated consumer (key-auth, jwt) that is not skipped gets a
-- fresh token over its method, upstream target, body and X-Consumer-* headers, which the services
-- verify before they trust those headers. The same as services/gateway/plugins/identity_signer.py.
--
-- With upstream_retry_after set, Kong's own answers to a failed upstream are made retryable: a 502
-- after which no byte came back from the service (connection refused or reset, or closed before an
-- answer) becomes 503 "The upstream server is currently unavailable" with Retry-After; Kong's own
-- 503 and 504 (no healthy target, a timeout) gain Retry-After. Kong answers these from its error
-- handler (kong.response.get_source() == "error"), whose body the body_filter phase rewrites.
local token = require "kong.plugins.clinic-identity-signer.token"
local sha256_hex = require("kong.tools.sha256").sha256_hex
local openssl_mac = require "resty.openssl.mac"
local openssl_rand = require "resty.openssl.rand"
local to_hex = require("resty.string").to_hex
local encode_base64url = require("ngx.base64").encode_base64url

local kong = kong
local ngx = ngx
local byte = string.byte
local find = string.find
local match = string.match
local sub = string.sub
local ipairs = ipairs
local tonumber = tonumber
local tostring = tostring
local type = type

local QUESTION_MARK = byte("?")
local MIN_KEY_CHARS = 32
-- kong/error_handlers.lua's messages for 502 and 503.
local INVALID_ANSWER = "An invalid response was received from the upstream server"
local UNAVAILABLE = "The upstream server is currently unavailable"


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


-- What the last try received from the upstream: nginx lists one figure per try ("0, 0" across
-- retries, " : " across internal redirects such as the error page's), the last one last.
local function last_try_received()
  local received = ngx.var.upstream_bytes_received
  if type(received) ~= "string" then
    return 0
  end
  return tonumber(match(received, "(%d+)%s*$")) or 0
end


function ClinicIdentitySigner:header_filter(conf)
  local retry_after = conf.upstream_retry_after -- unset: ngx.null (Kong fills absent fields with it)
  if type(retry_after) ~= "number" or kong.response.get_source() ~= "error" then
    return
  end

  local status = kong.response.get_status()
  if status == 502 and last_try_received() == 0 then
    status = 503
    kong.response.set_status(status)
    kong.response.clear_header("Content-Length") -- the body changes length (body_filter)
    kong.ctx.plugin.unavailable = true
  end
  if status == 503 or status == 504 then
    kong.response.set_header("Retry-After", tostring(retry_after))
  end
end


function ClinicIdentitySigner:body_filter(conf)
  if not kong.ctx.plugin.unavailable then
    return
  end
  local body = kong.response.get_raw_body() -- nil until the last chunk: the chunks are held
  if body and body ~= "" then -- "" (a HEAD): left as it is, set_raw_body would send "\n"
    local first, last = find(body, INVALID_ANSWER, 1, true)
    if first then
      body = sub(body, 1, first - 1) .. UNAVAILABLE .. sub(body, last + 1)
    end
    kong.response.set_raw_body(body)
  end
end


return ClinicIdentitySigner
