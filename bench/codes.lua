-- wrk script: POST /v1/codes/verify with right codes, each used once.
--   wrk -t2 -c32 -d10s -s codes.lua http://127.0.0.1:8080 -- codes.txt once 2
-- codes.txt: "USER_ID CODE" a line; the API key is verimail-bench's (bench/src/codes.rs).
-- Thread k of THREADS takes every THREADS-th line from the k-th, so no code is
-- sent twice until a thread has used its share up (then it wraps: already_verified).
-- Counts answers: 200 verified, 200 already_verified, and everything else.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path = args[1] or "codes.txt"
  local nthreads = tonumber(args[3] or "2")
  bodies = {}
  local n = 0
  for line in io.lines(path) do
    local user, code = string.match(line, "^(%S+) (%d+)$")
    if user then
      if n % nthreads == id then
        bodies[#bodies + 1] = string.format('{"user_id":"%s","code":"%s"}', user, code)
      end
      n = n + 1
    end
  end
  if #bodies == 0 then error("no codes in " .. path .. " for thread " .. id) end
  i = 0
  ok, already, other, first_other = 0, 0, 0, 0
end

local headers = {
  ["Authorization"] = "Bearer bench-api-key-0123456789",
  ["Content-Type"] = "application/json",
}

function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/codes/verify", headers, bodies[i])
end

function response(status, headers, body)
  if status == 200 then
    if string.find(body, "already", 1, true) then already = already + 1 else ok = ok + 1 end
  else
    other = other + 1
    if first_other == 0 then first_other = status end
  end
end

function done(summary, latency, requests)
  local ok_total, already_total, other_total, first = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    ok_total = ok_total + t:get("ok")
    already_total = already_total + t:get("already")
    other_total = other_total + t:get("other")
    if first == 0 then first = t:get("first_other") end
  end
  io.write(string.format("status 200: %d, already: %d, other: %d (first other status %d)\n",
    ok_total, already_total, other_total, first))
end
