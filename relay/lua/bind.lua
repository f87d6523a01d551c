-- Binds (or moves) name@tag to a stored module, keeping each module's set of names current, so
-- a module is never deleted while a name points at it. The first principal to bind a name owns
-- it. The caller read the tag's current CID to name its set's key: if the tag moved since,
-- nothing is done and it reads again.
-- KEYS: module hash, name owners hash, the name's hash, the module's names set, the names set
--       of the module the tag pointed at (any key when it pointed at none).
-- ARGV: name, tag, cid, principal, the CID the tag pointed at ('' for none).
-- Returns 'bound', 'missing' (no such module), 'taken' (another's name) or 'moved'.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'missing'
end
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner and owner ~= ARGV[4] then
  return 'taken'
end
local current = redis.call('HGET', KEYS[3], ARGV[2]) or ''
if current ~= ARGV[5] then
  return 'moved'
end
local binding = ARGV[1] .. '@' .. ARGV[2]
if current ~= '' then
  redis.call('SREM', KEYS[5], binding)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[4], binding)
return 'bound'
