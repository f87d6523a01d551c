-- Stores a batch whose items were admitted. KEYS[1] its hash, KEYS[2] relay:events.
-- ARGV: batch id, principal, created_at, total, items (JSON), keep ms, events retention,
-- callback url, callback events (JSON or ''), then (request id, how it ended or '') for each
-- accepted item: an item already ended (a replay) is ended here, the others wait.
local B = KEYS[1]
redis.call('HSET', B, 'principal', ARGV[2], 'created_at', ARGV[3], 'total', ARGV[4],
           'items', ARGV[5], 'status', 'running', 'callback_url', ARGV[8],
           'callback_events', ARGV[9])
for i = 10, #ARGV, 2 do
  if ARGV[i + 1] ~= '' then
    redis.call('HSET', B .. ':ended', ARGV[i], ARGV[i + 1])
  elseif redis.call('HEXISTS', B .. ':ended', ARGV[i]) == 0 then
    redis.call('SADD', B .. ':waiting', ARGV[i])
  end
end
for _, key in ipairs({B, B .. ':waiting', B .. ':ended'}) do
  redis.call('PEXPIRE', key, ARGV[6])
end
batch_finish(B, ARGV[1], KEYS[2], ARGV[7], ARGV[3], ARGV[6])
return redis.call('HGET', B, 'status')
