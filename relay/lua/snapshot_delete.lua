-- Deletes a snapshot with what it alone held: its reference to its state (state_unref,
-- states.lib.lua: the last one deletes the state and its pages no other state has) and its hold
-- on its module. Branches restored from it hold their own references, so they live on.
-- KEYS: the snapshot hash, the principal's snapshots, the module's holds.
-- ARGV: prefix, snapshot_id, principal, cid (the snapshot's, as the caller read it).
-- Returns 1 deleted, 0 when it is gone (deleted meanwhile) or another principal's.
local s = redis.call('HMGET', KEYS[1], 'principal', 'cid', 'state_cid')
if s[1] ~= ARGV[3] or s[2] ~= ARGV[4] then
  return 0
end
state_unref(ARGV[1], s[3] or '')
if redis.call('DECR', KEYS[3]) <= 0 then
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
