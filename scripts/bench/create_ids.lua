-- wrk script: creates sessions flat out (POST /api/sessions) and records
-- each new session's id, one a line, in PREFIX.<thread>; after QUOTA
-- creates a thread only reads /api/ready until the run ends.
--   wrk -t2 -c64 -d5s -s create_ids.lua URL -- PREFIX QUOTA
-- Each thread has its own Lua state (wrk), so its own file and count.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local out, quota, made = nil, 0, 0
function init(args)
  quota = tonumber(args[2]) or 0
  out = assert(io.open(args[1] .. "." .. tid, "a"))
  -- One write per id: nothing is lost in a buffer when wrk exits.
  out:setvbuf("line")
end

function request()
  made = made + 1
  if made > quota then return wrk.format("GET", "/api/ready") end
  return wrk.format("POST", "/api/sessions", {["Content-Type"] = "application/json"},
    '{"user_id":"b' .. tid .. "_" .. (made % 5000) .. '","metadata":{"cart":[1,2,3],"theme":"dark"}}')
end

function response(status, headers, body)
  if status ~= 201 then return end
  local id = body:match('"session_id":"([0-9a-f-]+)"')
  if id then out:write(id, "\n") end
end
