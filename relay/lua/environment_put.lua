-- Stores the environment ARGV[1] (its JSON, ARGV[2]) in the hash KEYS[1] and raises its version
-- in the hash KEYS[2], at once, so two PUTs never share a version. A shipped environment
-- (ARGV[3] '1') exists at version 1 before it is ever stored. ARGV[4]: the version the caller
-- read ('' for any), refused as {'conflict', current} when it is no longer the current one.
-- ARGV[5]: most environments stored; one more new one is {'full', 0}. Returns {'ok', version}.
local shipped = ARGV[3] == '1'
local exists = shipped or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
-- A deleted environment keeps its version here, so one made again under its name goes on
-- from it rather than reusing a version (memoized results are keyed by name and version).
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or (shipped and '1' or '0'))
if ARGV[4] ~= '' and (not exists or current ~= tonumber(ARGV[4])) then
  return {'conflict', exists and current or 0}
end
if not exists and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then
  return {'full', 0}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], current + 1)
return {'ok', current + 1}
