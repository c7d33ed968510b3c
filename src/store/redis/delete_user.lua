-- KEYS: user set, active, user's log-out time
-- ARGV: prefix, user, max_lifetime_ms, channel, now, before
-- Deletes the user's sessions created at or before `before` and records the
-- time, so sessions of the user created before it and replayed later (from
-- another node's journal) are not brought back. Returns the ids that were live.
local before = tonumber(ARGV[6])
local last = tonumber(redis.call('GET', index(KEYS[3], 'string')))
if not last or before > last then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3]) end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', index(KEYS[1], 'set'))) do
  local key = ARGV[1] .. 's:' .. id
  local cur = {}
  if redis.call('TYPE', key).ok == 'hash' then cur = redis.call('HMGET', key, 'e', 'u', 'c') end
  if cur[1] and cur[2] == ARGV[2] then
    if (tonumber(cur[3]) or 0) <= before then
      redis.call('DEL', key)
      redis.call('SET', ARGV[1] .. 't:' .. id, '1', 'PX', ARGV[3])
      redis.call('ZREM', index(KEYS[2], 'zset'), id)
      redis.call('SREM', KEYS[1], id)
      redis.call('PUBLISH', ARGV[4], 'del:' .. id)
      local e = tonumber(cur[1])
      if e and e > tonumber(ARGV[5]) then out[#out + 1] = id end
    end
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
