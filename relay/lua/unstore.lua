-- Deletes a module, only while it is the owner's the caller checked (a gateway's view may be
-- stale: deleted and uploaded again by another), no glyph name points at it and no live session
-- or snapshot holds it (they count themselves in its holds); gives its bytes back to the
-- owner's quota.
-- KEYS: module hash, modules sorted set, its names set, the owner's usage hash, its holds.
-- ARGV: owner, cid.
-- Returns {'deleted'}, {'missing'}, {'owner', <owner>}, {'named', <name@tag>...} or
-- {'held', <holds>}.
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  return {'missing'}
end
if owner ~= ARGV[1] then
  return {'owner', owner}
end
local names = redis.call('SMEMBERS', KEYS[3])
if #names > 0 then
  table.sort(names)
  table.insert(names, 1, 'named')
  return names
end
local holds = tonumber(redis.call('GET', KEYS[5]) or '0')
if holds > 0 then
  return {'held', tostring(holds)}
end
local size = redis.call('HSTRLEN', KEYS[1], 'wasm') + redis.call('HSTRLEN', KEYS[1], 'meta')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('HINCRBY', KEYS[4], 'count', -1) <= 0 then
  redis.call('DEL', KEYS[4])
else
  redis.call('HINCRBY', KEYS[4], 'bytes', -size)
end
return {'deleted'}
