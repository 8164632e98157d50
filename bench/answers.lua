-- Shared by the wrk scripts (confirm.lua, codes.lua): counts answers so non-200 ones do not
-- pass unnoticed: 200 (first use), 200 whose body says "already" (a second use), and
-- everything else, and prints the totals of all threads when wrk is done.
-- Load it with: dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "<path>/answers.lua")

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function reset_counts()
  ok, already, other, first_other = 0, 0, 0, 0
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
