-- wrk script: GET /confirm/<token>, tokens taken from a file (one a line).
--   wrk -t2 -c32 -d10s -s confirm.lua http://127.0.0.1:8081 -- tokens.txt [MODE] [THREADS]
-- MODE `round` (default): every thread walks the whole list round robin, from its own offset;
--   a token may be confirmed more than once (each request still verifies it and runs the UPDATE).
-- MODE `once`: thread k of THREADS (default 2, pass wrk's -t) takes every THREADS-th token from
--   the k-th, so no token is sent twice until a thread has used its share up (then it wraps).
-- Counts answers so non-200 ones do not pass unnoticed: 200 (first confirmation), 200 whose page
-- says "already" (verimail's second click: already_verified), and everything else.

-- setup, response and done (the answer counts) are in bench/answers.lua.
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../answers.lua")

function init(args)
  local path = args[1] or "tokens.txt"
  local mode = args[2] or "round"
  local nthreads = tonumber(args[3] or "2")
  tokens = {}
  local n = 0
  for line in io.lines(path) do
    if #line > 0 then
      if mode ~= "once" or n % nthreads == id then tokens[#tokens + 1] = line end
      n = n + 1
    end
  end
  if #tokens == 0 then error("no tokens in " .. path .. " for thread " .. id) end
  if mode == "once" then
    i = 0
  else
    -- Threads start at different offsets so they do not confirm the same tokens in lockstep.
    i = (id * math.floor(#tokens / 2)) % #tokens
  end
  reset_counts()
end

function request()
  i = i % #tokens + 1
  return wrk.format("GET", "/confirm/" .. tokens[i])
end
