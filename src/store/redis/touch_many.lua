-- The counts of many sessions in one call (the write-behind): one script
-- call's fixed cost (the call, the prelude) shared by the batch. On the
-- near cache's tracking connection it runs without `CLIENT CACHING YES`
-- before it (the connection tracks in OPTIN mode), so its reads track
-- nothing: Redis 7.0 would otherwise remember every key the call names on
-- each read inside it (n² for a batch). See tracking.rs for how the keys
-- are tracked again.
-- KEYS: active, this node's refusals, then per session: its key, its tombstone
-- ARGV: ttl_ms, max_lifetime_ms, replay, origin field, slide step in ms,
--       then per session: at, id, requests to count, operation id, floor
-- Returns each session's answer, as touch_one gives it, in order.
local shared = {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5])}
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local j = 5 + (i - 1) * 5
  -- pcall: a key another tool overwrote with another type is that
  -- session's answer (-2, corrupt), not an error for the whole batch. Any
  -- other error (OOM, READONLY, MISCONF, an overflowing count) is the
  -- batch's: raised again, so the node holds every id of it in doubt and
  -- journals them (what this call applied carries its claim: a replay
  -- skips it).
  local ok, r = pcall(touch_one, shared, KEYS[1 + 2 * i], KEYS[1], KEYS[2], KEYS[2 + 2 * i],
    ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4], ARGV[j + 5])
  if ok then
    out[i] = r
  elseif type(r) == 'table' and r.err and string.find(r.err, '^WRONGTYPE') then
    out[i] = -2
  else
    error(r)
  end
end
return out
