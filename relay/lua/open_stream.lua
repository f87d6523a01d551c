-- Takes one of a principal's places for an event stream, unless all ARGV[2] are taken. KEYS[1]
-- holds the principal's open streams on every gateway, each scored by when its lease ends;
-- leases that ended (a gateway that died with streams open) are dropped first. Counting and
-- adding are one step, so opens racing on several gateways never pass the cap together. Redis's
-- clock, so gateways' clocks need not agree. Returns 1 taken, 0 all taken.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
