local chain = KEYS[#KEYS]
if #KEYS >= 2 and string.sub(chain, 1, 6) == 'chain:' then
  local prev, own = string.match(chain, '^chain:([^:]*):(.*)$')
  local cursor = KEYS[#KEYS - 1]
  if redis.call('GET', cursor) ~= prev then return -9 end
  local r = body()
  redis.call('SET', cursor, own, 'PX', 600000)
  return r
end
return body()
