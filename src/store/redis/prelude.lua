-- Derived index keys that another tool overwrote with a value of another type
-- are dropped and rebuilt from here on, rather than failing every operation
-- that touches them (and a replayed create with them).
local function index(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= kind and t ~= 'none' then redis.call('DEL', key) end
  return key
end

-- The active index's score for an expiry `e`: rounded up to a step of a
-- thousandth of the absolute lifetime (10 min of 7 days, at least a second).
-- A touch that slides the expiry within the same step leaves the index
-- alone: the sorted-set update on an index of every live session was the
-- costliest command of a touch (~5.5 µs on 100 000 members, plus its TYPE
-- check and two calls from Lua), and a session used every few minutes slid
-- its expiry, and so updated it, on every use. The count then includes
-- sessions expired less than one step ago; never one that is alive
-- (the score is never below the stored expiry).
local function index_score(e, lifetime)
  local step = math.max(1000, math.floor(tonumber(lifetime) / 1000))
  return string.format('%.0f', math.ceil(tonumber(e) / step) * step)
end

-- A user's index: a sorted set of session ids scored by creation time. A set
-- (the layout of 0.1.0) is converted when small (score 0: created before the
-- upgrade) and dropped when not: only the unbounded anonymous index of 0.1.0
-- is that large, and anonymous sessions are no longer indexed.
local function user_index(key)
  local t = redis.call('TYPE', key).ok
  if t == 'zset' or t == 'none' then return key end
  if t == 'set' and redis.call('SCARD', key) <= 256 then
    local ids = redis.call('SMEMBERS', key)
    redis.call('DEL', key)
    for _, id in ipairs(ids) do redis.call('ZADD', key, 0, id) end
    return key
  end
  redis.call('DEL', key)
  return key
end

-- Keeps a user at `max` sessions: the oldest beyond it are deleted (with a
-- tombstone and an event, like a DELETE). Bounded: a create adds one.
local function evict_over(ukey, max, prefix, lifetime, channel, active)
  local n = redis.call('ZCARD', ukey)
  if n <= max then return end
  for _, id in ipairs(redis.call('ZRANGE', ukey, 0, n - max - 1)) do
    redis.call('DEL', prefix .. 's:' .. id)
    redis.call('SET', prefix .. 't:' .. id, '1', 'PX', lifetime)
    redis.call('ZREM', index(active, 'zset'), id)
    redis.call('ZREM', ukey, id)
    redis.call('PUBLISH', channel, 'del:' .. id)
  end
end

-- The operation ids of one node applied to a record, in its `o:<origin>`
-- field: `<floor> <id> <id>...`. Every id at or below the floor is settled
-- (the node has its answer, or replayed it: it never sends it again but as a
-- duplicate); the ids listed are above the floor and applied. An id is
-- applied at most once whatever the path and the order of arrival: it is
-- refused when at or below the floor or listed. The caller's floor (the
-- lowest id the node still waits on, minus one) raises the record's and
-- drops the ids it covers, so the list holds only the few ids in flight.
-- A record of 0.2 holds a bare number: a floor with no ids.
local MAX_LISTED = 32
local function marks(mark)
  local f, ids, first = 0, {}, true
  if mark then
    for n in string.gmatch(mark, '%d+') do
      if first then f = tonumber(n); first = false else ids[#ids + 1] = tonumber(n) end
    end
  end
  return f, ids
end
local function render(f, ids)
  local out = {string.format('%.0f', f)}
  for _, n in ipairs(ids) do out[#out + 1] = string.format('%.0f', n) end
  return table.concat(out, ' ')
end
-- Returns the field's new value with `seq_s` applied, or nil when it was
-- applied already (a duplicate: the caller refuses it). `seq_s` and
-- `floor_s` are the operation id and the node's floor as the node sent
-- them (plain decimal; the floor may be absent).
local function claim(mark, seq_s, floor_s)
  local seq, floor = tonumber(seq_s), tonumber(floor_s)
  -- The usual mark, a floor and at most one id (a session used now and
  -- then): decided without tables, the same answer as below, and written
  -- from the strings it was made of, with no number formatted (`%.0f` was
  -- the costliest step of a touch's Lua).
  local f1s, ones = string.match(mark or '0', '^(%d+) ?(%d*)$')
  if f1s then
    local f1, one = tonumber(f1s), tonumber(ones)
    if seq <= f1 or one == seq then return nil end
    local nf = math.max(f1, floor or 0)
    -- nf is the record's floor or the node's, whichever is higher.
    local nfs = (floor and floor > f1) and floor_s or f1s
    if one and one > nf then return nfs .. ' ' .. ones .. ' ' .. seq_s end
    return nfs .. ' ' .. seq_s
  end
  local f, ids = marks(mark)
  if seq <= f then return nil end
  for _, n in ipairs(ids) do if n == seq then return nil end end
  local nf = math.max(f, floor or 0)
  local kept = {}
  for _, n in ipairs(ids) do if n > nf then kept[#kept + 1] = n end end
  kept[#kept + 1] = seq
  -- Bounded: beyond MAX_LISTED ids in flight at once on one session, the
  -- lowest settles into the floor.
  if #kept > MAX_LISTED then
    table.sort(kept)
    nf = math.max(nf, kept[1])
    table.remove(kept, 1)
  end
  return render(nf, kept)
end
-- A refusal, counted where its node can read it: `dups:<origin>` (a hash,
-- field `n`). The late copy of a command usually arrives on a connection its
-- node closed long ago (that is why it is late), so nobody reads the script's
-- answer; the node reads this counter instead (see `refusals.rs`). One small
-- key per node, whose ids are in no session a lifetime after its last
-- refusal: it lapses then. Never an error (pcall; a key of another type is
-- dropped): a refused duplicate must stay refused, not fail.
local function count_refusal(key, lifetime)
  index(key, 'hash')
  redis.pcall('HINCRBY', key, 'n', 1)
  redis.pcall('PEXPIRE', key, lifetime)
end
-- The field's value with its floor raised to at least `floor`.
local function raise(mark, floor)
  local f, ids = marks(mark)
  local nf = math.max(f, floor)
  local kept = {}
  for _, n in ipairs(ids) do if n > nf then kept[#kept + 1] = n end end
  return render(nf, kept)
end
