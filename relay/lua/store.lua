-- Stores a module and counts it against its owner's quota, all or nothing: a module stored
-- already is left as it is (its first owner stays), one over the quota is not stored. Its
-- bytes are the binary's and its metadata's: both are kept.
-- KEYS: module hash, modules sorted set, the owner's usage hash.
-- ARGV: owner, wasm, meta, score (upload time), cid, max modules, max bytes.
-- Returns 1 stored, 0 stored already, {count, bytes} (the usage) when over the quota.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local used = redis.call('HMGET', KEYS[3], 'count', 'bytes')
local count, bytes = tonumber(used[1] or '0'), tonumber(used[2] or '0')
local size = #ARGV[2] + #ARGV[3]
if count + 1 > tonumber(ARGV[6]) or bytes + size > tonumber(ARGV[7]) then
  return {count, bytes}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'wasm', ARGV[2], 'meta', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('HINCRBY', KEYS[3], 'count', 1)
redis.call('HINCRBY', KEYS[3], 'bytes', size)
return 1
