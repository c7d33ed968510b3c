-- touch_one(s, k, at, id, count, seq, floor): counts requests on one session
-- and slides its expiry.
-- s (shared by a batch): ttl_ms, max_lifetime_ms, replay ('1'), origin
--   field, the expiry's slide step in ms, then ttl_ms, max_lifetime_ms and
--   the slide step as numbers (parsed once a batch: turning a string into
--   a number is a `strtod` each time)
-- k: the session's key; then active index, this node's refusals
--   (`count_refusal`), the session's tombstone (read on replay only)
-- at: the use's time; id: the session id; count: requests to count;
-- seq, floor: the operation id and the node's floor (see `claim`)
-- Returns the new request count, 0 when the session is gone, -1 when a
-- replayed touch meets a tombstone, -2 when the record is corrupt, -3 when
-- this operation id was already applied (on every path: a late live command
-- after its replay is refused as surely as a replay after it).
-- Kept apart from the scripts that call it (touch.lua, touch_many.lua).
-- Plain positional arguments, no table per session: each call into Redis
-- from Lua costs about as much as the command itself (measured in a batch
-- of 100 on the 2-core box: ~13 µs per session, of which the id's claim
-- ~3.5 before its fast path). Numbers the node sent are written back as
-- the strings it sent, not formatted again: with the batch's shared
-- numbers parsed once, that took a batch of 256 from 13.0 to 9.8 µs a
-- session (medians of 6, lab Redis of 100 000 records).
local function touch_one(s, k, active, dups, tomb, at, id, count, seq, floor)
  local cur = redis.call('HMGET', k, 'c', 'e', 'a', 'n', s[4])
  if not cur[1] then
    if s[3] == '1' and redis.call('EXISTS', tomb) == 1 then return -1 end
    return 0
  end
  local c, e, a = tonumber(cur[1]), tonumber(cur[2]), tonumber(cur[3])
  local at_s = at
  at = tonumber(at)
  -- -2: not a record a node wrote (it must count with these; HINCRBY needs an
  -- integer string)
  if not (c and e and a and cur[4] and string.match(cur[4], '^%d+$')) then return -2 end
  local mark = claim(cur[5], seq, floor)
  if not mark then
    count_refusal(dups, s[2])
    return -3
  end
  if s[3] ~= '1' and e <= at then
    redis.call('DEL', k)
    redis.call('ZREM', index(active, 'zset'), id)
    return 0
  end
  local ne = math.min(at + s[6], c + s[7])
  -- HINCRBY, not a sum in Lua: exact 64-bit integers, and an overflow is
  -- Redis's error, not a rounded double. (Folding the count into the HSET
  -- below measured no cheaper: 20.7 against 20.9 µs a session.)
  local n = redis.call('HINCRBY', k, 'n', count)
  -- The expiry slides in steps (s[5]: a thousandth of the idle TTL, at
  -- least a second; 86 s of 24 h): most touches of a session used often
  -- skip it. The active index moves only when the expiry leaves its own,
  -- coarser step (`index_score`): that update (a ZADD on an index of every
  -- live session, and its TYPE check) was 8 of the 29 µs a touch cost
  -- Redis when every use slid. '%.0f', not '%d': Lua's %d goes through a
  -- C long, 32 bits on a 32-bit Redis (a Pi on armv7). The use's time is
  -- written as the node sent it.
  local ats = at > a and at_s
  if ne >= e + s[8] then
    local nes = string.format('%.0f', ne)
    if ats then
      redis.call('HSET', k, 'a', ats, s[4], mark, 'e', nes)
    else
      redis.call('HSET', k, s[4], mark, 'e', nes)
    end
    redis.call('PEXPIREAT', k, nes)
    local score = index_score(ne, s[2])
    if score ~= index_score(e, s[2]) then
      redis.call('ZADD', index(active, 'zset'), score, id)
    end
  elseif ats then
    redis.call('HSET', k, 'a', ats, s[4], mark)
  else
    redis.call('HSET', k, s[4], mark)
  end
  return n
end
