-- KEYS: user index, active, user's log-out time
-- ARGV: prefix, user, max_lifetime_ms, channel, now, before, chunk
-- Deletes up to `chunk` of the user's sessions created at or before `before`
-- and records the time, so sessions of the user created before it and
-- replayed later (from another node's journal) are not brought back. Returns
-- {1 if more may remain (call again), live ids deleted...}. Bounded by `chunk`.
local before = tonumber(ARGV[6])
local last = tonumber(redis.call('GET', index(KEYS[3], 'string')))
if not last or before > last then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3]) end
local key = user_index(KEYS[1])
local chunk = tonumber(ARGV[7])
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', before, 'LIMIT', 0, chunk)
local out = {0}
if #ids == chunk then out[1] = 1 end
for _, id in ipairs(ids) do
  local skey = ARGV[1] .. 's:' .. id
  local cur = {}
  if redis.call('TYPE', skey).ok == 'hash' then cur = redis.call('HMGET', skey, 'e', 'u', 'c') end
  local c = tonumber(cur[3]) or 0
  if cur[1] and cur[2] == ARGV[2] and c > before then
    -- filed with a wrong score: a later login, kept
    redis.call('ZADD', key, c, id)
  else
    redis.call('ZREM', key, id)
    if cur[1] and cur[2] == ARGV[2] then
      redis.call('DEL', skey)
      redis.call('SET', ARGV[1] .. 't:' .. id, '1', 'PX', ARGV[3])
      redis.call('ZREM', index(KEYS[2], 'zset'), id)
      redis.call('PUBLISH', ARGV[4], 'del:' .. id)
      local e = tonumber(cur[1])
      if e and e > tonumber(ARGV[5]) then out[#out + 1] = id end
    end
  end
end
return out
