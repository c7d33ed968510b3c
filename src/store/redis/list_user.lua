-- KEYS: user index; ARGV: now, prefix, user, offset, limit
-- One page of a user's live sessions, oldest first: {next offset (-1 at the
-- end), record, id, record, id...}. Ids whose session is gone are dropped
-- from the index on the way (the next offset accounts for them). Bounded by
-- `limit`.
local key = user_index(KEYS[1])
local offset, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local ids = redis.call('ZRANGE', key, offset, offset + limit - 1)
local out = {-1}
local kept = 0
for _, id in ipairs(ids) do
  local skey = ARGV[2] .. 's:' .. id
  local cur = {}
  if redis.call('TYPE', skey).ok == 'hash' then cur = redis.call('HMGET', skey, 'e', 'u') end
  local e = tonumber(cur[1])
  if e and e > tonumber(ARGV[1]) and cur[2] == ARGV[3] then
    out[#out + 1] = redis.call('HGETALL', skey)
    out[#out + 1] = id
    kept = kept + 1
  else
    redis.call('ZREM', key, id)
  end
end
if #ids == limit then out[1] = offset + kept end
return out
