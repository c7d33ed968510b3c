-- KEYS: user set; ARGV: now, prefix, user
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', index(KEYS[1], 'set'))) do
  local key = ARGV[2] .. 's:' .. id
  local cur = {}
  if redis.call('TYPE', key).ok == 'hash' then cur = redis.call('HMGET', key, 'e', 'u') end
  local e = tonumber(cur[1])
  if e and e > tonumber(ARGV[1]) and cur[2] == ARGV[3] then
    out[#out + 1] = redis.call('HGETALL', key)
    out[#out + 1] = id
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
