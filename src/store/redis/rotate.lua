-- KEYS: old session, new session, old tombstone, active, new tombstone
-- ARGV: old id, new id, prefix, max_lifetime_ms, channel, now, replay
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[7] == '1' then
    if redis.call('EXISTS', KEYS[2]) == 1 then return {2} end
    if redis.call('EXISTS', KEYS[3]) == 1 then return {-1} end
  end
  return {0}
end
local cur = redis.call('HMGET', KEYS[1], 'e', 'u', 'v')
if not (cur[1] and string.match(cur[1], '^%d+$') and cur[2] and cur[3] and string.match(cur[3], '^%d+$')) then
  return {-2}
end
if ARGV[7] ~= '1' and tonumber(cur[1]) <= tonumber(ARGV[6]) then return {0} end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('HINCRBY', KEYS[2], 'v', 1)
-- the old id's tombstone names its successor (see delete.lua)
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[4])
redis.call('ZREM', index(KEYS[4], 'zset'), ARGV[1])
redis.call('ZADD', KEYS[4], index_score(cur[1], ARGV[4]), ARGV[2])
-- the new id takes the old one's place in the user's index, if it had one
local ukey = user_index(ARGV[3] .. 'u:' .. cur[2])
local score = redis.call('ZSCORE', ukey, ARGV[1])
if score then
  redis.call('ZREM', ukey, ARGV[1])
  redis.call('ZADD', ukey, score, ARGV[2])
end
redis.call('PUBLISH', ARGV[5], 'del:' .. ARGV[1])
return {1, redis.call('HGETALL', KEYS[2])}
