-- Sets fields of a session (closing it, its budget) only while it exists and is the caller's:
-- checked and written at once, so a write never lands on a session the expiry sweep deleted
-- meanwhile (it would create a hash without an owner, which nothing ever deletes).
-- KEYS: the session hash.
-- ARGV: principal, '1' when a closed session may be changed too, then field, value, ...
-- Returns 'ok', 'gone' (no such session, or another principal's) or 'closed'.
local s = redis.call('HMGET', KEYS[1], 'principal', 'closed')
if s[1] ~= ARGV[1] then
  return 'gone'
end
if ARGV[2] ~= '1' and s[2] == '1' then
  return 'closed'
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 'ok'
