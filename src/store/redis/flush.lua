-- The near cache's write-behind: many sessions' counts in one call (see
-- tracking.rs). Per session the same as a live touch.lua with a count.
-- KEYS: active, then one session key per session
-- ARGV: ttl_ms, max_lifetime_ms, origin field, then per session:
--       id, time of its latest use, count, operation id
-- Returns one code per session: the new request count, 0 when the session
-- is gone (deleted, expired), -2 when the record is corrupt.
local ttl, life, field = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 2, #KEYS do
  local key, j = KEYS[i], 4 + (i - 2) * 4
  local id, at, count, seq = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
  local cur = redis.call('HMGET', key, 'c', 'e', 'a', 'n', field)
  local c, e, a = tonumber(cur[1]), tonumber(cur[2]), tonumber(cur[3])
  if not cur[1] then
    out[#out + 1] = 0
  elseif not (c and e and a and cur[4] and string.match(cur[4], '^%d+$')) then
    out[#out + 1] = -2
  elseif e <= at then
    redis.call('DEL', key)
    redis.call('ZREM', index(KEYS[1], 'zset'), id)
    out[#out + 1] = 0
  else
    out[#out + 1] = redis.call('HINCRBY', key, 'n', count)
    local mark = tonumber(cur[5])
    if at > a then
      if not mark or seq > mark then
        redis.call('HSET', key, 'a', ARGV[j + 1], field, ARGV[j + 3])
      else
        redis.call('HSET', key, 'a', ARGV[j + 1])
      end
    elseif not mark or seq > mark then
      redis.call('HSET', key, field, ARGV[j + 3])
    end
    local ne = math.min(at + ttl, c + life)
    if ne >= e + 1000 then
      local s = string.format('%.0f', ne)
      redis.call('HSET', key, 'e', s)
      redis.call('PEXPIREAT', key, s)
      redis.call('ZADD', index(KEYS[1], 'zset'), s, id)
    end
    -- read again after writing: keeps the key tracked (see touch.lua)
    redis.call('EXISTS', key)
  end
end
return out
