-- Creates a session (or a branch of a snapshot: with a state), only while its module exists;
-- the module is then held (it cannot be deleted while a session or snapshot uses it).
-- KEYS: session hash, the principal's sessions, the expiry index, module hash, module holds.
-- ARGV: prefix, session_id, principal, cid, environment, created_at, ttl, budget_gas,
-- budget_time, budget_calls, state_cid, state_size, the most sessions the principal may hold.
-- Returns the expiry time (ms), 0 when the module is gone, -1 when the state is (state_ref,
-- states.lib.lua: a state dropped, or an orphan that expired, since it was read), -2 when the
-- principal holds as many sessions as it may.
if redis.call('EXISTS', KEYS[4]) == 0 then
  return 0
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[13]) then
  return -2
end
if not state_ref(ARGV[1], ARGV[11]) then
  return -1
end
local now = redis.call('TIME')
local created = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires = created + tonumber(ARGV[7])
redis.call('HSET', KEYS[1], 'principal', ARGV[3], 'cid', ARGV[4], 'environment', ARGV[5],
           'created_at', ARGV[6], 'created_ms', created, 'ttl', ARGV[7], 'expires_ms', expires,
           'budget_gas', ARGV[8], 'budget_time', ARGV[9], 'budget_calls', ARGV[10],
           'gas_used', 0, 'time_used', 0, 'calls', 0, 'accepted', 0,
           'state_cid', ARGV[11], 'state_size', ARGV[12])
redis.call('ZADD', KEYS[2], created, ARGV[2])
redis.call('ZADD', KEYS[3], expires, ARGV[2])
redis.call('INCR', KEYS[5])
return expires
