-- Rotates a principal's webhook signing secret: the current one becomes the previous one
-- (deliveries are signed by both during the grace period from ARGV[2], ms).
-- KEYS: the principal's secret hash. ARGV: the new secret, now (ms).
local current = redis.call('HGET', KEYS[1], 'current')
if current then
  redis.call('HSET', KEYS[1], 'previous', current, 'rotated_ms', ARGV[2])
end
redis.call('HSET', KEYS[1], 'current', ARGV[1])
return 1
