-- Emits `execution_started` only while the execution has no result.
local record = redis.call('HMGET', KEYS[1], 'principal', 'result')
if not record[1] or record[2] then
  return 0
end
if redis.call('HSETNX', KEYS[1], 'started', '1') == 1 then
  redis.call('DECR', KEYS[3])
end
redis.call('HSET', KEYS[1], 'status', 'running', 'executor', ARGV[1])
redis.call('RPUSH', KEYS[1] .. ':events',  -- the execution's index (accept.lua)
           redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[2], 'user',
                      record[1]))
return 1
