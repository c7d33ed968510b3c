-- KEYS: session, tombstone, active; ARGV: id, prefix, max_lifetime_ms, channel, replay
-- (a key that is not a hash is not a node's record: it is deleted all the same)
-- A replayed delete also deletes what the session was rotated into meanwhile
-- (a rotation leaves its new id in the old id's tombstone): a logout made
-- during an outage is not undone by another node's rotation of the session.
if ARGV[5] == '1' then
  local succ = redis.call('GET', KEYS[2])
  local hops = 0
  while succ and succ ~= '1' and hops < 8 do
    local skey = ARGV[2] .. 's:' .. succ
    local su = nil
    if redis.call('TYPE', skey).ok == 'hash' then su = redis.call('HGET', skey, 'u') end
    redis.call('DEL', skey)
    redis.call('ZREM', index(KEYS[3], 'zset'), succ)
    if su then redis.call('ZREM', user_index(ARGV[2] .. 'u:' .. su), succ) end
    redis.call('PUBLISH', ARGV[4], 'del:' .. succ)
    local tkey = ARGV[2] .. 't:' .. succ
    local nxt = redis.call('GET', tkey)
    redis.call('SET', tkey, '1', 'PX', ARGV[3])
    succ = nxt
    hops = hops + 1
  end
end
local u = nil
if redis.call('TYPE', KEYS[1]).ok == 'hash' then u = redis.call('HGET', KEYS[1], 'u') end
local existed = redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('ZREM', index(KEYS[3], 'zset'), ARGV[1])
if u then redis.call('ZREM', user_index(ARGV[2] .. 'u:' .. u), ARGV[1]) end
redis.call('PUBLISH', ARGV[4], 'del:' .. ARGV[1])
return existed
