-- Takes up to ARGV[3] deliveries due by ARGV[1] (ms): each is pushed to ARGV[2], its lease, so
-- no other deliverer takes it while this one sends it, and one that dies mid-attempt leaves it
-- to be taken again when the lease ends. Returns {the earliest due time left or '', ids}.
-- KEYS: the due set.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {first[2] or '', ids}
