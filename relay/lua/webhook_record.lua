-- Records one attempt of a delivery: appended to its owner's log, then the delivery is due
-- again at ARGV[4] (ms), or finished when ARGV[4] is ''. An attempt recorded already (a
-- deliverer whose lease ran out while it sent, and a peer sent again) is only logged.
-- KEYS: the delivery's hash, the due set, the log. ARGV: delivery id, attempt, the log entry,
-- next due or '', TTL (ms).
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[3] .. ':owner', ARGV[5])  -- webhook_queue.lua's owner key
if tonumber(ARGV[2]) <= tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') then
  return 0
end
redis.call('HSET', KEYS[1], 'attempt', ARGV[2])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], 'body')
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return 1
