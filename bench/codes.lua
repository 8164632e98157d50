-- wrk script: POST /v1/codes/verify with right codes, each used once.
--   wrk -t2 -c32 -d10s -s codes.lua http://127.0.0.1:8080 -- codes.txt once 2
-- codes.txt: "USER_ID CODE" a line; the API key is verimail-bench's (bench/src/codes.rs).
-- Thread k of THREADS takes every THREADS-th line from the k-th, so no code is
-- sent twice until a thread has used its share up (then it wraps: already_verified).
-- Counts answers: 200 verified, 200 already_verified, and everything else.

-- setup, response and done (the answer counts) are in bench/answers.lua.
dofile(debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "answers.lua")

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
  reset_counts()
end

local headers = {
  ["Authorization"] = "Bearer bench-api-key-0123456789",
  ["Content-Type"] = "application/json",
}

function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/v1/codes/verify", headers, bodies[i])
end
