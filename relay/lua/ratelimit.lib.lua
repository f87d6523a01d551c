-- Rate limits (relay.pipeline.ratelimit): a fixed window per principal at `key`, opened by its
-- first request. Adds `amount` requests; returns the window's count after, and the ms it has
-- left.
local function rate_count(key, amount, window_ms)
  local count = redis.call('INCRBY', key, amount)
  local left = redis.call('PTTL', key)
  if left < 0 then  -- this count opened the window
    redis.call('PEXPIRE', key, window_ms)
    left = tonumber(window_ms)
  end
  return count, left
end
