-- wrk script: AMP collect hits (GET /v1/amp/collect) as amp-analytics sends image pixels.
-- Every other request comes from the publisher's own page with the visitor cookie (ampId is
-- the cookie's value there, as AMP's clientId is on the origin); the others come from the
-- AMP cache page (its Origin, as a beacon sends it) with AMP's cache clientId and no cookie.
-- Each thread cycles through 1,000 visitors and 1,000 cache clientIds of its own.
local cache_origin = "https://www-example-com.cdn.ampproject.org"
local page = "&url=https%3A%2F%2Fwww.example.com%2Farticle&title=Bench%20article"
local n = 0
local counts = {hits = 0, errors = 0}

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local count_answer = dofile(here .. "answers.lua")

threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function request()
  n = n + 1
  local who = (thread_id or 0) .. "-" .. (n % 1000)
  if n % 2 == 0 then
    local visitor = "bench-visitor-" .. who
    return wrk.format("GET", "/v1/amp/collect?ampId=" .. visitor .. page,
      {["Cookie"] = "ajs_anonymous_id=" .. visitor})
  end
  return wrk.format("GET", "/v1/amp/collect?ampId=bench-cache-cid-" .. who .. page,
    {["Origin"] = cache_origin})
end

function response(status, headers, body)
  if status == 204 then
    counts.hits = counts.hits + 1
  else
    counts.errors = counts.errors + 1
  end
  hits, errors = counts.hits, counts.errors
  count_answer()
end

function done(summary, latency, requests)
  local h, x = 0, 0
  for _, thread in ipairs(threads) do
    h = h + (thread:get("hits") or 0)
    x = x + (thread:get("errors") or 0)
  end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"hits":%d,"errors":%d,'
    .. '"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, h, x,
    summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
