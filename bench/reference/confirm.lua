-- wrk script: GET /confirm/<token>, tokens taken round robin from a file (one a line).
--   wrk -t2 -c32 -d10s -s confirm.lua http://127.0.0.1:8081 -- tokens.txt
-- A token may be confirmed more than once; each request still verifies it and runs the UPDATE.
-- Counts responses by status class so non-200 answers do not pass unnoticed.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path = args[1] or "tokens.txt"
  tokens = {}
  for line in io.lines(path) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  if #tokens == 0 then error("no tokens in " .. path) end
  -- Threads start at different offsets so they do not confirm the same tokens in lockstep.
  i = (id * math.floor(#tokens / 2)) % #tokens
  ok, other = 0, 0
end

function request()
  i = i % #tokens + 1
  return wrk.format("GET", "/confirm/" .. tokens[i])
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local ok_total, other_total = 0, 0
  for _, t in ipairs(threads) do
    ok_total = ok_total + t:get("ok")
    other_total = other_total + t:get("other")
  end
  io.write(string.format("status 200: %d, other: %d\n", ok_total, other_total))
end
