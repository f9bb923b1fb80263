-- wrk script for the benchmark: POST messages shaped like the ones `ingest push` makes, N a
-- request (N = 1: a JSON object; more: NDJSON, one a line), and print how many messages were
-- acknowledged (202) when the run ends. With INGEST_TOKEN set, each request carries it.
-- Usage: wrk -t1 -c32 -d10s -s bench/messages.lua URL/messages -- N
-- Globals, not locals: done() reads `acked` from each thread with thread:get.
seq, acked, per_request = 0, 0, 1
local headers = {}

function init(args)
  per_request = tonumber(args[1] or "1")
  headers["Content-Type"] = per_request == 1 and "application/json" or "application/x-ndjson"
  if os.getenv("INGEST_TOKEN") then  -- for a service started with --auth-tokens
    headers["Authorization"] = "Bearer " .. os.getenv("INGEST_TOKEN")
  end
end

local function message(ts)
  seq = seq + 1
  return string.format('{"sensor":"s-%d","seq":%d,"v":%.3f,"ts":"%s"}',
    seq % 16, seq, 20.0 + 5.0 * math.sin(seq / 10.0), ts)
end

function request()
  local ts = os.date("!%Y-%m-%dT%H:%M:%S.000+00:00")
  if per_request == 1 then
    return wrk.format("POST", nil, headers, message(ts))
  end
  local lines = {}
  for i = 1, per_request do
    lines[i] = message(ts)
  end
  return wrk.format("POST", nil, headers, table.concat(lines, "\n") .. "\n")
end

function response(status, headers, body)
  if status == 202 then
    acked = acked + per_request
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("acked")
  end
  io.write(string.format("acked %d\n", total))
end
