-- KEYS: session, tombstone, active, user index, user's log-out time
-- ARGV: replay ('1' = skip if exists or tombstoned), id, max_lifetime_ms, u, c, a, e, n, v,
--       max sessions per user ('0' = not indexed: anonymous), prefix, channel,
--       then metadata field/value pairs
-- Returns 1 created, 0 already there (replay), -1 deleted meanwhile (replay)
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local out = redis.call('GET', index(KEYS[5], 'string'))
  if out and tonumber(ARGV[5]) <= (tonumber(out) or 0) then return -1 end
end
local args = {'u', ARGV[4], 'c', ARGV[5], 'a', ARGV[6], 'e', ARGV[7], 'n', ARGV[8], 'v', ARGV[9]}
for i = 13, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
redis.call('ZADD', index(KEYS[3], 'zset'), ARGV[7], ARGV[2])
local max = tonumber(ARGV[10])
if max > 0 then
  redis.call('ZADD', user_index(KEYS[4]), ARGV[5], ARGV[2])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
  evict_over(KEYS[4], max, ARGV[11], ARGV[3], ARGV[12], KEYS[3])
end
return 1
