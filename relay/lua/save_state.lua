-- Completes a save (relay/states.py), after the SET NX PX of the state's new pages in the same
-- pipeline: stores the manifest as an orphan with a TTL, so what a commit that never happens
-- wrote expires (the first reference, state_ref in states.lib.lua, makes it permanent). A page
-- or state that existed already was left as it is, but an orphan is kept at least `ttl` more:
-- the state being saved will refer to it.
-- KEYS: the state's hash, then the key of each page the caller wrote.
-- ARGV: ttl_ms, manifest, size (bytes of memory).
-- Returns {bytes of manifest written (0 when the state existed), then the 1-based positions in
-- KEYS of the pages that are gone (expired since their SET: the caller writes them again)}.
local ttl = tonumber(ARGV[1])
local reply = {0}

local function keep(key)
  local left = redis.call('PTTL', key)
  if left >= 0 and left < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
  return left ~= -2
end

for i = 2, #KEYS do
  if not keep(KEYS[i]) then
    reply[#reply + 1] = i
  end
end
if not keep(KEYS[1]) then
  redis.call('HSET', KEYS[1], 'manifest', ARGV[2], 'size', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  reply[1] = #ARGV[2]
end
return reply
