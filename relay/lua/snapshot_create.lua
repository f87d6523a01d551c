-- Snapshots a session: its last committed state (a call running now is not waited for), held by
-- a new reference (state_ref, states.lib.lua), its module, held as a session holds it, and its
-- environment (branches restored from it run in it too).
-- KEYS: the session hash, the snapshot hash, the principal's snapshots, the module's holds.
-- ARGV: prefix, snapshot_id, principal, session_id, cid (the session's, as the caller read it:
-- it never changes), created_at, the most snapshots the principal may keep, then the label if
-- there is one.
-- Returns {state_cid, size} ('' for a session never called: its module's fresh state), 0 when
-- the session is gone or another principal's, -1 when the principal keeps as many snapshots
-- as it may.
local s = redis.call('HMGET', KEYS[1], 'principal', 'cid', 'state_cid', 'state_size',
                     'environment')
if s[1] ~= ARGV[3] or s[2] ~= ARGV[5] then
  return 0
end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[7]) then
  return -1
end
local state_cid, size = s[3] or '', tonumber(s[4]) or 0
if not state_ref(ARGV[1], state_cid) then
  -- The session holds a reference to its state, so it cannot be gone: a broken invariant.
  return redis.error_reply('state ' .. state_cid .. ' of a session is not stored')
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'principal', ARGV[3], 'session_id', ARGV[4], 'cid', ARGV[5],
           'state_cid', state_cid, 'size', size, 'created_at', ARGV[6],
           'environment', s[5] or '')
if ARGV[8] then
  redis.call('HSET', KEYS[2], 'label', ARGV[8])
end
redis.call('ZADD', KEYS[3], tonumber(now[1]) * 1000000 + tonumber(now[2]), ARGV[2])
redis.call('INCR', KEYS[4])
return {state_cid, size}
