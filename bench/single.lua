-- wrk script for the benchmark's 1-message-a-request run: POST messages shaped like the ones
-- `ingest push` makes, and print how many were acknowledged (202) when the run ends.
-- Usage: wrk -t1 -c32 -d10s -s bench/single.lua URL/messages
-- Globals, not locals: done() reads `acked` from each thread with thread:get.
seq, acked = 0, 0
local headers = { ["Content-Type"] = "application/json" }
if os.getenv("INGEST_TOKEN") then  -- for a service started with --auth-tokens
  headers["Authorization"] = "Bearer " .. os.getenv("INGEST_TOKEN")
end

function request()
  seq = seq + 1
  local body = string.format(
    '{"sensor": "s-%d", "seq": %d, "v": %.3f, "ts": "%s"}',
    seq % 16, seq, 20.0 + 5.0 * math.sin(seq / 10.0), os.date("!%Y-%m-%dT%H:%M:%S.000+00:00"))
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  if status == 202 then
    acked = acked + 1
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
