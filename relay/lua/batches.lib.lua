-- A batch (relay.batches): its hash B holds principal, total, items, status; B .. ':waiting' the
-- request ids of its items that have not ended, B .. ':ended' request id -> how each ended.

-- Ends the batch once no item is waiting: status, finished_at, the one `batch_complete`
-- event (to `events`, trimmed to `retention`), and every key's expiry.
local function batch_finish(B, bid, events, retention, now, keep_ms)
  if redis.call('SCARD', B .. ':waiting') > 0 then return end
  if redis.call('HGET', B, 'status') ~= 'running' then return end
  redis.call('HSET', B, 'status', 'completed', 'finished_at', now)
  local fields = redis.call('HMGET', B, 'principal', 'callback_url', 'total')
  emit_event(events, retention,
    '{"type":"batch_complete","batch_id":"' .. bid .. '","status":"completed","total":' ..
    fields[3] .. ',"timestamp":"' .. now .. '"}',
    fields[1], has_callback(fields[2]))
  for _, key in ipairs({B, B .. ':ended'}) do
    redis.call('PEXPIRE', key, keep_ms)
  end
end
