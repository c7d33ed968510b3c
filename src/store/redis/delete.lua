-- KEYS: session, tombstone, active; ARGV: id, prefix, max_lifetime_ms, channel
-- (a key that is not a hash is not a node's record: it is deleted all the same)
local u = nil
if redis.call('TYPE', KEYS[1]).ok == 'hash' then u = redis.call('HGET', KEYS[1], 'u') end
local existed = redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('ZREM', index(KEYS[3], 'zset'), ARGV[1])
if u then redis.call('ZREM', user_index(ARGV[2] .. 'u:' .. u), ARGV[1]) end
redis.call('PUBLISH', ARGV[4], 'del:' .. ARGV[1])
return existed
