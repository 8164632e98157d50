-- wrk script: each request confirms a fresh pre-minted token (one per line in
-- the file given after `--`), split between wrk's threads so none repeats.
-- Once a thread runs out, it re-sends its last token (answered already_verified).
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  tokens = {}
  local nthreads = tonumber(args[2]) or 1
  local n = 0
  for line in io.lines(args[1]) do
    if n % nthreads == id then tokens[#tokens + 1] = line end
    n = n + 1
  end
  i = 0
end

function request()
  i = i + 1
  local t = tokens[i] or tokens[#tokens]
  return wrk.format("GET", "/confirm/" .. t, { ["Accept"] = "application/json" })
end
