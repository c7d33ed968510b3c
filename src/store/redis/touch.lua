-- One touch (see touch_one.lua).
-- KEYS: session, active, tombstone, this node's refusals
-- ARGV: at, ttl_ms, max_lifetime_ms, id, replay, requests to count, origin
--       field, operation id, the node's floor, slide step in ms
-- The request path that counts at once reads the record back with HGETALL
-- in the same MULTI: a Lua HGETALL (turning every field into a Lua string
-- and back) cost Redis more than the rest of the script.
return touch_one({ARGV[2], ARGV[3], ARGV[5], ARGV[7], ARGV[10],
    tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[10])},
  KEYS[1], KEYS[2], KEYS[4], KEYS[3], ARGV[1], ARGV[4], ARGV[6], ARGV[8], ARGV[9])
