-- One of a batch's items ended. KEYS[1] the batch's hash, KEYS[2] relay:events. ARGV: batch
-- id, request id, how it ended, now, events retention, keep ms. Changes nothing twice (a
-- completion read again after a crash), nor for a request id the batch does not wait for.
local B = KEYS[1]
if redis.call('SREM', B .. ':waiting', ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', B .. ':ended', ARGV[2], ARGV[3])
batch_finish(B, ARGV[1], KEYS[2], ARGV[5], ARGV[4], ARGV[6])
return 1
