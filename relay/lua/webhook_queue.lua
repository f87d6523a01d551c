-- Queues one webhook delivery (relay.webhooks), unless it exists already: the event that makes
-- it may be handled twice (a consumer died before acknowledging it), its delivery made once.
-- KEYS: the delivery's hash, the due set, its owner's log key + ':owner'.
-- ARGV: delivery id, url, principal, body, log key, due (ms), TTL (ms).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'url', ARGV[2], 'principal', ARGV[3], 'body', ARGV[4],
           'log', ARGV[5], 'attempt', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return 1
