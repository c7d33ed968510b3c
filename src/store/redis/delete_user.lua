-- KEYS: user index, active, user's log-out time
-- ARGV: prefix, user, max_lifetime_ms, channel, now, before ('+inf' = all), chunk, log-out time
-- Deletes up to `chunk` of the user's sessions created (or logged into) at or
-- before `before` and records the log-out time, so sessions of the user from
-- before it that are replayed later (from another node's journal) are not
-- brought back. A live log-out-everywhere deletes all (whatever the clocks of
-- the nodes that stamped them); a replayed one those from before it. Returns
-- {1 if more may remain (call again), live ids deleted...}. Bounded by `chunk`.
local before = tonumber(ARGV[6]) or math.huge
local at = tonumber(ARGV[8])
local last = tonumber(redis.call('GET', index(KEYS[3], 'string')))
if not last or at > last then redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[3]) end
local key = user_index(KEYS[1])
local active = index(KEYS[2], 'zset')
local chunk = tonumber(ARGV[7])
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', before, 'LIMIT', 0, chunk)
local out = {0}
if #ids == chunk then out[1] = 1 end
local gone = {}
for _, id in ipairs(ids) do
  local skey = ARGV[1] .. 's:' .. id
  -- a key of another type is not a node's record (pcall: no TYPE per id)
  local cur = redis.pcall('HMGET', skey, 'e', 'u', 'c', 'l')
  if type(cur) ~= 'table' or cur.err then cur = {} end
  -- born: when the session became the user's (created as it, or logged in)
  local c = math.max(tonumber(cur[3]) or 0, tonumber(cur[4]) or 0)
  if cur[1] and cur[2] == ARGV[2] and c > before then
    -- filed with a wrong score: a later login, kept
    redis.call('ZADD', key, c, id)
  else
    redis.call('ZREM', key, id)
    if cur[1] and cur[2] == ARGV[2] then
      redis.call('DEL', skey)
      redis.call('SET', ARGV[1] .. 't:' .. id, '1', 'PX', ARGV[3])
      redis.call('ZREM', active, id)
      gone[#gone + 1] = id
      local e = tonumber(cur[1])
      if e and e > tonumber(ARGV[5]) then out[#out + 1] = id end
    end
  end
end
-- one event for the chunk: `del:<id>,<id>,...`
if #gone > 0 then redis.call('PUBLISH', ARGV[4], 'del:' .. table.concat(gone, ',')) end
return out
