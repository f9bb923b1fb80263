-- wrk script for the benchmark's NDJSON runs: POST bodies of N messages (one a line) shaped like
-- the ones `ingest push` makes, and print how many messages were acknowledged (202).
-- Usage: wrk -t1 -c32 -d10s -s bench/ndjson.lua URL/messages -- 100
-- Globals, not locals: done() reads `acked` from each thread with thread:get.
seq, acked, per_request = 0, 0, 100
local headers = { ["Content-Type"] = "application/x-ndjson" }
if os.getenv("INGEST_TOKEN") then  -- for a service started with --auth-tokens
  headers["Authorization"] = "Bearer " .. os.getenv("INGEST_TOKEN")
end

function init(args)
  per_request = tonumber(args[1] or "100")
end

function request()
  local ts = os.date("!%Y-%m-%dT%H:%M:%S.000+00:00")
  local lines = {}
  for i = 1, per_request do
    seq = seq + 1
    lines[i] = string.format('{"sensor":"s-%d","seq":%d,"v":%.3f,"ts":"%s"}',
      seq % 16, seq, 20.0 + 5.0 * math.sin(seq / 10.0), ts)
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
