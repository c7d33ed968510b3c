local chain = KEYS[#KEYS]
local cursor = KEYS[#KEYS - 1]
if #KEYS >= 2 and string.sub(chain, 1, #cursor + 7) == cursor .. ':chain:' then
  local prev, own = string.match(string.sub(chain, #cursor + 8), '^([^:]*):(.*)$')
  if redis.call('GET', cursor) ~= prev then return -9 end
  local r = body()
  redis.call('SET', cursor, own, 'PX', 600000)
  return r
end
return body()
