-- KEYS: session, active, tombstone, this node's refusals (`count_refusal`)
-- ARGV: at, ttl_ms, max_lifetime_ms, id, replay, requests to count, origin field, operation id,
--       the node's floor (see `claim` in the prelude)
-- Returns the new request count, 0 when the session is gone, -1 when a
-- replayed touch meets a tombstone, -2 when the record is corrupt, -3 when
-- this operation id was already applied (on every path: a late live command
-- after its replay is refused as surely as a replay after it). The request path reads the record back
-- with HGETALL in the same MULTI: a Lua HGETALL (turning every field into a
-- Lua string and back) cost Redis more than the rest of the script.
local cur = redis.call('HMGET', KEYS[1], 'c', 'e', 'a', 'n', ARGV[7])
if not cur[1] then
  if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
  return 0
end
local at, c, e, a = tonumber(ARGV[1]), tonumber(cur[1]), tonumber(cur[2]), tonumber(cur[3])
-- -2: not a record a node wrote (it must count with these; HINCRBY needs an
-- integer string)
if not (c and e and a and cur[4] and string.match(cur[4], '^%d+$')) then return -2 end
local mark = claim(cur[5], tonumber(ARGV[8]), tonumber(ARGV[9]))
if not mark then
  count_refusal(KEYS[4], ARGV[3])
  return -3
end
if ARGV[5] ~= '1' and e <= at then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', index(KEYS[2], 'zset'), ARGV[4])
  return 0
end
local ne = math.min(at + tonumber(ARGV[2]), c + tonumber(ARGV[3]))
local n = redis.call('HINCRBY', KEYS[1], 'n', tonumber(ARGV[6]))
local set = {}
if at > a then set[1] = 'a'; set[2] = ARGV[1] end
set[#set + 1] = ARGV[7]; set[#set + 1] = mark
redis.call('HSET', KEYS[1], unpack(set))
-- the expiry slides in steps of at least a second: most touches then skip
-- three writes (and the sorted-set update). '%.0f', not '%d': Lua's %d goes
-- through a C long, 32 bits on a 32-bit Redis (a Pi on armv7).
if ne >= e + 1000 then
  redis.call('HSET', KEYS[1], 'e', string.format('%.0f', ne))
  redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', ne))
  redis.call('ZADD', index(KEYS[2], 'zset'), string.format('%.0f', ne), ARGV[4])
end
-- A read after the writes: Redis forgets who tracks a key whenever it is
-- written, even for the writer under NOLOOP, so the near cache's connection
-- (see tracking.rs) must read the key again to keep hearing of changes.
redis.call('EXISTS', KEYS[1])
return n
