-- Derived index keys that another tool overwrote with a value of another type
-- are dropped and rebuilt from here on, rather than failing every operation
-- that touches them (and a replayed create with them).
local function index(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= kind and t ~= 'none' then redis.call('DEL', key) end
  return key
end

-- A user's index: a sorted set of session ids scored by creation time. A set
-- (the layout of 0.1.0) is converted when small (score 0: created before the
-- upgrade) and dropped when not: only the unbounded anonymous index of 0.1.0
-- is that large, and anonymous sessions are no longer indexed.
local function user_index(key)
  local t = redis.call('TYPE', key).ok
  if t == 'zset' or t == 'none' then return key end
  if t == 'set' and redis.call('SCARD', key) <= 256 then
    local ids = redis.call('SMEMBERS', key)
    redis.call('DEL', key)
    for _, id in ipairs(ids) do redis.call('ZADD', key, 0, id) end
    return key
  end
  redis.call('DEL', key)
  return key
end

-- Keeps a user at `max` sessions: the oldest beyond it are deleted (with a
-- tombstone and an event, like a DELETE). Bounded: a create adds one.
local function evict_over(ukey, max, prefix, lifetime, channel, active)
  local n = redis.call('ZCARD', ukey)
  if n <= max then return end
  for _, id in ipairs(redis.call('ZRANGE', ukey, 0, n - max - 1)) do
    redis.call('DEL', prefix .. 's:' .. id)
    redis.call('SET', prefix .. 't:' .. id, '1', 'PX', lifetime)
    redis.call('ZREM', index(active, 'zset'), id)
    redis.call('ZREM', ukey, id)
    redis.call('PUBLISH', channel, 'del:' .. id)
  end
end
