-- Stores a state's new pages and its manifest as orphans (relay/states.py): each with a TTL, so
-- what a commit that never happens wrote expires; the first reference (state_ref,
-- states.lib.lua) makes them permanent. A page or state that exists already is left as it is,
-- but an orphan is kept at least `ttl` more: the state being saved will refer to it.
-- KEYS: the state's hash, then the key of each page.
-- ARGV: ttl_ms, manifest ('' writes only the pages: a large state is sent in several calls),
-- size (bytes of memory), then each page's compressed bytes, in KEYS' order.
-- Returns the bytes it wrote (pages and manifest that were not there).
local ttl = tonumber(ARGV[1])
local written = 0

local function keep(key)
  local left = redis.call('PTTL', key)
  if left >= 0 and left < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

for i = 2, #KEYS do
  local page = ARGV[i + 2]
  if redis.call('SET', KEYS[i], page, 'NX', 'PX', ttl) then
    written = written + #page
  else
    keep(KEYS[i])
  end
end
if ARGV[2] ~= '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    keep(KEYS[1])
  else
    redis.call('HSET', KEYS[1], 'manifest', ARGV[2], 'size', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ttl)
    written = written + #ARGV[2]
  end
end
return written
