-- Envoy + Lua failover: what `make bench` (bench/run.py) measures llm-failover against.
--
-- Envoy's Lua HTTP filter (envoy.filters.http.lua) runs this as its inline code, in place of
-- the Wasm filter, with the same listener, route, clusters and upstreams. bench/run.py puts one
-- generated line in front of it, `local CONF = {...}`: the OpenAI and Azure keys, the Azure
-- resource, deployment and api-version and the two targets' timeouts, taken from the plugin
-- config of envoy/local.yaml, so that both filters do the same work.
--
-- Per request: buffer the body; send it to cluster `openai` as an OpenAI chat completion; if
-- that answers 429 or 5xx (Envoy's async client reports a reset or timeout as a 503), send it
-- to cluster `azure` at the Azure deployment URL; answer locally with that answer's status,
-- content type and body, plus x-llm-failover-target and x-llm-failover-attempts.
-- Nothing else: no retries, no cooldown, no checks of the request, no counters.

local OPENAI_PATH = "/v1/chat/completions"
local OPENAI_AUTHORITY = CONF.openai_host
local OPENAI_AUTHORIZATION = "Bearer " .. CONF.openai_key
local AZURE_PATH = "/openai/deployments/" .. CONF.azure_deployment
  .. "/chat/completions?api-version=" .. CONF.azure_api_version
local AZURE_AUTHORITY = CONF.azure_host
local AZURE_KEY = CONF.azure_key

local function failed(status)
  local code = tonumber(status)
  return code == nil or code == 429 or code >= 500
end

function envoy_on_request(handle)
  -- Yields until the whole request body is buffered.
  local buffer = handle:body()
  local body = nil
  if buffer ~= nil and buffer:length() > 0 then
    body = buffer:getBytes(0, buffer:length())
  end
  local content_type = handle:headers():get("content-type") or "application/json"

  local target, attempts = "openai", "1"
  local headers, answer = handle:httpCall("openai", {
    [":method"] = "POST",
    [":path"] = OPENAI_PATH,
    [":authority"] = OPENAI_AUTHORITY,
    ["authorization"] = OPENAI_AUTHORIZATION,
    ["content-type"] = content_type,
  }, body, CONF.openai_timeout_ms)

  if failed(headers[":status"]) then
    target, attempts = "azure", "2"
    headers, answer = handle:httpCall("azure", {
      [":method"] = "POST",
      [":path"] = AZURE_PATH,
      [":authority"] = AZURE_AUTHORITY,
      ["api-key"] = AZURE_KEY,
      ["content-type"] = content_type,
    }, body, CONF.azure_timeout_ms)
  end

  handle:respond({
    [":status"] = headers[":status"],
    ["content-type"] = headers["content-type"],
    ["x-llm-failover-target"] = target,
    ["x-llm-failover-attempts"] = attempts,
  }, answer)
end
