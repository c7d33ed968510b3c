-- wrk script: GET /api/session, each request carrying one of the first N
-- session ids of IDS_FILE (one a line), picked at random:
--   uniform   every id equally likely;
--   zipf      the id of rank k (file order) with probability ~ 1/k^S
--             (S = 1 unless given), drawn by binary search in an inverse-CDF
--             table built once per thread in init.
--   wrk -t2 -c64 -d10s --latency -s spread.lua URL -- IDS_FILE N uniform|zipf [S]
-- wrk runs this file in one Lua state per thread; each loads the ids in
-- its own init and seeds its own generator (else both threads would draw
-- the same sequence).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local ids, n, zipf, cdf = {}, 0, false, nil

function init(args)
  local want = tonumber(args[2]) or 0
  for line in io.lines(args[1]) do
    if #ids >= want then break end
    if #line > 0 then ids[#ids + 1] = line end
  end
  n = #ids
  assert(n > 0 and n >= want, "spread.lua: " .. args[1] .. " holds " .. n .. " ids, " .. want .. " wanted")
  zipf = args[3] == "zipf"
  if zipf then
    local s = tonumber(args[4]) or 1.0
    cdf = {}
    local sum = 0
    for k = 1, n do
      sum = sum + 1 / k ^ s
      cdf[k] = sum
    end
    for k = 1, n do cdf[k] = cdf[k] / sum end
  end
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

local function pick()
  if not zipf then return ids[math.random(n)] end
  local u, lo, hi = math.random(), 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return ids[lo]
end

function request()
  return wrk.format("GET", "/api/session", {["Cookie"] = "session_id=" .. pick()})
end
