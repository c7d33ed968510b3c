-- KEYS: session, tombstone, active, user index, user's log-out time, this node's refusals
--       (`count_refusal`)
-- ARGV: replay ('1' = skip if exists or tombstoned; '2' = a re-seed from a
--       mirror: as '1', but a copy that exists is compared and set), id, max_lifetime_ms, u, c, a, e, n, v,
--       max sessions per user ('0' = not indexed: anonymous), prefix, channel,
--       origin field, operation id the record already includes ('0' = none),
--       login time ('0' = created as this user), then metadata field/value pairs
-- Returns 1 created, 0 already there (replay; live: a late copy, refused), -1 deleted meanwhile (replay),
-- 2 a re-seed that raised or replaced what another node re-seeded
-- A re-seed meets what another node re-seeded (or what was written since):
-- the copy with the higher version wins (on equal versions, the later use);
-- the count, last use and expiry take the highest of both, so a re-seed
-- never goes back on what any node acknowledged. Returns 0 when nothing
-- changed, 2 otherwise.
local function reseed_over()
  local cur = redis.call('HMGET', KEYS[1], 'v', 'a', 'n', 'e', 'u', ARGV[13])
  local v, a, n, e = tonumber(cur[1]), tonumber(cur[2]), tonumber(cur[3]), tonumber(cur[4])
  if not (v and a and n and e and cur[5]) then return 0 end
  local nv, na, nn, ne = tonumber(ARGV[9]), tonumber(ARGV[6]), tonumber(ARGV[8]), tonumber(ARGV[7])
  local changed = false
  if nv > v or (nv == v and na > a) then
    -- replace the data: metadata, user, login time, version
    local all = redis.call('HGETALL', KEYS[1])
    local drop = {}
    for i = 1, #all, 2 do
      if string.sub(all[i], 1, 2) == 'm:' or all[i] == 'l' then drop[#drop + 1] = all[i] end
    end
    if #drop > 0 then redis.call('HDEL', KEYS[1], unpack(drop)) end
    local set = {'u', ARGV[4], 'v', ARGV[9]}
    if tonumber(ARGV[15]) > 0 then set[#set + 1] = 'l'; set[#set + 1] = ARGV[15] end
    for i = 16, #ARGV do set[#set + 1] = ARGV[i] end
    redis.call('HSET', KEYS[1], unpack(set))
    if cur[5] ~= ARGV[4] then
      redis.call('ZREM', user_index(ARGV[11] .. 'u:' .. cur[5]), ARGV[2])
      local max = tonumber(ARGV[10])
      if max > 0 then
        redis.call('ZADD', user_index(KEYS[4]), math.max(tonumber(ARGV[5]), tonumber(ARGV[15])), ARGV[2])
        redis.call('PEXPIRE', KEYS[4], ARGV[3])
      end
    end
    changed = true
  end
  if nn > n then redis.call('HSET', KEYS[1], 'n', ARGV[8]); changed = true end
  if na > a then redis.call('HSET', KEYS[1], 'a', ARGV[6]); changed = true end
  if ne > e then
    redis.call('HSET', KEYS[1], 'e', ARGV[7])
    redis.call('PEXPIREAT', KEYS[1], ARGV[7])
    redis.call('ZADD', index(KEYS[3], 'zset'), index_score(ARGV[7], ARGV[3]), ARGV[2])
    changed = true
  end
  if tonumber(ARGV[14]) > 0 then
    redis.call('HSET', KEYS[1], ARGV[13], raise(cur[6], tonumber(ARGV[14])))
  end
  if changed then return 2 end
  return 0
end
-- A live create names a new random id: a record or a tombstone under it can
-- only come from this very create, applied already (its replay ran first,
-- after an outage that left the original in flight). Written again, the late
-- original would reset the counts and data acknowledged since, or bring a
-- deleted session back.
if ARGV[1] == '0' and (redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1) then
  count_refusal(KEYS[6], ARGV[3])
  return 0
end
if ARGV[1] ~= '0' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
  if redis.call('EXISTS', KEYS[1]) == 1 then
    if ARGV[1] ~= '2' then return 0 end
    return reseed_over()
  end
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
redis.call('ZADD', index(KEYS[3], 'zset'), index_score(ARGV[7], ARGV[3]), ARGV[2])
local max = tonumber(ARGV[10])
if max > 0 then
  redis.call('ZADD', user_index(KEYS[4]), math.max(tonumber(ARGV[5]), tonumber(ARGV[15])), ARGV[2])
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
  evict_over(KEYS[4], max, ARGV[11], ARGV[3], ARGV[12], KEYS[3])
end
return 1
