-- Deletes a session whose idle time is over, with what it alone held: its reference to its
-- state (state_unref, states.lib.lua) and its hold on its module. A session with a call still
-- queued or running is not idle: its expiry moves on by its ttl.
-- KEYS: session hash, its calls, its history, the expiry index.
-- ARGV: prefix, session_id.
-- Returns 1 deleted, 0 not (yet).
local s = redis.call('HMGET', KEYS[1], 'principal', 'expires_ms', 'state_cid', 'cid', 'ttl')
if not s[1] then
  redis.call('ZREM', KEYS[4], ARGV[2])
  return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(s[2]) > now_ms then
  redis.call('ZADD', KEYS[4], s[2], ARGV[2])
  return 0
end
if redis.call('LLEN', KEYS[2]) > 0 then
  local later = now_ms + tonumber(s[5])
  redis.call('HSET', KEYS[1], 'expires_ms', later)
  redis.call('ZADD', KEYS[4], later, ARGV[2])
  return 0
end
state_unref(ARGV[1], s[3] or '')
local holds = ARGV[1] .. ':module-holds:' .. s[4]
if redis.call('DECR', holds) <= 0 then
  redis.call('DEL', holds)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', ARGV[1] .. ':sessions:' .. s[1], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
