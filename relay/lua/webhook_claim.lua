-- Takes up to ARGV[3] deliveries due by ARGV[1] (ms): each is pushed to ARGV[2], its lease, so
-- no other deliverer takes it while this one sends it, and one that dies mid-attempt leaves it
-- to be taken again when the lease ends. Returns {the earliest due time left or '', {id, url,
-- principal, body, log, attempt}, ...}; a delivery whose hash is gone (expired, or finished by
-- a peer whose lease had run out) is dropped from the set instead.
-- KEYS: the due set. ARGV[4]: the start of a delivery's hash key (relay.keys.Keys.webhook).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local taken = {}
for _, id in ipairs(ids) do
  local fields = redis.call('HMGET', ARGV[4] .. id, 'url', 'principal', 'body', 'log', 'attempt')
  if fields[1] and fields[3] then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(taken, {id, fields[1], fields[2], fields[3], fields[4], fields[5]})
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {first[2] or '', taken}
