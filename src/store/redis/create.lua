-- KEYS: session, tombstone, active, user index, user's log-out time
-- ARGV: replay ('1' = skip if exists or tombstoned), id, max_lifetime_ms, u, c, a, e, n, v,
--       max sessions per user ('0' = not indexed: anonymous), prefix, channel,
--       origin field, operation id the record already includes ('0' = none),
--       login time ('0' = created as this user), then metadata field/value pairs
-- Returns 1 created, 0 already there (replay), -1 deleted meanwhile (replay)
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local out = redis.call('GET', index(KEYS[5], 'string'))
  local born = math.max(tonumber(ARGV[5]), tonumber(ARGV[15]))
  if out and born <= (tonumber(out) or 0) then return -1 end
end
local args = {'u', ARGV[4], 'c', ARGV[5], 'a', ARGV[6], 'e', ARGV[7], 'n', ARGV[8], 'v', ARGV[9]}
-- a copy restored from a mirror carries what it includes: the replay of the
-- journal entries it covers is then skipped, however often it is repeated
if tonumber(ARGV[14]) > 0 then
  args[#args + 1] = ARGV[13]
  args[#args + 1] = ARGV[14]
end
if tonumber(ARGV[15]) > 0 then
  args[#args + 1] = 'l'
  args[#args + 1] = ARGV[15]
end
for i = 16, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
redis.call('ZADD', index(KEYS[3], 'zset'), ARGV[7], ARGV[2])
local max = tonumber(ARGV[10])
if max > 0 then
  redis.call('ZADD', user_index(KEYS[4]), math.max(tonumber(ARGV[5]), tonumber(ARGV[15])), ARGV[2])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
  evict_over(KEYS[4], max, ARGV[11], ARGV[3], ARGV[12], KEYS[3])
end
return 1
