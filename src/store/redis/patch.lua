-- KEYS: session, tombstone, this node's refusals (`count_refusal`)
-- ARGV: now, if_match ('' = none), new user ('' = none), prefix, id, max_lifetime_ms, max_metadata_bytes, replay,
--       origin field, operation id, max sessions per user of the new user ('0' = not indexed), channel,
--       the node's floor (see `claim` in the prelude), then pairs of metadata field, value ('null' deletes)
-- Returns {1, record} applied, {0} gone, {-1} tombstoned (replay), {-2}
-- corrupt, {2, version} If-Match failed, {3, size} too large, {4} a patch
-- whose operation id was already applied (on every path)
local cur = redis.call('HMGET', KEYS[1], 'e', 'v', 'u', ARGV[9], 'c')
if not cur[1] then
  if ARGV[8] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
  return {0}
end
if not (string.match(cur[1], '^%d+$') and cur[2] and string.match(cur[2], '^%d+$') and cur[3]) then
  return {-2}
end
local mark = claim(cur[4], ARGV[10], ARGV[13])
if not mark then
  count_refusal(KEYS[3], ARGV[6])
  return {4}
end
if ARGV[8] ~= '1' and tonumber(cur[1]) <= tonumber(ARGV[1]) then return {0} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= tonumber(cur[2]) then return {2, cur[2]} end
if #ARGV > 13 then
  -- the merged metadata must fit: compute its JSON size before writing
  local meta = {}
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'm:' then meta[all[i]] = all[i + 1] end
  end
  for i = 14, #ARGV, 2 do
    if ARGV[i + 1] == 'null' then meta[ARGV[i]] = nil else meta[ARGV[i]] = ARGV[i + 1] end
  end
  local size, count = 2, 0
  for k, v in pairs(meta) do
    size = size + (#k - 2) + 1 + #v
    count = count + 1
  end
  if count > 1 then size = size + count - 1 end
  if size > tonumber(ARGV[7]) then return {3, tostring(size)} end
  for i = 14, #ARGV, 2 do
    if ARGV[i + 1] == 'null' then
      redis.call('HDEL', KEYS[1], ARGV[i])
    else
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  end
end
if ARGV[3] ~= '' and ARGV[3] ~= cur[3] then
  redis.call('ZREM', user_index(ARGV[4] .. 'u:' .. cur[3]), ARGV[5])
  local max = tonumber(ARGV[11])
  if max > 0 then
    local ukey = user_index(ARGV[4] .. 'u:' .. ARGV[3])
    redis.call('ZADD', ukey, tonumber(ARGV[1]), ARGV[5])
    redis.call('PEXPIRE', ukey, ARGV[6])
    evict_over(ukey, max, ARGV[4], ARGV[6], ARGV[12], ARGV[4] .. 'active')
  end
  -- `l`: when the session became this user's (a log-out-everywhere made
  -- before it does not take it)
  redis.call('HSET', KEYS[1], 'u', ARGV[3], 'l', ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[9], mark)
redis.call('HINCRBY', KEYS[1], 'v', 1)
return {1, redis.call('HGETALL', KEYS[1])}
