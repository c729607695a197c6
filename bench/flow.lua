-- wrk script: each thread alternates a prepare and the exchange of a token a prepare returned.
-- Tokens from prepare answers queue per thread; a request is an exchange when one is waiting.
local write_key = os.getenv("BENCH_WRITE_KEY")
local auth = "Bearer " .. write_key
local prepare_body = '{"anonymousId":"bench-visitor-0001","userId":"bench-user",'
  .. '"consent":{"analytics":true},"destination":"https://checkout.example-pay.com/cart?step=1"}'
local tokens = {}
local counts = {prepared = 0, exchanged = 0, errors = 0}

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local count_answer = dofile(here .. "answers.lua")

function setup(thread)
  table.insert(threads, thread)
end
threads = {}

function request()
  local token = table.remove(tokens)
  if token ~= nil then
    return wrk.format("POST", "/v1/handoffs/exchange",
      {["Content-Type"] = "application/json", ["Authorization"] = auth},
      '{"token":"' .. token .. '"}')
  end
  return wrk.format("POST", "/v1/handoffs",
    {["Content-Type"] = "application/json", ["Authorization"] = auth}, prepare_body)
end

function response(status, headers, body)
  if status == 201 then
    counts.prepared = counts.prepared + 1
    local token = string.match(body, '"token":"([A-Za-z0-9_-]+)"')
    table.insert(tokens, token)
  elseif status == 200 then
    counts.exchanged = counts.exchanged + 1
  else
    counts.errors = counts.errors + 1
  end
  prepared, exchanged, errors = counts.prepared, counts.exchanged, counts.errors
  count_answer()
end

function done(summary, latency, requests)
  local p, e, x = 0, 0, 0
  for _, thread in ipairs(threads) do
    p = p + (thread:get("prepared") or 0)
    e = e + (thread:get("exchanged") or 0)
    x = x + (thread:get("errors") or 0)
  end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"prepared":%d,"exchanged":%d,"errors":%d,'
    .. '"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, p, e, x,
    -- Answers of 400 and more are in errors (counted above), not here again.
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
